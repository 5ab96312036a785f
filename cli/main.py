"""`gencls` command line: each area registers its own subcommands.

Usage: gencls --help
"""
from __future__ import annotations

import argparse
import importlib
import sys

from components.config import set_offline_env
from components.threads import apply_thread_policy

# Modules that contribute subcommands; each exposes `add_commands(subparsers)`.
# Every subcommand sets `func(args) -> int | None` via set_defaults.
COMMAND_MODULES = ["cli.data", "cli.core", "cli.train", "cli.ops", "cli.study"]


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser from every command module that is present."""
    parser = argparse.ArgumentParser(prog="gencls", description="GenCLS++ generative text classification")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue
            raise
        module.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `gencls` console script."""
    set_offline_env()
    args = build_parser().parse_args(argv)
    try:
        apply_thread_policy(threads=getattr(args, "threads", None))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
