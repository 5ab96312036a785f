"""Preparing a dataset for the study: the profile's settings, prompt and SFT budgets fitted to the dataset,
the seeded stratified subsample (texts cut to one budget) and the dataset views the cells read, and the settings fingerprint.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

from components.study.plan import TRAIN_FLOOR


def profile_settings(profile: str, overrides: dict | None, params: dict | None = None) -> dict:
    """params.yaml `profiles.<profile>.study` with flat overrides (`train_size`, `eval.batch_size`, ...) applied."""
    from components.config import profile_section

    settings = json.loads(json.dumps(profile_section(profile, "study", params)))
    for key, value in (overrides or {}).items():
        head, _, tail = key.partition(".")
        if head in ("sft", "rl"):
            continue  # training config keys go through load_config
        if tail and isinstance(settings.get(head), dict):
            settings[head][tail] = value
        elif key in settings:
            settings[key] = value
        else:
            raise ValueError(f"study override {key!r}: unknown; valid: {', '.join(sorted(settings))} "
                             f"(or sft.KEY / rl.KEY / eval.KEY / reasoning_rl.KEY)")
    return settings


def fit_prompt_budgets(settings: dict, tokenizer: Any, labels: dict) -> int:
    """Set every prompt budget (sft, rl, eval) so that no strategy cuts the text further; returns it.

    Texts are cut to ``settings["text_tokens"]`` once, in the data (``truncate_texts``), so every arm
    sees the same text whatever its strategy. The prompt budget is then the longest instructions
    any strategy renders (definitions, uncertain, numeric labels, reasoning hint) + the text + k
    demonstrations of ``demo_tokens`` each with their Text:/Category: lines, so the prompt builder
    never has to cut the text to classify (and never drops a demonstration).
    """
    from components.model.prompts import Strategy, instruction_tokens

    text = int(settings["text_tokens"])
    k = int(settings.get("icl_k") or 0)
    longest = max(instruction_tokens(tokenizer, labels, Strategy.parse(spec)) for spec in
                  ("definitions,uncertain", "definitions,uncertain,numeric", "definitions,uncertain,reasoning"))
    budget = longest + text + k * (DEMO_TOKENS + DEMO_SCAFFOLD) + DEMO_SCAFFOLD
    for part in ("sft", "rl", "eval"):
        settings.setdefault(part, {})["max_prompt_tokens"] = budget
    return budget


DEMO_TOKENS = 48  # PromptBuilder's default demo_tokens: each demonstration's text is cut to this
DEMO_SCAFFOLD = 16  # "Examples:" / "Text:" / "Category: <label>" tokens around one demonstration (generous)


def truncate_texts(rows: Sequence[dict], tokenizer: Any, max_tokens: int) -> tuple[list[dict], int]:
    """Every row's text cut to `max_tokens` tokens of the model's tokenizer (PromptBuilder's cut, " ..." marks it).

    Returns:
        (rows with cut texts, how many were cut).
    """
    from components.model.prompts import PromptBuilder, Strategy

    builder = PromptBuilder(tokenizer, {"x": "x"}, Strategy())
    out, cut = [], 0
    for row in rows:
        text, was_cut = builder.truncate(row["text"], max_tokens)
        cut += int(was_cut)
        out.append({**row, "text": text} if was_cut else row)
    return out, cut


# ----------------------------------------------------------------------------- cut copies
def drop_cut_duplicates(train: Sequence[dict], test: Sequence[dict]) -> tuple[list[dict], list[dict], dict[str, int]]:
    """Drop the rows that cutting made into copies (the build already dropped copies of whole texts).

    Two long texts that begin alike become one text once cut (r8's Reuters items that open with the
    same headline): the copy would break the data checks (text unique within a split, no test text
    in train) and count one text twice. Within each split the first row in file order is kept, and a
    test row whose cut text is a kept train text is dropped (unlike the build, which keeps the test
    copy: here the test sample is drawn afterwards, so losing a test row costs nothing).

    Returns:
        (train, test, {"train": dropped, "test": dropped}).
    """
    from components.data.build import normalise_text

    def first_copies(rows: Sequence[dict], seen: set[str]) -> list[dict]:
        kept = []
        for row in rows:
            key = normalise_text(row["text"])
            if key not in seen:
                seen.add(key)
                kept.append(row)
        return kept

    seen: set[str] = set()
    kept_train = first_copies(train, seen)
    kept_test = first_copies(test, seen)  # `seen` holds the kept train texts: their test copies go too
    return kept_train, kept_test, {"train": len(train) - len(kept_train), "test": len(test) - len(kept_test)}


# ----------------------------------------------------------------------------- subsampling
def ids_hash(examples: Sequence[dict]) -> str:
    """sha256 of the sorted example ids (what exactly a subsample holds)."""
    digest = hashlib.sha256()
    for ex_id in sorted(str(ex["id"]) for ex in examples):
        digest.update(ex_id.encode() + b"\n")
    return digest.hexdigest()


def subsample(train: Sequence[dict], test: Sequence[dict], train_size: int | None, val_size: int,
              test_size: int | None, seed: int, heldout: int = 0) -> tuple[dict[str, list[dict]], dict[str, Any]]:
    """Carve the validation slice, the training pool (N trained + SFT's held-out) and the test subsample.

    The validation slice is drawn first (stratified, seed + 101) from the training split; the
    pool of ``train_size + heldout`` (stratified, seed, a floor per label) from the rest; SFT
    carves its ``heldout`` checkpoint-selection slice from the pool exactly as
    ``components.train.sampling.split_train_eval(pool, 0, heldout, seed)`` does, and the
    remaining ``train_size`` examples ("trained") are what every arm learns from: SFT and RL
    prompts, in-context demonstrations, TF-IDF and MiniLM. The test subsample (stratified, seed)
    comes from the test split. None or 0 sizes mean "all".

    Returns:
        ({"pool", "trained", "heldout", "val", "test", "train_all"} example lists, record with sizes, seed and
        ids hashes); "train_all" is the training split minus the validation slice (TF-IDF on all data).
    """
    from components.train.sampling import split_train_eval, stratified_sample

    val = stratified_sample(train, val_size, seed + 101) if val_size else []
    val_ids = {ex["id"] for ex in val}
    rest = [ex for ex in train if ex["id"] not in val_ids]
    size = (train_size + heldout) if train_size else 0
    pool = _ordered(stratified_sample(rest, size, seed, min_per_label=TRAIN_FLOOR), train)
    trained, held = split_train_eval(pool, 0, heldout, seed)
    splits = {"pool": pool, "trained": _ordered(trained, train), "heldout": _ordered(held, train),
              "val": _ordered(val, train), "test": _ordered(stratified_sample(test, test_size or 0, seed), test),
              "train_all": rest}
    record = {"seed": seed, "method": "stratified by label (components.train.sampling.stratified_sample); "
                                      "val from the training split first (seed+101), then the pool of N + SFT held-out "
                                      f"with at least {TRAIN_FLOOR} examples per label; SFT's held-out carved from the "
                                      "pool by split_train_eval (seed+1); every arm learns from the rest (N)",
              "source_sizes": {"train": len(train), "test": len(test)},
              "sizes": {name: len(items) for name, items in splits.items()},
              "ids_sha256": {name: ids_hash(items) for name, items in splits.items() if name != "train_all"}}
    return splits, record


def _ordered(chosen: Sequence[dict], source: Sequence[dict]) -> list[dict]:
    """The chosen examples in their source file order (stable files, stable hashes)."""
    ids = {ex["id"] for ex in chosen}
    return [ex for ex in source if ex["id"] in ids]


VIEWS = {  # view -> (train.jsonl split, test.jsonl split); each view is a data_dir for load_split/evaluate
    "train": ("pool", "val"),  # SFT/RL training: the pool (SFT carves its held-out from it); test.jsonl unused
    "test": ("trained", "test"),  # measuring: demos, TF-IDF and MiniLM from the N trained examples
    "val": ("trained", "val"),  # choosing: the same, on the validation slice
    "all": ("train_all", "test"),  # TF-IDF on all training data
}


def write_views(root: Path, dataset: str, splits: dict[str, list[dict]], labels_yaml: bytes) -> dict[str, Path]:
    """Write the dataset views (VIEWS) under ``<root>/<view>/<dataset>/``; returns {view: <root>/<view>}.

    Files are only rewritten when their content changes.
    """
    views = {}
    for view, (train_split, test_split) in VIEWS.items():
        folder = Path(root) / view / dataset
        folder.mkdir(parents=True, exist_ok=True)
        for name, rows in (("train.jsonl", splits[train_split]), ("test.jsonl", splits[test_split])):
            _write_if_changed(folder / name, "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n"
                                                     for r in rows).encode("utf-8"))
        _write_if_changed(folder / "labels.yaml", labels_yaml)
        views[view] = Path(root) / view
    return views


def _write_if_changed(path: Path, data: bytes) -> None:
    if path.exists() and path.read_bytes() == data:
        return
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def files_sha256(*folders: Path) -> str:
    """sha256 over the train/test/labels files of dataset view folders (content identity)."""
    digest = hashlib.sha256()
    for folder in folders:
        for name in ("train.jsonl", "test.jsonl", "labels.yaml"):
            path = Path(folder) / name
            digest.update(name.encode() + b"\0" + (path.read_bytes() if path.is_file() else b"<missing>") + b"\0")
    return digest.hexdigest()


def settings_fingerprint(data: Any) -> str:
    """Short sha256 of the settings a dataset's cells depend on."""
    from components.fingerprint import fingerprint

    return fingerprint(data, 16)


RL_SETTINGS = ("rl", "reasoning_rl")  # the study settings only RL adapters read


def recipe_config(profile: str, model: str, overrides: dict | None = None) -> str:
    """Fingerprint of what the recipe's validation cells depend on: the model and the study settings without the
    RL ones (no RL cell chooses the recipe)."""
    settings = {k: v for k, v in profile_settings(profile, overrides).items() if k not in RL_SETTINGS}
    return settings_fingerprint({"model": model, "settings": settings})
