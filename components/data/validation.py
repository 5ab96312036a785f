"""Validate a built dataset with a great-expectations suite and write Data Docs.

Usage:
    gencls data validate trec6          # or: validate_dataset("trec6"); require_valid("trec6")

Every check goes through one GX ExpectationSuite run on a pandas frame holding both
splits (one row per JSONL line). Checks GX has no built-in expectation for are computed
as helper columns in pandas (e.g. `is_duplicate`, `in_train_and_test`, `utf8_valid`) and
then asserted with a GX expectation on that column, so every check appears in Data Docs.
Train-only checks use a GX row condition on `split == "train"`.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd

from components import config
from components.data.sources import DATASETS
from components.data.datasets import SPLITS, DataError, dataset_dir, load_labels
from components.data.build import normalise_text

DEFAULT_THRESHOLDS: dict[str, Any] = {
    "min_per_label": 10,     # fewer training examples than this per label is too few to learn from
    "max_dup_rate": 0.0,     # builds remove exact duplicates, so any duplicate means the files were altered
    "min_chars": 1,          # an empty text carries no signal
    "max_chars": 20_000,     # longer texts are probably concatenated records; raised per dataset in DATASETS
}
SAMPLE_ROWS = 5  # offending rows shown per failed expectation
DOCS_PARTS = ("index.html", "static", "validations", "expectations")  # what GX writes into a site


class Failure(NamedTuple):
    """One failed expectation: GX type and column, the split it covers, details, sample rows."""

    expectation: str
    split: str
    details: str
    samples: list[dict]


@dataclass
class ValidationReport:
    """Outcome of `validate_dataset`.

    Attributes:
        name: Dataset name.
        success: True when every expectation passed.
        failures: The failed expectations, in suite order.
        docs_path: index.html of the Data Docs site that shows this run.
        thresholds: The thresholds used.
        rows: Number of rows read per split.
        expectations: Every expectation evaluated ("type(column)"), in suite order.
    """

    name: str
    success: bool
    failures: list[Failure] = field(default_factory=list)
    docs_path: Path | None = None
    thresholds: dict[str, Any] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)
    expectations: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict of the report."""
        return {"name": self.name, "success": self.success, "docs_path": str(self.docs_path) if self.docs_path else None,
                "thresholds": self.thresholds, "rows": self.rows, "expectations": self.expectations,
                "failures": [f._asdict() for f in self.failures]}


class DataValidationError(RuntimeError):
    """Raised by `require_valid` when a dataset fails validation; `.report` holds the details."""

    def __init__(self, report: ValidationReport):
        names = "; ".join(f"{f.expectation} [{f.split}]: {f.details}" for f in report.failures)
        super().__init__(f"dataset {report.name!r} failed validation: {names}. Data Docs: {report.docs_path}")
        self.report = report


# ----------------------------------------------------------------------------- reading
def read_split_frame(path: Path, split: str) -> pd.DataFrame:
    """Read one JSONL split leniently: bad bytes and bad records become flagged rows.

    Args:
        path: The split's .jsonl file.
        split: "train" or "test".

    Returns:
        DataFrame with columns split, line, row_key, id, text, label, record_ok, utf8_valid.
    """
    rows = []
    for number, raw in enumerate(path.read_bytes().split(b"\n"), 1):
        if raw.strip():
            rows.append(_parse_raw_line(raw, split, number))
    return pd.DataFrame(rows, columns=["split", "line", "row_key", "id", "text", "label", "record_ok", "utf8_valid"])


def _parse_raw_line(raw: bytes, split: str, number: int) -> dict[str, Any]:
    """Decode and parse one line; flag invalid UTF-8 (incl. lone surrogates) and bad records."""
    try:
        line, utf8_valid = raw.decode("utf-8"), True
    except UnicodeDecodeError:
        line, utf8_valid = raw.decode("utf-8", errors="replace"), False
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        record = None
    ok = isinstance(record, dict) and all(isinstance(record.get(k), str) for k in ("id", "text", "label"))
    record = record if isinstance(record, dict) else {}
    text = record.get("text") if isinstance(record.get("text"), str) else None
    if text is not None and not _encodes(text):
        text, utf8_valid = text.encode("utf-8", errors="replace").decode("utf-8"), False
    return {"split": split, "line": number, "row_key": f"{split}:{number}", "id": _as_str(record.get("id")),
            "text": text, "label": _as_str(record.get("label")), "record_ok": ok, "utf8_valid": utf8_valid}


