"""Bring your own data: a CSV, JSONL or Parquet file imported as data/<name>/ (the same layout and
processing as a build, `components.data.build`).

Usage:
    gencls data import my.csv --name mine     # or: import_dataset("my.csv", "mine")
"""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from components.data.build import clean_frame, count_labels, processing_fields, split_frame, write_dataset
from components.data.datasets import DataError, dataset_dir, parse_json_line, read_definitions
from components.data.packages import file_sha256
from components.data.sources import DATASETS

SUPPORTED_SUFFIXES = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet"}


# ----------------------------------------------------------------------------- import (bring your own)
def import_dataset(file: str | Path, name: str, text_col: str = "text", label_col: str = "label",
                   definitions: str | Path | None = None, test_file: str | Path | None = None,
                   test_size: float = 0.2, seed: int = 0, data_dir: str | Path | None = None,
                   overwrite: bool = False, min_per_label: int | None = None) -> Path:
    """Import a user's CSV, JSONL or Parquet file as data/<name> (same layout as a build).

    Args:
        file: Training file (or the whole data when `test_file` is None).
        name: Dataset name (lowercase letters, digits, '.', '_' or '-').
        text_col: Column holding the text.
        label_col: Column holding the label.
        definitions: YAML mapping label -> one-sentence definition; labels it leaves out
            get a generic definition.
        test_file: Test file in the same format; when given, `test_size` is ignored.
        test_size: Fraction of each label put in test when there is no test file.
        seed: Seed of the stratified split.
        data_dir: Folder holding all datasets; default `config.data_dir()`.
        overwrite: Replace an imported dataset of the same name (built-in names are never replaced).
        min_per_label: Fewest training examples a label may keep after cleaning (default: the
            validation minimum, `components.data.validation.DEFAULT_THRESHOLDS`).

    Returns:
        The dataset folder.

    Raises:
        DataError: Unsupported extension, empty file, missing columns, empty labels, a
            single class, undecodable bytes, definitions naming unknown labels, a name that is
            built in or taken (without `overwrite`), or a split left empty / a label left with
            too few training examples after cleaning. Nothing under data/ is changed then.
    """
    target = dataset_dir(name, data_dir)  # validates the name before any work
    if name in DATASETS:
        raise DataError(f"dataset name {name!r} is a built-in dataset (restore it with `gencls data build --datasets "
                        f"{name}`); import under another --name")
    if (target / "labels.yaml").exists() and not overwrite:
        raise DataError(f"dataset {name!r} already exists in {target}; pass --overwrite to replace it, "
                        f"or import under another --name")
    frame = read_labelled_file(file, text_col, label_col)
    if test_file is not None:
        test = read_labelled_file(test_file, text_col, label_col)
        _check_test_labels(test, set(frame["label"]), Path(test_file))
        frame = pd.concat([frame.assign(split="train"), test.assign(split="test")], ignore_index=True)
    _check_classes(frame, Path(file), label_col)
    labels = sorted(set(frame["label"]))
    defs = _merge_definitions(labels, Path(definitions) if definitions else None)
    cleaned, stats = clean_frame(frame)
    splits = split_frame(cleaned, test_size, seed)
    _check_split_sizes(splits, labels, Path(file), stats, min_per_label)
    split_note = "from the test file" if test_file is not None else f"stratified {1 - test_size:.0%}/{test_size:.0%}, seed {seed}"
    card = {"name": name, "description": f"Imported from {Path(file).name}.",
            "source": _import_source(Path(file), test_file, definitions, text_col, label_col),
            "processing": processing_fields(stats, split_note), "counts": count_labels(splits, list(defs))}
    return write_dataset(name, splits, defs, card, data_dir)


def _check_split_sizes(splits: dict[str, pd.DataFrame], labels: list[str], path: Path, dropped: dict[str, int],
                       min_per_label: int | None) -> None:
    """Refuse an import that leaves a split empty or a label with fewer training rows than validation needs."""
    if min_per_label is None:
        from components.data.validation import DEFAULT_THRESHOLDS

        min_per_label = int(DEFAULT_THRESHOLDS["min_per_label"])
    train = splits["train"]["label"].value_counts()
    few = {label: int(train.get(label, 0)) for label in labels if train.get(label, 0) < min_per_label}
    empty = [split for split, part in splits.items() if part.empty]
    if not empty and not few:
        return
    sizes = ", ".join(f"{split} {len(part)}" for split, part in splits.items())
    removed = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in dropped.items() if v) or "none"
    problem = f"split(s) {', '.join(empty)} empty" if empty else ""
    if few:
        problem += ("; " if problem else "") + f"label(s) with fewer than {min_per_label} training rows: " + \
            ", ".join(f"{label} {n}" for label, n in few.items())
    raise DataError(f"{path}: after cleaning ({sizes} rows; dropped: {removed}) {problem}; nothing was imported")


