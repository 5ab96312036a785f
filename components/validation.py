"""Validate a built dataset with a great-expectations suite and write Data Docs.

Usage:
    gencls data validate trec6          # or: validate_dataset("trec6"); require_valid("trec6")

Every check goes through one GX ExpectationSuite run on a pandas frame holding both
splits (one row per JSONL line). The expectations are on the data's own columns wherever
GX has a built-in: `label` in the label set and present in train, at least `min_per_label`
train rows per label (one row-count expectation per label), `text` not blank and within
the length bounds, (`split`, `id`) and (`split`, `text_normalised`) unique. Two checks have
no built-in and use a derived column with a note saying what it holds: `record_problem` and
`encoding_problem` (why a line is unreadable; empty when it is fine) and, on test rows,
`train_copy_id` (the id of a train row with the same text: a leak). Each expectation carries
a `description` (the sentence Data Docs shows) and `notes` (why it matters).

The Data Docs site (default ``reports/<name>/data_docs``) keeps the last `HISTORY`
validations; it renders offline: the CDN files GX's pages load are shipped in
``components/datadocs_assets`` and the pages are rewritten to load the copies.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import warnings
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd

from components import config
from components.datasets import DATASETS, SPLITS, DataError, dataset_dir, load_labels, normalise_text

DEFAULT_THRESHOLDS: dict[str, Any] = {
    "min_per_label": 10,     # fewer training examples than this per label is too few to learn from
    "max_dup_rate": 0.0,     # builds remove exact duplicates, so any duplicate means the files were altered
    "min_chars": 1,          # an empty text carries no signal
    "max_chars": 20_000,     # longer texts are probably concatenated records; raised per dataset in DATASETS
}
SAMPLE_ROWS = 5  # offending rows shown per failed expectation
HISTORY = 20  # validations a Data Docs site keeps (the oldest go first)
BLANK_TEXT = r"^[\s\x00-\x1f\x7f-\x9f]*$"  # nothing printable: what normalise_text turns into ""
ASSETS_DIR = Path(__file__).resolve().parent / "datadocs_assets"  # see its README.md
RESULTS_DIR = "validation_results"  # the site's GX validation results (JSON), one per page in validations/
VENDOR_DIR = ("static", "vendor")  # where a site gets its copy of ASSETS_DIR
CDN_ASSETS = {  # URL in GX 1.24's page templates -> file in ASSETS_DIR
    "https://maxcdn.bootstrapcdn.com/bootstrap/4.3.1/css/bootstrap.min.css": "bootstrap.min.css",
    "https://stackpath.bootstrapcdn.com/bootstrap/4.3.1/js/bootstrap.min.js": "bootstrap.min.js",
    "https://code.jquery.com/jquery-3.7.1.min.js": "jquery.min.js",
    "https://cdnjs.cloudflare.com/ajax/libs/popper.js/1.12.9/umd/popper.min.js": "popper.min.js",
    "https://unpkg.com/bootstrap-table@1.19.1/dist/bootstrap-table.min.css": "bootstrap-table.min.css",
    "https://unpkg.com/bootstrap-table@1.19.1/dist/bootstrap-table.min.js": "bootstrap-table.min.js",
    "https://unpkg.com/bootstrap-table@1.19.1/dist/extensions/filter-control/bootstrap-table-filter-control.min.js":
        "bootstrap-table-filter-control.min.js",
    "https://unpkg.com/bootstrap-table@1.19.0/dist/extensions/filter-control/bootstrap-table-filter-control.min.css":
        "bootstrap-table-filter-control.min.css",
    "https://unpkg.com/bootstrap-table@1.19.0/dist/extensions/filter-control/bootstrap-table-filter-control.css":
        "bootstrap-table-filter-control.min.css",
    "https://cdnjs.cloudflare.com/ajax/libs/bootstrap-datepicker/1.9.0/css/bootstrap-datepicker.min.css":
        "bootstrap-datepicker.min.css",
    "https://cdnjs.cloudflare.com/ajax/libs/bootstrap-datepicker/1.9.0/js/bootstrap-datepicker.min.js":
        "bootstrap-datepicker.min.js",
    "https://cdn.jsdelivr.net/npm/@forevolve/bootstrap-dark@1.1.0/dist/css/bootstrap-prefers-dark.css":
        "bootstrap-prefers-dark.min.css",
    "https://cdnjs.cloudflare.com/ajax/libs/font-awesome/6.6.0/css/all.min.css": "fontawesome/css/all.min.css",
}
GX_WEB_ASSETS = "https://great-expectations-web-assets.s3.us-east-2.amazonaws.com/"  # GX's logos (in static/images)
VEGA_TAG = re.compile(r'<script src="https://cdn\.jsdelivr\.net/npm/vega[^"]*"></script>[ \t]*\n?')


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
        results: One outcome per expectation, in suite order: expectation, check, split, description,
            success, observed (the observed value or "n of m rows fail").
    """

    name: str
    success: bool
    failures: list[Failure] = field(default_factory=list)
    docs_path: Path | None = None
    thresholds: dict[str, Any] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)
    expectations: list[str] = field(default_factory=list)
    results: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict of the report."""
        return {"name": self.name, "success": self.success, "docs_path": str(self.docs_path) if self.docs_path else None,
                "thresholds": self.thresholds, "rows": self.rows, "expectations": self.expectations,
                "failures": [f._asdict() for f in self.failures], "results": self.results}


class DataValidationError(RuntimeError):
    """Raised by `require_valid` when a dataset fails validation; `.report` holds the details."""

    def __init__(self, report: ValidationReport):
        names = "; ".join(f"{f.expectation} [{f.split}]: {f.details}" for f in report.failures)
        super().__init__(f"dataset {report.name!r} failed validation: {names}. Data Docs: {report.docs_path}")
        self.report = report


# ----------------------------------------------------------------------------- reading
def read_split_frame(path: Path, split: str) -> pd.DataFrame:
    """Read one JSONL split leniently: bad bytes and bad records become rows that say what is wrong.

    Args:
        path: The split's .jsonl file.
        split: "train" or "test".

    Returns:
        DataFrame with columns split, line, row_key, id, text, label, record_problem, encoding_problem
        (the problems are None for a good line).
    """
    rows = []
    for number, raw in enumerate(path.read_bytes().split(b"\n"), 1):
        if raw.strip():
            rows.append(_parse_raw_line(raw, split, number))
    return pd.DataFrame(rows, columns=["split", "line", "row_key", "id", "text", "label", "record_problem",
                                       "encoding_problem"])


def _parse_raw_line(raw: bytes, split: str, number: int) -> dict[str, Any]:
    """Decode and parse one line; say why it is not valid UTF-8 (incl. lone surrogates) or not a record."""
    encoding_problem = None
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        line, encoding_problem = raw.decode("utf-8", errors="replace"), "bytes that are not UTF-8"
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        record = None
    if record is None or not isinstance(record, dict):
        record_problem = "not JSON" if record is None else "not a JSON object"
        record = {}
    else:
        bad = [f"{key} is {'missing' if record.get(key) is None else 'not a string'}"
               for key in ("id", "text", "label") if not isinstance(record.get(key), str)]
        record_problem = "; ".join(bad) or None
    text = record.get("text") if isinstance(record.get("text"), str) else None
    if text is not None and not _encodes(text):
        text = text.encode("utf-8", errors="replace").decode("utf-8")
        encoding_problem = encoding_problem or "a lone surrogate escape (\\ud800-\\udfff) that UTF-8 cannot encode"
    return {"split": split, "line": number, "row_key": f"{split}:{number}", "id": _as_str(record.get("id")),
            "text": text, "label": _as_str(record.get("label")), "record_problem": record_problem,
            "encoding_problem": encoding_problem}


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
    """Add the two derived columns the suite needs where GX has no built-in.

    Args:
        frame: Both splits from `read_split_frame`.

    Returns:
        The frame with text_normalised (the text as builds deduplicate it: whitespace collapsed,
        control characters dropped; None when there is no text) and train_copy_id (on a test row,
        the id of a train row with the same normalised text; else None).
    """
    key = frame["text"].map(lambda t: normalise_text(t) if isinstance(t, str) else None)
    is_train = frame["split"].eq("train")
    train_ids = (frame.assign(k=key)[is_train & key.notna() & key.ne("")]
                 .drop_duplicates("k").set_index("k")["id"].to_dict())
    copy_id = [train_ids.get(k) if split == "test" and k else None for split, k in zip(frame["split"], key)]
    return frame.assign(text_normalised=key, train_copy_id=pd.Series(copy_id, index=frame.index, dtype=object))


# ----------------------------------------------------------------------------- suite
def _sentence(text: str) -> str:
    """A Data Docs description: GX renders it as a string template, so a literal $ is doubled."""
    return text.replace("$", "$$")


def build_expectations(labels: list[str], thresholds: dict[str, Any]) -> list[Any]:
    """Return the suite's expectations: each has a `description` (the sentence Data Docs shows), `notes`
    (why it matters, and what a derived column holds) and `meta` (check, split, intent; label).

    Args:
        labels: The labels of labels.yaml.
        thresholds: min_per_label, max_dup_rate, min_chars, max_chars.

    Returns:
        GX expectation objects, in the order they are reported.
    """
    import great_expectations.expectations as gxe
    from great_expectations.expectations.row_conditions import Column

    train, test = Column("split") == "train", Column("split") == "test"
    least, rate = thresholds["min_per_label"], thresholds["max_dup_rate"]

    def about(check: str, split: str, intent: str, description: str, *notes: str, **more: str) -> dict[str, Any]:
        return {"meta": {"check": check, "split": split, "intent": intent, **more},
                "description": _sentence(description), "notes": list(notes) or None}
    duplicates = ("No text occurs twice within a split" if not rate else
                  f"At most {rate:.1%} of a split's rows share their text with another row of the split")
    return [
        gxe.ExpectColumnValuesToBeNull(column="record_problem", **about(
            "records", "all", "every line is a JSON object with string id, text, label",
            "Every line of train.jsonl and test.jsonl is a JSON object with a string id, text and label.",
            "`record_problem` is derived: why a line is not such a record (not JSON, not an object, a field "
            "missing or not a string); it is empty for a good line. GX has no expectation on raw JSON lines.")),
        gxe.ExpectColumnValuesToBeNull(column="encoding_problem", **about(
            "utf8", "all", "every line is valid UTF-8", "Every line is valid UTF-8.",
            "`encoding_problem` is derived: what is wrong with a line's encoding (bytes that are not UTF-8, or "
            "a JSON escape of a lone surrogate that UTF-8 cannot encode); it is empty for a good line.")),
        gxe.ExpectColumnValuesToNotMatchRegex(column="text", regex=BLANK_TEXT, **about(
            "text_nonempty", "all", "text is not empty or whitespace",
            "Every text has printable content: not empty, not only whitespace or control characters.",
            "An empty text carries no signal to classify.")),
        gxe.ExpectColumnValueLengthsToBeBetween(
            column="text", min_value=thresholds["min_chars"], max_value=thresholds["max_chars"], **about(
                "text_length", "all", "text length is within bounds",
                f"Every text is {thresholds['min_chars']:,} to {thresholds['max_chars']:,} characters long.",
                "A text far longer than the dataset's longest means records were merged (e.g. by broken CSV "
                "quoting); the bound is set per dataset in components/datasets.py (DATASETS)."))
    ] + [
        gxe.ExpectColumnValuesToBeInSet(column="label", value_set=labels, **about(
            "labels_known", "all", "labels are those of labels.yaml",
            f"Every label is one of the {len(labels)} labels of labels.yaml: {', '.join(labels)}.",
            "A label outside labels.yaml can never be predicted and is a typo or a stale file.")),
        gxe.ExpectColumnDistinctValuesToContainSet(column="label", value_set=labels, row_condition=train, **about(
            "labels_in_train", "train", "every label occurs in train",
            "Every label of labels.yaml occurs in train.",
            "A label with no training example cannot be learnt.")),
    ] + [
        gxe.ExpectTableRowCountToBeBetween(min_value=least, row_condition=train & (Column("label") == label), **about(
            "min_per_label", "train", "enough training examples per label",
            f"Train has at least {least} examples labelled {label}.",
            f"Fewer than {least} examples of a label are too few to learn it from; the observed value is "
            "the label's count in train.", label=label))
        for label in labels
    ] + [
        gxe.ExpectCompoundColumnsToBeUnique(column_list=["split", "id"], ignore_row_if="any_value_is_missing", **about(
            "ids_unique", "all", "ids are unique within a split", "Every id occurs once within its split.",
            "Predictions and the gate's validation slice are keyed by id.")),
        gxe.ExpectCompoundColumnsToBeUnique(
            column_list=["split", "text_normalised"], mostly=1 - rate, ignore_row_if="any_value_is_missing", **about(
                "duplicates", "all", "duplicate rate within a split is bounded", duplicates + ".",
                "`text_normalised` is the text as builds deduplicate it: whitespace collapsed and control "
                "characters dropped. Builds remove duplicates, so one here means the files were altered; "
                "every copy of a repeated text counts.")),
        gxe.ExpectColumnValuesToBeNull(column="train_copy_id", row_condition=test, **about(
            "no_leak", "test", "no test text appears in train",
            "No test text also occurs in train.",
            "`train_copy_id` is derived: on a test row, the id of a train row with the same normalised text "
            "(empty when there is none). A test text seen in training inflates the test score (a leak).")),
    ]


def _quiet_gx() -> None:
    """Turn off GX analytics and chatter (called before importing GX)."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    logging.getLogger("great_expectations").setLevel(logging.ERROR)


