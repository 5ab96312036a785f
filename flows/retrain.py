"""Prefect 3 retraining flow: validate -> render -> SFT -> RL -> evaluate -> register.

    python -m flows.retrain --dataset trec6 --profile quick
    gencls retrain --dataset trec6            # the same, from the CLI

One MLflow run per flow run (tags: dataset, strategy, prefect flow run id) collects the
resolved configs, per-step losses/rewards, final metrics, artifacts and the logged model;
any failure marks it FAILED and fails the Prefect run with the error. Tasks are thin
wrappers around flows/steps.py. Finished steps are skipped when started again: each
training/evaluation step records a fingerprint of its inputs (config, data hash,
upstream checkpoint fingerprint, component source) next to its outputs, which works
across processes; a failed validation stops the flow before training.
"""
from __future__ import annotations

import argparse
import re
import sys
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from components.evaluate.summary import format_interval, format_table, summary_interval, summary_table
from components.ops import tracking
from components.config import set_offline_env
from components.threads import apply_thread_policy
from flows import steps

EVALUATIONS = ("zeroshot", "sft", "gencls")


@task(name="validate", cache_policy=NO_CACHE)
def validate_task(dataset: str, run_id: str) -> dict:
    """Great-expectations gate; raises DataValidationError (the flow stops before training)."""
    return steps.step_validate(dataset, run_id)


@task(name="render", cache_policy=NO_CACHE, retries=1)
def render_task(dataset: str, strategies: dict[str, str], model: str, run_id: str) -> str:
    """Rendered prompt samples (training and inference strategy) as an artifact."""
    return str(steps.step_render(dataset, strategies, model, run_id=run_id))


@task(name="sft", cache_policy=NO_CACHE)
def sft_task(dataset: str, profile: str, overrides: dict, run_id: str) -> dict:
    """SFT warm-up (skipped when checkpoints/<d>/sft matches its input fingerprint)."""
    return steps.step_sft(dataset, profile, overrides, run_id)


@task(name="rl", cache_policy=NO_CACHE)
def rl_task(dataset: str, profile: str, overrides: dict, run_id: str, sft_fingerprint: str) -> dict:
    """GRPO from the SFT checkpoint (skipped when its fingerprint matches)."""
    return steps.step_rl(dataset, profile, overrides, run_id, sft_fingerprint=sft_fingerprint)


@task(name="evaluate", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5)
def evaluate_task(dataset: str, name: str, model: str | None, profile: str, run_id: str, eval_overrides: dict) -> dict:
    """One evaluation row (zeroshot | sft | gencls); retried on transient load errors."""
    return steps.step_evaluate(dataset, name, model=model, profile=profile, run_id=run_id, overrides=eval_overrides)


@task(name="tfidf", cache_policy=NO_CACHE)
def baselines_task(dataset: str, profile: str, overrides: dict, run_id: str, eval_overrides: dict) -> dict:
    """TF-IDF + LR on SFT's own training examples and on all training data (seconds)."""
    return steps.step_baselines(dataset, profile, run_id, overrides, eval_overrides)


@task(name="register", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5)
def register_task(dataset: str, run_id: str, profile: str, configs: dict) -> dict:
    """Log the pyfunc model, register a version, gate the champion alias."""
    return steps.step_register(dataset, run_id=run_id, profile=profile, configs=configs)


def summary_markdown(dataset: str, rows: list[dict], decision: dict, run_id: str, experiment_id: str,
                     mlflow_url: str = "http://127.0.0.1:5000", interval: dict | None = None) -> str:
    """The result table (pandas' to_markdown), the gate decision and the MLflow run link as Markdown (a Prefect
    artifact)."""
    import pandas as pd

    fmt = lambda v: f"{v:.3f}" if isinstance(v, (int, float)) else "-"  # noqa: E731
    table = pd.DataFrame([{"model": r["row"], "strategy": f"`{r['strategy']}`", "n": r.get("n") or "",
                           "accuracy": fmt(r["accuracy"]), "macro-F1": fmt(r["macro_f1"]),
                           "invalid": fmt(r["invalid_rate"])} for r in rows],
                         columns=["model", "strategy", "n", "accuracy", "macro-F1", "invalid"])
    lines = [f"## GenCLS++ on {dataset}", "", table.to_markdown(index=False, disable_numparse=True,
                                                                      colalign=("left", "left") + ("right",) * 4)]
    if interval:
        lines += ["", format_interval(interval)]
    lines += ["", f"**Registry:** {decision['model']} v{decision['version']}: {decision['decision']} "
                  f"({decision['reason']})", "",
              f"**MLflow run:** [{run_id}]({mlflow_url}/#/experiments/{experiment_id}/runs/{run_id}) "
              f"(open the MLflow UI with `make ui`)"]
    return "\n".join(lines)


