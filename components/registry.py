"""MLflow model registry: `gencls-<dataset>` versions and the gated `champion` alias.

    gencls registry show --dataset trec6
    gencls promote --dataset trec6 --version 3 --reason "better on the new test set"
    gencls rollback --dataset trec6

Gate (``register_and_gate``): a new version takes the alias ``champion`` only when it
strictly beats the current champion on the *same* test set: higher accuracy, or equal
accuracy and higher macro-F1; a full tie keeps the current champion. "Same test set" is
checked by a hash of test.jsonl + labels.yaml stored as a tag on every version: when the
hashes differ the gate refuses (decision ``refused-different-test-set``) rather than
compare numbers from different data; re-evaluate the champion on the new test set and
register again, or promote by hand. Every decision, with both figures, is written as tags
on the version and on the run, and appended to the registered model's
``champion_history`` tag (also used by ``rollback``).

Concurrency: the read-compare-set sequence runs under a file lock
(``<root>/mlflow/registry-<dataset>.lock``) and re-reads the champion after acquiring it,
so two runs finishing at once end with the better one as champion, never a missing or
worse version. The lock is per machine, which matches the local sqlite store.
"""
from __future__ import annotations

import getpass
import hashlib
import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from components import tracking

ALIAS = "champion"
HISTORY_TAG = "champion_history"
HISTORY_KEEP = 40  # entries kept in the history tag (tag values are limited in size)
LOCK_TIMEOUT_S = 120


class RegistryError(RuntimeError):
    """A registry operation cannot be done; the message says why."""


def model_name(dataset: str) -> str:
    """Registered model name of a dataset: ``gencls-<dataset>``."""
    return f"gencls-{dataset}"


def test_set_hash(dataset: str, data_dir: str | Path | None = None) -> str:
    """sha256 over the dataset's test.jsonl and labels.yaml (what "same test set" means)."""
    from components.config import data_dir as default_data_dir

    folder = Path(data_dir or default_data_dir()) / dataset
    digest = hashlib.sha256()
    for name in ("test.jsonl", "labels.yaml"):
        path = folder / name
        if not path.exists():
            raise RegistryError(f"{path}: not found; build the dataset first (gencls data build --datasets {dataset})")
        digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


@contextmanager
def _alias_lock(dataset: str) -> Iterator[None]:
    """Machine-wide lock around read-compare-set of one model's alias."""
    from filelock import FileLock

    folder = tracking.mlflow_dir()
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder / f"registry-{dataset}.lock"), timeout=LOCK_TIMEOUT_S):
        yield


def _figures(version: Any) -> tuple[float, float] | None:
    """(accuracy, macro_f1) from a version's tags, or None when missing."""
    try:
        return float(version.tags["accuracy"]), float(version.tags["macro_f1"])
    except (KeyError, TypeError, ValueError):
        return None


def current_champion(dataset: str) -> Any | None:
    """The champion ModelVersion, or None (no alias, or it points at a deleted version)."""
    c = tracking.client()
    try:
        version = c.get_model_version_by_alias(model_name(dataset), ALIAS)
    except Exception:
        return None
    if version is None or getattr(version, "status", "READY") != "READY":
        return None
    return version


def read_history(dataset: str) -> list[dict]:
    """The champion history (oldest first) from the registered model's tag."""
    c = tracking.client()
    try:
        raw = c.get_registered_model(model_name(dataset)).tags.get(HISTORY_TAG, "[]")
        return json.loads(raw)
    except Exception:
        return []


def champion_stack(history: list[dict]) -> list[str]:
    """The champions a rollback walks back through (oldest first): each promotion pushes its
    version, each rollback pops the one it left, so a second rollback goes further back.

    Example:
        >>> champion_stack([{"version": "1"}, {"version": "2"}, {"version": "3"},
        ...                 {"version": "2", "kind": "rollback"}])
        ['1', '2']
    """
    stack: list[str] = []
    for entry in history:
        if entry.get("kind") == "rollback":
            if stack:
                stack.pop()
            if not stack or stack[-1] != entry["version"]:
                stack.append(entry["version"])
        else:
            stack.append(entry["version"])
    return stack


def _set_champion(dataset: str, version: str, by: str, reason: str, figures: dict | None = None,
                  kind: str = "promotion") -> None:
    """Move the alias and append to the history (caller holds the lock)."""
    c = tracking.client()
    name = model_name(dataset)
    c.get_model_version(name, str(version))  # raises if the version does not exist
    c.set_registered_model_alias(name, ALIAS, str(version))
    entry = {"version": str(version), "at": time.strftime("%Y-%m-%dT%H:%M:%S"), "by": by, "reason": reason,
             "kind": kind}
    if figures:
        entry.update(figures)
    history = (read_history(dataset) + [entry])[-HISTORY_KEEP:]
    while len(json.dumps(history)) > 4500 and len(history) > 2:
        history = history[1:]
    c.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))


