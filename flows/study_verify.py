"""`gencls study --verify`: measure committed study cells again from scratch and compare them.

    gencls study --datasets sms-spam movie-sentiment --cells headline --verify

The committed cells (reports/study/cells/<profile>/<dataset>/) are left as they are. A scratch project
under checkpoints/study-verify/<profile>/ links conf/ and data/, holds a copy of the committed recipes
(GenCLS++ is the committed recipe, not chosen again) and no cells and no adapters, so every cell is trained
and measured again, as on a fresh clone: its own MLflow store, no registration (caches under
~/.cache/gencls, such as the base model's converted copy, are shared). First a run that measures nothing
(`--only none`) computes the datasets' settings fingerprints: other settings than the committed cells'
stop the verification there (exit 2), not after hours of training. An interrupted verification resumes
from the scratch project (the report counts cells measured by an earlier attempt); delete the folder to
start over.

`--adopt` then replaces the committed cells, the dataset's record (training curves, compute) and the project's
adapters of the dataset (checkpoints/study/<d>; the old ones go to <d>.replaced) by the re-run's, e.g. to bring
cells of an older engine up to the current code. Before any training it refuses a dataset whose committed cells
the re-run would not all measure (its tables would mix two code versions) and scratch cells of other code; the
comparison with the replaced cells stays in the verify file.

The comparison (components/study/verify.py) goes to reports/study/verify-<profile>.json, one entry per dataset
(later verifications of other datasets are added to it), and the profile's report (reports/study.md for cpu) is
rebuilt with it; a re-run that failed prints what it finished and writes nothing.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from components.config import checkpoints_dir, data_dir, project_root
from components.study import adopt, measure, report, verify
from flows.study_report import RECIPE_FILE, cells_root, rebuild_report, report_paths, verify_path

SOURCE = Path(__file__).resolve().parents[1]  # the code that runs the re-measurement


class VerifyError(ValueError):
    """Nothing to verify, or a re-run that would not measure the committed cells' settings (exit 2)."""


def scratch_root(profile: str) -> Path:
    """checkpoints/study-verify/<profile>/: the scratch project the cells are measured again in (not in git)."""
    return checkpoints_dir() / "study-verify" / profile


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
    """The `gencls study` command the scratch project runs: the same cells, the committed recipe, no registry
    (`only=["none"]`: measure nothing, only write the datasets' records)."""
    command = [sys.executable, "-m", "cli", "study", "--datasets", *datasets, "--profile", profile,
               "--cells", cells, "--no-register", "--keep-recipe"]
    command += ["--model", model] if model else []
    for item in settings or []:
        command += ["--set", item]
    return command + (["--only", *only] if only else [])


def committed_datasets(datasets: list[str], profile: str) -> dict[str, dict]:
    """{dataset: measure.read_dataset of its committed cells}; VerifyError names the first without cells."""
    out = {}
    for d in datasets:
        adopt.recover_adoption(cells_root(profile) / d)
        info = measure.read_dataset(cells_root(profile) / d)
        if not info or not info["cells"]:
            raise VerifyError(f"{cells_root(profile) / d}: no committed {profile} cells for {d} to verify "
                              f"(run `gencls study --datasets {d} --profile {profile}` first)")
        out[d] = info
    return out


