"""Datasets as the rest of the code reads them: data/<name>/ and its files.

Every dataset ends up as ``data/<name>/`` with
    train.jsonl, test.jsonl   one JSON object per line: {"id", "label", "text"}
    labels.yaml               label -> one-sentence definition (this order is the label order)
    card.yaml, card.md        source, licence, checksums, processing, counts per split and label

They come from the seven public sets of `components.data.sources` (`gencls data build`,
`components.data.build.build_dataset`) or from a user's file (`gencls data import`,
`components.data.importer.import_dataset`); `components.data.validation` checks them.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from components import config

SPLITS = ("train", "test")
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
MAX_NAME_LENGTH = 64  # a dataset name is a folder, an MLflow model name (gencls-<name>) and a tag value


class DataError(ValueError):
    """Input data that cannot be turned into a dataset; the message names file, row or column."""


# ----------------------------------------------------------------------------- paths and reading
def dataset_dir(name: str, data_dir: str | Path | None = None) -> Path:
    """Return the folder of a dataset (it may not exist yet).

    Args:
        name: Dataset name (lowercase letters, digits, '.', '_' or '-').
        data_dir: Folder holding all datasets; default `config.data_dir()`.

    Returns:
        ``<data_dir>/<name>``.

    Raises:
        DataError: When the name is not a valid dataset name.
    """
    if not NAME_PATTERN.match(name) or len(name) > MAX_NAME_LENGTH:
        shown = name if len(name) <= 40 else f"{name[:37]}... ({len(name)} characters)"
        raise DataError(f"dataset name {shown!r}: expected lowercase letters, digits, '.', '_' or '-', "
                        f"at most {MAX_NAME_LENGTH} characters")
    return (Path(data_dir) if data_dir else config.data_dir()) / name


def load_split(name: str, split: str, data_dir: str | Path | None = None) -> list[dict]:
    """Read one split of a built dataset.

    Args:
        name: Dataset name.
        split: "train" or "test".
        data_dir: Folder holding all datasets; default `config.data_dir()`.

    Returns:
        One dict per example with keys id, text, label, in file order.

    Raises:
        DataError: When the split name is unknown or the file is missing or malformed.
    """
    if split not in SPLITS:
        raise DataError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
    path = dataset_dir(name, data_dir) / f"{split}.jsonl"
    if not path.exists():
        raise DataError(f"{path}: not found; run `gencls data build --datasets {name}` or `gencls data import`")
    with open(path, encoding="utf-8") as fh:
        return [parse_json_line(line, path, number) for number, line in enumerate(fh, 1) if line.strip()]


def load_labels(name: str, data_dir: str | Path | None = None) -> dict[str, str]:
    """Read labels.yaml of a built dataset.

    Args:
        name: Dataset name.
        data_dir: Folder holding all datasets; default `config.data_dir()`.

    Returns:
        Label -> definition, in the order of labels.yaml.

    Raises:
        DataError: When labels.yaml is missing or is not a mapping of strings.
    """
    path = dataset_dir(name, data_dir) / "labels.yaml"
    if not path.exists():
        raise DataError(f"{path}: not found; build or import the dataset {name!r} first")
    return read_definitions(path)


def parse_json_line(line: str, path: Path, number: int) -> dict:
    """Parse one JSONL line into a dict, naming file and line on error."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: line {number}: invalid JSON ({exc.msg})") from None
    if not isinstance(record, dict):
        raise DataError(f"{path}: line {number}: expected a JSON object, got {type(record).__name__}")
    return record


def read_definitions(path: Path) -> dict[str, str]:
    """Read a label -> definition YAML mapping, checking that keys and values are strings."""
    if not path.is_file():
        raise DataError(f"{path}: definitions file not found; expected a YAML mapping label -> definition")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not readable as UTF-8 YAML ({exc})") from None
    if not isinstance(data, dict) or not data:
        raise DataError(f"{path}: expected a mapping of label -> one-sentence definition")
    bad = [k for k, v in data.items() if not isinstance(v, str) or not str(v).strip()]
    if bad:
        raise DataError(f"{path}: label(s) {', '.join(map(str, bad))}: expected a non-empty definition string")
    return {str(k): v.strip() for k, v in data.items()}
