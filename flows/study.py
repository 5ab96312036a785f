"""The GenCLS++ study as a Prefect flow: baselines, strategy ablation, interplay grid, best + RL.

    gencls study --datasets trec6 movie-sentiment --profile cpu --cells headline
    gencls study --datasets trec6 --cells ablation --runner dask --dask-address tcp://10.0.0.5:8786
    python -m cli study --datasets trec6 --profile cpu --cells all   # the same, without the console script

Per dataset: the study subsamples the splits (components.study.STUDY_PROFILES; recorded
exactly), writes two dataset views under reports/study/<d>/data/ (test view: training pool +
test subsample; val view: training pool + validation slice), then runs its cells in two
phases. Phase 1 holds everything that does not depend on the best combination (baselines,
single dimensions, interplay grid); the best combination is then chosen on the validation
slice (components.study.select_best); phase 2 trains it, adds GRPO and the reasoning variant.

Cells sharing a training strategy and rl switch are one Prefect task (train once, evaluate
many); tasks run on the chosen task runner: local threads (one at a time by default, as
training saturates 2 cores) or Dask (a cluster address, or a local 2-worker cluster).

MLflow: one study run (experiment `gencls-study`, resumed when the same study is started
again) with one child run per cell and per training (tag `mlflow.parentRunId`). Resume: a
cell whose key has a result on disk (reports/study/<d>/<key>/result.json) or a FINISHED
MLflow run is not re-run; a finished training (marker file next to the adapter) is reused.
The best GenCLS++ model per dataset is logged as a pyfunc model and goes through the
champion gate (components.registry.register_and_gate).
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import wait
from prefect.task_runners import ThreadPoolTaskRunner

from components.study import plan as S
from components.ops import tracking
from components.config import checkpoints_dir, data_dir, load_params, project_root, reports_dir, set_offline_env
from components.model.prompts import PROMPT_FORMAT

EXPERIMENT = "study"  # tracking.experiment_id("study") -> MLflow experiment "gencls-study"
TRAIN_DONE = ".study_train.json"
RUNNERS = ("local", "dask")


# ----------------------------------------------------------------------------- task runners
def make_task_runner(runner: str = "local", address: str | None = None, workers: int | None = None) -> Any:
    """The Prefect task runner for a `--runner` flag.

    local: ThreadPoolTaskRunner(max_workers=workers or 1) — one cell group at a time, since
        training uses every core of a small machine.
    dask: prefect_dask.DaskTaskRunner on the cluster at `address`, or a LocalCluster with
        `workers or 2` single-threaded worker processes.
    """
    if runner == "local":
        return ThreadPoolTaskRunner(max_workers=workers or 1)
    if runner == "dask":
        from prefect_dask import DaskTaskRunner

        if address:
            return DaskTaskRunner(address=address)
        return DaskTaskRunner(cluster_class="distributed.LocalCluster",
                              cluster_kwargs={"n_workers": workers or 2, "threads_per_worker": 1, "processes": True,
                                              "host": "127.0.0.1", "dashboard_address": "127.0.0.1:0"})
    raise ValueError(f"runner {runner!r}: expected one of {', '.join(RUNNERS)}")


# ----------------------------------------------------------------------------- dataset context
def study_root() -> Path:
    """reports/study/ (cell results, dataset views, plots)."""
    return reports_dir() / "study"


def prepare_dataset(dataset: str, profile: str, model: str, overrides: dict | None = None,
                    study_run_id: str = "", torch_threads: int | None = None) -> dict:
    """Subsample one dataset, write its views and resolve its configs; returns the JSON-able context.

    Args:
        dataset: dataset name (data/<dataset>/ built).
        profile: study profile ("cpu" or "gpu").
        model: base model name or folder.
        overrides: study settings (`train_size`, `val_size`, `test_size`, `icl_k`, `seed`, `eval.batch_size`,
            ...) and training config keys (`sft.max_steps`, `rl.max_steps`, ...).
        study_run_id: parent MLflow run.
        torch_threads: threads per task (Dask workers share the cores).

    Returns:
        The context every task needs (paths, configs, settings fingerprint, env).
    """
    from components.data.datasets import dataset_dir, load_split
    from components.model.models import load_tokenizer
    from components.train.configs import asdict_config, load_config

    settings = _profile_settings(profile, overrides)
    train = load_split(dataset, "train")
    test = load_split(dataset, "test")
    splits, record = S.subsample(train, test, settings["train_size"], settings["val_size"], settings["test_size"],
                                 settings["seed"])
    labels_yaml = (dataset_dir(dataset) / "labels.yaml").read_bytes()
    labels = yaml.safe_load(labels_yaml)
    tokenizer = load_tokenizer(model)
    _fit_prompt_budgets(settings, tokenizer, labels, overrides)
    record["sft_budget"] = _fit_sft_size(settings, tokenizer, labels, splits["train"], overrides)
    views = S.write_views(study_root() / dataset / "data", dataset, splits, labels_yaml)
    params = load_params()
    configs = {}
    for kind in ("sft", "rl"):
        layer = {f"{kind}.{k}": v for k, v in settings[kind].items()}
        if kind == "sft":
            layer["sft.model"] = model
        layer.update({k: v for k, v in (overrides or {}).items() if k.startswith(f"{kind}.")})
        configs[kind] = asdict_config(load_config(kind, settings["training_profile"], params, layer))
    fp_data = {"dataset": dataset, "data_sha256": S.files_sha256(Path(views["test"]) / dataset, Path(views["val"]) / dataset),
               "subsample": record, "sft": configs["sft"], "rl": configs["rl"], "eval": settings["eval"],
               "icl_k": settings["icl_k"], "reasoning_rl": settings["reasoning_rl"], "prompt_format": PROMPT_FORMAT}
    return {
        "dataset": dataset, "profile": profile, "model": model, "settings": settings, "subsample": record,
        "configs": configs, "fingerprint": S.settings_fingerprint(fp_data), "k": settings["icl_k"],
        "views": {k: str(v) for k, v in views.items()}, "results": str(study_root() / dataset),
        "checkpoints": str(checkpoints_dir() / "study" / dataset), "study_run_id": study_run_id,
        "env": {"GENCLS_ROOT": str(project_root()), "MLFLOW_TRACKING_URI": tracking.tracking_uri()},
        "torch_threads": torch_threads,
    }


def _fit_prompt_budgets(settings: dict, tokenizer: Any, labels: dict, overrides: dict | None = None) -> None:
    """Raise every prompt budget to the instructions' length + settings["text_room"] (in place; 0 = off).

    Long label lists (20newsgroups' 20 names cost ~180 tokens) would otherwise leave the text to
    classify only the 16-token minimum and no room for demonstrations. GRPO's cost is proportional
    to its prompts' tokens, so where its budget rises its steps shrink in proportion (at least 2):
    every dataset's RL gets about the same number of prompt tokens. Explicit `rl.*` overrides win.
    """
    room = int(settings.get("text_room") or 0)
    if not room:
        return
    from components.model.prompts import instruction_tokens

    need = instruction_tokens(tokenizer, labels) + room
    rl = settings.get("rl", {})
    before = int(rl.get("max_prompt_tokens") or 0)
    for part in ("sft", "rl", "eval"):
        if "max_prompt_tokens" in settings.get(part, {}):
            settings[part]["max_prompt_tokens"] = max(int(settings[part]["max_prompt_tokens"]), need)
    explicit = {k for k in (overrides or {}) if k.startswith("rl.")}
    if explicit & {"rl.max_steps", "rl.max_prompt_tokens"}:
        return
    if before and rl.get("max_steps") and rl["max_prompt_tokens"] > before:
        steps = max(2, round(int(rl["max_steps"]) * before / rl["max_prompt_tokens"]))
        for key in ("eval_every", "save_steps"):
            if key in rl and f"rl.{key}" not in explicit:
                rl[key] = min(int(rl[key]), steps)
        rl["max_steps"] = steps


def _fit_sft_size(settings: dict, tokenizer: Any, labels: dict, pool: list[dict], overrides: dict | None = None) -> dict:
    """Cap SFT prompts at settings["sft_tokens"] tokens of naive prompts (in place; 0 = off); returns the record.

    Training time is proportional to tokens: 200 trec6 questions (~67 tokens each) cost what ~100
    bbc-news articles cut at 128 tokens cost. Naive and GenCLS++ SFT get the same number of prompts.
    """
    budget = int(settings.get("sft_tokens") or 0)
    if "sft.train_size" in (overrides or {}):  # the user's explicit size wins
        return {"sft_tokens": 0, "train_size": int(overrides["sft.train_size"])}
    if not budget:
        return {"sft_tokens": 0, "train_size": int(settings["sft"]["train_size"] or 0)}  # 0 = the whole pool
    cap = int(settings["sft"]["train_size"] or len(pool))
    from components.model.prompts import PromptBuilder, Strategy

    builder = PromptBuilder(tokenizer, labels, Strategy(),
                            max_prompt_tokens=int(settings["sft"]["max_prompt_tokens"]))
    lengths = [len(builder.tokenizer(builder.prompt(ex), add_special_tokens=False)["input_ids"]) for ex in pool]
    mean = sum(lengths) / max(len(lengths), 1)
    size = max(1, min(cap, int(budget // max(mean, 1.0))))
    settings["sft"]["train_size"] = size
    return {"sft_tokens": budget, "mean_naive_prompt_tokens": round(mean, 1), "train_size": size}


def _profile_settings(profile: str, overrides: dict | None) -> dict:
    """STUDY_PROFILES[profile] with flat overrides (`train_size`, `eval.batch_size`, ...) applied."""
    if profile not in S.STUDY_PROFILES:
        raise ValueError(f"profile {profile!r}: expected one of {', '.join(S.STUDY_PROFILES)}")
    settings = json.loads(json.dumps(S.STUDY_PROFILES[profile]))
    for key, value in (overrides or {}).items():
        head, _, tail = key.partition(".")
        if head in ("sft", "rl"):
            continue  # training config keys go through load_config
        if tail and isinstance(settings.get(head), dict):
            settings[head][tail] = value
        elif key in settings:
            settings[key] = value
        else:
            raise ValueError(f"study override {key!r}: unknown; valid: {', '.join(sorted(settings))} "
                             f"(or sft.KEY / rl.KEY / eval.KEY / reasoning_rl.KEY)")
    return settings


def _apply_env(ctx: dict) -> None:
    """Make a (possibly remote) worker see the same project root and MLflow store."""
    set_offline_env()
    os.environ.update(ctx["env"])
    if ctx.get("torch_threads"):
        from components.threads import apply_thread_policy

        apply_thread_policy(threads=int(ctx["torch_threads"]))


# ----------------------------------------------------------------------------- resume
def find_finished(ctx: dict, cell: S.Cell) -> dict | None:
    """A finished cell's result: from disk, else rebuilt from a FINISHED MLflow run (then saved)."""
    key = cell.key(ctx["fingerprint"])
    path = S.result_path(Path(ctx["results"]).parent, ctx["dataset"], key)
    result = S.read_result(path)
    if result is not None:
        return result
    run = _finished_run(key, ctx["dataset"])
    if run is None:
        return None
    result = json.loads(run.data.tags.get("study.result", "{}") or "{}")
    if not result:
        metrics = run.data.metrics
        result = {**_cell_fields(cell, key, ctx), **{k: v for k, v in metrics.items() if "/" not in k},
                  "run_id": run.info.run_id}
    S.write_result(path, result)
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


def _cell_fields(cell: S.Cell, key: str, ctx: dict) -> dict:
    return {"key": key, "name": cell.name, "kind": cell.kind, "train": cell.train, "infer": cell.infer,
            "rl": cell.rl, "profile": cell.profile, "model": cell.model, "dataset": ctx["dataset"],
            "fingerprint": ctx["fingerprint"]}


# ----------------------------------------------------------------------------- training
def ensure_adapter(ctx: dict, train: str, rl: bool) -> Path:
    """The trained adapter for (training strategy, rl): trained once, reused by every cell and rerun.

    A file lock per adapter keeps two workers from training the same one; a finished training
    leaves a marker (TRAIN_DONE) and is never repeated. RL first ensures its SFT adapter.
    """
    from filelock import FileLock

    from components.train.rl import train_rl
    from components.train.sft import train_sft
    from components.train.configs import load_config

    kind = "rl" if rl else "sft"
    train_key = S.settings_fingerprint({"train": train, "model": ctx["model"], "fp": ctx["fingerprint"]})[:12]
    out = Path(ctx["checkpoints"]) / f"{S.slug_dir(train)}-{train_key}" / kind
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out.parent / f".{kind}.lock")):
        if (out / TRAIN_DONE).is_file():
            return out
        sft_dir = ensure_adapter(ctx, train, False) if rl else None
        view = ctx["views"]["test"]  # train.jsonl = the training pool (same in both views)
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
                train_rl(ctx["dataset"], config, sft_dir=sft_dir, out_dir=out, log_fn=log_fn, data_dir=view)
            else:
                train_sft(ctx["dataset"], config, out_dir=out, log_fn=log_fn, data_dir=view)
            for name in ("gencls_config.json", "metrics.json", "loss_curve.png", "reward_curve.png"):
                tracking.log_artifact(rid, out / name, kind)
        (out / TRAIN_DONE).write_text(json.dumps({"run_id": rid, "seconds": round(time.time() - started, 1),
                                                  "fingerprint": ctx["fingerprint"], "train": train}) + "\n")
    return out


