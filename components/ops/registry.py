"""MLflow model registry: `gencls-<dataset>` versions and the gated `champion` alias.

    gencls registry show --dataset trec6
    gencls promote --dataset trec6 --version 3 --reason "better on the new test set"
    gencls rollback --dataset trec6

Gate (``register_and_gate``): the candidate and the current champion are both scored, as
served (their logged pyfunc models, each with its own prompt settings), on the same
validation slice of the training split that neither trained nor chose checkpoints on (the
SFT run's ``gate.json``; never the test split). The alias moves only when the candidate is
significantly better: a one-sided exact McNemar test on the examples where exactly one of
the two is right, p < ``register.alpha`` in conf/params.yaml (default 0.05). The test metrics
are tags for reporting only. A candidate whose adapter and prompt settings are identical
to an existing version registers nothing new (decision ``unchanged``). A champion that
was evaluated on another test set (hash of test.jsonl + labels.yaml, a tag on every
version) still refuses the comparison (``refused-different-test-set``). Every decision,
with both validation figures and the p-value, is written as tags on the version and on
the run, and appended to the registered model's ``champion_history`` tag.

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
from typing import Any, Callable, Iterator, Sequence

from components.ops import tracking
from components.ops.gate import DEFAULT_ALPHA, decide, mcnemar_p  # noqa: F401 (the gate's rule)

ALIAS = "champion"
ADAPTER_TAG = "adapter_sha256"  # adapter weights + prompt settings: equal hashes = the same served model
HISTORY_TAG = "champion_history"
HISTORY_KEEP = 40  # entries kept in the history tag (tag values are limited in size)
LOCK_TIMEOUT_S = 900  # the gate scores two models on the validation slice while holding the lock


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


def _figures(version: Any, other: Any = None) -> tuple[float, ...] | None:
    """The figures a manual promotion compares: validation accuracy on the gate slice when both
    versions were scored on the same one, else (test accuracy, macro-F1) from the tags; None when missing."""
    try:
        if other is not None and version.tags.get("gate_set") and version.tags.get("gate_set") == \
                other.tags.get("gate_set") and "gate.candidate_val_accuracy" in version.tags and \
                "gate.candidate_val_accuracy" in other.tags:
            return (float(version.tags["gate.candidate_val_accuracy"]),)
        return float(version.tags["accuracy"]), float(version.tags["macro_f1"])
    except (KeyError, TypeError, ValueError):
        return None


def _fmt(figures: tuple[float, ...]) -> str:
    return ", ".join(f"{x:.4f}" for x in figures)


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


def create_version(run_id: str, dataset: str, metrics: dict, test_hash: str, model_uri: str | None = None,
                   extra_tags: dict | None = None, description: str = "") -> Any:
    """Register the run's logged model as a new version of ``gencls-<dataset>``, tagged with its figures
    and what it is (``extra_tags``: base model, strategies, profile, data hash) and described in a paragraph."""
    import mlflow

    c = tracking.client()  # configures the fluent registry URI
    run = c.get_run(run_id)
    tags = {"accuracy": str(float(metrics["accuracy"])), "macro_f1": str(float(metrics["macro_f1"])),
            "test_set_hash": test_hash, "dataset": dataset, "strategy": run.data.tags.get("strategy", ""),
            **{k: str(v) for k, v in (extra_tags or {}).items()}}
    version = mlflow.register_model(model_uri or f"runs:/{run_id}/model", model_name(dataset), tags=tags,
                                    await_registration_for=60)
    if description:
        c.update_model_version(model_name(dataset), str(version.version), description=description)
    return version


def version_metadata(base: dict, train_strategy: str, inference_strategy: str, profile: str, data_hash: str,
                     metrics: dict, dataset: str) -> tuple[dict[str, str], str]:
    """(version tags, one-paragraph description) saying what a version is.

    Args:
        base: ``serving.base_model_reference`` (base_model, package, version, sha256).
        train_strategy, inference_strategy: prompt strategy slugs of SFT/RL and of serving.
        profile: the training profile (quick, full ...).
        data_hash: sha256 of the dataset's train/test/labels files.
        metrics: test metrics of the candidate (reporting only; the gate decides on validation).
        dataset: dataset name.
    """
    package = f"{base.get('package')} {base.get('version')}" if base.get("package") else "a local folder"
    tags = {"base_model": base.get("base_model", ""), "base_model.package": base.get("package") or "",
            "base_model.version": base.get("version") or "", "base_model.sha256": base.get("sha256") or "",
            "strategy.train": train_strategy, "strategy.inference": inference_strategy, "profile": profile,
            "data_hash": data_hash}
    tags = {k: v for k, v in tags.items() if v}  # a local base model has no package, version or sha256
    description = (
        f"GenCLS++ classifier for {dataset}: a LoRA adapter on {base.get('base_model')} ({package}"
        f"{', sha256 ' + str(base['sha256'])[:12] if base.get('sha256') else ''}), trained by SFT then GRPO "
        f"with the '{train_strategy}' prompt strategy under the '{profile}' profile on data {data_hash[:12]}; "
        f"it serves with the '{inference_strategy}' strategy. Test accuracy {float(metrics['accuracy']):.3f}, "
        f"macro-F1 {float(metrics['macro_f1']):.3f} (reporting only: the champion gate compares versions on a "
        f"validation slice). Load it with mlflow.pyfunc.load_model('models:/{model_name(dataset)}@champion') "
        f"once it holds the alias, or serve it with `gencls serve --dataset {dataset}`.")
    return tags, description


def find_identical(dataset: str, adapter_hash: str) -> Any | None:
    """An existing READY version whose adapter + prompt settings hash equals `adapter_hash`."""
    try:
        versions = tracking.client().search_model_versions(f"name='{model_name(dataset)}'")
    except Exception:
        return None
    same = [v for v in versions if v.tags.get(ADAPTER_TAG) == adapter_hash and v.status == "READY"]
    return min(same, key=lambda v: int(v.version)) if same else None


def gate_scorer(examples: Sequence[dict]) -> Callable[[str], list[bool]]:
    """Score a logged pyfunc model (by URI) on `examples` as served: which it classifies right."""
    def score(model_uri: str) -> list[bool]:
        import mlflow.pyfunc
        import pandas as pd

        model = mlflow.pyfunc.load_model(model_uri)
        labels = model.predict(pd.DataFrame({"text": [ex["text"] for ex in examples]}))["label"]
        return [str(pred) == ex["label"] for pred, ex in zip(labels, examples)]
    return score


def register_and_gate(run_id: str, dataset: str, metrics: dict, test_set_hash: str,
                      model_uri: str | None = None, scorer: Callable[[str], list[bool]] | None = None,
                      alpha: float = DEFAULT_ALPHA, adapter_hash: str | None = None, gate_key: str = "",
                      metadata: dict | None = None, description: str = "") -> dict:
    """Create a version from the run's logged model and move `champion` only if it is significantly better.

    Args:
        run_id: MLflow run that logged the pyfunc model.
        dataset: Dataset name (registered model ``gencls-<dataset>``).
        metrics: Test metrics of the candidate (accuracy, macro_f1): tags for reporting only.
        test_set_hash: ``test_set_hash(dataset)`` of the data the metrics were computed on.
        model_uri: The logged model (``model_info.model_uri``); default ``runs:/<run_id>/model``.
        scorer: model URI -> per-example correctness on the validation slice (``gate_scorer``);
            needed whenever there is a champion to compare with.
        alpha: significance level of the one-sided McNemar test.
        adapter_hash: identity of the adapter + prompt settings; an existing version with the same
            hash means nothing new is registered.
        gate_key: identity of the validation slice (a tag, for audits).
        metadata, description: what the version is (``version_metadata``): version tags and description.

    Returns:
        {"model", "version", "promoted", "decision", "reason", "candidate": {...}, "champion": {...} | None}
    """
    candidate = {"accuracy": float(metrics["accuracy"]), "macro_f1": float(metrics["macro_f1"])}
    if adapter_hash:
        same = find_identical(dataset, adapter_hash)
        if same is not None:
            champ = current_champion(dataset)
            return {"model": model_name(dataset), "version": str(same.version), "run_id": run_id, "promoted": False,
                    "decision": "unchanged", "reason": f"identical adapter and prompt settings to v{same.version}; "
                    "nothing new registered", "candidate": candidate,
                    "champion": {"version": str(champ.version)} if champ is not None else None}
    tags = {ADAPTER_TAG: adapter_hash or "", "gate_set": gate_key, **(metadata or {})}
    version = create_version(run_id, dataset, metrics, test_set_hash, model_uri, tags, description)
    uri = f"models:/{model_name(dataset)}/{version.version}"
    with _alias_lock(dataset):
        champ = current_champion(dataset)  # re-read under the lock
        figures: dict = {"champion_version": champ.version if champ is not None else None}
        if champ is not None and champ.tags.get("test_set_hash") != test_set_hash:
            promoted, decision = False, "refused-different-test-set"
            reason = (f"champion v{champ.version} was evaluated on another test set "
                      f"({champ.tags.get('test_set_hash', '?')[:12]} vs {test_set_hash[:12]}); re-evaluate it "
                      f"and register again, or promote by hand")
        elif champ is not None and scorer is None:
            promoted, decision = False, "kept-champion"
            reason = "no validation slice to compare the candidate with the champion on; champion kept"
        else:
            cand_correct = scorer(uri) if scorer is not None else []
            champ_correct = scorer(f"models:/{model_name(dataset)}/{champ.version}") if champ is not None else None
            promoted, reason, gate_figures = decide(cand_correct, champ_correct, alpha)
            figures.update(gate_figures)
            decision = "promoted" if promoted else "kept-champion"
        if promoted:
            _set_champion(dataset, version.version, by=f"gate (run {run_id})", reason=reason, figures=candidate)
    _record_decision(run_id, dataset, version.version, decision, reason, figures)
    return {"model": model_name(dataset), "version": str(version.version), "run_id": run_id, "promoted": promoted,
            "decision": decision, "reason": reason, "candidate": {**candidate, **{k: v for k, v in figures.items()
                                                                                   if k.startswith("candidate")}},
            "champion": None if champ is None else {"version": str(champ.version),
                                                    "val_accuracy": figures.get("champion_val_accuracy")}}


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
        mine = _figures(mv, before) if before is not None else None
        theirs = _figures(before, mv) if before is not None else None
        worse = before is not None and str(before.version) != str(version) and mine is not None \
            and theirs is not None and mine < theirs
        if worse and not force:
            shown = "validation accuracy" if len(mine) == 1 else "(accuracy, macro-F1)"
            raise RegistryError(f"{model_name(dataset)} v{version} {shown} {_fmt(mine)} is worse than champion "
                                f"v{before.version} {_fmt(theirs)}; pass --force --reason '...' to promote it anyway")
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
