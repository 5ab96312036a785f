"""`gencls study`: the GenCLS++ study (baselines, strategy ablation, interplay grid, best + RL).

    gencls study --datasets trec6 movie-sentiment --profile cpu --cells headline
    gencls study --datasets trec6 --cells ablation --runner dask            # local 2-worker Dask cluster
    gencls study --datasets trec6 --runner dask --dask-address tcp://host:8786
    gencls study --datasets trec6 --set test_size=100 --set sft.max_steps=20   # budgets

Writes reports/study.md, reports/study.json and reports/study/plots/ (profile cpu; another profile writes
reports/study-<profile>.md/.json and reports/study/plots-<profile>/); every cell is an MLflow run under the study run
(experiment gencls-study). Finished cells are never re-run, so an interrupted study resumes.
"""
from __future__ import annotations

import argparse
import sys
from cli.args import profile_arg

ALL_DATASETS = ("movie-sentiment", "tweet-sentiment", "sms-spam", "trec6", "bbc-news", "r8", "20newsgroups")  # = DATASETS


def add_study_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `gencls study` ."""
    parser.add_argument("--datasets", nargs="+", default=["trec6"], metavar="NAME",
                        help=f"datasets to study (built under data/); 'all' = {' '.join(ALL_DATASETS)}")
    parser.add_argument("--profile", default="cpu", type=profile_arg("study"),
                        help="cpu: N = 1,000 per arm, 500 test; a headline takes 25-45 min per dataset on 2 cores "
                             "(one SFT arm + 32 GRPO steps), the ablation 2-4 h; cpu-long: cpu with SFT up to 6 epochs and "
                             "early stopping (the convergence check); gpu: N = 8,000, test at 2,000 (one H100/H200)")
    parser.add_argument("--runner", default="local", choices=["local", "dask"],
                        help="Prefect task runner: local threads (1 worker) or Dask")
    parser.add_argument("--dask-address", default=None, metavar="ADDR",
                        help="scheduler address of an existing Dask cluster (default: a local 2-worker cluster)")
    parser.add_argument("--workers", type=int, default=None,
                        help="local: parallel cell groups (default 1); dask without address: worker processes (2)")
    parser.add_argument("--cells", default="headline", choices=["headline", "ablation", "all"],
                        help="headline: tfidf, zero-shot, naive SFT, best + RL; ablation: dimensions, grid, best, "
                             "best + RL, reasoning; all: both")
    parser.add_argument("--model", default=None, help="base model name or folder (default smollm2-135m)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="study setting (train_size, val_size, test_size, icl_k, seed, eval.batch_size, ...) "
                             "or training key (sft.max_steps, rl.max_steps, ...); repeatable")
    parser.add_argument("--only", nargs="+", default=None, metavar="ROLE",
                        help="run only cells with these roles or role prefixes (tfidf, zeroshot, naive_sft, dim:, "
                             "grid:, gencls, best_sft, reasoning)")
    parser.add_argument("--report-only", action="store_true",
                        help="rebuild reports/study.{md,json} and the plots from the committed cell files "
                             "(reports/study/cells/<profile>/); trains and measures nothing")
    parser.add_argument("--no-register", dest="register", action="store_false",
                        help="do not register the best model / gate the champion")
    parser.add_argument("--keep-recipe", action="store_true",
                        help="GenCLS++ is the recipe already stored for the profile (cells/<profile>/recipe.json); "
                             "this run's validation cells do not choose it again")
    parser.add_argument("--verify", action="store_true",
                        help="measure the datasets' committed cells again from scratch (checkpoints/study-verify/; "
                             "the committed cells stay) and compare: reports/study/verify-<profile>.json")
    parser.add_argument("--adopt", action="store_true",
                        help="with --verify: then replace the committed cells by the re-run's (the current code's), "
                             "keeping the comparison; refused when the re-run would not measure every committed cell; "
                             "exit 0 when every dataset was adopted, whatever the verdicts")


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register `gencls study`."""
    parser = sub.add_parser("study", help="run the GenCLS++ study (Prefect flow; resumable)",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_study_arguments(parser)
    parser.set_defaults(func=run_study)


def parse_settings(items: list[str]) -> dict:
    """`["test_size=100", "sft.max_steps=20"]` -> {"test_size": 100, "sft.max_steps": "20"} (YAML-typed)."""
    import yaml

    from components.train.configs import parse_overrides

    out = {}
    for key, value in parse_overrides(items).items():
        out[key] = value if key.startswith(("sft.", "rl.")) else yaml.safe_load(value)
    return out


def run_study(args: argparse.Namespace) -> int:
    """Handler: run the flow, print the headline table and where the report went."""
    from flows.study import study

    from flows.study_report import rebuild_report, report_paths

    if args.adopt and not args.verify:
        print("error: --adopt replaces committed cells by a --verify re-run's; pass --verify", file=sys.stderr)
        return 2
    json_path, report, _ = report_paths(args.profile)
    if args.report_only:
        rebuilt = rebuild_report(args.profile)
        print(f"report: {report} ({len(rebuilt['datasets'])} dataset(s) from the committed cells)")
        return 0
    datasets = list(ALL_DATASETS) if args.datasets == ["all"] else args.datasets
    try:
        overrides = parse_settings(args.overrides)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.verify:
        return run_verify(args, datasets)
    state = study(datasets, args.profile, args.runner, args.cells, args.model, args.dask_address, args.workers,
                  overrides, args.register, args.only, return_state=True, keep_recipe=args.keep_recipe)
    if report.is_file():
        print(f"report: {report} (and {json_path.name}, plots)")
    if state.is_failed():
        print(f"study failed: {state.message}", file=sys.stderr)
        return 1
    summary = state.result()["summary"]
    verdict, rows = summary["verdict"], summary["rows"]
    for role in ("tfidf", "naive_sft", "best_sft", "gencls"):
        row = rows[role]
        if row["datasets"]:
            diff = row.get("vs_naive_sft")
            interval = "" if not diff else (f", vs naive SFT {100 * diff['accuracy']['diff']:+.1f} "
                                            f"[{100 * diff['accuracy']['low']:+.1f}, {100 * diff['accuracy']['high']:+.1f}]")
            print(f"{row['title']}: mean accuracy {100 * row['mean_accuracy']:.1f} over {row['datasets']} dataset(s)"
                  f"{interval}")
    if verdict["gain_points"] is not None:
        print(f"target (GenCLS++ >= naive SFT + 4 points, interval above 0, on {verdict['datasets']} of "
              f"{verdict['expected_datasets']} datasets): {'met' if verdict['gain_met'] else 'NOT met'}")
    return 0


def run_verify(args: argparse.Namespace, datasets: list[str]) -> int:
    """`--verify`: re-measure the committed cells in a scratch project and print the comparison."""
    from pathlib import Path

    from flows.study_verify import VerifyError, print_verification, run_verification

    if args.runner != "local" or args.dask_address or args.workers:
        print("error: --verify re-measures with the local runner, one cell group at a time; drop --runner, "
              "--dask-address and --workers", file=sys.stderr)
        return 2
    model = str(Path(args.model).resolve()) if args.model and Path(args.model).exists() else args.model
    try:
        result = run_verification(datasets, args.profile, args.cells, model, args.overrides, args.only, args.adopt)
    except VerifyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print_verification(result)
    if result.get("failed"):
        print(f"verify: the re-run exited with status {result['failed']}; the cells it finished are compared above",
              file=sys.stderr)
        return 1
    if args.adopt:
        return 0 if set(result["adopted"]) == set(datasets) else 1
    return 0 if result["summary"]["reproduced"] else 1