# ----------------------------------------------------------------------------- cells
def evaluate_cell(ctx: dict, cell: S.Cell, out: Path, loaded: Any = None, adapter: Path | None = None,
                  views: tuple[str, ...] = ("test", "val")) -> dict:
    """Measure one cell on the test view (and the validation view); returns {"test": m, "val": m}."""
    from components.evaluate.baselines import tfidf_records
    from components.data.datasets import load_labels, load_split
    from components.evaluate.evaluation import compute_metrics, evaluate, write_reports

    dataset, ev = ctx["dataset"], ctx["settings"]["eval"]
    out_metrics = {}
    for view in views:
        if cell.kind == "tfidf":
            train = load_split(dataset, "train", ctx["views"][view])
            test = load_split(dataset, "test", ctx["views"][view])
            started = time.perf_counter()
            records = tfidf_records(train, test, seed=ctx["settings"]["seed"])
            labels = list(load_labels(dataset, ctx["views"][view]))
            metrics = compute_metrics(records, labels)
            metrics.update(seconds=round(time.perf_counter() - started, 2), strategy="tfidf", dataset=dataset)
            write_reports(out / view, records, metrics, labels, [])
        else:
            metrics = evaluate(dataset, ctx["model"] if adapter is None else None, cell.infer,
                               adapter=str(adapter) if adapter else None, out_dir=out / view,
                               batch_size=int(ev["batch_size"]), max_prompt_tokens=int(ev["max_prompt_tokens"]),
                               seed=ctx["settings"]["seed"], progress=False, data_dir=ctx["views"][view], loaded=loaded)
        out_metrics[view] = metrics
    return out_metrics