def _encodes(text: str) -> bool:
    """True when text encodes as UTF-8 (JSON escapes can smuggle in lone surrogates)."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _as_str(value: Any) -> str | None:
    """Return strings unchanged, anything else (missing, numbers) as None or its text."""
    return None if value is None else value if isinstance(value, str) else str(value)


def add_check_columns(frame: pd.DataFrame) -> pd.DataFrame:
    """Add the helper columns the suite asserts on.

    Args:
        frame: Both splits from `read_split_frame`.

    Returns:
        The frame with text_blank, is_duplicate, in_train_and_test and train_label_count.
    """
    key = frame["text"].map(lambda t: normalise_text(t) if isinstance(t, str) else None)
    in_split = {s: set(key[frame["split"].eq(s)].dropna()) for s in SPLITS}
    train_counts = frame.loc[frame["split"].eq("train"), "label"].value_counts()
    return frame.assign(
        text_blank=key.isna() | key.eq(""),
        is_duplicate=key.notna() & frame.assign(k=key).duplicated(["split", "k"], keep="first"),
        in_train_and_test=key.map(lambda k: k is not None and k in in_split["train"] and k in in_split["test"]),
        train_label_count=frame["label"].map(lambda lab: int(train_counts.get(lab, 0))),
    )


# ----------------------------------------------------------------------------- suite
def build_expectations(labels: list[str], thresholds: dict[str, Any]) -> list[Any]:
    """Return the suite's expectations, each with `meta` naming its check and intent.

    Args:
        labels: The labels of labels.yaml.
        thresholds: min_per_label, max_dup_rate, min_chars, max_chars.

    Returns:
        GX expectation objects, in the order they are reported.
    """
    import great_expectations.expectations as gxe
    from great_expectations.expectations.row_conditions import Column

    train = Column("split") == "train"
    def meta(check: str, split: str, intent: str) -> dict[str, str]:
        return {"check": check, "split": split, "intent": intent}
    return [
        gxe.ExpectColumnValuesToBeInSet(column="record_ok", value_set=[True],
                                        meta=meta("records", "all", "every line is a JSON object with string id, text, label")),
        gxe.ExpectColumnValuesToNotBeNull(column="text", meta=meta("text_present", "all", "text is present")),
        gxe.ExpectColumnValuesToBeInSet(column="text_blank", value_set=[False],
                                        meta=meta("text_nonempty", "all", "text is not empty or whitespace")),
        gxe.ExpectColumnValuesToBeInSet(column="label", value_set=labels,
                                        meta=meta("labels_known", "all", "labels are those of labels.yaml")),
        gxe.ExpectColumnDistinctValuesToContainSet(column="label", value_set=labels, row_condition=train,
                                                   meta=meta("labels_in_train", "train", "every label occurs in train")),
        gxe.ExpectColumnValuesToBeBetween(column="train_label_count", min_value=thresholds["min_per_label"],
                                          row_condition=train,
                                          meta=meta("min_per_label", "train", "enough training examples per label")),
        gxe.ExpectColumnValuesToBeInSet(column="is_duplicate", value_set=[False], mostly=1 - thresholds["max_dup_rate"],
                                        meta=meta("duplicates", "all", "duplicate rate within a split is bounded")),
        gxe.ExpectColumnValuesToBeInSet(column="in_train_and_test", value_set=[False],
                                        meta=meta("no_leak", "all", "no test text appears in train")),
        gxe.ExpectColumnValueLengthsToBeBetween(column="text", min_value=thresholds["min_chars"],
                                                max_value=thresholds["max_chars"],
                                                meta=meta("text_length", "all", "text length is within bounds")),
        gxe.ExpectColumnValuesToBeInSet(column="utf8_valid", value_set=[True],
                                        meta=meta("utf8", "all", "every line is valid UTF-8")),
        gxe.ExpectColumnValuesToBeUnique(column="row_id", meta=meta("ids_unique", "all", "ids are unique within a split")),
    ]


def _quiet_gx() -> None:
    """Turn off GX analytics and chatter (called before importing GX)."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    logging.getLogger("great_expectations").setLevel(logging.ERROR)


