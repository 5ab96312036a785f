"""`gencls study --verify`: measure committed study cells again from scratch and compare them.

    gencls study --datasets sms-spam movie-sentiment --cells headline --verify

The committed cells (reports/study/cells/<profile>/<dataset>/) are left as they are. A scratch project
under checkpoints/study-verify/<profile>/ links conf/ and data/, holds a copy of the committed recipes
(GenCLS++ is the committed recipe, not chosen again) and no cells and no adapters, so every cell is trained
and measured again, exactly as a fresh clone would: its own MLflow store, no registration. An interrupted
verification resumes from that scratch project; delete it to start over. The comparison
(components/study/verify.py) goes to reports/study/verify-<profile>.json, one entry per dataset
(later verifications of other datasets are added to it).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from components.config import checkpoints_dir, data_dir, project_root
from components.study import measure, report, verify
from flows.study_report import RECIPE_FILE, cells_root, study_root

SOURCE = Path(__file__).resolve().parents[1]  # the code that runs the re-measurement


class NothingToVerify(ValueError):
    """A dataset has no committed cells for the profile."""


def scratch_root(profile: str) -> Path:
    """checkpoints/study-verify/<profile>/: the scratch project the cells are measured again in (not in git)."""
    return checkpoints_dir() / "study-verify" / profile


def verify_path(profile: str) -> Path:
    """reports/study/verify-<profile>.json: the comparison (committed)."""
    return study_root() / f"verify-{profile}.json"


def prepare_scratch(profile: str) -> Path:
    """The scratch project: conf/ and data/ linked, the committed recipe files copied, nothing else."""
    root = scratch_root(profile)
    root.mkdir(parents=True, exist_ok=True)
    for name, target in (("conf", project_root() / "conf"), ("data", data_dir())):
        link = root / name
        if link.is_symlink() and link.resolve() != target.resolve():
            link.unlink()
        if target.is_dir() and not link.exists():
            link.symlink_to(target.resolve(), target_is_directory=True)
    for recipe in cells_root(profile).parent.glob(f"*/{RECIPE_FILE}"):
        copy = root / recipe.relative_to(project_root())
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(recipe, copy)
    return root


def rerun_command(datasets: list[str], profile: str, cells: str, model: str | None = None,
                  settings: list[str] | None = None, only: list[str] | None = None) -> list[str]:
    """The `gencls study` command the scratch project runs: the same cells, the committed recipe, no registry."""
    command = [sys.executable, "-m", "cli", "study", "--datasets", *datasets, "--profile", profile,
               "--cells", cells, "--no-register", "--keep-recipe"]
    command += ["--model", model] if model else []
    for item in settings or []:
        command += ["--set", item]
    return command + (["--only", *only] if only else [])


def committed_datasets(datasets: list[str], profile: str) -> dict[str, dict]:
    """{dataset: measure.read_dataset of its committed cells}; NothingToVerify names the first without cells."""
    out = {}
    for d in datasets:
        info = measure.read_dataset(cells_root(profile) / d)
        if not info or not info["cells"]:
            raise NothingToVerify(f"{cells_root(profile) / d}: no committed {profile} cells for {d} to verify "
                                  f"(run `gencls study --datasets {d} --profile {profile}` first)")
        out[d] = info
    return out


def run_verification(datasets: list[str], profile: str = "cpu", cells: str = "headline", model: str | None = None,
                     settings: list[str] | None = None, only: list[str] | None = None) -> dict:
    """Re-run the datasets' cells in the scratch project, compare with the committed ones, write verify-<p>.json.

    Returns:
        {"meta", "datasets": {dataset: verify.compare_dataset(...)}, "summary"} for this run's datasets, plus
        "failed" (the re-run's exit status when it was not 0; the cells it finished are still compared).
    """
    committed = committed_datasets(datasets, profile)
    root = prepare_scratch(profile)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # the scratch project's own store
    env["GENCLS_ROOT"] = str(root)
    command = rerun_command(datasets, profile, cells, model, settings, only)
    print(f"[verify] measuring {', '.join(datasets)} ({profile}, {cells}) again in {root}", flush=True)
    started = time.time()
    status = subprocess.run(command, cwd=SOURCE, env=env).returncode
    rerun_cells = root / cells_root(profile).relative_to(project_root())
    results = {d: verify.compare_dataset(committed[d], measure.read_dataset(rerun_cells / d)) for d in datasets}
    meta = {"profile": profile, "cells": cells, "only": only, "settings": settings or [],
            "command": "gencls study --verify " + " ".join(command[command.index("--datasets"):]),
            "machine": report.machine_info(), "seconds": round(time.time() - started, 1),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
    path = verify_path(profile)
    stored = measure.read_result(path) or {}
    merged = {**(stored.get("datasets") or {}), **{d: {**r, "meta": meta} for d, r in results.items()}}
    measure.write_result(path, {"profile": profile, "datasets": merged, "summary": verify.summary(merged),
                                "about": verify.ABOUT})
    out = {"meta": meta, "datasets": results, "summary": verify.summary(results), "path": str(path)}
    return {**out, "failed": status} if status else out


def print_verification(result: dict) -> None:
    """The per-cell table of every dataset, then the overall line."""
    for dataset, info in result["datasets"].items():
        print("\n".join(verify.table(dataset, info)))
    s = result["summary"]
    counts = ", ".join(f"{n} {v}" for v, n in s["counts"].items() if n) or "none"
    largest = "" if s["max_abs_accuracy_diff"] is None else f"; largest accuracy change {100 * s['max_abs_accuracy_diff']:.1f} points"
    print(f"verify: {s['cells']} cell(s) over {len(s['datasets'])} dataset(s): {counts}{largest}; "
          f"{'reproduced' if s['reproduced'] else 'NOT reproduced'} -> {result['path']}")