def run_cell(ctx: dict, cell: S.Cell, roles: list[str], loaded: Any = None, adapter: Path | None = None) -> dict:
    """Evaluate one cell inside its own MLflow child run and write its result.json (last)."""
    key = cell.key(ctx["fingerprint"])
    out = Path(ctx["results"]) / key
    tags = {"mlflow.parentRunId": ctx["study_run_id"], "dataset": ctx["dataset"], "study.kind": "cell",
            "study.cell_key": key, "study.cell": cell.name, "study.roles": ",".join(roles),
            "strategy.train": cell.train, "strategy": cell.infer, "rl": cell.rl, "profile": cell.profile}
    with tracking.start_run(EXPERIMENT, run_name=f"{ctx['dataset']}: {cell.name}", tags=tags) as run:
        rid = run.info.run_id
        tracking.log_config(rid, {"cell": _cell_fields(cell, key, ctx), "subsample": ctx["subsample"],
                                  "eval": ctx["settings"]["eval"], "adapter": str(adapter) if adapter else ""})
        views = ("test", "val") if S.needs_validation(roles) else ("test",)
        metrics = evaluate_cell(ctx, cell, out, loaded=loaded, adapter=adapter, views=views)
        result = {**_cell_fields(cell, key, ctx), "roles": roles, "run_id": rid,
                  "adapter": str(adapter) if adapter else None, "worker": f"{socket.gethostname()}:{os.getpid()}",
                  **S.metric_subset(metrics["test"]), **S.metric_subset(metrics.get("val", {}), "val_")}
        tracking.log_metrics(rid, {k: v for k, v in result.items() if isinstance(v, float)})
        for name in ("metrics.json", "confusion.png", "predictions.jsonl", "prompts_sample.txt"):
            tracking.log_artifact(rid, out / "test" / name, "test")
        tracking.log_artifact(rid, out / "val" / "metrics.json", "val")
        tracking.set_tags(rid, {"study.result": json.dumps(result, default=str)[:5000]})
        S.write_result(out / S.RESULT_FILE, result)
    return result


