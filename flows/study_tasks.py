"""The study's Prefect tasks: a group of cells sharing one adapter (train it once, measure each cell in its
own MLflow child run) and the registration of the best model; resume from results on disk or MLflow.
"""
from __future__ import annotations

import json
import os
import platform
import socket
import time
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from components.config import set_offline_env
from components.ops import tracking
from components.study import measure, plan, prepare
from components.fingerprint import fingerprint, finished, source_hash, write_record

EXPERIMENT = "study"  # tracking.experiment_id("study") -> MLflow experiment "gencls-study"


def _apply_env(ctx: dict) -> None:
    """Make a (possibly remote) worker see the same project root and MLflow store."""
    set_offline_env()
    os.environ.update(ctx["env"])
    if ctx.get("torch_threads"):
        from components.threads import apply_thread_policy

        apply_thread_policy(threads=int(ctx["torch_threads"]))


# ----------------------------------------------------------------------------- resume
def find_finished(ctx: dict, cell: plan.Cell) -> dict | None:
    """A finished cell's result: from its committed cell file, else rebuilt from a FINISHED MLflow run and its
    logged predictions (then the cell file is written)."""
    key = measure.cell_key(ctx, cell)
    done = measure.read_result(measure.cell_path(ctx, key))
    if done is not None and done.get("result"):
        return done["result"]
    run = _finished_run(key, ctx["dataset"])
    if run is None:
        return None
    result = json.loads(run.data.tags.get("study.result", "{}") or "{}")
    if not result:
        return None
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for view in ("test", "val"):
            try:
                tracking.client().download_artifacts(run.info.run_id, f"{view}/predictions.jsonl", tmp)
            except Exception:  # noqa: BLE001 - a view that was not measured has no predictions
                continue
        if not (Path(tmp) / "test" / "predictions.jsonl").is_file():
            return None  # without its predictions the cell cannot give intervals: measure it again
        measure.write_cell(ctx, result, Path(tmp))
    return result


def _finished_run(key: str, dataset: str) -> Any | None:
    """The FINISHED MLflow run of a cell key of a dataset, if any."""
    c = tracking.client()
    exp = c.get_experiment_by_name(f"gencls-{EXPERIMENT}")
    if exp is None:
        return None
    runs = c.search_runs([exp.experiment_id], f"tags.`study.cell_key` = '{key}' and tags.dataset = '{dataset}' "
                         "and attributes.status = 'FINISHED'",
                         max_results=1)
    return runs[0] if runs else None


# ----------------------------------------------------------------------------- training
def ensure_adapter(ctx: dict, train: str, rl: bool, select: str = "") -> Path:
    """The trained adapter for (training strategy, rl): trained once, reused by every cell and rerun.

    An RL adapter's checkpoint is chosen on SFT's held-out slice decoded with `select` (the cell's
    inference strategy), so `select` is part of its identity. A file lock per adapter keeps two
    workers from training the same one; a finished training leaves a record
    (components.fingerprint: settings + training code) and is not repeated while both hold. RL first
    ensures its SFT adapter.
    """
    from filelock import FileLock

    from components.train.rl import train_rl
    from components.train.sft import train_sft
    from components.train.configs import load_config

    kind = "rl" if rl else "sft"
    select = select if rl else ""
    rl_settings = {"rl": ctx["rl_fingerprint"]} if rl else {}
    identity = {"train": train, "model": ctx["model"], "fp": ctx["train_fingerprint"], **rl_settings,
                **({"select": select} if select else {})}
    train_key = prepare.settings_fingerprint(identity)[:12]
    out = Path(ctx["checkpoints"]) / f"{plan.slug_dir(train)}-{train_key}" / kind
    out.parent.mkdir(parents=True, exist_ok=True)
    done_key = fingerprint({"settings": ctx["train_fingerprint"], "train": train, "model": ctx["model"],
                            "src": source_hash((train_rl if rl else train_sft).__module__), **rl_settings,
                            **({"select": select} if select else {})})
    with FileLock(str(out.parent / f".{kind}.lock")):
        if finished(out, done_key, ("gencls_config.json",)):
            return out
        sft_dir = ensure_adapter(ctx, train, False) if rl else None  # RL's own folder; SFT's is keyed by train only
        view = ctx["views"]["train"]  # train.jsonl = the pool: N trained + SFT's held-out slice
        cfg = dict(ctx["configs"][kind], train_strategy=train)
        if rl and "reasoning" in train.split(","):
            cfg.update(ctx["settings"]["reasoning_rl"])
        config = load_config(kind, ctx["settings"]["training_profile"], {}, {k: v for k, v in cfg.items()})
        tags = {"mlflow.parentRunId": ctx["study_run_id"], "dataset": ctx["dataset"], "study.kind": f"train-{kind}",
                "study.train_key": train_key, "strategy.train": train, "profile": ctx["profile"]}
        started = time.time()
        with tracking.start_run(EXPERIMENT, run_name=f"{ctx['dataset']}: train {kind}[{train}]", tags=tags) as run:
            rid = run.info.run_id
            tracking.log_config(rid, cfg, prefix=f"{kind}.")
            log_fn = tracking.make_log_fn(rid)
            if rl:
                train_rl(ctx["dataset"], config, sft_dir=sft_dir, out_dir=out, log_fn=log_fn, data_dir=view,
                         select_strategy=select or None)
            else:
                train_sft(ctx["dataset"], config, out_dir=out, log_fn=log_fn, data_dir=view)
            for name in ("gencls_config.json", "metrics.json", "loss_curve.png", "reward_curve.png"):
                tracking.log_artifact(rid, out / name, kind)
        from components.config import RUN_INFO_FILE

        timing = measure.read_result(out / RUN_INFO_FILE) or {}  # the training's seconds over every attempt
        write_record(out, {"fingerprint": done_key, "settings": ctx["train_fingerprint"], "train": train, "run_id": rid,
                           **({"rl_settings": ctx["rl_fingerprint"]} if rl else {}),
                           "seconds": timing.get("seconds", round(time.time() - started, 1))})
        # the learning curve goes into the committed dataset record now, not only when the study ends: a study
        # killed during the next training still leaves this one's curve in git (checkpoints/ stays on this machine)
        measure.write_dataset_record(ctx)
    return out