def decide(candidate: tuple[float, float], champion: tuple[float, float] | None) -> tuple[bool, str]:
    """Gate rule: (promote?, reason). Strictly better accuracy, tie broken by macro-F1."""
    if champion is None:
        return True, "no champion yet"
    (acc, f1), (c_acc, c_f1) = candidate, champion
    if acc > c_acc:
        return True, f"accuracy {acc:.4f} > {c_acc:.4f}"
    if acc == c_acc and f1 > c_f1:
        return True, f"accuracy tie {acc:.4f}, macro_f1 {f1:.4f} > {c_f1:.4f}"
    if acc == c_acc and f1 == c_f1:
        return False, f"tie (accuracy {acc:.4f}, macro_f1 {f1:.4f}): champion kept"
    return False, f"not better: accuracy {acc:.4f} vs champion {c_acc:.4f}, macro_f1 {f1:.4f} vs {c_f1:.4f}"


def create_version(run_id: str, dataset: str, metrics: dict, test_hash: str, model_uri: str | None = None) -> Any:
    """Register the run's logged model as a new version of ``gencls-<dataset>``, tagged with its figures."""
    import mlflow

    tracking.client()  # configures the fluent registry URI
    c = tracking.client()
    run = c.get_run(run_id)
    tags = {"accuracy": str(float(metrics["accuracy"])), "macro_f1": str(float(metrics["macro_f1"])),
            "test_set_hash": test_hash, "dataset": dataset, "strategy": run.data.tags.get("strategy", "")}
    return mlflow.register_model(model_uri or f"runs:/{run_id}/model", model_name(dataset), tags=tags,
                                 await_registration_for=60)


def register_and_gate(run_id: str, dataset: str, metrics: dict, test_set_hash: str,
                      model_uri: str | None = None) -> dict:
    """Create a version from the run's logged model and move `champion` only if it is better.

    Args:
        run_id: MLflow run that logged the pyfunc model.
        dataset: Dataset name (registered model ``gencls-<dataset>``).
        metrics: Evaluation metrics of the candidate (needs accuracy and macro_f1).
        test_set_hash: ``test_set_hash(dataset)`` of the data the metrics were computed on.
        model_uri: The logged model (``model_info.model_uri``); default ``runs:/<run_id>/model``.

    Returns:
        {"model", "version", "promoted", "decision", "reason", "candidate": {...}, "champion": {...} | None}
    """
    version = create_version(run_id, dataset, metrics, test_set_hash, model_uri)
    candidate = (float(metrics["accuracy"]), float(metrics["macro_f1"]))
    with _alias_lock(dataset):
        champ = current_champion(dataset)  # re-read under the lock
        champ_figures = _figures(champ) if champ is not None else None
        if champ is not None and champ_figures is None:
            champ = None  # a champion without figures cannot be compared; treat as none
        if champ is not None and champ.tags.get("test_set_hash") != test_set_hash:
            promoted, decision = False, "refused-different-test-set"
            reason = (f"champion v{champ.version} was evaluated on another test set "
                      f"({champ.tags.get('test_set_hash', '?')[:12]} vs {test_set_hash[:12]}); re-evaluate it "
                      f"and register again, or promote by hand")
        else:
            promoted, reason = decide(candidate, champ_figures)
            decision = "promoted" if promoted else "kept-champion"
        figures = {"candidate_accuracy": candidate[0], "candidate_macro_f1": candidate[1],
                   "champion_version": champ.version if champ is not None else None,
                   "champion_accuracy": champ_figures[0] if champ_figures else None,
                   "champion_macro_f1": champ_figures[1] if champ_figures else None}
        if promoted:
            _set_champion(dataset, version.version, by=f"gate (run {run_id})", reason=reason,
                          figures={"accuracy": candidate[0], "macro_f1": candidate[1]})
    _record_decision(run_id, dataset, version.version, decision, reason, figures)
    return {"model": model_name(dataset), "version": str(version.version), "run_id": run_id, "promoted": promoted,
            "decision": decision, "reason": reason,
            "candidate": {"accuracy": candidate[0], "macro_f1": candidate[1]},
            "champion": None if champ is None else {"version": str(champ.version), "accuracy": figures["champion_accuracy"],
                                                    "macro_f1": figures["champion_macro_f1"]}}