def artifact_key(dataset: str) -> str:
    """The Prefect artifact key of a dataset's retrain results (lowercase letters, digits, dashes)."""
    return "retrain-" + re.sub(r"[^a-z0-9-]+", "-", dataset.lower())


@flow(name="retrain", log_prints=True)
def retrain(dataset: str = "trec6", profile: str = "quick", overrides: dict[str, Any] | None = None,
            eval_overrides: dict[str, Any] | None = None, evaluations: list[str] | None = None) -> dict:
    """Retrain one dataset end to end and gate the registry champion.

    Args:
        dataset: dataset name (data/<dataset>/ built; `gencls data build`).
        profile: training profile, "quick" (CPU) or "full" (GPU).
        overrides: config overrides, e.g. {"sft.model": "/path/tiny", "rl.max_steps": 2}.
        eval_overrides: evaluation settings, e.g. {"limit": 50, "batch_size": 8}.
        evaluations: which summary rows to evaluate (default all three; "gencls" is required).

    Returns:
        {"run_id", "decision", "summary"}.
    """
    set_offline_env()
    apply_thread_policy()  # tasks run one at a time in this process: all its cores, decided once
    logger = get_run_logger()
    overrides = dict(overrides or {})
    evaluations = list(evaluations or EVALUATIONS)
    if "gencls" not in evaluations:
        evaluations.append("gencls")
    configs = steps.resolve_configs(profile, overrides)
    from components.train.configs import asdict_config

    config_dicts = {k: asdict_config(v) for k, v in configs.items()}
    inference = steps.eval_settings("gencls", profile=profile)["strategy"]
    tags = {"profile": profile, "strategy": inference, "strategy.train": configs["sft"].train_strategy,
            "prefect.flow_run_id": flow_run.get_id() or "", "orchestrator": "prefect"}
    with tracking.start_run(dataset, run_name=f"retrain-{dataset}", tags=tags) as run:
        run_id = run.info.run_id
        logger.info("MLflow run %s (%s)", run_id, tracking.tracking_uri())
        validate_task(dataset, run_id)
        render_task(dataset, {"train": configs["sft"].train_strategy, "inference": inference}, configs["sft"].model, run_id)
        sft = sft_task(dataset, profile, overrides, run_id)
        rl_task(dataset, profile, overrides, run_id, sft["fingerprint"])
        for name in evaluations:
            evaluate_task(dataset, name, configs["sft"].model if name == "zeroshot" else None, profile, run_id,
                          dict(eval_overrides or {}))
        baselines_task(dataset, profile, overrides, run_id, dict(eval_overrides or {}))
        decision = register_task(dataset, run_id, profile, config_dicts)
        summary, interval = summary_table(dataset), summary_interval(dataset)
        print(format_table(summary, interval))
        print(f"{decision['model']} v{decision['version']}: {decision['decision']} ({decision['reason']})")
        create_markdown_artifact(
            key=artifact_key(dataset), description=f"retrain {dataset}: results, gate decision, MLflow run",
            markdown=summary_markdown(dataset, summary, decision, run_id, run.info.experiment_id, interval=interval))
    return {"run_id": run_id, "decision": decision, "summary": summary}


def main(argv: list[str] | None = None) -> int:
    """CLI: run the flow once (locally, or against PREFECT_API_URL when set)."""
    parser = argparse.ArgumentParser(prog="python -m flows.retrain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="trec6")
    parser.add_argument("--profile", default="quick", choices=["quick", "full"])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. --set rl.learning_rate=1e-5 (repeatable)")
    args = parser.parse_args(argv)
    from components.train.configs import parse_overrides

    retrain(args.dataset, args.profile, parse_overrides(args.overrides))
    return 0


if __name__ == "__main__":
    sys.exit(main())