@task(name="study-cells", cache_policy=NO_CACHE)
def cell_group_task(ctx: dict, cells: list[tuple[S.Cell, list[str]]]) -> list[dict]:
    """Cells that share one adapter: train it once (if any cell still needs it), evaluate each cell.

    A failing cell does not stop its siblings; the task fails at the end, naming the failures.
    """
    _apply_env(ctx)
    results, todo = [], []
    for cell, roles in cells:
        done = find_finished(ctx, cell)
        if done is not None and (done.get("val_accuracy") is not None or not S.needs_validation(roles)):
            results.append({**done, "reused": True})
        else:
            todo.append((cell, roles))
    if not todo:
        return results
    first = todo[0][0]
    loaded, adapter = None, None
    if first.kind != "tfidf":
        from components.model.models import load_model

        adapter = ensure_adapter(ctx, first.train, first.rl) if first.kind == "trained" else None
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
    previous = S.read_result(path)
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
    S.write_result(path, decision)
    return decision


# ----------------------------------------------------------------------------- flow
def _submit_groups(ctx: dict, planned: list[tuple[str, S.Cell]]) -> list[Any]:
    """One task per adapter group of a dataset's planned cells."""
    roles = S.roles_by_cell(planned)
    groups = S.group_cells(list(roles))
    return [cell_group_task.with_options(task_run_name=f"{ctx['dataset']}: {kind} {train}{' +RL' if rl else ''}")
            .submit(ctx, [(c, roles[c]) for c in cells]) for (kind, train, rl), cells in groups.items()]


