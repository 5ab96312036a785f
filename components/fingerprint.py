"""Fingerprints of a step's inputs: hashes of files, of JSON-able data, and of the code a module runs.

    key = fingerprint({"config": cfg, "data": sha256_files(files), "src": source_hash("components.train.sft")})

Every skip of finished work goes through here: a folder's record (`write_record`, `.gencls_step.json`:
the fingerprint of the inputs that made it, plus run id and seconds) says it is done for those inputs
(`finished`). The pipeline steps (flows/steps.py), the study's trained adapters and its cell keys use
it; DVC decides with the same code closure (tests/test_dvc.py).

`source_hash` follows the module's imports (module level and inside functions, found with `ast`)
through the project's own packages, so a change to any module the step can run (engine.py for SFT,
decoding.py for an evaluation) changes the key. flows/steps.py keys every step's skip record with it
and tests/test_dvc.py derives each dvc stage's `deps` the same way, so DVC and the Prefect flow skip
the same work.
"""
from __future__ import annotations

import ast
import hashlib
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("components", "flows")
RECORD_FILE = ".gencls_step.json"  # in an output folder: the fingerprint of its inputs, run id, seconds  # the code a step can run (cli/ and benchmarks/ are never imported by steps)


def sha256_files(paths: Iterable[Path]) -> str:
    """One sha256 over several files (name + content; a missing file hashes as such)."""
    digest = hashlib.sha256()
    for path in paths:
        path = Path(path)
        digest.update(path.name.encode() + b"\0")
        digest.update(path.read_bytes() if path.is_file() else b"<missing>")
    return digest.hexdigest()


def fingerprint(data: Any, length: int = 20) -> str:
    """Stable short hash of JSON-able data (the first `length` hex digits of its sha256)."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:length]


# ----------------------------------------------------------------------------- skip records
def read_record(folder: str | Path) -> dict:
    """The record of an output folder: what made it ({} when absent or unreadable)."""
    path = Path(folder) / RECORD_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except ValueError:
        return {}  # a torn write: the output is not finished


def write_record(folder: str | Path, record: dict, outputs: Iterable[str] = ()) -> None:
    """Write the record last and atomically (written aside, renamed): a crash leaves no record.

    `outputs` (file names in `folder`) are recorded with their sha256, and `finished` then holds the folder
    finished only while those files are the ones written: outputs that something else put back (a
    `dvc checkout` of another experiment into a `persist`ed folder, whose record dvc ignores) are not taken
    for this run's.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if outputs:
        record = {**record, "outputs": {name: sha256_files([folder / name]) for name in outputs}}
    tmp = folder / (RECORD_FILE + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, folder / RECORD_FILE)


def finished(folder: str | Path, key: str, needs: tuple[str, ...] = ()) -> dict | None:
    """The record when `folder` was made from inputs with fingerprint `key` and holds the files `needs`."""
    record = read_record(folder)
    if record.get("fingerprint") != key or not all((Path(folder) / name).exists() for name in needs):
        return None
    if any(sha256_files([Path(folder) / name]) != digest for name, digest in (record.get("outputs") or {}).items()):
        return None  # the recorded outputs were replaced or changed since
    return record


def module_file(name: str) -> Path | None:
    """`components.train.sft` -> components/train/sft.py (a package's __init__.py); None outside PACKAGES or missing."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = REPO_ROOT / name.replace(".", "/")
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def imported_modules(tree: ast.AST) -> set[str]:
    """Project modules imported anywhere under an AST node (`from components import x` counts as components.x)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return {m for m in found if module_file(m) is not None}


@lru_cache(maxsize=64)
def module_closure(*modules: str) -> tuple[Path, ...]:
    """The files of `modules` and of every project module they can import, sorted."""
    seen: set[str] = set()
    todo = list(modules)
    while todo:
        name = todo.pop()
        if name in seen or module_file(name) is None:
            continue
        seen.add(name)
        todo += sorted(imported_modules(ast.parse(module_file(name).read_text(encoding="utf-8"))) - seen)
    return tuple(sorted({module_file(m) for m in seen}))


def source_hash(*modules: str) -> str:
    """Hash of the code `modules` run: their files and those of everything they import from the project."""
    files = module_closure(*modules)
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(REPO_ROOT)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()