def _run(command: list[str], root: Path) -> int:
    """Run `command` in the scratch project (GENCLS_ROOT) with its own MLflow store; its exit status."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "GENCLS_PARENT_RUN_ID")}
    env["GENCLS_ROOT"] = str(root)
    return subprocess.run(command, cwd=SOURCE, env=env).returncode


def check_settings(committed: dict[str, dict], rerun_cells: Path, profile: str) -> None:
    """VerifyError unless the scratch records (written by the `--only none` run) carry the committed fingerprints."""
    for d, info in committed.items():
        rerun = measure.read_dataset(rerun_cells / d) or {"record": {}}
        for name in ("fingerprint", "rl_fingerprint"):
            ours, theirs = info["record"].get(name), rerun["record"].get(name)
            if ours != theirs:
                raise VerifyError(f"{d}: the re-run would measure other settings than the committed cells ({name} "
                                  f"{theirs} vs {ours}): pass the committed study's --model and --set options (its "
                                  f"settings: {cells_root(profile) / d / measure.DATASET_FILE})")


def empty_scratch(root: Path, rerun_cells: Path, dataset: str) -> None:
    """After a swap: the re-run's adapters become the project's and its cells leave the scratch project."""
    adopt.take_adapters(root / "checkpoints" / "study" / dataset, checkpoints_dir() / "study" / dataset)
    shutil.rmtree(rerun_cells / dataset, ignore_errors=True)


def finish_adoptions(profile: str, root: Path, rerun_cells: Path, datasets: list[str]) -> None:
    """At the start, after committed_datasets has completed or undone a half-swapped folder
    (adopt.recover_adoption): a verify entry still `adopting` becomes `done` when the committed cells are the
    adopted ones (its adapters taken from the scratch project), else loses its mark (the run adopts again)."""
    from filelock import FileLock

    path = verify_path(profile)
    with FileLock(str(path) + ".lock"):
        stored = measure.read_result(path)
        entries = (stored or {}).get("datasets") or {}
        pending = [d for d in datasets if (entries.get(d, {}).get("adopted") or {}).get("state") == "adopting"]
        for d in pending:
            info = measure.read_dataset(cells_root(profile) / d) or {}
            runs = {c["result"].get("run_id") for c in info.get("cells") or []}
            if runs and runs <= set(entries[d]["adopted"].get("run_ids") or []):
                empty_scratch(root, rerun_cells, d)
                entries[d]["adopted"]["state"] = "done"
            else:
                del entries[d]["adopted"]
        if pending:
            measure.write_result(path, stored)


def source_commit() -> str | None:
    """The git commit of the code that re-measures (None outside a git checkout)."""
    done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=SOURCE, capture_output=True, text=True)
    return done.stdout.strip() or None if done.returncode == 0 else None


def run_verification(datasets: list[str], profile: str = "cpu", cells: str = "headline", model: str | None = None,
                     settings: list[str] | None = None, only: list[str] | None = None,
                     adopt_cells: bool = False) -> dict:
    """Re-run the datasets' cells in the scratch project, compare with the committed ones, write verify-<p>.json;
    `adopt_cells`: then replace the committed cells of every dataset whose committed cells were all measured again.

    Raises:
        VerifyError: a dataset without committed cells; the re-run's settings are not the committed cells';
            `adopt_cells` with committed cells that `cells` and `only` do not measure, or scratch cells of other code.

    Returns:
        {"meta", "datasets": {dataset: verify.compare_dataset(...)}, "summary", "path"} for this run's datasets,
        plus "failed" (the re-run's exit status when it was not 0: nothing is written, the cells it finished
        are compared), "adopted" ({dataset: {"date", "commit", "state", "code", "cells", "not_adopted", "run_ids"}}).
    """
    committed = committed_datasets(datasets, profile)
    root = scratch_root(profile)
    rerun_cells = root / cells_root(profile).relative_to(project_root())
    if adopt_cells:
        finish_adoptions(profile, root, rerun_cells, datasets)
        try:
            adopt.check_adoptable(committed, cells, only, rerun_cells, root / "checkpoints" / "study",
                                  measure.code_hash())
        except adopt.AdoptError as exc:
            raise VerifyError(str(exc)) from None
    prepare_scratch(profile)
    print(f"[verify] {', '.join(datasets)} ({profile}, {cells}): checking the settings in {root}", flush=True)
    status = _run(rerun_command(datasets, profile, cells, model, settings, ["none"]), root)
    if status:
        raise VerifyError(f"the re-run could not start (exit {status}; its output is above)")
    check_settings(committed, rerun_cells, profile)
    command = rerun_command(datasets, profile, cells, model, settings, only)
    print(f"[verify] measuring {', '.join(datasets)} again", flush=True)
    started = time.time()
    status = _run(command, root)
    reran = {d: measure.read_dataset(rerun_cells / d) for d in datasets}
    results = {d: verify.compare_dataset(committed[d], reran[d]) for d in datasets}
    earlier = sum(1 for d, info in reran.items() for c in (info or {}).get("cells") or []
                  if (rerun_cells / d / f"{c['result']['key']}.json").stat().st_mtime < started)
    meta = {"profile": profile, "cells": cells, "only": only, "settings": settings or [],
            "command": "gencls study --verify " + " ".join(command[command.index("--datasets"):]),
            "commit": source_commit(), "machine": report.machine_info(), "seconds": round(time.time() - started, 1),
            "cells_from_an_earlier_attempt": earlier, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
    path = verify_path(profile)
    out = {"meta": meta, "datasets": results, "summary": verify.summary(results), "path": str(path)}
    if status:
        return {**out, "failed": status}
    adopted = {}
    for d in datasets if adopt_cells else []:
        codes = {c["result"].get("code") for c in (reran[d] or {}).get("cells") or []}
        if results[d]["not_rerun"] or codes - {None, measure.code_hash()}:  # the committed set stays whole
            why = (f"{len(results[d]['not_rerun'])} committed cell(s) not measured again" if results[d]["not_rerun"]
                   else f"cells measured by other code ({', '.join(sorted(c for c in codes if c))}): the code changed")
            print(f"[verify] {d}: not adopted, {why}", file=sys.stderr)
            continue
        adopted[d] = {"date": meta["finished"][:10], "commit": meta["commit"], "state": "adopting",
                      "code": sorted(str(c or "not recorded") for c in codes), "cells": len(results[d]["cells"]),
                      "not_adopted": results[d]["only_in_rerun"],
                      "run_ids": sorted(c["result"].get("run_id") or "" for c in reran[d]["cells"])}
    write_entries(path, profile, results, meta, adopted)  # first: an interrupted adoption is finished next time
    for d in adopted:
        adopt.adopt_dataset(rerun_cells / d, cells_root(profile) / d, [c["key"] for c in results[d]["cells"]],
                            root / "checkpoints", checkpoints_dir())
        empty_scratch(root, rerun_cells, d)
        adopted[d]["state"] = "done"
    if adopted:
        write_entries(path, profile, results, meta, adopted)
    if report_paths(profile)[0].is_file():  # the profile's report carries the comparison (its own section)
        rebuild_report(profile)
    return {**out, "adopted": adopted}


def write_entries(path: Path, profile: str, results: dict, meta: dict, adopted: dict) -> None:
    """Merge this run's comparisons into the verify file; an earlier adoption of a dataset this run does not adopt
    is carried as `adopted_earlier` (the committed cells are still the adopted ones)."""
    from filelock import FileLock

    with FileLock(str(path) + ".lock"):
        stored = (measure.read_result(path) or {}).get("datasets") or {}
        entries = {}
        for d, r in results.items():
            before = stored.get(d, {}).get("adopted") or stored.get(d, {}).get("adopted_earlier")
            before = before if before and before.get("state", "done") == "done" else None
            entries[d] = {**r, "meta": meta, **({"adopted": adopted[d]} if d in adopted else
                                                 {"adopted_earlier": before} if before else {})}
        merged = {**stored, **entries}
        measure.write_result(path, {"profile": profile, "datasets": merged, "summary": verify.summary(merged),
                                    "about": verify.ABOUT})


def print_verification(result: dict) -> None:
    """The per-cell table of every dataset, then the overall line."""
    for dataset, info in result["datasets"].items():
        print("\n".join(verify.table(dataset, info)))
    s = result["summary"]
    counts = verify.count_text(s["counts"])
    largest = "" if s["max_abs_accuracy_diff"] is None else f"; largest accuracy change {100 * s['max_abs_accuracy_diff']:.1f} points"
    earlier = result["meta"]["cells_from_an_earlier_attempt"]
    reused = f" ({earlier} measured by an earlier attempt in the scratch project)" if earlier else ""
    where = "not written: the re-run failed" if result.get("failed") else result["path"]
    if result.get("adopted"):
        print(f"adopted: {', '.join(result['adopted'])}: the committed cells are now the re-run's")
    print(f"verify: {s['cells']} cell(s) over {len(s['datasets'])} dataset(s){reused}: {counts}{largest}; "
          f"{'reproduced' if s['reproduced'] else 'NOT reproduced'} -> {where}")