def run_cell(ctx: dict, cell: plan.Cell, roles: list[str], loaded: Any = None, adapter: Path | None = None) -> dict:
    """Evaluate one cell inside its own MLflow child run and write its result.json (last)."""
    key = measure.cell_key(ctx, cell)
    out = Path(ctx["results"]) / key
    tags = {"mlflow.parentRunId": ctx["study_run_id"], "dataset": ctx["dataset"], "study.kind": "cell",
            "study.cell_key": key, "study.cell": cell.name, "study.roles": ",".join(roles),
            "strategy.train": cell.train, "strategy": cell.infer, "rl": cell.rl, "profile": cell.profile}
    with tracking.start_run(EXPERIMENT, run_name=f"{ctx['dataset']}: {cell.name}", tags=tags) as run:
        rid = run.info.run_id
        tracking.log_config(rid, {"cell": measure.cell_fields(cell, key, ctx), "subsample": ctx["subsample"],
                                  "eval": ctx["settings"]["eval"], "adapter": str(adapter) if adapter else ""})
        views = ("test", "val") if plan.needs_validation(roles) else ("test",)
        metrics = measure.evaluate_cell(ctx, cell, out, loaded=loaded, adapter=adapter, views=views)
        result = {**measure.cell_fields(cell, key, ctx), "roles": roles, "run_id": rid,
                  "adapter": str(adapter) if adapter else None, "worker": f"{socket.gethostname()}:{os.getpid()}",
                  "machine": platform.platform(), "code": measure.code_hash(),
                  **measure.metric_subset(metrics["test"]), **measure.metric_subset(metrics.get("val", {}), "val_")}
        tracking.log_metrics(rid, {k: v for k, v in result.items() if isinstance(v, float)})
        for name in ("metrics.json", "confusion.png", "predictions.jsonl", "prompts_sample.txt"):
            tracking.log_artifact(rid, out / "test" / name, "test")
        for name in ("metrics.json", "predictions.jsonl"):
            tracking.log_artifact(rid, out / "val" / name, "val")
        tracking.set_tags(rid, {"study.result": json.dumps(result, default=str)[:5000]})
        measure.write_cell(ctx, result, out)
    return result


@task(name="study-cells", cache_policy=NO_CACHE)
def cell_group_task(ctx: dict, cells: list[tuple[plan.Cell, list[str]]]) -> list[dict]:
    """Cells that share one adapter: train it once (if any cell still needs it), evaluate each cell.

    A failing cell does not stop its siblings; the task fails at the end, naming the failures.
    """
    _apply_env(ctx)
    results, todo = [], []
    for cell, roles in cells:
        done = find_finished(ctx, cell)
        if done is not None and (done.get("val_accuracy") is not None or not plan.needs_validation(roles)):
            results.append({**done, "reused": True})
        else:
            todo.append((cell, roles))
    if not todo:
        return results
    first = todo[0][0]
    loaded, adapter = None, None
    if first.kind not in measure.BASELINE_KINDS:
        from components.model.models import load_model

        adapter = ensure_adapter(ctx, *first.group[1:]) if first.kind == "trained" else None
        loaded = load_model(ctx["model"], adapter=str(adapter) if adapter else None)
    errors = []
    for cell, roles in todo:
        try:
            results.append({**run_cell(ctx, cell, roles, loaded=loaded, adapter=adapter), "reused": False})
        except Exception as exc:  # noqa: BLE001 - reported below, siblings go on
            errors.append(f"{cell.name}: {type(exc).__name__}: {exc}")
    if errors:
        raise RuntimeError(f"{ctx['dataset']}: {len(errors)} cell(s) failed: " + "; ".join(errors))
    return results


@task(name="study-register", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=5)
def register_task(ctx: dict, result: dict) -> dict:
    """Log the best GenCLS++ adapter as a pyfunc model in its cell run and gate `champion`."""
    from components.ops import registry, serving

    _apply_env(ctx)
    path = Path(ctx["results"]) / "register.json"
    previous = measure.read_result(path)
    if previous and previous.get("cell_key") == result["key"]:
        return previous
    view = Path(ctx["views"]["test"])
    dataset = ctx["dataset"]
    info = serving.log_model(result["run_id"], result["adapter"], view / dataset / "labels.yaml", result["infer"],
                             base_model=ctx["model"], demos_path=view / dataset / "train.jsonl")
    from components.data.datasets import load_split
    from flows.steps import gate_alpha

    val = load_split(dataset, "test", Path(ctx["views"]["val"]))  # the study's validation slice, never test
    decision = registry.register_and_gate(result["run_id"], dataset, result,
                                          registry.test_set_hash(dataset, data_dir=view), model_uri=info.model_uri,
                                          scorer=registry.gate_scorer(val), alpha=gate_alpha())
    decision["cell_key"] = result["key"]
    measure.write_result(path, decision)
    return decision
