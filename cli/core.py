"""`gencls prompt show`, `gencls evaluate` and `gencls bench decoding|train|serve`.

Usage:
    gencls prompt show --dataset trec6 --strategy icl=semantic,k=4,definitions,numeric --index 0
    gencls evaluate --dataset trec6 --model smollm2-135m --strategy decoding=perplexity --limit 200
    gencls bench decoding --labels 6 --prompt-tokens 128 --n 20 --model smollm2-135m
    gencls bench train --dataset trec6        # SFT paths and the GRPO step vs a raw LoRA forward+backward
    gencls bench serve --dataset trec6        # `gencls serve` latency over HTTP
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXIT_BAD_INPUT = 2  # bad input: one clear line on stderr, no traceback


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register `prompt show`, `evaluate` and `bench decoding`."""
    prompt = sub.add_parser("prompt", help="inspect rendered prompts")
    prompt_sub = prompt.add_subparsers(dest="prompt_command", required=True)
    show = prompt_sub.add_parser("show", help="print exactly what the model sees for one example")
    show.add_argument("--dataset", required=True, help="dataset name (built under data/)")
    show.add_argument("--strategy", default="naive", help="strategy spec, e.g. icl=random,k=4,definitions,numeric")
    show.add_argument("--model", default=None, help="model whose tokenizer/chat template renders (default smollm2-135m)")
    which = show.add_mutually_exclusive_group()
    which.add_argument("--index", type=int, default=0, help="example position in the split (default 0)")
    which.add_argument("--id", default=None, help="example id")
    show.add_argument("--split", default="test", choices=["train", "test"], help="split (default test)")
    show.add_argument("--max-prompt-tokens", type=int, default=384, help="prompt token budget (default 384)")
    show.add_argument("--data-dir", type=Path, default=None, help="datasets folder (default <root>/data)")
    show.set_defaults(func=_guard(cmd_prompt_show))

    ev = sub.add_parser("evaluate", help="zero-shot (or adapter) evaluation on a test split")
    ev.add_argument("--dataset", required=True, help="dataset name (built under data/)")
    ev.add_argument("--model", default=None, help="registry name, folder or HF id (default smollm2-135m, "
                                                  "or the adapter's base model)")
    ev.add_argument("--adapter", default=None, help="PEFT adapter folder (e.g. checkpoints/trec6/sft)")
    ev.add_argument("--strategy", default="naive", help="strategy spec (default naive)")
    ev.add_argument("--limit", type=int, default=None, help="first N test examples after a seeded shuffle")
    ev.add_argument("--batch-size", type=int, default=16, help="prompts per forward pass (default 16)")
    ev.add_argument("--max-prompt-tokens", type=int, default=384, help="prompt token budget (default 384)")
    ev.add_argument("--calibrate", action="store_true", help="contextual calibration (perplexity decoding)")
    ev.add_argument("--seed", type=int, default=0, help="seed for the subset and random demos")
    ev.add_argument("--out", type=Path, default=None, help="report folder (default reports/<ds>/eval/<model>-<strategy>)")
    ev.add_argument("--data-dir", type=Path, default=None, help="datasets folder (default <root>/data)")
    _threads_option(ev)
    ev.set_defaults(func=_guard(cmd_evaluate))

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    dec = bench_sub.add_parser("decoding", help="perplexity decoding: shared prompt prefix vs one forward per label")
    dec.add_argument("--labels", type=int, default=6, help="number of candidate labels (default 6)")
    dec.add_argument("--prompt-tokens", type=int, default=128, help="prompt length in tokens (default 128)")
    dec.add_argument("--n", type=int, default=20, help="number of prompts (default 20)")
    dec.add_argument("--model", default="smollm2-135m", help="smollm2-135m (default), tiny, or a model folder")
    dec.add_argument("--batch-size", type=int, default=8, help="prompts per forward, shared-prefix path (default 8)")
    dec.add_argument("--dataset", default=None,
                     help="instead: predict on this dataset's first --n test examples with the prompts' shared "
                          "prefix run once vs run for every prompt")
    dec.add_argument("--strategy", default="icl=semantic,k=2,decoding=perplexity",
                     help="inference strategy for --dataset (default: two semantic demonstrations, perplexity)")
    _threads_option(dec)
    dec.set_defaults(func=_guard(cmd_bench_decoding))

    tr = bench_sub.add_parser("train", help="SFT paths and the GRPO step vs a raw LoRA forward+backward")
    tr.add_argument("--dataset", default="trec6", help="dataset whose training prompts are used (default trec6)")
    tr.add_argument("--strategy", default="naive", help="training strategy spec (default naive)")
    tr.add_argument("--model", default="smollm2-135m", help="base model (default smollm2-135m)")
    tr.add_argument("--n", type=int, default=96, help="training examples timed per SFT path (default 96)")
    tr.add_argument("--batch-size", type=int, default=8, help="examples per SFT step (default 8)")
    tr.add_argument("--engines", nargs="+", default=["trl", "answer-only", "shared-prefix"],
                    choices=["trl", "answer-only", "shared-prefix"], help="SFT paths to time (default all three)")
    tr.add_argument("--grpo-steps", type=int, default=5, help="GRPO steps timed per engine after a warm-up (0: skip)")
    tr.add_argument("--generations", type=int, nargs="+", default=[4, 8], help="GRPO group sizes (default 4 8)")
    tr.add_argument("--sft-dir", type=Path, default=None,
                    help="SFT adapter the GRPO policy starts from (default checkpoints/<dataset>/sft when it exists)")
    _threads_option(tr)
    tr.set_defaults(func=_guard(cmd_bench_train))

    sv = bench_sub.add_parser("serve", help="latency of `gencls serve` over HTTP: one text and a batch")
    sv.add_argument("--dataset", default="trec6", help="dataset whose registered model is served (default trec6)")
    sv.add_argument("--alias", default="champion", help="registry alias (default champion)")
    sv.add_argument("--batch", type=int, default=100, help="texts in the batch request (default 100)")
    sv.add_argument("--repeats", type=int, default=5, help="single-text requests timed (default 5)")
    sv.add_argument("--workers", type=int, default=1, help="uvicorn workers of the server (default 1)")
    sv.set_defaults(func=_guard(cmd_bench_serve))


