"""Building data/<name>/ from raw rows: the processing every source gets, and the build of a registry dataset.

Usage:
    gencls data build --datasets trec6        # or: build_dataset("trec6")

Processing, the same for every source (documented in each card):
    1. text is normalised: control characters removed, whitespace inside a line collapsed
       to one space, lines stripped, empty lines dropped; rows left empty are dropped;
    2. exact duplicates (identical normalised text) are removed: a text seen with one label
       keeps its first occurrence (test rows first, so a test text never stays in train);
       a text seen with different labels is dropped everywhere (it is ambiguous);
    3. sources with a split keep it; the others get a stratified 80/20 split, seed 0;
    4. ids are the first 16 hex digits of sha256(text), stable across rebuilds;
    5. files are written with sorted keys, source order and no timestamps, so a rebuild is
       byte-identical; they are written into a temporary folder that replaces
       ``data/<name>`` only once complete, so a failed build leaves old data untouched.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import unicodedata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from components.data.datasets import SPLITS, DataError, dataset_dir
from components.data.packages import fetch_package, file_sha256, read_manifest, record_files
from components.data.sources import DatasetSpec, get_spec


# ----------------------------------------------------------------------------- processing
def normalise_text(text: str) -> str:
    """Normalise whitespace: drop control characters, collapse spaces, strip lines, drop empty lines.

    Args:
        text: Raw text.

    Returns:
        The normalised text ("" when nothing printable is left).
    """
    text = "".join(ch for ch in text if ch in "\n\t" or unicodedata.category(ch) != "Cc")
    lines = (" ".join(line.split()) for line in text.splitlines())
    return "\n".join(line for line in lines if line)


def text_id(text: str) -> str:
    """Return the stable id of a text: the first 16 hex digits of its sha256."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def clean_frame(frame: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, int]]:
    """Normalise text, drop empty rows and exact duplicates (see the module docstring).

    Rows of the test split come first, so a text present in both splits stays in test.

    Args:
        frame: Columns text, label and optionally split, in source order.

    Returns:
        The cleaned frame (source order, fresh index) and counts of dropped rows.
    """
    frame = frame.assign(text=frame["text"].map(normalise_text), label=frame["label"].astype(str))
    empty = frame["text"] == ""
    frame = frame[~empty]
    n_labels = frame.groupby("text")["label"].transform("nunique")
    conflicting = n_labels > 1
    frame = frame[~conflicting]
    split = frame["split"] if "split" in frame else pd.Series("", index=frame.index)
    ranked = frame.iloc[np.argsort(split.eq("train").to_numpy(), kind="stable")]
    duplicate = ranked["text"].duplicated(keep="first")
    in_test = ranked["text"].isin(set(ranked.loc[split.eq("test"), "text"]))
    crossed = duplicate & split.loc[ranked.index].eq("train") & in_test
    kept = ranked[~duplicate].sort_index().reset_index(drop=True)
    stats = {"empty_text": int(empty.sum()), "conflicting_label_rows": int(conflicting.sum()),
             "duplicate_rows": int((duplicate & ~crossed).sum()), "test_text_removed_from_train": int(crossed.sum())}
    return kept, stats


def stratified_split(labels: pd.Series, test_size: float = 0.2, seed: int = 0) -> np.ndarray:
    """Choose test rows per label: round(n * test_size) of each label, at least one left in train.

    Args:
        labels: One label per row.
        test_size: Fraction of each label that goes to test.
        seed: Seed of the numpy generator (labels are visited in sorted order).

    Returns:
        Boolean array, True for test rows.
    """
    if not 0 < test_size < 1:
        raise DataError(f"test size {test_size}: expected a fraction between 0 and 1")
    rng = np.random.default_rng(seed)
    is_test = np.zeros(len(labels), dtype=bool)
    values = labels.to_numpy()
    for label in sorted(set(values)):
        idx = np.flatnonzero(values == label)
        n_test = min(math.floor(len(idx) * test_size + 0.5), len(idx) - 1)
        is_test[rng.permutation(idx)[:n_test]] = True
    return is_test


