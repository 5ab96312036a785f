"""Validation: the GX suite passes clean data and names the expectation each planted fault breaks;
Data Docs render offline and keep a history."""
from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from cli import main as cli
from components.data import datadocs, validation
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
    assert len(report.expectations) == 12  # 9 + one row count per label
    assert len(report.results) == 12 and all(r["success"] and r["description"] for r in report.results)
    json.dumps(report.as_dict())  # serialisable


def test_expectations_are_on_the_real_columns_and_read_as_sentences(tiny_dataset, tmp_path):
    data_dir, name = tiny_dataset
    report = _validate(data_dir, tmp_path, name, max_chars=200)
    assert {"expect_column_values_to_be_in_set(label)", "expect_column_distinct_values_to_contain_set(label)",
            "expect_column_value_lengths_to_be_between(text)", "expect_column_values_to_not_match_regex(text)",
            "expect_compound_columns_to_be_unique(split,id)",
            "expect_compound_columns_to_be_unique(split,text_normalised)",
            "expect_table_row_count_to_be_between(label=negative)",
            "expect_table_row_count_to_be_between(label=neutral)",
            "expect_table_row_count_to_be_between(label=positive)"} <= set(report.expectations)
    # no expectation asserts a derived boolean ("values must belong to this set: False")
    assert not [e for e in report.expectations if re.search(r"\((is_|in_|text_blank|record_ok|utf8_valid)", e)]
    outcomes = {r["expectation"]: r for r in report.results}
    assert outcomes["expect_table_row_count_to_be_between(label=neutral)"]["observed"] == 12  # the label's count
    assert outcomes["expect_column_value_lengths_to_be_between(text)"]["description"] == \
        "Every text is 1 to 200 characters long."
    page = next((tmp_path / "docs" / "validations").rglob("*.html")).read_text(encoding="utf-8")
    for sentence in ("Every label is one of the 3 labels of labels.yaml: negative, neutral, positive.",
                     "Train has at least 10 examples labelled neutral.", "No test text also occurs in train.",
                     "Every text is 1 to 200 characters long."):
        assert sentence in page
    assert "values must belong to this set" not in page and "False" not in re.sub(r"<[^>]+>", "", page)


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
    elif fault == "duplicate_id":
        test.append({**test[0], "text": "another test text"})  # ids unique
    return rows


