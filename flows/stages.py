"""dvc stage entry points: `python -m flows.stages <stage>` (dvc.yaml calls these).

    python -m flows.stages data|validate|render|sft|rl|register
    python -m flows.stages evaluate [tfidf|zeroshot|sft|gencls]   # no name: every row, in one process

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
EVALUATIONS = ("tfidf", "zeroshot", "sft", "gencls")  # the summary's rows, in the order `evaluate` runs them


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
    parser.add_argument("name", nargs="?", help="evaluate only: one row, tfidf (both TF-IDF rows) | zeroshot | sft | "
                                                "gencls; none: all of them")
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
        if args.name not in (None, *EVALUATIONS):
            parser.error(f"evaluate takes one of: {', '.join(EVALUATIONS)} (none: all of them, as dvc.yaml runs it)")
        for name in [args.name] if args.name else EVALUATIONS:  # one process: torch, PEFT and MLflow load once
            if name == "tfidf":
                steps.step_baselines(dataset, profile)
            else:
                steps.step_evaluate(dataset, name, profile=profile)
    elif args.stage == "register":
        decision = steps.step_register(dataset, profile=profile)
        print(f"[register] {decision['model']} v{decision['version']}: {decision['decision']} ({decision['reason']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
