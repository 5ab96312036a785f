"""dvc stage entry points: `python -m flows.stages <stage>` (dvc.yaml calls these).

    python -m flows.stages data|validate|render|sft|rl|register
    python -m flows.stages evaluate zeroshot|sft|gencls|tfidf

The dataset and profile come from conf/params.yaml (`data.dataset`, `profile`); each stage
opens its own MLflow run (tag `stage`), marked FAILED when the stage raises.
"""
from __future__ import annotations

import argparse
import signal
import sys

from components.config import load_params, set_offline_env
from components.threads import apply_thread_policy

STAGES = ("data", "validate", "render", "sft", "rl", "evaluate", "register")


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM (dvc/Prefect cancelling) -> KeyboardInterrupt, so the MLflow run is closed as KILLED."""
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    """Run one stage for the dataset and profile named in conf/params.yaml."""
    set_offline_env()
    apply_thread_policy()  # one process on the cores (GENCLS_THREADS overrides)
    signal.signal(signal.SIGTERM, _interrupt)
    parser = argparse.ArgumentParser(prog="python -m flows.stages", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument("name", nargs="?", help="evaluate only: zeroshot | sft | gencls | tfidf (both TF-IDF rows)")
    args = parser.parse_args(argv)
    from flows import steps

    params = load_params()
    dataset = (params.get("data") or {}).get("dataset", "trec6")
    profile = params.get("profile", "quick")
    if args.stage == "data":
        steps.step_data(dataset)
    elif args.stage == "validate":
        steps.step_validate(dataset)
    elif args.stage == "render":
        cfg = steps.resolve_configs(profile)
        steps.step_render(dataset, {"train": cfg["sft"].train_strategy,
                                    "inference": steps.eval_settings("gencls", profile=profile)["strategy"]},
                          cfg["sft"].model)
    elif args.stage == "sft":
        steps.step_sft(dataset, profile)
    elif args.stage == "rl":
        steps.step_rl(dataset, profile)
    elif args.stage == "evaluate":
        if args.name not in ("zeroshot", "sft", "gencls", "tfidf"):
            parser.error("evaluate needs one of: zeroshot, sft, gencls, tfidf")
        if args.name == "tfidf":
            steps.step_baselines(dataset, profile)
        else:
            steps.step_evaluate(dataset, args.name, profile=profile)
    elif args.stage == "register":
        decision = steps.step_register(dataset, profile=profile)
        print(f"[register] {decision['model']} v{decision['version']}: {decision['decision']} ({decision['reason']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