def split_frame(frame: pd.DataFrame, test_size: float, seed: int) -> dict[str, pd.DataFrame]:
    """Split into train/test: the frame's own split column if any, else stratified.

    Args:
        frame: Cleaned frame with text, label and optionally split.
        test_size: Test fraction used when the frame has no split column.
        seed: Seed used when the frame has no split column.

    Returns:
        {"train": frame, "test": frame}, each with columns id, text, label in source order.
    """
    if "split" in frame:
        is_test = frame["split"].eq("test").to_numpy()
    else:
        is_test = stratified_split(frame["label"], test_size, seed)
    frame = frame.assign(id=frame["text"].map(text_id))
    if frame["id"].duplicated().any():
        raise DataError("two different texts share an id (sha256 prefix collision); report this")
    return {"train": frame.loc[~is_test, ["id", "text", "label"]], "test": frame.loc[is_test, ["id", "text", "label"]]}


def count_labels(splits: dict[str, pd.DataFrame], labels: list[str]) -> dict[str, dict]:
    """Count examples per split and label (labels in the given order)."""
    counts = {}
    for split, part in splits.items():
        per_label = part["label"].value_counts()
        counts[split] = {"total": len(part), "labels": {lab: int(per_label.get(lab, 0)) for lab in labels}}
    return counts


# ----------------------------------------------------------------------------- writing
def write_dataset(name: str, splits: dict[str, pd.DataFrame], definitions: dict[str, str],
                  card: dict[str, Any], data_dir: str | Path | None = None) -> Path:
    """Write a dataset atomically: build a temporary folder, then swap it into place.

    Args:
        name: Dataset name.
        splits: {"train": frame, "test": frame} with columns id, text, label.
        definitions: Label -> definition, in label order.
        card: Card fields (source, processing, counts); file checksums are added here.
        data_dir: Folder holding all datasets; default `config.data_dir()`.

    Returns:
        The dataset folder.
    """
    target = dataset_dir(name, data_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=target.parent))
    try:
        os.chmod(staging, 0o755)  # mkdtemp makes it private; datasets are ordinary folders
        for split, part in splits.items():
            _write_jsonl(staging / f"{split}.jsonl", part)
        _write_text(staging / "labels.yaml", _dump_yaml(definitions))
        card = {**card, "files": {f: file_sha256(staging / f) for f in ("labels.yaml", "test.jsonl", "train.jsonl")}}
        _write_text(staging / "card.yaml", _dump_yaml(card))
        _write_text(staging / "card.md", render_card(card, definitions))
        _swap_into_place(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _write_jsonl(path: Path, part: pd.DataFrame) -> None:
    """Write rows as JSON lines with sorted keys, UTF-8, LF line ends."""
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        for row in part[["id", "text", "label"]].itertuples(index=False):
            fh.write(json.dumps({"id": row.id, "label": row.label, "text": row.text},
                                ensure_ascii=False, sort_keys=True) + "\n")


def _write_text(path: Path, text: str) -> None:
    """Write UTF-8 text with LF line ends."""
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        fh.write(text)


def _dump_yaml(data: dict) -> str:
    """Dump YAML keeping insertion order, unicode as is, long lines unwrapped."""
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=1000)


