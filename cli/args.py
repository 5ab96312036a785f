"""Argument types the `gencls` subcommands share."""
from __future__ import annotations

import argparse
from typing import Callable


def profile_arg(section: str) -> Callable[[str], str]:
    """An argparse `type` accepting the conf/params.yaml profiles that define `section` (sft, study ...):
    the profiles are listed once, in conf/params.yaml, and a wrong name is one line and exit code 2."""
    def check(name: str) -> str:
        from components.config import profile_section

        try:
            profile_section(name, section)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return name
    check.__name__ = "profile"
    return check
