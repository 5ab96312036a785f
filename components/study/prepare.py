"""Preparing a dataset for the study: the profile's settings, prompt and SFT budgets fitted to the dataset,
the seeded stratified subsample and the two dataset views the cells read, and the settings fingerprint.
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


def fit_prompt_budgets(settings: dict, tokenizer: Any, labels: dict, overrides: dict | None = None) -> None:
    """Raise every prompt budget to the instructions' length + settings["text_room"] (in place; 0 = off).

    Long label lists (20newsgroups' 20 names cost ~180 tokens) would otherwise leave the text to
    classify only the 16-token minimum and no room for demonstrations. GRPO's cost is proportional
    to its prompts' tokens, so where its budget rises its steps shrink in proportion (at least 2):
    every dataset's RL gets about the same number of prompt tokens. Explicit `rl.*` overrides win.
    """
    room = int(settings.get("text_room") or 0)
    if not room:
        return
    from components.model.prompts import instruction_tokens

    need = instruction_tokens(tokenizer, labels) + room
    rl = settings.get("rl", {})
    before = int(rl.get("max_prompt_tokens") or 0)
    for part in ("sft", "rl", "eval"):
        if "max_prompt_tokens" in settings.get(part, {}):
            settings[part]["max_prompt_tokens"] = max(int(settings[part]["max_prompt_tokens"]), need)
    explicit = {k for k in (overrides or {}) if k.startswith("rl.")}
    if explicit & {"rl.max_steps", "rl.max_prompt_tokens"}:
        return
    if before and rl.get("max_steps") and rl["max_prompt_tokens"] > before:
        steps = max(2, round(int(rl["max_steps"]) * before / rl["max_prompt_tokens"]))
        for key in ("eval_every", "save_steps"):
            if key in rl and f"rl.{key}" not in explicit:
                rl[key] = min(int(rl[key]), steps)
        rl["max_steps"] = steps


def fit_sft_size(settings: dict, tokenizer: Any, labels: dict, pool: list[dict], overrides: dict | None = None) -> dict:
    """Cap SFT prompts at settings["sft_tokens"] tokens of naive prompts (in place; 0 = off); returns the record.

    Training time is proportional to tokens: 200 trec6 questions (~67 tokens each) cost what ~100
    bbc-news articles cut at 128 tokens cost. Naive and GenCLS++ SFT get the same number of prompts.
    """
    budget = int(settings.get("sft_tokens") or 0)
    if "sft.train_size" in (overrides or {}):  # the user's explicit size wins
        return {"sft_tokens": 0, "train_size": int(overrides["sft.train_size"])}
    if not budget:
        return {"sft_tokens": 0, "train_size": int(settings["sft"]["train_size"] or 0)}  # 0 = the whole pool
    cap = int(settings["sft"]["train_size"] or len(pool))
    from components.model.prompts import PromptBuilder, Strategy

    builder = PromptBuilder(tokenizer, labels, Strategy(),
                            max_prompt_tokens=int(settings["sft"]["max_prompt_tokens"]))
    lengths = [len(builder.tokenizer(builder.prompt(ex), add_special_tokens=False)["input_ids"]) for ex in pool]
    mean = sum(lengths) / max(len(lengths), 1)
    size = max(1, min(cap, int(budget // max(mean, 1.0))))
    settings["sft"]["train_size"] = size
    return {"sft_tokens": budget, "mean_naive_prompt_tokens": round(mean, 1), "train_size": size}


# ----------------------------------------------------------------------------- subsampling
def ids_hash(examples: Sequence[dict]) -> str:
    """sha256 of the sorted example ids (what exactly a subsample holds)."""
    digest = hashlib.sha256()
    for ex_id in sorted(str(ex["id"]) for ex in examples):
        digest.update(ex_id.encode() + b"\n")
    return digest.hexdigest()


def subsample(train: Sequence[dict], test: Sequence[dict], train_size: int | None, val_size: int,
              test_size: int | None, seed: int) -> tuple[dict[str, list[dict]], dict[str, Any]]:
    """Carve validation, training pool and test subsample; returns (splits, record).

    The validation slice is drawn first (stratified, seed + 101) from the training split; the
    training pool (stratified, seed) from the rest; the test subsample (stratified, seed)
    from the test split. None or 0 sizes mean "all".

    Returns:
        ({"train", "val", "test"} example lists, record with sizes, seed and ids hashes).
    """
    from components.train.sampling import stratified_sample

    val = stratified_sample(train, val_size, seed + 101) if val_size else []
    val_ids = {ex["id"] for ex in val}
    rest = [ex for ex in train if ex["id"] not in val_ids]
    pool = stratified_sample(rest, train_size or 0, seed, min_per_label=TRAIN_FLOOR)
    test_sub = stratified_sample(test, test_size or 0, seed)
    splits = {"train": _ordered(pool, train), "val": _ordered(val, train), "test": _ordered(test_sub, test)}
    # the method text is recorded as it was first written: it is part of every cell key (settings fingerprint)
    record = {"seed": seed, "method": "stratified by label (components.training_common.stratified_sample); "
                                      "val from the training split first (seed+101), then the training pool "
                                      f"with at least {TRAIN_FLOOR} examples per label (validation minimum)",
              "source_sizes": {"train": len(train), "test": len(test)},
              "sizes": {name: len(items) for name, items in splits.items()},
              "ids_sha256": {name: ids_hash(items) for name, items in splits.items()}}
    return splits, record


def _ordered(chosen: Sequence[dict], source: Sequence[dict]) -> list[dict]:
    """The chosen examples in their source file order (stable files, stable hashes)."""
    ids = {ex["id"] for ex in chosen}
    return [ex for ex in source if ex["id"] in ids]


def write_views(root: Path, dataset: str, splits: dict[str, list[dict]], labels_yaml: bytes) -> dict[str, Path]:
    """Write two dataset views a study evaluates on, both with the training pool as train.jsonl.

    ``<root>/test/<dataset>/`` has the test subsample as test.jsonl; ``<root>/val/<dataset>/``
    has the validation slice as test.jsonl. Each view is a data_dir for load_split/evaluate.
    Files are only rewritten when their content changes.
    """
    views = {}
    for view, test_split in (("test", "test"), ("val", "val")):
        folder = Path(root) / view / dataset
        folder.mkdir(parents=True, exist_ok=True)
        for name, rows in (("train.jsonl", splits["train"]), ("test.jsonl", splits[test_split])):
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