def _collect(futures: list[Any], logger: Any) -> tuple[list[dict], list[str]]:
    """Results of finished groups and the error messages of failed ones."""
    wait(futures)
    results, errors = [], []
    for future in futures:
        state = future.state
        if state.is_completed():
            results += future.result()
        else:
            message = str(state.message or state.name)
            errors.append(message)
            logger.error(message)
    return results, errors


def _dataset_results(ctx: dict) -> list[dict]:
    """Every finished cell result of this dataset with the current settings fingerprint."""
    out = []
    for path in sorted(Path(ctx["results"]).glob(f"*/{S.RESULT_FILE}")):
        result = S.read_result(path)
        if result and result.get("fingerprint") == ctx["fingerprint"]:
            out.append(result)
    return out


PHASE2_ROLES = ("gencls", "best_sft", "reasoning")


def _report_cells(ctx: dict, planned: list[tuple[str, S.Cell]]) -> list[dict]:
    """Finished cells of the dataset with their roles: phase-2 roles only from this run's plan."""
    roles = S.roles_by_cell(planned)
    by_key = {cell.key(ctx["fingerprint"]): r for cell, r in roles.items()}
    out = []
    for result in _dataset_results(ctx):
        stored = [r for r in result.get("roles", []) if r not in PHASE2_ROLES]
        merged = list(dict.fromkeys(by_key.get(result["key"], []) + stored))
        out.append({**result, "roles": merged})
    return out