def run_suite(name: str, frame: pd.DataFrame, expectations: list[Any], docs_dir: Path,
              run_name: str | None = None) -> Any:
    """Run the expectations through an ephemeral GX context and add the run to the Data Docs in docs_dir.

    Args:
        name: Dataset name (names the suite, asset and checkpoint).
        frame: The frame with derived columns.
        expectations: From `build_expectations`.
        docs_dir: Folder of the local Data Docs site (earlier validations in it are kept).
        run_name: Run name shown in the site's index (e.g. the data's hash).

    Returns:
        The GX ExpectationSuiteValidationResult.
    """
    _quiet_gx()
    import great_expectations as gx
    from great_expectations.core.run_identifier import RunIdentifier
    from great_expectations.data_context.types.base import (DataContextConfig, InMemoryStoreBackendDefaults,
                                                            ProgressBarsConfig)

    # ephemeral, except for the validation results: the site's index lists the results in this store (and
    # removes pages without one), so keeping them next to the pages is what keeps the history
    stores = InMemoryStoreBackendDefaults()
    stores.stores[stores.validation_results_store_name]["store_backend"] = {
        "class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir / RESULTS_DIR)}
    context = gx.get_context(mode="ephemeral", project_config=DataContextConfig(
        store_backend_defaults=stores, analytics_enabled=False, progress_bars=ProgressBarsConfig(globally=False),
        data_docs_sites={"gencls": {
            "class_name": "SiteBuilder", "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)}}}))
    batch = context.data_sources.add_pandas("gencls").add_dataframe_asset(name).add_batch_definition_whole_dataframe("splits")
    suite = context.suites.add(gx.ExpectationSuite(
        name=f"gencls-{name}", expectations=expectations,
        notes=f"Checks run by `gencls data validate {name}` before anything trains on data/{name}."))
    definition = context.validation_definitions.add(gx.ValidationDefinition(name=f"gencls-{name}", data=batch, suite=suite))
    checkpoint = context.checkpoints.add(gx.Checkpoint(
        name=f"gencls-{name}", validation_definitions=[definition],
        actions=[gx.checkpoint.UpdateDataDocsAction(name="data_docs", site_names=["gencls"])],
        result_format={"result_format": "SUMMARY", "unexpected_index_column_names": ["row_key"],
                       "partial_unexpected_count": SAMPLE_ROWS}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = checkpoint.run(batch_parameters={"dataframe": frame}, run_id=RunIdentifier(run_name=run_name))
    return next(iter(result.run_results.values()))


# ----------------------------------------------------------------------------- report
def expectation_name(cfg: Any) -> str:
    """How a report names an expectation: type(column), type(col1,col2) or type(label=X) for a per-label count."""
    kwargs, meta = cfg.kwargs, cfg.meta or {}
    if kwargs.get("column"):
        subject = kwargs["column"]
    elif kwargs.get("column_list"):
        subject = ",".join(kwargs["column_list"])
    else:
        subject = f"label={meta['label']}" if "label" in meta else ""
    return f"{cfg.type}({subject})"


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
    name, check, split = expectation_name(cfg), meta.get("check"), meta.get("split", "all")
    if result.exception_info and result.exception_info.get("raised_exception"):
        return Failure(name, split, f"{meta.get('intent')}: GX error "
                       f"{result.exception_info.get('exception_message')}", [])
    train = frame[frame["split"].eq("train")]
    if check == "labels_in_train":
        missing = res.get("details", {}).get("missing") or res.get("partial_missing_list") or \
            sorted(set(cfg.kwargs["value_set"]) - set(train["label"].dropna()))
        return Failure(name, "train", f"{meta['intent']}: missing from train: {', '.join(map(str, missing))}", [])
    if check == "min_per_label":
        label = meta["label"]
        samples = _sample_rows(frame, list(train.loc[train["label"].eq(label), "row_key"][:SAMPLE_ROWS]))
        return Failure(name, "train", f"{meta['intent']}: label {label!r} has {res.get('observed_value', '?')} train "
                       f"examples, fewer than {thresholds['min_per_label']}", samples)
    keys = [row["row_key"] for row in res.get("partial_unexpected_index_list") or [] if "row_key" in row]
    samples = _sample_rows(frame, keys)
    details = f"{meta.get('intent')}: {res.get('unexpected_count', '?')} of {res.get('element_count', '?')} rows fail"
    values = [v for v in res.get("partial_unexpected_list") or [] if not isinstance(v, dict)]
    if check == "text_length":
        details += f" (allowed {thresholds['min_chars']}..{thresholds['max_chars']} characters)"
    elif check == "duplicates":
        details += f" (allowed rate {thresholds['max_dup_rate']})"
    elif check == "no_leak" and values:
        details += f" (same text as train ids: {', '.join(dict.fromkeys(map(str, values)))})"
    elif check in ("records", "utf8") and values:
        details += f" ({'; '.join(dict.fromkeys(map(str, values)))})"
    return Failure(name, split, details, samples)


def outcome(result: Any) -> dict[str, Any]:
    """One expectation's outcome as plain JSON: expectation, check, split, description, success, observed."""
    cfg, res = result.expectation_config, dict(result.result or {})
    meta = cfg.meta or {}
    if "observed_value" in res:
        observed = res["observed_value"]
    elif "unexpected_count" in res:
        observed = f"{res['unexpected_count']} of {res.get('element_count', '?')} rows fail"
    else:
        observed = None
    return {"expectation": expectation_name(cfg), "check": meta.get("check"), "split": meta.get("split"),
            "description": (cfg.description or "").replace("$$", "$"), "success": bool(result.success),
            "observed": json.loads(json.dumps(observed, default=str))}


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
        max_dup_rate: Largest allowed share of rows whose text is repeated within their split (default 0).
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
    paths = [_split_path(folder, s) for s in SPLITS]
    frame = add_check_columns(pd.concat([read_split_frame(path, s) for path, s in zip(paths, SPLITS)],
                                        ignore_index=True))
    docs = Path(docs_dir) if docs_dir else config.reports_dir() / name / "data_docs"
    docs.mkdir(parents=True, exist_ok=True)
    prune_history(docs, keep=HISTORY - 1)
    result = run_suite(name, frame, build_expectations(labels, thresholds), docs, run_name=_data_run_name(paths))
    make_offline(docs)
    failures = [describe_failure(r, frame, thresholds) for r in result.results if not r.success]
    rows = {s: int(frame["split"].eq(s).sum()) for s in SPLITS}
    # expected rows: a split with no rows passes every per-row expectation vacuously, so it is checked here
    failures += [Failure("split_has_rows", split, f"{split}.jsonl has no rows; expected at least one example", [])
                 for split, n in rows.items() if n == 0]
    return ValidationReport(
        name=name, success=not failures, failures=failures, docs_path=docs / "index.html", thresholds=thresholds,
        rows=rows, expectations=[expectation_name(r.expectation_config) for r in result.results],
        results=[outcome(r) for r in result.results])


def _split_path(folder: Path, split: str) -> Path:
    """Path of a split file, raising DataError when it is missing."""
    path = folder / f"{split}.jsonl"
    if not path.is_file():
        raise DataError(f"{path}: not found; build or import the dataset first")
    return path


def _data_run_name(paths: list[Path]) -> str:
    """The GX run name: ``data-<sha256 of the split files, first 12>``, so the index shows when the data changed."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.read_bytes())
    return f"data-{digest.hexdigest()[:12]}"


# ----------------------------------------------------------------------------- Data Docs site
def validation_runs(docs: Path) -> list[tuple[str, ...]]:
    """The validations a site holds, oldest first, as (run time, suite, run name, batch) keys: its results in
    validation_results/ and its pages in validations/ (<suite>/<run name>/<run time>/<batch>.json|html)."""
    keys = set()
    for folder, suffix in ((RESULTS_DIR, ".json"), ("validations", ".html")):
        for path in (docs / folder).glob(f"*/*/*/*{suffix}") if (docs / folder).is_dir() else []:
            keys.add((path.parent.name, path.parent.parent.parent.name, path.parent.parent.name, path.stem))
    return sorted(keys)


def prune_history(docs: Path, keep: int = HISTORY - 1) -> list[tuple[str, ...]]:
    """Remove all but the newest `keep` validations of a site (result and page; folders left empty too).

    Args:
        docs: The Data Docs folder.
        keep: How many validations stay (the run about to be added comes on top).

    Returns:
        The (run time, suite, run name, batch) keys removed.
    """
    runs = validation_runs(docs)
    removed = runs[:max(len(runs) - keep, 0)]
    for run_time, suite, run_name, batch in removed:
        for folder, suffix in ((RESULTS_DIR, ".json"), ("validations", ".html")):
            path = docs / folder / suite / run_name / run_time / f"{batch}{suffix}"
            path.unlink(missing_ok=True)
            parent = path.parent
            while parent != docs and parent.is_dir() and not any(parent.iterdir()):
                parent.rmdir()
                parent = parent.parent
    return removed


def make_offline(docs: Path) -> None:
    """Make a Data Docs site render without network: copy the vendored assets to static/vendor and point
    every page's CDN links at them (idempotent; earlier pages are rewritten again harmlessly).

    Args:
        docs: The Data Docs folder GX has just written.
    """
    shutil.copytree(ASSETS_DIR, docs.joinpath(*VENDOR_DIR), dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__"))
    styles = docs / "static" / "styles" / "data_docs_default_styles.css"
    if styles.is_file():  # the dark theme's logo is fetched from GX's web bucket; use the shipped one
        css = styles.read_text(encoding="utf-8")
        fixed = css.replace(f"{GX_WEB_ASSETS}full_logo_dark.png", "../images/logo-long.png")
        if fixed != css:
            styles.write_text(fixed, encoding="utf-8")
    for page in docs.rglob("*.html"):
        if page.is_relative_to(docs / "static"):
            continue
        html = page.read_text(encoding="utf-8")
        root = Path(os.path.relpath(docs, page.parent)).as_posix()
        offline = offline_html(html, root, docs)
        if offline != html:
            page.write_text(offline, encoding="utf-8")


def offline_html(html: str, root: str, docs: Path) -> str:
    """One page with its CDN assets replaced by the site's copies.

    Args:
        html: The page.
        root: Relative path from the page's folder to the site root ("." or "../../..").
        docs: The site root (to check that a GX image exists locally).

    Returns:
        The page: CDN URLs -> ``<root>/static/vendor/<file>`` (without the integrity and crossorigin
        attributes, which a browser enforces as CORS on file:// pages), GX's hosted logo -> static/images,
        links into static/ made relative to the site root, and the vega script tags dropped when the page draws no chart.
    """
    vendor = "/".join((root, *VENDOR_DIR))
    for url, local in CDN_ASSETS.items():
        html = html.replace(f'"{url}"', f'"{vendor}/{local}"')
    html = re.sub(r'\s+(?:integrity|crossorigin)="[^"]*"', "", html)
    # GX links static/ one level short from validation pages (validations/<suite>/<run>/<time>/)
    html = re.sub(r'(["\'])(?:\./|(?:\.\./)+)static/', lambda m: f"{m.group(1)}{root}/static/", html)

    def image(match: re.Match) -> str:
        local = docs / "static" / "images" / match.group(1)
        return f"{root}/static/images/{match.group(1)}" if local.is_file() else match.group(0)
    html = re.sub(re.escape(GX_WEB_ASSETS) + r'([\w.-]+)(?:\?[^"\']*)?', image, html)
    if "vegaEmbed" not in html:
        html = VEGA_TAG.sub("", html)
    return html


class _AssetLinks(HTMLParser):
    """Collects what a page loads: script src, link href (stylesheets, icons), img src."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag in ("script", "img") and values.get("src"):
            self.urls.append(values["src"])
        elif tag == "link" and values.get("href"):
            self.urls.append(values["href"])


def offline_problems(docs: str | Path) -> list[str]:
    """What stops a Data Docs site from rendering offline: assets loaded from the network, and local
    assets (pages' scripts, stylesheets and images; url() in the site's CSS) that do not exist.

    Args:
        docs: The Data Docs folder.

    Returns:
        One line per problem ("page: url"); empty when the site is self-contained.
    """
    docs, problems = Path(docs), []
    for page in sorted(docs.rglob("*.html")):
        parser = _AssetLinks()
        parser.feed(page.read_text(encoding="utf-8"))
        problems += [f"{page.relative_to(docs)}: {url}" for url in parser.urls if _missing(url, page.parent)]
    for sheet in sorted(docs.rglob("*.css")):
        urls = re.findall(r"url\(\s*['\"]?([^'\")]+)['\"]?\s*\)", sheet.read_text(encoding="utf-8"))
        problems += [f"{sheet.relative_to(docs)}: {url}" for url in urls if _missing(url, sheet.parent)]
    return problems


def _missing(url: str, base: Path) -> bool:
    """True for a network URL or a relative path that does not exist under base (data: and # are fine)."""
    if url.startswith(("data:", "#")):
        return False
    if re.match(r"^[a-z][a-z0-9+.-]*:|^//", url, re.IGNORECASE):
        return True
    return not (base / url.split("?")[0].split("#")[0]).exists()


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
