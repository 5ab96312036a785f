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
``components/data/datadocs_assets`` and the pages are rewritten to load the copies.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd

from components import config
from components.data.sources import DATASETS
from components.data.datasets import SPLITS, DataError, dataset_dir, load_labels
from components.data.expectations import build_expectations
from components.data.frame import add_check_columns, read_split_frame
from components.data.datadocs import HISTORY, RESULTS_DIR, make_offline, prune_history

DEFAULT_THRESHOLDS: dict[str, Any] = {
    "min_per_label": 10,     # fewer training examples than this per label is too few to learn from
    "max_dup_rate": 0.0,     # builds remove exact duplicates, so any duplicate means the files were altered
    "min_chars": 1,          # an empty text carries no signal
    "max_chars": 20_000,     # longer texts are probably concatenated records; raised per dataset in DATASETS
}
SAMPLE_ROWS = 5  # offending rows shown per failed expectation
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


def require_valid(name: str, data_dir: str | Path | None = None, **kwargs: Any) -> ValidationReport:
    """Validate and stop the caller on failure: the gate every downstream step calls.

    Files whose exact bytes already passed this suite with the same thresholds (`passed_path`, a record in
    the user cache keyed by their sha256, the thresholds and the suite's source) are not validated again:
    SFT and RL call this right after the validate stage, and a GX run costs ~10 s of imports on 2 cores.
    A failure is never recorded, so bad files fail every time.

    Args:
        name: Dataset name.
        data_dir: Folder holding all datasets; default `config.data_dir()`.
        **kwargs: Passed on to `validate_dataset` (docs_dir and thresholds).

    Returns:
        The passing ValidationReport (the recorded one when the files had passed before).

    Raises:
        DataValidationError: When any expectation fails.
    """
    record = passed_path(name, data_dir, **kwargs)
    if record is not None and record.is_file():
        try:
            data = json.loads(record.read_text(encoding="utf-8"))
            return ValidationReport(**{**data, "failures": [], "success": True,
                                       "docs_path": Path(data["docs_path"]) if data.get("docs_path") else None})
        except (ValueError, TypeError, KeyError):
            pass  # a torn or older record: validate again
    report = validate_dataset(name, data_dir=data_dir, **kwargs)
    if not report.success:
        raise DataValidationError(report)
    remember_pass(report, record, data_dir, **kwargs)
    return report


def remember_pass(report: ValidationReport, before: Path | None, data_dir: str | Path | None = None,
                  **kwargs: Any) -> None:
    """Record a passing report of `validate_dataset` (same data_dir and thresholds) for `require_valid`.

    `before` is `passed_path` taken before the validation: the pass is recorded only when the files still hash
    the same (bytes replaced while GX read them are not recorded as validated). The record only saves time, so
    a cache that cannot be written is skipped.
    """
    import tempfile

    if not report.success or before is None or passed_path(report.name, data_dir, **kwargs) != before:
        return
    try:
        before.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=before.parent, suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(report.as_dict(), default=str))
        os.replace(tmp, before)
    except OSError as exc:
        logging.getLogger(__name__).warning("validation record %s not written (%s)", before, exc)


def passed_path(name: str, data_dir: str | Path | None = None, **kwargs: Any) -> Path | None:
    """Where `require_valid` records that these files passed: ``<cache>/validated/<key>.json``, the key hashing
    the split files and labels.yaml, the resolved thresholds and the source of this module and what it imports.
    None when a file is missing (validation reports that)."""
    from components.fingerprint import fingerprint, sha256_files, source_hash

    folder = dataset_dir(name, data_dir)
    files = [folder / f"{s}.jsonl" for s in SPLITS] + [folder / "labels.yaml"]
    if not all(path.is_file() for path in files):
        return None
    thresholds = resolve_thresholds(name, **{k: v for k, v in kwargs.items() if k != "docs_dir"})
    from importlib.metadata import version

    key = fingerprint({"data": sha256_files(files), "thresholds": thresholds, "src": source_hash(__name__),
                       "name": name, "libraries": [version("great_expectations"), pd.__version__]})
    return config.cache_dir() / "validated" / f"{key}.json"