def run_suite(name: str, frame: pd.DataFrame, expectations: list[Any], docs_dir: Path) -> Any:
    """Run the expectations through an ephemeral GX context and build Data Docs into docs_dir.

    Args:
        name: Dataset name (names the suite, asset and checkpoint).
        frame: The frame with helper columns.
        expectations: From `build_expectations`.
        docs_dir: Folder of the local Data Docs site.

    Returns:
        The GX ExpectationSuiteValidationResult.
    """
    _quiet_gx()
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    for site in list(context.get_site_names()):
        context.delete_data_docs_site(site)  # the ephemeral default site lives in a temp folder
    context.add_data_docs_site("gencls", {
        "class_name": "SiteBuilder", "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)}})
    batch = context.data_sources.add_pandas("gencls").add_dataframe_asset(name).add_batch_definition_whole_dataframe("splits")
    suite = context.suites.add(gx.ExpectationSuite(name=f"gencls-{name}", expectations=expectations))
    definition = context.validation_definitions.add(gx.ValidationDefinition(name=f"gencls-{name}", data=batch, suite=suite))
    checkpoint = context.checkpoints.add(gx.Checkpoint(
        name=f"gencls-{name}", validation_definitions=[definition],
        actions=[gx.checkpoint.UpdateDataDocsAction(name="data_docs", site_names=["gencls"])],
        result_format={"result_format": "SUMMARY", "unexpected_index_column_names": ["row_key"],
                       "partial_unexpected_count": SAMPLE_ROWS}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = checkpoint.run(batch_parameters={"dataframe": frame})
    return next(iter(result.run_results.values()))


# ----------------------------------------------------------------------------- report
def describe_failure(result: Any, frame: pd.DataFrame, thresholds: dict[str, Any]) -> Failure:
    """Turn one failed GX expectation result into a `Failure` with sample offending rows.

    Args:
        result: A GX ExpectationValidationResult with success False.
        frame: The validated frame (to look up sample rows by row_key).
        thresholds: The thresholds used (quoted in the details).

    Returns:
        The Failure.
    """
    cfg = result.expectation_config
    meta, res = cfg.meta or {}, dict(result.result or {})
    name = f"{cfg.type}({cfg.kwargs.get('column')})"
    if result.exception_info and result.exception_info.get("raised_exception"):
        return Failure(name, meta.get("split", "all"), f"{meta.get('intent')}: GX error "
                       f"{result.exception_info.get('exception_message')}", [])
    if meta.get("check") == "labels_in_train":
        missing = res.get("details", {}).get("missing") or res.get("partial_missing_list") or \
            sorted(set(cfg.kwargs["value_set"]) - set(frame.loc[frame["split"].eq("train"), "label"].dropna()))
        return Failure(name, "train", f"{meta['intent']}: missing from train: {', '.join(map(str, missing))}", [])
    keys = [row["row_key"] for row in res.get("partial_unexpected_index_list") or [] if "row_key" in row]
    samples = _sample_rows(frame, keys)
    details = f"{meta.get('intent')}: {res.get('unexpected_count', '?')} of {res.get('element_count', '?')} rows fail"
    if meta.get("check") == "min_per_label":
        small = frame[frame["split"].eq("train") & (frame["train_label_count"] < thresholds["min_per_label"])]
        counts = small.groupby("label")["train_label_count"].first().to_dict()
        details = f"{meta['intent']}: labels with fewer than {thresholds['min_per_label']} train examples: {counts}"
    elif meta.get("check") == "text_length":
        details += f" (allowed {thresholds['min_chars']}..{thresholds['max_chars']} characters)"
    elif meta.get("check") == "duplicates":
        details += f" (allowed rate {thresholds['max_dup_rate']})"
    return Failure(name, meta.get("split", "all"), details, samples)


def _sample_rows(frame: pd.DataFrame, keys: list[str]) -> list[dict]:
    """Return the rows with these row_keys as short dicts (text cut to 120 characters)."""
    rows = frame.set_index("row_key").loc[[k for k in keys if k in set(frame["row_key"])]]
    samples = []
    for key, row in rows.iterrows():
        text = row["text"]
        samples.append({"split": row["split"], "line": int(row["line"]), "id": row["id"], "label": row["label"],
                        "text": text[:120] + ("..." if len(text) > 120 else "") if isinstance(text, str) else text})
    return samples


def resolve_thresholds(name: str, **given: Any) -> dict[str, Any]:
    """Thresholds: explicit arguments, else the dataset's registry overrides, else defaults.

    Args:
        name: Dataset name.
        **given: min_per_label, max_dup_rate, min_chars, max_chars; None means not given.

    Returns:
        The four thresholds.
    """
    overrides = DATASETS[name].validation if name in DATASETS else {}
    resolved = {**DEFAULT_THRESHOLDS, **overrides}
    resolved.update({k: v for k, v in given.items() if v is not None})
    return resolved


def validate_dataset(name: str, data_dir: str | Path | None = None, docs_dir: str | Path | None = None,
                     min_per_label: int | None = None, max_dup_rate: float | None = None,
                     min_chars: int | None = None, max_chars: int | None = None) -> ValidationReport:
    """Validate data/<name> with the GX suite and write Data Docs.

    Args:
        name: Dataset name.
        data_dir: Folder holding all datasets; default `config.data_dir()`.
        docs_dir: Data Docs folder; default ``reports/<name>/data_docs`` (git-ignored).
        min_per_label: Minimum training examples per label (default 10, or the registry's).
        max_dup_rate: Largest allowed share of duplicated texts within a split (default 0).
        min_chars: Shortest allowed text (default 1).
        max_chars: Longest allowed text (default 20,000, or the registry's).

    Returns:
        The ValidationReport.

    Raises:
        DataError: When the dataset's files are missing.
    """
    thresholds = resolve_thresholds(name, min_per_label=min_per_label, max_dup_rate=max_dup_rate,
                                    min_chars=min_chars, max_chars=max_chars)
    labels = list(load_labels(name, data_dir))
    folder = dataset_dir(name, data_dir)
    frame = pd.concat([read_split_frame(_split_path(folder, s), s) for s in SPLITS], ignore_index=True)
    frame = add_check_columns(frame).assign(row_id=lambda f: f["split"] + ":" + f["id"].fillna(f["row_key"]))
    docs = Path(docs_dir) if docs_dir else config.reports_dir() / name / "data_docs"
    _clear_docs(docs)
    result = run_suite(name, frame, build_expectations(labels, thresholds), docs)
    failures = [describe_failure(r, frame, thresholds) for r in result.results if not r.success]
    rows = {s: int(frame["split"].eq(s).sum()) for s in SPLITS}
    # expected rows: a split with no rows passes every per-row expectation vacuously, so it is checked here
    failures += [Failure("split_has_rows", split, f"{split}.jsonl has no rows; expected at least one example", [])
                 for split, n in rows.items() if n == 0]
    return ValidationReport(
        name=name, success=not failures, failures=failures, docs_path=docs / "index.html", thresholds=thresholds,
        rows=rows,
        expectations=[f"{r.expectation_config.type}({r.expectation_config.kwargs.get('column')})" for r in result.results])


def _split_path(folder: Path, split: str) -> Path:
    """Path of a split file, raising DataError when it is missing."""
    path = folder / f"{split}.jsonl"
    if not path.is_file():
        raise DataError(f"{path}: not found; build or import the dataset first")
    return path


def _clear_docs(docs: Path) -> None:
    """Remove what a previous GX run wrote into the site folder, so it shows this run only."""
    for part in DOCS_PARTS:
        target = docs / part
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    docs.mkdir(parents=True, exist_ok=True)


def require_valid(name: str, data_dir: str | Path | None = None, **kwargs: Any) -> ValidationReport:
    """Validate and stop the caller on failure: the gate every downstream step calls.

    Args:
        name: Dataset name.
        data_dir: Folder holding all datasets; default `config.data_dir()`.
        **kwargs: Passed on to `validate_dataset` (docs_dir and thresholds).

    Returns:
        The passing ValidationReport.

    Raises:
        DataValidationError: When any expectation fails.
    """
    report = validate_dataset(name, data_dir=data_dir, **kwargs)
    if not report.success:
        raise DataValidationError(report)
    return report
