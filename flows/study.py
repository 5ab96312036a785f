"""The GenCLS++ study as a Prefect flow: baselines, strategy ablation, interplay grid, best + RL.

    gencls study --datasets trec6 movie-sentiment --profile cpu --cells headline
    gencls study --datasets trec6 --cells ablation --runner dask --dask-address tcp://10.0.0.5:8786
    python -m cli study --datasets trec6 --profile cpu --cells all   # the same, without the console script

Per dataset: the study subsamples the splits (conf/params.yaml profiles.<p>.study; recorded
exactly), writes two dataset views under reports/study/<d>/data/ (test view: training pool +
test subsample; val view: training pool + validation slice), then runs its cells in two
phases. Phase 1 holds everything that does not depend on the best combination (baselines,
single dimensions, interplay grid); the best combination is then chosen on the validation
slice (components.study.plan.select_best); phase 2 trains it, adds GRPO and the reasoning variant.

Cells sharing a training strategy and rl switch are one Prefect task (train once, evaluate
many); tasks run on the chosen task runner: local threads (one at a time by default, as
training saturates 2 cores) or Dask (a cluster address, or a local 2-worker cluster).

MLflow: one study run (experiment `gencls-study`, resumed when the same study is started
again) with one child run per cell and per training (tag `mlflow.parentRunId`). Resume: a
cell whose key has a result on disk (reports/study/<d>/<key>/result.json) or a FINISHED
MLflow run is not re-run; a finished training (marker file next to the adapter) is reused.
The best GenCLS++ model per dataset is logged as a pyfunc model and goes through the
champion gate (components.ops.registry.register_and_gate). The tasks live in
flows/study_tasks.py; the pure steps in components/study/ (plan, prepare, measure, report).
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger
from prefect.futures import wait
from prefect.task_runners import ThreadPoolTaskRunner

from components.config import checkpoints_dir, load_params, project_root, set_offline_env
from components.model.prompts import PROMPT_FORMAT
from components.ops import tracking
from components.study import measure, plan, prepare, report
from flows.study_report import RECIPE_FILE, cells_root, inherited_recipe, stored_recipe, study_root, write_report
from flows.study_tasks import EXPERIMENT, cell_group_task, register_task

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
def prepare_dataset(dataset: str, profile: str, model: str, overrides: dict | None = None,
                    study_run_id: str = "", torch_threads: int | None = None) -> dict:
    """Subsample one dataset, write its views and resolve its configs; returns the JSON-able context.

    Args:
        dataset: dataset name (data/<dataset>/ built).
        profile: study profile (conf/params.yaml: "cpu", "cpu-long" or "gpu").
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

    settings = prepare.profile_settings(profile, overrides)
    tokenizer = load_tokenizer(model)
    text_tokens = int(settings["text_tokens"])
    train, cut_train = prepare.truncate_texts(load_split(dataset, "train"), tokenizer, text_tokens)
    test, cut_test = prepare.truncate_texts(load_split(dataset, "test"), tokenizer, text_tokens)
    train, test, dropped = prepare.drop_cut_duplicates(train, test)
    heldout = int((overrides or {}).get("sft.eval_size", settings["sft"].get("eval_size", 0)) or 0)
    splits, record = prepare.subsample(train, test, settings["train_size"], settings["val_size"],
                                       settings["test_size"], settings["seed"], heldout=heldout)
    record["text_tokens"] = {"max": text_tokens, "cut_train_split": cut_train, "cut_test_split": cut_test}
    if any(dropped.values()):  # only when cutting made copies (keeps earlier fingerprints where it did not)
        record["text_tokens"]["copies_dropped"] = dropped
    labels_yaml = (dataset_dir(dataset) / "labels.yaml").read_bytes()
    labels = yaml.safe_load(labels_yaml)
    record["max_prompt_tokens"] = prepare.fit_prompt_budgets(settings, tokenizer, labels)
    views = prepare.write_views(study_root() / dataset / "data", dataset, splits, labels_yaml)
    params = load_params()
    configs = {}
    for kind in ("sft", "rl"):
        layer = {f"{kind}.{k}": v for k, v in settings[kind].items()}
        layer[f"{kind}.seed"] = settings["seed"]  # SFT's held-out carve must match prepare.subsample's
        layer[f"{kind}.eval_size"] = heldout  # RL selects on SFT's held-out slice and trains on the same N
        if kind == "sft":
            layer["sft.model"] = model
        layer.update({k: v for k, v in (overrides or {}).items() if k.startswith(f"{kind}.")})
        configs[kind] = asdict_config(load_config(kind, settings["training_profile"], params, layer))
    view_dirs = [Path(v) / dataset for v in views.values()]
    data_sha256 = prepare.files_sha256(*view_dirs)
    # what SFT adapters and every cell depend on; the RL settings are a separate fingerprint that only RL adapters
    # and RL cells carry, so a new RL budget re-runs the RL cells and nothing else
    train_fp = {"dataset": dataset, "train_view_sha256": prepare.files_sha256(Path(views["train"]) / dataset),
                "sft": configs["sft"], "icl_k": settings["icl_k"], "prompt_format": PROMPT_FORMAT}
    fp_data = {**train_fp, "data_sha256": data_sha256, "subsample": record, "eval": settings["eval"]}
    return {
        "dataset": dataset, "profile": profile, "model": model, "settings": settings, "subsample": record,
        "configs": configs, "fingerprint": prepare.settings_fingerprint(fp_data),
        "train_fingerprint": prepare.settings_fingerprint(train_fp),
        "rl_fingerprint": prepare.settings_fingerprint({"rl": configs["rl"], "reasoning_rl": settings["reasoning_rl"]}),
        "k": settings["icl_k"],
        "views": {k: str(v) for k, v in views.items()}, "results": str(study_root() / dataset),
        "cells": str(cells_root(profile) / dataset),
        "checkpoints": str(checkpoints_dir() / "study" / dataset), "study_run_id": study_run_id,
        "env": {"GENCLS_ROOT": str(project_root()), "MLFLOW_TRACKING_URI": tracking.tracking_uri()},
        "torch_threads": torch_threads,
    }


