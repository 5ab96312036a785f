"""Validation: the GX suite passes clean data and names the expectation each planted fault breaks."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli import main as cli
from components.data.datasets import DataError
from components.data.validation import DataValidationError, ValidationReport, require_valid, validate_dataset


def _validate(data_dir: Path, tmp_path: Path, name: str = "tiny", **kwargs) -> ValidationReport:
    return validate_dataset(name, data_dir=data_dir, docs_dir=tmp_path / "docs", **kwargs)


def _failed(report: ValidationReport) -> dict[str, object]:
    return {f.expectation: f for f in report.failures}


def test_clean_dataset_passes_and_writes_data_docs(tiny_dataset, tmp_path):
    data_dir, name = tiny_dataset
    report = _validate(data_dir, tmp_path, name)
    assert report.success, report.failures
    assert report.docs_path == tmp_path / "docs" / "index.html" and report.docs_path.is_file()
    assert report.rows == {"train": 36, "test": 9}
    assert len(report.expectations) == 11
    json.dumps(report.as_dict())  # serialisable


def _plant(rows: dict, fault: str) -> dict:
    """Return rows with one fault planted."""
    train, test = rows["train"], rows["test"]
    if fault == "empty_text":
        train[0]["text"] = "   "  # non-empty text
    elif fault == "unknown_label":
        test[0]["label"] = "sarcastic"  # expected labels
    elif fault == "missing_label_in_train":
        rows["train"] = [r for r in train if r["label"] != "neutral"]  # every label in train
    elif fault == "too_few_per_label":
        rows["train"] = [r for r in train if r["label"] != "neutral"] + [r for r in train if r["label"] == "neutral"][:4]
    elif fault == "duplicates":
        train.append({**train[1], "id": "dup-1"})  # duplicate rate
    elif fault == "overlap":
        test.append({"id": "leak", "text": train[2]["text"], "label": train[2]["label"]})  # data leak
    elif fault == "too_long":
        train[3]["text"] = "x" * 500  # text length bounds
    return rows


FAULTS = {
    "empty_text": "expect_column_values_to_be_in_set(text_blank)",
    "unknown_label": "expect_column_values_to_be_in_set(label)",
    "missing_label_in_train": "expect_column_distinct_values_to_contain_set(label)",
    "too_few_per_label": "expect_column_values_to_be_between(train_label_count)",
    "duplicates": "expect_column_values_to_be_in_set(is_duplicate)",
    "overlap": "expect_column_values_to_be_in_set(in_train_and_test)",
    "too_long": "expect_column_value_lengths_to_be_between(text)",
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_planted_fault_is_caught(fault, data_dir, tmp_path, tiny_rows, dataset_writer):
    dataset_writer(data_dir, "tiny", _plant(tiny_rows(), fault))
    report = _validate(data_dir, tmp_path, max_chars=200)
    assert not report.success
    failed = _failed(report)
    assert FAULTS[fault] in failed, list(failed)
    failure = failed[FAULTS[fault]]
    assert failure.details
    if fault not in ("missing_label_in_train",):
        assert failure.samples, "offending rows are shown"
    if fault == "missing_label_in_train":
        assert "neutral" in failure.details and failure.split == "train"
    if fault == "too_few_per_label":
        assert "neutral" in failure.details and failure.samples[0]["label"] == "neutral"


def test_bad_utf8_is_caught(data_dir, tmp_path, tiny_rows, dataset_writer):
    bad = b'{"id": "bad", "label": "positive", "text": "caf\xe9 au lait"}'  # latin-1 byte in a UTF-8 file
    surrogate = b'{"id": "sur", "label": "negative", "text": "broken \\ud800 emoji"}'
    dataset_writer(data_dir, "tiny", tiny_rows(), raw_lines={"train": [bad, surrogate]})
    report = _validate(data_dir, tmp_path)
    failure = _failed(report)["expect_column_values_to_be_in_set(utf8_valid)"]
    assert {s["id"] for s in failure.samples} == {"bad", "sur"}


def test_malformed_line_is_caught(data_dir, tmp_path, tiny_rows, dataset_writer):
    dataset_writer(data_dir, "tiny", tiny_rows(), raw_lines={"test": [b'{"id": "x", "text": 3}', b"not json"]})
    report = _validate(data_dir, tmp_path)
    assert "expect_column_values_to_be_in_set(record_ok)" in _failed(report)


def test_duplicate_rate_threshold_allows_some(data_dir, tmp_path, tiny_rows, dataset_writer):
    rows = _plant(tiny_rows(), "duplicates")
    dataset_writer(data_dir, "tiny", rows)
    assert _validate(data_dir, tmp_path, max_dup_rate=0.05).success


def test_require_valid_raises_with_report(data_dir, tmp_path, tiny_rows, dataset_writer):
    dataset_writer(data_dir, "tiny", _plant(tiny_rows(), "overlap"))
    with pytest.raises(DataValidationError, match="in_train_and_test") as info:
        require_valid("tiny", data_dir=data_dir, docs_dir=tmp_path / "docs")
    assert not info.value.report.success


def test_missing_dataset_is_a_data_error(data_dir, tmp_path):
    with pytest.raises(DataError, match="labels.yaml"):
        _validate(data_dir, tmp_path, name="absent")


def test_cli_validate_exit_codes(data_dir, tmp_path, capsys, tiny_rows, dataset_writer):
    dataset_writer(data_dir, "good", tiny_rows())
    dataset_writer(data_dir, "bad", _plant(tiny_rows(), "unknown_label"))
    common = ["--data-dir", str(data_dir), "--docs-dir", str(tmp_path / "docs")]
    assert cli.main(["data", "validate", "good", *common]) == 0
    assert cli.main(["data", "validate", "bad", *common]) == 1
    out = capsys.readouterr().out
    assert "expect_column_values_to_be_in_set(label) [all]" in out and "sarcastic" in out
    assert "Data Docs:" in out and "index.html" in out
    assert cli.main(["data", "validate", "absent", *common]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_an_empty_split_fails_validation(data_dir, tmp_path, tiny_rows, dataset_writer):
    rows = tiny_rows()
    rows["test"] = []  # every per-row expectation passes vacuously on no rows
    dataset_writer(data_dir, "tiny", rows)
    report = validate_dataset("tiny", data_dir=data_dir, docs_dir=tmp_path / "docs")
    assert not report.success and report.rows["test"] == 0
    assert [(f.expectation, f.split) for f in report.failures] == [("split_has_rows", "test")]
