"""Adopting re-measured study cells (`gencls study --verify --adopt`): the file work, on paths it is given.

A dataset's committed cells (reports/study/cells/<profile>/<d>/) are replaced by the cells a scratch project
measured again with the same settings keys, e.g. to bring cells of an older engine up to the current code:

* ``check_adoptable`` refuses, before any training, a selection that would leave some committed cell unmeasured
  (the dataset's tables would mix two code versions) and scratch cells measured by other code;
* ``adopt_dataset`` swaps in a staged copy of the folder by two renames (``recover_adoption`` finishes or undoes
  an interrupted swap), keeps the committed registry decision and points the cells at the project's adapters;
* ``take_adapters`` moves the re-run's adapters into the project's checkpoints/study/<d> one training folder at a
  time (other profiles' adapters there stay; the replaced ones go to <d>.replaced).

The orchestration (the re-run, the comparison, the verify file) is flows/study_verify.py.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from components.study import measure, plan, verify

STAGED, REPLACED = ".adopting", ".replaced"  # suffixes of a dataset folder during a swap (never a dataset name)


class AdoptError(ValueError):
    """Adopting would mix code versions in a dataset's cells (exit 2, before any training)."""


def scratch_cell_codes(folder: Path) -> set[str | None]:
    """The `code` of every cell file in a scratch dataset folder (None for cells that do not record one)."""
    codes = set()
    for path in Path(folder).glob("*.json"):
        result = (measure.read_result(path) or {}).get("result")
        if isinstance(result, dict):
            codes.add(result.get("code"))
    return codes


def check_adoptable(committed: dict[str, dict], cells: str, only: list[str] | None, scratch_cells: Path,
                    scratch_checkpoints: Path, code: str) -> None:
    """AdoptError when adopting would keep committed cells the selection does not measure, or reuse scratch cells
    measured by other code than `code` (measure.code_hash()). Cells that record no code predate the field and
    are taken as measured by this code; the adoption record says "not recorded" for them."""
    for d, info in committed.items():
        k = int((info["record"].get("settings") or {}).get("icl_k", 2))
        left = verify.uncovered(info, plan.selection_roles(cells, only, k))
        if left:
            roles = sorted({r for c in info["cells"] for r in c["result"].get("roles") or []})
            raise AdoptError(f"{d}: --adopt would keep {len(left)} committed cell(s) that `--cells {cells}`"
                             f"{' --only ' + ' '.join(only) if only else ''} does not measure ({', '.join(left[:3])}"
                             f"{', ...' if len(left) > 3 else ''}), so the dataset's tables would mix two code "
                             f"versions; pass a selection that measures every committed role ({', '.join(roles[:8])}"
                             f"{', ...' if len(roles) > 8 else ''}), e.g. --cells all")
        other = sorted(c for c in scratch_cell_codes(scratch_cells / d) if c not in (None, code))
        if other:
            raise AdoptError(f"{d}: the scratch project holds cells measured by other code ({', '.join(other)}; this "
                             f"checkout's is {code}), which --adopt would reuse: delete {scratch_cells / d} and "
                             f"{scratch_checkpoints / d}, then run again")


def recover_adoption(target: Path) -> None:
    """Finish or undo a dataset folder swap that an interrupted adoption left (`<d>.replaced`, `<d>.adopting`)."""
    replaced, staged = target.with_name(target.name + REPLACED), target.with_name(target.name + STAGED)
    if replaced.is_dir():
        if target.is_dir():  # the new folder is in place: the old one only had to be removed
            shutil.rmtree(replaced)
        else:
            replaced.rename(target)
    if staged.is_dir():
        shutil.rmtree(staged)


def adopt_dataset(source: Path, target: Path, keys: list[str], adapters_from: Path, adapters_to: Path) -> None:
    """Swap the committed dataset folder `target` for one with the re-run's cells of `keys` and its record (the
    committed registry decision kept), each cell's adapter path moved from under `adapters_from` to under
    `adapters_to` (where ``take_adapters`` puts them): staged beside it, then two renames."""
    staged, replaced = target.with_name(target.name + STAGED), target.with_name(target.name + REPLACED)
    recover_adoption(target)
    shutil.copytree(target, staged)
    for key in keys:
        cell = measure.read_result(source / f"{key}.json")
        adapter = cell["result"].get("adapter")
        if adapter and Path(adapter).is_relative_to(adapters_from):
            cell["result"]["adapter"] = str(adapters_to / Path(adapter).relative_to(adapters_from))
        (staged / f"{key}.json").write_text(measure.dump_cell(cell), encoding="utf-8")
    record = measure.read_result(source / measure.DATASET_FILE) or {}
    record["register"] = (measure.read_result(target / measure.DATASET_FILE) or {}).get("register")
    measure.write_result(staged / measure.DATASET_FILE, record)
    target.rename(replaced)
    staged.rename(target)
    shutil.rmtree(replaced)


def take_adapters(theirs: Path, ours: Path) -> list[str]:
    """Move each training folder of `theirs` (the scratch project's checkpoints/study/<d>) into `ours` (the
    project's); a folder of the same name there goes to <d>.replaced first. Other folders of `ours` (other
    profiles' adapters) stay. Returns the names moved."""
    moved = []
    for child in sorted(Path(theirs).iterdir()) if Path(theirs).is_dir() else []:
        mine = ours / child.name
        if mine.exists():
            old = ours.with_name(ours.name + REPLACED) / child.name
            shutil.rmtree(old, ignore_errors=True)
            old.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(mine), str(old))
        ours.mkdir(parents=True, exist_ok=True)
        shutil.move(str(child), str(mine))
        moved.append(child.name)
    shutil.rmtree(theirs, ignore_errors=True)
    return moved