# ----------------------------------------------------------------------------- flow
def _submit_groups(ctx: dict, planned: list[tuple[str, plan.Cell]]) -> list[Any]:
    """One task per adapter group of a dataset's planned cells."""
    roles = plan.roles_by_cell(planned)
    groups = plan.group_cells(list(roles))
    return [cell_group_task.with_options(task_run_name=f"{ctx['dataset']}: {kind} {train}{' +RL' if rl else ''}")
            .submit(ctx, [(c, roles[c]) for c in cells]) for (kind, train, rl, _), cells in groups.items()]


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


@flow(name="study", log_prints=False)  # training libraries print a lot; it stays on stdout
def study_flow(datasets: list[str], profile: str = "cpu", runner: str = "local", cells: str = "headline",
               model: str | None = None, overrides: dict[str, Any] | None = None, register_model: bool = True,
               torch_threads: int | None = None, only: list[str] | None = None, keep_recipe: bool = False) -> dict:
    """Run the GenCLS++ study (see module docstring) and write its report (flows/study_report.report_paths).

    Args:
        datasets: dataset names (each built under data/).
        profile: "cpu" (subsampled, 2 cores), "cpu-long" (cpu with a longer SFT budget rule) or "gpu" (pool capped
            at 8,000, test at 2,000; one GPU).
        runner: recorded only; the task runner is set by `study()` / `with_options`.
        cells: "headline", "ablation" or "all".
        model: base model (default smollm2-135m).
        overrides: study settings and `sft.*` / `rl.*` training keys (see prepare_dataset).
        register_model: register the best GenCLS++ model per dataset and gate `champion`.
        torch_threads: torch threads per task (set for Dask workers sharing cores).
        only: keep only cells with these roles (or role prefixes such as "grid:"), e.g. ["tfidf",
            "zeroshot"]; phase 2 runs only when "gencls", "best_sft" or "reasoning" is kept.
        keep_recipe: GenCLS++ is the recipe already stored for the profile (cells/<profile>/recipe.json); this
            run's validation cells do not choose it again (`gencls study --verify` re-measures with it).

    Returns:
        The study.json dict (plus "failed": error messages); the flow fails when a cell failed.
    """
    from components.model.models import DEFAULT_MODEL

    set_offline_env()
    logger = get_run_logger()
    model = model or DEFAULT_MODEL
    started = time.time()
    if cells not in plan.CELL_SETS:
        raise ValueError(f"cells {cells!r}: expected one of {', '.join(plan.CELL_SETS)}")
    tracking.configure()
    study_key = prepare.settings_fingerprint({"datasets": sorted(datasets), "profile": profile, "cells": cells,
                                        "model": model, "overrides": overrides or {}, "only": only})
    with contextlib.ExitStack() as held:  # one study per dataset at a time (dataset_lock)
        for d in datasets:
            held.callback(dataset_lock(profile, d).release)
        with tracking.start_run(EXPERIMENT, run_name=f"study {profile} {cells}", run_id=_study_run(study_key),
                                tags={"dataset": ",".join(datasets), "study.kind": "study", "study.key": study_key,
                                      "profile": profile, "study.cells": cells, "model": model, "runner": runner}) as run:
            run_id = run.info.run_id
            logger.info("MLflow study run %s (%s)", run_id, tracking.tracking_uri())
            inherited_recipe(profile, overrides, model)  # a missing or mismatched inherited recipe: stop before training
            if keep_recipe:
                update_recipe(profile, {}, model, overrides, keep_stored=True)  # none stored: stop before training
            ctxs = {d: prepare_dataset(d, profile, model, overrides, run_id, torch_threads) for d in datasets}
            for ctx in ctxs.values():  # written again at the end; now, so that an interrupted study still reports
                measure.write_dataset_record(ctx)
            plans = {d: plan.keep_roles(plan.phase1_cells(cells, profile, model, ctx["k"]), only) for d, ctx in ctxs.items()}
            futures = {d: _submit_groups(ctx, plans[d]) for d, ctx in ctxs.items()}
            results, errors = {}, []
            for d in datasets:
                results[d], errs = _collect(futures[d], logger)
                errors += errs
            recipe = update_recipe(profile, ctxs, model, overrides, keep_recipe)
            logger.info("recipe (%s): train=%s inference=%s", recipe["source"], recipe["train"], recipe["infer"])
            for attempt in range(2):  # a second round when the confirmation replaces the combination
                for d, ctx in ctxs.items():
                    phase2 = plan.keep_roles(plan.phase2_cells(cells, profile, model, (recipe["train"], recipe["infer"])), only)
                    plans[d] += phase2
                    futures[d] = _submit_groups(ctx, phase2)
                for d in datasets:
                    more, errs = _collect(futures[d], logger)
                    results[d] += more
                    errors += errs
                again = update_recipe(profile, ctxs, model, overrides, keep_recipe)
                if (again["train"], again["infer"]) == (recipe["train"], recipe["infer"]):
                    recipe = again
                    break
                logger.info("confirmation on validation: recipe now train=%s inference=%s", again["train"], again["infer"])
                recipe = again
            decisions = {}
            if register_model:
                reg = {}
                for d, ctx in ctxs.items():
                    gencls = next((r for r in results[d] if r.get("kind") == "trained" and r.get("rl")
                                   and (r["train"], r["infer"]) == (recipe["train"], recipe["infer"])), None)
                    if gencls is not None and not Path(gencls.get("adapter") or "").is_dir():
                        logger.warning("%s: GenCLS++ cell %s was measured elsewhere (its adapter %s is not on this "
                                       "machine): not registered", d, gencls["key"], gencls.get("adapter"))
                    elif gencls is not None and not _in_store(gencls.get("run_id")):
                        logger.warning("%s: GenCLS++ cell %s was measured in another MLflow store (run %s, e.g. a "
                                       "`--verify --adopt` re-run): not registered", d, gencls["key"], gencls.get("run_id"))
                    elif gencls is not None:
                        reg[d] = register_task.submit(ctx, gencls)
                for d, future in reg.items():
                    future.wait()
                    if future.state.is_completed():
                        decisions[d] = future.result()
                    else:
                        errors.append(f"{d}: register: {future.state.message}")
            for d, ctx in ctxs.items():
                measure.write_dataset_record(ctx, decisions.get(d))
            reused = sum(1 for d in results for r in results[d] if r.get("reused"))
            first = next(iter(ctxs.values()), None)
            meta = {"profile": profile, "cells": cells, "model": model, "runner": runner, "datasets": datasets,
                    "study_run_id": run_id, "study_key": study_key, "machine": report.machine_info(),
                    "seconds": round(time.time() - started, 1), "cells_reused": reused,
                    "cells_run": sum(len(v) for v in results.values()) - reused,
                    "settings": {k: v for k, v in prepare.profile_settings(profile, overrides).items()
                                 if not isinstance(v, dict)},
                    "sft_config_summary": report.config_summary(first["configs"]["sft"]) if first else {},
                    "rl_config_summary": report.config_summary(first["configs"]["rl"]) if first else {},
                    "overrides": overrides or {}, "only": only, "failed": errors,
                    "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
            study = write_report(profile, meta, run_id, recipe)
            if errors:
                raise RuntimeError(f"study: {len(errors)} failure(s): " + " | ".join(errors))
    return study


def _in_store(run_id: str | None) -> bool:
    """Whether the project's MLflow store has this run (a cell adopted from a scratch project's has not)."""
    from mlflow.exceptions import MlflowException

    try:
        return bool(run_id) and tracking.client().get_run(run_id) is not None
    except MlflowException:  # RESOURCE_DOES_NOT_EXIST
        return False


def dataset_lock(profile: str, dataset: str) -> Any:
    """Hold reports/study/cells/<profile>/<dataset>/.lock for this process: a second study of the same dataset
    would measure the same cells again and race on their files; it stops with one clear line instead."""
    from filelock import FileLock, Timeout

    folder = cells_root(profile) / dataset
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder / ".lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise RuntimeError(f"another `gencls study` is running on {dataset} ({profile} profile; lock "
                           f"{folder / '.lock'}): wait for it or stop it first") from None
    return lock


def update_recipe(profile: str, ctxs: dict[str, dict], model: str = "", overrides: dict | None = None,
                  keep_stored: bool = False) -> dict:
    """Choose the study's recipe on validation (plan.select_recipe) over every dataset with a complete ablation:
    this run's datasets' cells plus the validation results other datasets left in the committed recipe file,
    only those measured with the same model and study settings (a lock keeps two studies from racing on it).
    `keep_stored`: return the stored recipe as it is (ValueError when there is none)."""
    from filelock import FileLock

    inherited = inherited_recipe(profile, overrides, model or None)
    if inherited is not None:  # a profile that re-runs another study under other budgets keeps that study's recipe
        return inherited
    if keep_stored:
        stored = stored_recipe(profile)
        if not stored:
            raise ValueError(f"{cells_root(profile) / RECIPE_FILE}: no stored recipe to keep")
        return stored
    root = cells_root(profile)
    root.mkdir(parents=True, exist_ok=True)
    config = prepare.recipe_config(profile, model, overrides)
    with FileLock(str(root / ".recipe.lock")):
        stored = measure.read_result(root / RECIPE_FILE) or {}
        validation = {d: v for d, v in (stored.get("validation_results") or {}).items()
                      if isinstance(v, dict) and v.get("config") == config}
        keep = ("kind", "train", "infer", "rl", "val_accuracy", "val_macro_f1")
        for d, ctx in ctxs.items():
            rows = [{k: r.get(k) for k in keep} for r in measure.dataset_results(ctx) if r.get("val_accuracy") is not None]
            if rows or d in validation:
                validation[d] = {"config": config, "fingerprint": ctx["fingerprint"], "rows": rows}
        k = next(iter(ctxs.values()))["k"] if ctxs else stored.get("k", 2)
        recipe = plan.select_recipe({d: v["rows"] for d, v in validation.items()}, k)
        measure.write_result(root / RECIPE_FILE, {**recipe, "k": k, "validation_results": validation})
    return recipe


def _study_run(study_key: str) -> str | None:
    """The latest MLflow study run with the same key (resumed rather than duplicated)."""
    c = tracking.client()
    exp = c.get_experiment_by_name(f"gencls-{EXPERIMENT}")
    if exp is None:
        return None
    runs = c.search_runs([exp.experiment_id], f"tags.`study.key` = '{study_key}'", max_results=1,
                         order_by=["attributes.start_time DESC"])
    return runs[0].info.run_id if runs else None


def study(datasets: list[str], profile: str = "cpu", runner: str = "local", cells: str = "headline",
          model: str | None = None, dask_address: str | None = None, workers: int | None = None,
          overrides: dict[str, Any] | None = None, register_model: bool = True, only: list[str] | None = None,
          torch_threads: int | None = None, return_state: bool = False, keep_recipe: bool = False) -> Any:
    """Run `study_flow` on the task runner named by `runner` (see make_task_runner)."""
    task_runner = make_task_runner(runner, dask_address, workers)
    threads = torch_threads
    if threads is None and runner == "dask" and not dask_address:
        from components.threads import thread_budget

        threads = thread_budget(workers or 2)
    return study_flow.with_options(task_runner=task_runner)(
        datasets, profile, runner, cells, model, overrides, register_model, threads, only, keep_recipe,
        return_state=return_state)