def _record_decision(run_id: str, dataset: str, version: str, decision: str, reason: str, figures: dict) -> None:
    """Write the gate decision and both figures as tags on the version and the run."""
    c = tracking.client()
    tags = {"gate.decision": decision, "gate.reason": reason,
            **{f"gate.{k}": "" if v is None else str(v) for k, v in figures.items()}}
    for key, value in tags.items():
        c.set_model_version_tag(model_name(dataset), str(version), key, value)
        c.set_tag(run_id, key, value)
    c.set_tag(run_id, "registered_version", str(version))


def promote(dataset: str, version: str | int, reason: str = "", by: str | None = None, force: bool = False) -> dict:
    """Manual promotion by a person: move `champion` to ``version``, recorded in the history.

    A version whose gate figures (accuracy, then macro-F1) are below the champion's is refused
    unless `force`; a forced move needs a reason, kept as the version's `promoted_by` and
    `forced_reason` tags.
    """
    by = by or getpass.getuser()
    c = tracking.client()
    try:
        mv = c.get_model_version(model_name(dataset), str(version))
    except Exception:
        raise RegistryError(f"{model_name(dataset)} has no version {version}; see `gencls registry show --dataset {dataset}`") from None
    if mv.status != "READY":
        raise RegistryError(f"{model_name(dataset)} v{version} is {mv.status}, not READY")
    with _alias_lock(dataset):
        before = current_champion(dataset)
        mine, theirs = _figures(mv), _figures(before) if before is not None else None
        worse = before is not None and str(before.version) != str(version) and mine is not None \
            and theirs is not None and mine < theirs
        if worse and not force:
            raise RegistryError(f"{model_name(dataset)} v{version} (accuracy {mine[0]:.4f}, macro-F1 {mine[1]:.4f}) "
                                f"is worse than champion v{before.version} (accuracy {theirs[0]:.4f}, macro-F1 "
                                f"{theirs[1]:.4f}); pass --force --reason '...' to promote it anyway")
        if worse and not reason.strip():
            raise RegistryError("a forced promotion of a worse version needs --reason (kept in the history)")
        note = reason or "manual promotion"
        _set_champion(dataset, str(version), by=by, reason=f"forced: {note}" if worse else note,
                      kind="forced-promotion" if worse else "promotion")
    c.set_model_version_tag(model_name(dataset), str(version), "promoted_by", f"{by}: {note}")
    if worse:
        c.set_model_version_tag(model_name(dataset), str(version), "forced_reason", note)
    return {"model": model_name(dataset), "version": str(version), "previous": str(before.version) if before else None,
            "by": by, "forced": worse}


def rollback(dataset: str, by: str | None = None, reason: str = "") -> dict:
    """Move `champion` back one step in its history: a second rollback goes further back, never forward."""
    by = by or getpass.getuser()
    c = tracking.client()
    with _alias_lock(dataset):
        current = current_champion(dataset)
        if current is None:
            raise RegistryError(f"{model_name(dataset)} has no champion to roll back from")
        stack = champion_stack(read_history(dataset))
        if stack and stack[-1] == str(current.version):
            stack.pop()
        previous = None
        for candidate in reversed(stack):
            if candidate == str(current.version):
                continue
            try:
                mv = c.get_model_version(model_name(dataset), candidate)
            except Exception:
                continue  # deleted since
            if mv.status == "READY":
                previous = candidate
                break
        if previous is None:
            raise RegistryError(f"{model_name(dataset)}: no earlier champion in the history to roll back to")
        _set_champion(dataset, previous, by=by, reason=reason or f"rollback from v{current.version}", kind="rollback")
    return {"model": model_name(dataset), "version": previous, "previous": str(current.version), "by": by}


def show(dataset: str) -> dict:
    """Versions (newest first) with figures and gate decisions, the champion and the history."""
    c = tracking.client()
    name = model_name(dataset)
    try:
        versions = c.search_model_versions(f"name='{name}'")
    except Exception:
        versions = []
    champ = current_champion(dataset)
    rows = [{"version": str(v.version), "accuracy": v.tags.get("accuracy"), "macro_f1": v.tags.get("macro_f1"),
             "decision": v.tags.get("gate.decision", ""), "run_id": v.run_id, "status": v.status,
             "champion": champ is not None and str(v.version) == str(champ.version)}
            for v in sorted(versions, key=lambda v: -int(v.version))]
    return {"model": name, "champion": str(champ.version) if champ else None, "versions": rows,
            "history": read_history(dataset)}