def _swap_into_place(staging: Path, target: Path) -> None:
    """Replace target by staging with two renames; the old folder is removed afterwards."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.rename(target, old / "data")
    try:
        os.rename(staging, target)
    except OSError:
        if old is not None:
            os.rename(old / "data", target)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def render_card(card: dict[str, Any], definitions: dict[str, str]) -> str:
    """Render the human-readable card.md from the card fields.

    Args:
        card: Card fields as written to card.yaml.
        definitions: Label -> definition.

    Returns:
        Markdown text.
    """
    src = card["source"]
    lines = [f"# {card['name']}", "", card["description"], "", "## Source", ""]
    lines += [f"- {key}: {value}" for key, value in src.items() if not isinstance(value, dict)]
    lines += [f"- `{path}`: sha256 `{sha}`" for path, sha in src.get("files", {}).items()]
    lines += ["", "## Processing", ""] + [f"- {key}: {value}" for key, value in card["processing"].items()]
    lines += ["", "## Counts", "", "| label | " + " | ".join(SPLITS) + " | definition |",
              "|---|" + "---:|" * len(SPLITS) + "---|"]
    for label, text in definitions.items():
        cells = [str(card["counts"][s]["labels"][label]) for s in SPLITS]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {text} |")
    lines.append("| **total** | " + " | ".join(str(card["counts"][s]["total"]) for s in SPLITS) + " | |")
    lines += ["", "## Files", ""] + [f"- `{f}`: sha256 `{sha}`" for f, sha in card["files"].items()]
    return "\n".join(lines) + "\n"


def processing_fields(stats: dict[str, int], split_note: str) -> dict[str, Any]:
    """Describe the processing steps and what they dropped, for the card."""
    return {"text": "control characters removed, whitespace collapsed per line, empty lines dropped",
            "deduplication": "exact duplicates of the normalised text removed; texts with conflicting labels dropped",
            "split": split_note, "ids": "first 16 hex digits of sha256(text)", **{f"dropped_{k}": v for k, v in stats.items()}}


# ----------------------------------------------------------------------------- build (registry)
def build_dataset(name: str, data_dir: str | Path | None = None, package_root: str | Path | None = None) -> Path:
    """Build one registry dataset from its package into data/<name>.

    Args:
        name: A key of `DATASETS`.
        data_dir: Folder holding all datasets; default `config.data_dir()`.
        package_root: Read the raw files from here instead of fetching the package (tests).

    Returns:
        The dataset folder.

    Raises:
        DataError: For an unknown name or raw files that do not match the spec.
    """
    spec = get_spec(name)
    root = Path(package_root) if package_root else fetch_package(spec.package, spec.version)
    frame = spec.loader(root)
    unknown = sorted(set(frame["label"].astype(str)) - set(spec.definitions))
    if unknown:
        raise DataError(f"{name}: loader produced labels without a definition: {', '.join(unknown)}")
    cleaned, stats = clean_frame(frame)
    split_note = "from the source" if "split" in frame else "stratified 80/20, seed 0"
    splits = split_frame(cleaned, 0.2, 0)
    card = {"name": name, "description": spec.description,
            "source": _source_fields(spec, root, package_root is None),
            "processing": processing_fields(stats, split_note), "counts": count_labels(splits, list(spec.definitions))}
    return write_dataset(name, splits, spec.definitions, card, data_dir)


def _source_fields(spec: DatasetSpec, root: Path, record: bool) -> dict[str, Any]:
    """Source block of the card: package, version, licence and checksums of the files read."""
    files: dict[str, str] = {}
    for pattern in spec.files:
        paths = sorted(root.glob(pattern))
        if not paths:
            raise DataError(f"{root}: no file matches {pattern!r} in {spec.package} {spec.version}")
        if record:
            record_files(spec.package, spec.version, paths)
        hashes = [f"{file_sha256(p)}  {p.relative_to(root).as_posix()}\n" for p in paths]
        files[pattern] = hashes[0].split()[0] if len(paths) == 1 else \
            f"{len(paths)} files; sha256 of the sorted 'sha256  path' list: " \
            + hashlib.sha256("".join(hashes).encode()).hexdigest()
    fields: dict[str, Any] = {"package": spec.package, "version": spec.version, "licence": spec.licence}
    if record:
        fields["archive_sha256"] = read_manifest(spec.package, spec.version)["archive_sha256"]
    fields["files"] = files
    return fields