def read_labelled_file(path: str | Path, text_col: str = "text", label_col: str = "label") -> pd.DataFrame:
    """Read a CSV, JSONL or Parquet file and return its text and label columns.

    Args:
        path: The file.
        text_col: Column holding the text.
        label_col: Column holding the label.

    Returns:
        DataFrame with columns text, label (strings, source order).

    Raises:
        DataError: On an unsupported extension, an empty file, undecodable bytes, missing
            columns or rows without a label.
    """
    path = Path(path)
    kind = SUPPORTED_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{path}: unsupported extension {path.suffix!r}; expected .csv, .jsonl or .parquet")
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty file; expected a header and at least one row")
    frame = {"csv": _read_csv, "jsonl": _read_jsonl, "parquet": _read_parquet}[kind](path)
    if frame.empty:
        raise DataError(f"{path}: no data rows; expected a header and at least one row")
    missing = [c for c in (text_col, label_col) if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(map(repr, missing))}; expected text column "
                        f"{text_col!r} and label column {label_col!r}; found columns: {', '.join(map(str, frame.columns))}")
    frame = frame[[text_col, label_col]].set_axis(["text", "label"], axis=1).reset_index(drop=True)
    return _check_cells(frame, path, label_col)


def _decode_strict(path: Path) -> str:
    """Decode a file as UTF-8 (BOM allowed), naming line and byte offset of bad bytes."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise DataError(f"{path}: line {line} (byte offset {exc.start}): undecodable byte "
                        f"0x{raw[exc.start]:02x}; expected UTF-8 text") from None


def _read_csv(path: Path) -> pd.DataFrame:
    """Read a UTF-8 CSV file with every cell as a string."""
    text = _decode_strict(path)
    if not text.strip():
        raise DataError(f"{path}: empty file; expected a header and at least one row")
    try:
        return pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise DataError(f"{path}: not readable as CSV ({str(exc).strip()})") from None


def _read_jsonl(path: Path) -> pd.DataFrame:
    """Read a UTF-8 JSON-lines file of objects."""
    lines = _decode_strict(path).splitlines()
    records = [parse_json_line(line, path, n) for n, line in enumerate(lines, 1) if line.strip()]
    if not records:
        raise DataError(f"{path}: empty file; expected one JSON object per line")
    return pd.DataFrame.from_records(records)


def _read_parquet(path: Path) -> pd.DataFrame:
    """Read a Parquet file; byte-string cells are decoded as UTF-8, naming the row on error."""
    try:
        frame = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several unrelated types for a bad file
        raise DataError(f"{path}: not readable as Parquet ({exc})") from None
    for column in frame.columns:
        frame[column] = [_decode_cell(v, path, column, row) for row, v in enumerate(frame[column], 1)]
    return frame


def _decode_cell(value: Any, path: Path, column: str, row: int) -> Any:
    """Decode one bytes cell as UTF-8, naming file, column, row and offset on error."""
    if not isinstance(value, bytes):
        return value
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: row {row}, column {column!r} (byte offset {exc.start}): "
                        f"undecodable byte 0x{value[exc.start]:02x}; expected UTF-8 text") from None


def _check_cells(frame: pd.DataFrame, path: Path, label_col: str) -> pd.DataFrame:
    """Turn cells into strings; every row needs a label (text may be empty: it is dropped later)."""
    text = frame["text"].map(lambda v: "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v))
    label = frame["label"].map(lambda v: "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v).strip())
    empty = np.flatnonzero(label.eq("").to_numpy())
    if len(empty):
        rows = ", ".join(str(i + 1) for i in empty[:5])
        raise DataError(f"{path}: row(s) {rows}: empty value in label column {label_col!r}; expected a label")
    return pd.DataFrame({"text": text, "label": label})


def _check_classes(frame: pd.DataFrame, path: Path, label_col: str) -> None:
    """Require at least two distinct labels."""
    labels = sorted(set(frame["label"]))
    if len(labels) < 2:
        raise DataError(f"{path}: label column {label_col!r} has a single class {labels[0]!r}; "
                        "expected at least two classes")


def _check_test_labels(test: pd.DataFrame, train_labels: set[str], path: Path) -> None:
    """Every test label must occur in the training file."""
    unseen = sorted(set(test["label"]) - train_labels)
    if unseen:
        raise DataError(f"{path}: label(s) {', '.join(unseen)} do not occur in the training file")


def _merge_definitions(labels: list[str], path: Path | None) -> dict[str, str]:
    """Definitions for every label: the user's file where given, a generic sentence elsewhere."""
    given = read_definitions(path) if path else {}
    unknown = [label for label in given if label not in labels]
    if unknown:
        raise DataError(f"{path}: definitions name unknown label(s) {', '.join(unknown)}; "
                        f"labels in the data: {', '.join(labels)}")
    order = list(given) + [label for label in labels if label not in given]
    return {label: given.get(label, f"The text belongs to the category '{label}'.") for label in order}


def _import_source(file: Path, test_file: str | Path | None, definitions: str | Path | None,
                   text_col: str, label_col: str) -> dict[str, Any]:
    """Source block of an imported dataset's card (file names and checksums, no absolute paths)."""
    files = {file.name: file_sha256(file)}
    if test_file is not None:
        files[Path(test_file).name] = file_sha256(test_file)
    if definitions is not None:
        files[Path(definitions).name] = file_sha256(definitions)
    return {"origin": "user import", "licence": "as supplied by the user", "text_column": text_col,
            "label_column": label_col, "files": files}
