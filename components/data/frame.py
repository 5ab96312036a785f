"""The table great-expectations validates: both splits of a dataset, one row per JSONL line.

Lines that cannot be read as a record (not JSON, not UTF-8, no text) become rows with the reason in
`record_problem` / `encoding_problem`, so the suite reports them instead of the loader failing;
`add_check_columns` adds the normalised text and, on test rows, the id of a train row with the same
text (`train_copy_id`: a leak).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from components.data.build import normalise_text


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