FAULTS = {
    "empty_text": "expect_column_values_to_not_match_regex(text)",
    "unknown_label": "expect_column_values_to_be_in_set(label)",
    "missing_label_in_train": "expect_column_distinct_values_to_contain_set(label)",
    "too_few_per_label": "expect_table_row_count_to_be_between(label=neutral)",
    "duplicates": "expect_compound_columns_to_be_unique(split,text_normalised)",
    "overlap": "expect_column_values_to_be_null(train_copy_id)",
    "too_long": "expect_column_value_lengths_to_be_between(text)",
    "duplicate_id": "expect_compound_columns_to_be_unique(split,id)",
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
        assert "neutral" in failure.details and "has 4 train examples" in failure.details
        assert failure.samples[0]["label"] == "neutral" and len(failed) == 1  # the other labels pass
    if fault == "overlap":
        assert failure.split == "test" and "same text as train ids: train-negative-2" in failure.details
        assert [s["id"] for s in failure.samples] == ["leak"]
    if fault == "unknown_label":
        assert failure.samples[0]["label"] == "sarcastic"
    if fault == "too_long":
        assert [s["line"] for s in failure.samples] == [4] and "1..200" in failure.details


def test_bad_utf8_is_caught(data_dir, tmp_path, tiny_rows, dataset_writer):
    bad = b'{"id": "bad", "label": "positive", "text": "caf\xe9 au lait"}'  # latin-1 byte in a UTF-8 file
    surrogate = b'{"id": "sur", "label": "negative", "text": "broken \\ud800 emoji"}'
    dataset_writer(data_dir, "tiny", tiny_rows(), raw_lines={"train": [bad, surrogate]})
    report = _validate(data_dir, tmp_path)
    failure = _failed(report)["expect_column_values_to_be_null(encoding_problem)"]
    assert {s["id"] for s in failure.samples} == {"bad", "sur"}
    assert "not UTF-8" in failure.details and "surrogate" in failure.details


def test_malformed_line_is_caught(data_dir, tmp_path, tiny_rows, dataset_writer):
    dataset_writer(data_dir, "tiny", tiny_rows(), raw_lines={"test": [b'{"id": "x", "text": 3}', b"not json"]})
    report = _validate(data_dir, tmp_path)
    failure = _failed(report)["expect_column_values_to_be_null(record_problem)"]
    assert "not JSON" in failure.details and "text is not a string" in failure.details


def test_duplicate_rate_threshold_allows_some(data_dir, tmp_path, tiny_rows, dataset_writer):
    rows = _plant(tiny_rows(), "duplicates")
    dataset_writer(data_dir, "tiny", rows)
    assert _validate(data_dir, tmp_path, max_dup_rate=0.05).success


def test_require_valid_raises_with_report(data_dir, tmp_path, tiny_rows, dataset_writer):
    dataset_writer(data_dir, "tiny", _plant(tiny_rows(), "overlap"))
    with pytest.raises(DataValidationError, match="train_copy_id") as info:
        require_valid("tiny", data_dir=data_dir, docs_dir=tmp_path / "docs")
    assert not info.value.report.success


def test_require_valid_skips_files_that_already_passed(data_dir, tmp_path, tiny_rows, dataset_writer, monkeypatch):
    monkeypatch.setenv("GENCLS_CACHE", str(tmp_path / "cache"))
    dataset_writer(data_dir, "tiny", tiny_rows())
    runs = []
    real = validation.validate_dataset
    monkeypatch.setattr(validation, "validate_dataset", lambda *a, **k: runs.append(1) or real(*a, **k))
    first = require_valid("tiny", data_dir=data_dir, docs_dir=tmp_path / "docs")
    again = require_valid("tiny", data_dir=data_dir)
    assert len(runs) == 1 and again.success and again.rows == first.rows and again.results == first.results
    assert require_valid("tiny", data_dir=data_dir, min_per_label=2) and len(runs) == 2  # other thresholds: GX again
    before = validation.passed_path("tiny", data_dir, min_per_label=3)  # what the validate stage records
    validation.remember_pass(real("tiny", data_dir=data_dir, docs_dir=tmp_path / "docs", min_per_label=3), before,
                             data_dir, min_per_label=3)
    assert require_valid("tiny", data_dir=data_dir, min_per_label=3) and len(runs) == 2
    stale = validation.passed_path("tiny", data_dir, min_per_label=4)
    labels = data_dir / "tiny" / "labels.yaml"
    labels.write_text(labels.read_text() + "\n")  # the bytes changed while "GX ran": not recorded
    validation.remember_pass(first, stale, data_dir, min_per_label=4)
    assert not stale.exists() and not validation.passed_path("tiny", data_dir, min_per_label=4).exists()
    train = data_dir / "tiny" / "train.jsonl"
    lines = train.read_text().splitlines()
    train.write_text("\n".join(lines + [lines[0]]) + "\n")  # a duplicated row: the bytes changed, and they fail
    for _ in range(2):  # a failure is never recorded
        with pytest.raises(DataValidationError):
            require_valid("tiny", data_dir=data_dir)
    assert len(runs) == 4


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


# ----------------------------------------------------------------------------- Data Docs site
class _Loads(HTMLParser):
    """What a page makes the browser fetch: script src, link href, img src (anchors are not fetched)."""

    def __init__(self):
        super().__init__()
        self.urls = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        url = attrs.get("src") if tag in ("script", "img", "iframe") else attrs.get("href") if tag == "link" else None
        if url:
            self.urls.append(url)


def _assert_renders_offline(docs: Path) -> None:
    """Every asset a page or stylesheet loads is a local file of the site: nothing from the network."""
    pages = sorted(docs.rglob("*.html"))
    assert pages
    for page in pages:
        parser = _Loads()
        parser.feed(page.read_text(encoding="utf-8"))
        text = page.read_text(encoding="utf-8")
        assert not re.findall(r"""(?:src|href)=["']https?://[^"']*\.(?:js|css|png|ico|svg)""", text), page
        for url in parser.urls:
            assert not re.match(r"^(https?:)?//", url), f"{page}: {url}"
            assert (page.parent / url.split("?")[0]).resolve().is_file(), f"{page}: {url} is missing"
    for sheet in sorted(docs.rglob("*.css")):
        for url in re.findall(r"url\(\s*['\"]?([^'\")]+)['\"]?\s*\)", sheet.read_text(encoding="utf-8")):
            if not url.startswith("data:"):
                assert not re.match(r"^(https?:)?//", url), f"{sheet}: {url}"
                assert (sheet.parent / url).resolve().is_file(), f"{sheet}: {url} is missing"


def test_data_docs_render_offline(data_dir, tmp_path, tiny_rows, dataset_writer):
    dataset_writer(data_dir, "tiny", _plant(tiny_rows(), "unknown_label"))  # a failing run renders more tables
    report = _validate(data_dir, tmp_path)
    docs = report.docs_path.parent
    _assert_renders_offline(docs)
    assert datadocs.offline_problems(docs) == []
    index = report.docs_path.read_text(encoding="utf-8")
    assert 'src="./static/vendor/jquery.min.js"' in index and 'src="./static/vendor/bootstrap-table.min.js"' in index
    assert "crossorigin" not in index  # file:// pages cannot satisfy CORS
    assert (docs / "static" / "vendor" / "licenses" / "bootstrap.LICENSE").is_file()
    # the checker itself catches what GX writes by default
    page = docs / "probe.html"
    page.write_text('<script src="https://code.jquery.com/jquery-3.7.1.min.js"></script>'
                    '<link rel="stylesheet" href="static/vendor/nope.css">', encoding="utf-8")
    assert len(datadocs.offline_problems(docs)) == 2
    with pytest.raises(AssertionError):
        _assert_renders_offline(docs)


def test_every_cdn_url_of_the_gx_templates_is_handled():
    """GX's page templates load nothing that make_offline neither maps to a shipped file nor drops."""
    import great_expectations

    templates = Path(great_expectations.__file__).parent / "render" / "view" / "templates"
    urls = set()
    for template in templates.glob("*.j2"):
        urls |= set(re.findall(r"""(?:src|href)=["'](https://[^"'{]+)["']""", template.read_text(encoding="utf-8")))
    loaded = {u for u in urls if re.search(r"\.(js|css)$|/npm/vega", u)}
    assert loaded, "the templates changed shape"
    unhandled = {u for u in loaded if u not in datadocs.CDN_ASSETS and not datadocs.VEGA_TAG.search(
        f'<script src="{u}"></script>')}
    assert not unhandled
    assert all((datadocs.ASSETS_DIR / local).is_file() for local in datadocs.CDN_ASSETS.values())


def test_data_docs_keep_a_history_of_validations(data_dir, tmp_path, tiny_rows, dataset_writer, monkeypatch):
    dataset_writer(data_dir, "tiny", tiny_rows())
    first = _validate(data_dir, tmp_path)
    dataset_writer(data_dir, "tiny", _plant(tiny_rows(), "unknown_label"))
    second = _validate(data_dir, tmp_path)
    assert first.success and not second.success
    docs = second.docs_path.parent
    runs = datadocs.validation_runs(docs)
    assert len(runs) == 2 and runs[0][2] != runs[1][2]  # two runs, named by their data's hash
    pages = sorted((docs / "validations").rglob("*.html"))
    assert len(pages) == 2
    index = second.docs_path.read_text(encoding="utf-8")
    for page in pages:  # the index links both runs
        assert page.relative_to(docs).as_posix() in index
    _assert_renders_offline(docs)
    monkeypatch.setattr(validation, "HISTORY", 2)  # the cap: the oldest run goes
    third = _validate(data_dir, tmp_path)
    kept = datadocs.validation_runs(third.docs_path.parent)
    assert len(kept) == 2 and runs[0] not in kept and runs[1] in kept
    assert not list((docs / "validations").rglob(f"{runs[0][0]}"))


# ----------------------------------------------------------------------------- MLflow
def test_validate_step_logs_result_and_data_docs_to_mlflow(tmp_path, monkeypatch, tiny_rows, dataset_writer):
    from components.ops import tracking
    from flows import steps

    monkeypatch.setenv("GENCLS_ROOT", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking.tracking_uri(tmp_path))
    dataset_writer(tmp_path / "data", "tiny", tiny_rows())
    dataset_writer(tmp_path / "data", "leaky", _plant(tiny_rows(), "overlap"))
    steps.step_validate("tiny")
    with pytest.raises(DataValidationError):
        steps.step_validate("leaky")
    client = tracking.client()
    for name, success in (("tiny", True), ("leaky", False)):
        run = client.search_runs([client.get_experiment_by_name(f"gencls-{name}").experiment_id])[0]
        assert run.info.status == ("FINISHED" if success else "FAILED")
        assert run.data.tags["validation.success"] == str(success)
        assert run.data.metrics["validation.success"] == float(success)
        assert run.data.metrics["validation.failed_expectations"] == (0 if success else 1)
        logged = Path(client.download_artifacts(run.info.run_id, "validation", str(tmp_path / f"dl-{name}")))
        result = json.loads((logged / "validation.json").read_text())
        assert result["success"] is success and len(result["results"]) == 12
        leak = {r["expectation"]: r for r in result["results"]}["expect_column_values_to_be_null(train_copy_id)"]
        assert leak["success"] is success
        docs = logged / "data_docs"
        assert (docs / "index.html").is_file() and len(list((docs / "validations").rglob("*.html"))) == 1
        _assert_renders_offline(docs)  # the copy in MLflow opens offline too
