"""`gencls train sft|rl`: SFT warm-up and GRPO from the command line.

    gencls train sft --dataset trec6 --profile quick
    gencls train rl  --dataset trec6 --profile quick --from-sft checkpoints/trec6/sft
    gencls train sft --dataset trec6 --strategy definitions,numeric --set sft.lora_r=8 --set epochs=2

Config keys: `gencls train sft --help` lists them; conf/params.yaml `sft:`/`rl:` sections and
`profiles: {quick|full: {sft: ..., rl: ...}}` are read when present; `--set` wins.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from cli.args import profile_arg


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register `train sft` and `train rl`."""
    from components.train.configs import config_help

    train = sub.add_parser("train", help="train a classifier: SFT warm-up, then GRPO")
    kinds = train.add_subparsers(dest="train_kind", required=True)
    for kind, what in (("sft", "supervised fine-tuning (LoRA by default)"), ("rl", "GRPO from the SFT checkpoint")):
        parser = kinds.add_parser(kind, help=what, formatter_class=argparse.RawDescriptionHelpFormatter,
                                  epilog=f"config keys for --set ({kind}.KEY=VALUE or KEY=VALUE):\n{config_help(kind)}")
        parser.add_argument("--dataset", required=True, help="dataset name (data/<name>/ built)")
        parser.add_argument("--profile", default="quick", type=profile_arg("sft"),
                            help="quick: 2 CPU cores, trec6 SFT+RL+eval < 15 min; full: GPU, all data")
        parser.add_argument("--strategy", default=None, help="training prompt strategy (default: naive / the SFT one)")
        parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                            help="override a config key, e.g. sft.learning_rate=1e-4 (repeatable)")
        parser.add_argument("--out", default=None, help=f"output folder (default checkpoints/<dataset>/{kind})")
        parser.add_argument("--params", default=None, help="config file (default <root>/conf/params.yaml)")
        if kind == "sft":
            parser.add_argument("--model", default=None, help="base model name or folder (default smollm2-135m)")
        else:
            parser.add_argument("--from-sft", dest="from_sft", default=None,
                                help="SFT output folder (default checkpoints/<dataset>/sft)")
        parser.set_defaults(func=run_train)


def resolve_config(args: argparse.Namespace):
    """The resolved SFTConfig/RLConfig for parsed CLI arguments."""
    from components.config import load_params
    from components.train.configs import load_config, parse_overrides

    overrides = parse_overrides(args.overrides)
    if getattr(args, "model", None):
        overrides[f"{args.train_kind}.model"] = args.model
    if args.strategy:
        overrides[f"{args.train_kind}.train_strategy"] = args.strategy
    return load_config(args.train_kind, args.profile, params=load_params(args.params), overrides=overrides)


def run_train(args: argparse.Namespace) -> int:
    """Handler of `gencls train sft|rl`: train, then print where the adapter went and its metrics."""
    from components.train.checkpoints import read_json

    try:
        config = resolve_config(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        if args.train_kind == "sft":
            from components.train.sft import train_sft

            out = train_sft(args.dataset, config, out_dir=args.out)
        else:
            from components.train.rl import train_rl

            out = train_rl(args.dataset, config, sft_dir=args.from_sft, out_dir=args.out)
    except Exception as exc:  # data validation / missing data: report, nothing trained
        name = type(exc).__name__
        if name in ("DataValidationError", "DataError", "ModelError", "FileNotFoundError"):
            print(f"error: {name}: {' '.join(str(exc).split())}", file=sys.stderr)
            return 2
        raise
    metrics = read_json(Path(out) / "metrics.json", {})
    best = metrics.get("best") or {}
    print(f"adapter: {out}")
    if best:
        print(f"held-out (step {best['step']}): accuracy {best['accuracy']:.4f}  macro-F1 {best['macro_f1']:.4f}  "
              f"invalid {best.get('invalid_rate', 0):.4f}")
        for label, f1 in sorted(best.get("per_label_f1", {}).items()):
            print(f"  F1 {label:<20} {f1:.4f}")
    print(f"time: {metrics.get('seconds')} s;  evaluate with: gencls evaluate --dataset {args.dataset} --adapter {out}")
    return 0