@flow(name="study", log_prints=False)  # training libraries print a lot; it stays on stdout
def study_flow(datasets: list[str], profile: str = "cpu", runner: str = "local", cells: str = "headline",
               model: str | None = None, overrides: dict[str, Any] | None = None, register_model: bool = True,
               torch_threads: int | None = None, only: list[str] | None = None) -> dict:
    """Run the GenCLS++ study (see module docstring) and write reports/study.{md,json} + plots.

    Args:
        datasets: dataset names (each built under data/).
        profile: "cpu" (subsampled, 2 cores) or "gpu" (pool capped at 8,000, test at 2,000; one GPU).
        runner: recorded only; the task runner is set by `study()` / `with_options`.
        cells: "headline", "ablation" or "all".
        model: base model (default smollm2-135m).
        overrides: study settings and `sft.*` / `rl.*` training keys (see prepare_dataset).
        register_model: register the best GenCLS++ model per dataset and gate `champion`.
        torch_threads: torch threads per task (set for Dask workers sharing cores).
        only: keep only cells with these roles (or role prefixes such as "grid:"), e.g. ["tfidf",
            "zeroshot"]; phase 2 runs only when "gencls", "best_sft" or "reasoning" is kept.

    Returns:
        The study.json dict (plus "failed": error messages); the flow fails when a cell failed.
    """
    from components.model.models import DEFAULT_MODEL

    set_offline_env()
    logger = get_run_logger()
    model = model or DEFAULT_MODEL
    started = time.time()
    if cells not in S.CELL_SETS:
        raise ValueError(f"cells {cells!r}: expected one of {', '.join(S.CELL_SETS)}")
    tracking.configure()
    study_key = S.settings_fingerprint({"datasets": sorted(datasets), "profile": profile, "cells": cells,
                                        "model": model, "overrides": overrides or {}, "only": only})
    with tracking.start_run(EXPERIMENT, run_name=f"study {profile} {cells}", run_id=_study_run(study_key),
                            tags={"dataset": ",".join(datasets), "study.kind": "study", "study.key": study_key,
                                  "profile": profile, "study.cells": cells, "model": model, "runner": runner}) as run:
        run_id = run.info.run_id
        logger.info("MLflow study run %s (%s)", run_id, tracking.tracking_uri())
        ctxs = {d: prepare_dataset(d, profile, model, overrides, run_id, torch_threads) for d in datasets}
        plans = {d: S.keep_roles(S.phase1_cells(cells, profile, model, ctx["k"]), only) for d, ctx in ctxs.items()}
        futures = {d: _submit_groups(ctx, plans[d]) for d, ctx in ctxs.items()}
        results, errors = {}, []
        for d in datasets:
            results[d], errs = _collect(futures[d], logger)
            errors += errs
        best = {}
        for d, ctx in ctxs.items():
            best[d] = S.select_best(_dataset_results(ctx), ctx["k"])
            logger.info("%s: best combination (%s) train=%s inference=%s", d, best[d]["source"], best[d]["train"],
                        best[d]["infer"])
            phase2 = S.keep_roles(S.phase2_cells(cells, profile, model, (best[d]["train"], best[d]["infer"])), only)
            plans[d] += phase2
            futures[d] = _submit_groups(ctx, phase2)
        for d in datasets:
            more, errs = _collect(futures[d], logger)
            results[d] += more
            errors += errs
        decisions = {}
        if register_model:
            reg = {}
            for d, ctx in ctxs.items():
                gencls_cells = [c for role, c in plans[d] if role == "gencls"]
                if not gencls_cells:
                    continue
                key = gencls_cells[0].key(ctx["fingerprint"])
                gencls = next((r for r in results[d] if r["key"] == key), None)
                if gencls is not None:
                    reg[d] = register_task.submit(ctx, gencls)
            for d, future in reg.items():
                future.wait()
                if future.state.is_completed():
                    decisions[d] = future.result()
                else:
                    errors.append(f"{d}: register: {future.state.message}")
        per_dataset = {}
        for d, ctx in ctxs.items():
            per_dataset[d] = {"cells": _report_cells(ctx, plans[d]), "best": best[d], "subsample": ctx["subsample"],
                              "register": decisions.get(d) or S.read_result(Path(ctx["results"]) / "register.json"),
                              "seconds": _compute_seconds(ctx)}
        reused = sum(1 for d in results for r in results[d] if r.get("reused"))
        meta = {"profile": profile, "cells": cells, "model": model, "runner": runner, "datasets": datasets,
                "study_run_id": run_id, "study_key": study_key, "machine": S.machine_info(),
                "seconds": round(time.time() - started, 1), "cells_reused": reused,
                "cells_run": sum(len(v) for v in results.values()) - reused,
                "subsampling": {k: S.STUDY_PROFILES[profile][k] for k in ("train_size", "val_size", "test_size", "seed")}
                | {k: v for k, v in (overrides or {}).items() if k in ("train_size", "val_size", "test_size", "seed")},
                "sft_config_summary": _config_summary(next(iter(ctxs.values()))["configs"]["sft"]) if ctxs else {},
                "rl_config_summary": _config_summary(next(iter(ctxs.values()))["configs"]["rl"]) if ctxs else {},
                "overrides": overrides or {}, "only": only, "failed": errors,
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        study = write_report(per_dataset, meta, run_id)
        if errors:
            raise RuntimeError(f"study: {len(errors)} failure(s): " + " | ".join(errors))
    return study


def _compute_seconds(ctx: dict) -> float:
    """Training + evaluation seconds spent on this dataset's current cells (model loading excluded)."""
    total = sum(r.get("seconds", 0.0) + r.get("val_seconds", 0.0) for r in _dataset_results(ctx))
    for marker in Path(ctx["checkpoints"]).glob(f"*/*/{TRAIN_DONE}"):
        info = json.loads(marker.read_text())
        if info.get("fingerprint") == ctx["fingerprint"]:
            total += float(info.get("seconds", 0.0))
    return round(total, 1)


def _study_run(study_key: str) -> str | None:
    """The latest MLflow study run with the same key (resumed rather than duplicated)."""
    c = tracking.client()
    exp = c.get_experiment_by_name(f"gencls-{EXPERIMENT}")
    if exp is None:
        return None
    runs = c.search_runs([exp.experiment_id], f"tags.`study.key` = '{study_key}'", max_results=1,
                         order_by=["attributes.start_time DESC"])
    return runs[0].info.run_id if runs else None


def _config_summary(config: dict) -> dict:
    keys = ("model", "lora", "lora_r", "learning_rate", "epochs", "max_steps", "batch_size", "train_size", "eval_size",
            "max_prompt_tokens", "num_generations", "beta", "focus")
    return {k: config[k] for k in keys if k in config}


def write_report(per_dataset: dict, meta: dict, run_id: str) -> dict:
    """reports/study.json, reports/study.md, interplay heatmaps and the headline bar chart; all logged to MLflow."""
    study = S.aggregate(per_dataset, meta)
    root = reports_dir()
    root.mkdir(parents=True, exist_ok=True)
    (root / "study.json").write_text(json.dumps(study, indent=2, default=str) + "\n", encoding="utf-8")
    (root / "study.md").write_text(S.render_markdown(study), encoding="utf-8")
    plots = [S.plot_headline(study, study_root() / "headline.png")]
    for name, info in study["datasets"].items():
        plots.append(S.plot_heatmap(info["grid"], study_root() / name / "interplay.png",
                                    f"{name}: train x inference accuracy ({meta['profile']})"))
    tracking.log_artifact(run_id, root / "study.json")
    tracking.log_artifact(run_id, root / "study.md")
    for plot in filter(None, plots):
        tracking.log_artifact(run_id, plot, "plots" if plot.parent == study_root() else f"plots/{plot.parent.name}")
    summary = study["summary"]
    flat = {"mean_gain_over_naive_sft_points": summary["mean_gain_over_naive_sft_points"],
            "tfidf_mean_accuracy": summary["tfidf_mean_accuracy"], "gencls_mean_accuracy": summary["gencls_mean_accuracy"]}
    for name, info in study["datasets"].items():
        for role, row in info["headline"].items():
            if row:
                flat[f"{name}/{role}/accuracy"] = row["accuracy"]
                flat[f"{name}/{role}/macro_f1"] = row["macro_f1"]
    tracking.log_metrics(run_id, {k: v for k, v in flat.items() if v is not None})
    return study


def study(datasets: list[str], profile: str = "cpu", runner: str = "local", cells: str = "headline",
          model: str | None = None, dask_address: str | None = None, workers: int | None = None,
          overrides: dict[str, Any] | None = None, register_model: bool = True, only: list[str] | None = None,
          torch_threads: int | None = None, return_state: bool = False) -> Any:
    """Run `study_flow` on the task runner named by `runner` (see make_task_runner)."""
    task_runner = make_task_runner(runner, dask_address, workers)
    threads = torch_threads
    if threads is None and runner == "dask" and not dask_address:
        from components.threads import thread_budget

        threads = thread_budget(workers or 2)
    return study_flow.with_options(task_runner=task_runner)(
        datasets, profile, runner, cells, model, overrides, register_model, threads, only, return_state=return_state)