def _threads_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: GENCLS_THREADS, else every core this process may use; "
                             "1 is much faster when other jobs share the CPU)")


def _guard(handler):
    """Turn expected input errors into one line on stderr and exit code 2."""

    def run(args: argparse.Namespace) -> int:
        from components.data.datasets import DataError
        from components.model.models import ModelError

        try:
            return handler(args)
        except (ValueError, DataError, ModelError, FileNotFoundError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT

    return run


def _check_dataset(name: str, data_dir: Path | None) -> None:
    """Fail with the list of available datasets when `name` is not built."""
    from components.data.sources import DATASETS
    from components.data.datasets import DataError, dataset_dir

    folder = dataset_dir(name, data_dir)
    if not (folder / "labels.yaml").exists():
        root = folder.parent
        built = sorted(p.name for p in root.iterdir() if (p / "labels.yaml").exists()) if root.is_dir() else []
        hint = f"`gencls data build --datasets {name}`" if name in DATASETS else "`gencls data import FILE --name ...`"
        raise DataError(
            f"dataset {name!r} not found in {root}; available: {', '.join(built) or '(none)'}; "
            f"registry: {', '.join(DATASETS)}; create it with {hint}"
        )


def cmd_prompt_show(args: argparse.Namespace) -> int:
    """Print the rendered prompt of one example (and the target for a training example)."""
    from components.data.datasets import load_labels, load_split
    from components.evaluate.evaluation import build_retriever
    from components.model.models import load_tokenizer
    from components.model.prompts import PromptBuilder, Strategy

    strategy = Strategy.parse(args.strategy)
    _check_dataset(args.dataset, args.data_dir)
    labels = load_labels(args.dataset, args.data_dir)
    train = load_split(args.dataset, "train", args.data_dir)
    examples = train if args.split == "train" else load_split(args.dataset, args.split, args.data_dir)
    if args.id is not None:
        matches = [ex for ex in examples if ex["id"] == args.id]
        if not matches:
            raise ValueError(f"no example with id {args.id!r} in {args.dataset}/{args.split}")
        example = matches[0]
    else:
        if not -len(examples) <= args.index < len(examples):
            raise ValueError(f"--index {args.index}: {args.dataset}/{args.split} has {len(examples)} examples")
        example = examples[args.index]
    tokenizer = load_tokenizer(args.model)
    builder = PromptBuilder(tokenizer, labels, strategy, train, retriever=build_retriever(train, strategy),
                            max_prompt_tokens=args.max_prompt_tokens)
    sys.stdout.write(builder.prompt(example))
    if args.split == "train":
        sys.stdout.write(builder.target(example))
    sys.stdout.write("\n")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Evaluate and print a summary table."""
    from components.evaluate.evaluation import evaluate
    from components.model.prompts import Strategy

    strategy = Strategy.parse(args.strategy)
    _check_dataset(args.dataset, args.data_dir)
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit {args.limit}: expected a positive number")
    metrics = evaluate(args.dataset, args.model, strategy, adapter=args.adapter, limit=args.limit,
                       out_dir=args.out, batch_size=args.batch_size, max_prompt_tokens=args.max_prompt_tokens,
                       seed=args.seed, calibrate=args.calibrate, data_dir=args.data_dir)
    print_summary(metrics)
    return 0


def print_summary(metrics: dict) -> None:
    """Rich table of the headline metrics and where the reports are."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{metrics['dataset']} | {metrics['model']}"
                        f"{' + ' + metrics['adapter'] if metrics.get('adapter') else ''} | {metrics['strategy']}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("n", "accuracy", "macro_f1", "invalid_rate", "abstention_rate", "answered_accuracy", "ece",
                "examples_per_s", "seconds"):
        value = metrics.get(key)
        table.add_row(key, "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value))
    console = Console()
    console.print(table)
    out = Path(metrics["out_dir"])
    for name in ("predictions.jsonl", "metrics.json", "confusion.png", "prompts_sample.txt"):
        console.print(f"  {out / name}")


def cmd_bench_decoding(args: argparse.Namespace) -> int:
    """Shared-prefix vs naive perplexity decoding on the same inputs."""
    bench = _load_benchmark()
    if args.dataset:
        if args.n < 2 or args.prompt_tokens < 16:
            raise ValueError("bench decoding --dataset: need --n >= 2 and --prompt-tokens >= 16")
        result = bench.run_prefix_benchmark(model=args.model, dataset=args.dataset, n=args.n, strategy=args.strategy,
                                            prompt_tokens=args.prompt_tokens, batch_size=args.batch_size)
        print(bench.format_prefix_report(result))
        return 0
    if args.labels < 2 or args.prompt_tokens < 16 or args.n < 1:
        raise ValueError("bench decoding: need --labels >= 2, --prompt-tokens >= 16, --n >= 1")
    result = bench.run_benchmark(model=args.model, labels=args.labels, prompt_tokens=args.prompt_tokens, n=args.n,
                           batch_size=args.batch_size)
    print(bench.format_report(result))
    return 0


def cmd_bench_train(args: argparse.Namespace) -> int:
    """Training paths vs a raw LoRA forward+backward on the dataset's prompts."""
    from benchmarks import bench_train
    from components import config as project_config

    _check_dataset(args.dataset, None)
    if args.n < 2 * args.batch_size or args.batch_size < 1:
        raise ValueError("bench train: need --batch-size >= 1 and --n >= 2 x --batch-size (the first step warms up)")
    sft_dir = args.sft_dir or project_config.checkpoints_dir() / args.dataset / "sft"
    if args.sft_dir and not (sft_dir / "adapter_config.json").exists():
        raise FileNotFoundError(f"--sft-dir {sft_dir}: no SFT adapter there")
    result = bench_train.run_benchmark(
        dataset=args.dataset, strategy=args.strategy, model=args.model, n=args.n, batch_size=args.batch_size,
        engines=tuple(args.engines), grpo_steps=args.grpo_steps, generations=tuple(args.generations),
        sft_dir=sft_dir if (sft_dir / "adapter_config.json").exists() else None)
    print(bench_train.format_report(result))
    return 0


def cmd_bench_serve(args: argparse.Namespace) -> int:
    """Start `gencls serve`, time one text and a batch over HTTP, stop it."""
    from benchmarks import bench_serve

    _check_dataset(args.dataset, None)
    if args.batch < 1 or args.repeats < 1 or args.workers < 1:
        raise ValueError("bench serve: need --batch, --repeats and --workers >= 1")
    print(bench_serve.format_report(bench_serve.run_benchmark(args.dataset, args.alias, args.batch, args.repeats,
                                                              args.workers)))
    return 0


def _load_benchmark():
    """benchmarks.bench_decoding (an importable module of the repository checkout)."""
    from benchmarks import bench_decoding

    return bench_decoding
