"""Data fixtures: a temporary data folder, a tiny valid three-label dataset, and writers to plant faults.

Helpers are handed out as fixtures (`tiny_rows`, `dataset_writer`) rather than imported, because
the repository root has its own conftest.py and `import conftest` would be ambiguous.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

TINY_LABELS = {
    "negative": "The text expresses an unfavourable opinion.",
    "neutral": "The text states facts without an opinion.",
    "positive": "The text expresses a favourable opinion.",
}


def make_tiny_rows(n_train: int = 12, n_test: int = 3) -> dict[str, list[dict]]:
    """Rows of a tiny valid dataset: n_train and n_test unique texts per label."""
    rows: dict[str, list[dict]] = {"train": [], "test": []}
    for split, n in (("train", n_train), ("test", n_test)):
        for label in TINY_LABELS:
            for i in range(n):
                text = f"{split} {label} example number {i}"
                rows[split].append({"id": f"{split}-{label}-{i}", "text": text, "label": label})
    return rows


def write_dataset_files(data_dir: Path, name: str, rows: dict[str, list[dict]],
                        labels: dict[str, str] | None = None, raw_lines: dict[str, list[bytes]] | None = None) -> Path:
    """Write data/<name>/{train,test}.jsonl and labels.yaml directly (to plant faults).

    Args:
        data_dir: Folder holding datasets.
        name: Dataset name.
        rows: {"train": [...], "test": [...]} of dicts with id, text, label.
        labels: labels.yaml content (default: TINY_LABELS).
        raw_lines: Extra raw byte lines appended to a split file (e.g. invalid UTF-8).

    Returns:
        The dataset folder.
    """
    folder = data_dir / name
    folder.mkdir(parents=True, exist_ok=True)
    for split, items in rows.items():
        lines = [json.dumps(r, ensure_ascii=False, sort_keys=True).encode("utf-8") for r in items]
        lines += (raw_lines or {}).get(split, [])
        (folder / f"{split}.jsonl").write_bytes(b"".join(line + b"\n" for line in lines))
    (folder / "labels.yaml").write_text(yaml.safe_dump(labels or TINY_LABELS, sort_keys=False), encoding="utf-8")
    return folder


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """An empty datasets folder under the test's tmp_path."""
    path = tmp_path / "data"
    path.mkdir()
    return path


@pytest.fixture
def tiny_dataset(data_dir: Path) -> tuple[Path, str]:
    """A valid dataset 'tiny' (3 labels, 12 train and 3 test texts each); returns (data_dir, name)."""
    write_dataset_files(data_dir, "tiny", make_tiny_rows())
    return data_dir, "tiny"


@pytest.fixture
def tiny_rows():
    """The row factory `make_tiny_rows(n_train=12, n_test=3)` -> {"train": [...], "test": [...]}."""
    return make_tiny_rows


@pytest.fixture
def dataset_writer():
    """The writer `write_dataset_files(data_dir, name, rows, labels=None, raw_lines=None)`."""
    return write_dataset_files
