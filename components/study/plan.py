"""The GenCLS++ study, pure parts: the cell grid, subsampling, best-combination choice, report, plots.

    gencls study --datasets trec6 movie-sentiment --profile cpu --cells headline
    # flows/study.py runs the cells; this module decides *which* cells and writes the report.

A cell is one measured configuration of one dataset: (kind, train strategy, inference
strategy, rl on/off, profile, model). Its key is a stable hash of those fields plus the
dataset's settings fingerprint (subsample ids, resolved training configs, evaluation
settings), so a changed budget never reuses an old number. Cells that share a training
strategy and rl switch share one trained adapter ("train once, evaluate many").

Cell kinds (registry; add an entry to add a kind):
    tfidf     TF-IDF (1-2 grams) + logistic regression on the same training subsample.
    zeroshot  the base model with an inference strategy, no training.
    trained   SFT with a training strategy (+ GRPO when rl), evaluated with an inference strategy.

Selections (``--cells``):
    headline  tfidf, zero-shot (plain and perplexity), naive SFT, best GenCLS++ (+RL).
    ablation  naive SFT, each dimension alone at training, at inference and at both, the
              train x inference interplay grid, best (SFT only), best + RL, best + reasoning (+RL).
    all       both.
The best combination is chosen on a validation slice carved from the training split (never
on test): every dimension whose matched (train = inference) cell beats naive SFT on that
slice is switched on (the better of icl=random/semantic), and perplexity decoding is added
when it beats generative decoding on the naive adapter. Without those measurements (a
headline-only run on a fresh dataset) `DEFAULT_BEST` is used and the report says so.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from components.evaluate.evaluation import save_figure

TRAIN_FLOOR = 20  # rare labels keep this many training examples (the strictest validation minimum, r8's)
NAIVE = "naive"
PERPLEXITY = "decoding=perplexity"
REASONING = "reasoning"
# strategy dimensions switched on alone at training time (and inference time); spec -> display name
TRAIN_DIMS = {"definitions": "definitions", "uncertain": "uncertain", "numeric": "numeric",
              "icl=random": "icl=random", "icl=semantic": "icl=semantic"}
INFER_ONLY_DIMS = {PERPLEXITY: "decoding=perplexity"}  # decoding has no training-time meaning
INTERPLAY = ("naive", "definitions", "icl=semantic", "numeric")  # train x inference grid (both axes)
DEFAULT_BEST = ("icl=semantic", "icl=semantic,decoding=perplexity")  # prior when no validation results exist
DEFAULT_BEST_WHY = ("(semantically retrieved demonstrations at training and inference, perplexity decoding: fixed "
                    "for every dataset, chosen from the paper's ablation and our earlier zero-shot trec6 figures, "
                    "not tuned per dataset)")
CELL_SETS = ("headline", "ablation", "all")
RESULT_FILE = "result.json"
METRIC_KEYS = ("accuracy", "macro_f1", "invalid_rate", "abstention_rate", "answered_accuracy", "ece")

# Profiles: what each study profile subsamples and which training profile/overrides it uses.
# cpu: headline (tfidf, zero-shot, naive SFT, best SFT + RL) < 15 min per dataset on 2 cores with
#      SmolLM2-135M. Every cost is proportional to prompt tokens (LoRA training ~100 tokens/s through
#      SFTTrainer without dropout, evaluation ~2,700 prompt tokens/s of what the prompts do not share,
#      GRPO ~15 s per step of 8 completions at 128 tokens), so SFT gets a token budget: as many naive prompts of the pool as
#      fit in `sft_tokens` (at most sft.train_size): 200 short questions, ~95 news articles.
# gpu: headline over all seven < 10 min on one H100/H200 (goal). Measured on one H100 (2026-11-26, batch 32,
#      GRPO 24 steps, before the shared-prefix decoding and the retriever fix): SFT ran 3.4 optimizer steps/s
#      whatever the prompt length (launch-bound: ~110 prompts/s), GenCLS++ SFT spent ~50 s more re-embedding
#      its prompts one at a time, GRPO 24 steps took 57 s with no learning signal (grad norm ~5e-5 at 98%
#      held-out accuracy); ~4 min per dataset. Hence batch 128 (lr 5e-4: ~40 steps, as the cpu profile
#      found for few steps) and 12 GRPO steps: expected ~1.5 min per dataset, not yet re-measured.
# Both: GRPO trains on the prompts most likely to carry a learning signal (rl.focus=informative, scored by
#      the SFT policy; components.rl.focus_examples).
STUDY_PROFILES: dict[str, dict[str, Any]] = {
    "cpu": {
        "training_profile": "quick",
        "train_size": 240,  # stratified, seeded training pool (SFT, RL, TF-IDF and demos all use it)
        "val_size": 100,  # stratified validation slice of the training split (best-combination choice)
        "test_size": 200,  # stratified, seeded test subsample (None = the full test split)
        "icl_k": 2,  # demonstrations per prompt (k=4 doubles prompt length and CPU training time)
        "seed": 0,
        "text_room": 64,  # prompt budgets rise to instructions + 64 tokens where 128 is too few (20newsgroups)
        "sft_tokens": 12_000,  # SFT prompts: as many as fit in this many naive-prompt tokens (0 = sft.train_size)
        # SFT: the pool minus 40 held-out prompts (model selection), at most 200 and at most sft_tokens' worth;
        # lr 5e-4 because 25 steps at 2e-4 leave LoRA under-trained; no dropout (-15% time)
        "sft": {"train_size": 200, "eval_size": 40, "epochs": 1.0, "eval_every_steps": 1000, "save_steps": 25,
                "max_prompt_tokens": 128, "uncertain_max_scored": 200, "learning_rate": 5e-4, "lora_dropout": 0.0},
        "rl": {"train_size": 0, "eval_size": 40, "max_steps": 8, "batch_size": 8, "eval_every": 8,
               "save_steps": 4, "max_prompt_tokens": 128, "learning_rate": 5e-5},
        "reasoning_rl": {"max_completion_length": 64},  # room for <think>...</think> then the answer
        "eval": {"batch_size": 16, "max_prompt_tokens": 128},
    },
    "gpu": {
        "training_profile": "full",
        "train_size": 8000,  # the training pool is capped at 8,000 (tweet-sentiment has 29,748, 20newsgroups 11,262)
        "val_size": 500,
        "test_size": 2000,  # stratified; 5 of the 7 test splits are smaller and kept whole
        "icl_k": 2,  # the cpu profile's prior, so both profiles measure the same GenCLS++ configuration
        "seed": 0,
        "text_room": 64,
        "sft_tokens": 400_000,  # 1 epoch over ~6,000 trec6 questions or ~1,500 newsgroup posts
        "sft": {"train_size": 8000, "eval_size": 200, "epochs": 1.0, "batch_size": 128, "learning_rate": 5e-4,
                "eval_every_steps": 100_000, "save_steps": 20, "max_prompt_tokens": 256, "lora_dropout": 0.0,
                "uncertain_max_scored": 1000},
        "rl": {"train_size": 0, "eval_size": 200, "max_steps": 12, "num_generations": 8, "batch_size": 64,
               "eval_every": 12, "save_steps": 6, "max_prompt_tokens": 256},
        "reasoning_rl": {"max_completion_length": 96},
        "eval": {"batch_size": 128, "max_prompt_tokens": 256},
    },
}


# ----------------------------------------------------------------------------- strategies
def canonical(spec: str, k: int | None = None) -> str:
    """Canonical slug of a strategy spec, with k set for in-context strategies.

    Example:
        >>> canonical("icl=semantic", k=2)
        'icl=semantic,k=2'
    """
    from components.model.prompts import Strategy

    strategy = Strategy.parse(spec)
    if k is not None and strategy.icl != "none":
        strategy = strategy.replace(k=k)
    return strategy.slug()


def combine(*specs: str, k: int | None = None) -> str:
    """Merge strategy specs: each spec's non-default dimensions switched on (later wins).

    Example:
        >>> combine("definitions", "numeric,decoding=perplexity")
        'definitions,numeric,decoding=perplexity'
    """
    from components.model.prompts import Strategy

    default = Strategy()
    merged: dict[str, Any] = {}
    for spec in specs:
        parsed = Strategy.parse(spec)
        for f in dataclasses.fields(Strategy):
            if getattr(parsed, f.name) != getattr(default, f.name):
                merged[f.name] = getattr(parsed, f.name)
    if merged.get("reasoning"):
        merged["decoding"] = "generative"  # reasoning is decoded generatively
    return canonical(Strategy(**merged).slug(), k)


def without_decoding(spec: str) -> str:
    """The training-time part of a strategy (decoding is inference-only)."""
    from components.model.prompts import Strategy

    return Strategy.parse(spec).replace(decoding="generative").slug()


# ----------------------------------------------------------------------------- cells
@dataclass(frozen=True)
class Cell:
    """One measured configuration of a dataset (see module docstring)."""

    kind: str  # "tfidf" | "zeroshot" | "trained"
    train: str  # training strategy slug ("-" when nothing is trained)
    infer: str  # inference strategy slug ("-" for tfidf)
    rl: bool
    profile: str
    model: str

    def key(self, settings_fp: str = "") -> str:
        """Stable 12-hex key of the cell's fields and the dataset's settings fingerprint."""
        data = json.dumps({**dataclasses.asdict(self), "settings": settings_fp}, sort_keys=True)
        return hashlib.sha256(data.encode()).hexdigest()[:12]

    @property
    def name(self) -> str:
        """Readable name, e.g. `sft[definitions] -> definitions,decoding=perplexity +RL`."""
        if self.kind == "tfidf":
            return "tfidf"
        if self.kind == "zeroshot":
            return f"zero-shot -> {self.infer}"
        return f"sft[{self.train}] -> {self.infer}{' +RL' if self.rl else ''}"

    @property
    def group(self) -> tuple[str, str, bool]:
        """Cells with the same group share one trained adapter (or none)."""
        return (self.kind, self.train, self.rl)


def slug_dir(spec: str) -> str:
    """File-system friendly strategy name: `icl=semantic,k=2` -> `icl-semantic-k-2`."""
    import re

    return re.sub(r"[^A-Za-z0-9._]+", "-", spec).strip("-") or NAIVE


def single_dim_cells(profile: str, model: str, k: int) -> list[tuple[str, Cell]]:
    """Each training dimension alone at training, at inference and at both; decoding at inference."""
    naive = NAIVE
    out: list[tuple[str, Cell]] = []
    for spec, title in TRAIN_DIMS.items():
        dim = canonical(spec, k)
        out += [(f"dim:{title}:both", Cell("trained", dim, dim, False, profile, model)),
                (f"dim:{title}:train", Cell("trained", dim, naive, False, profile, model)),
                (f"dim:{title}:inference", Cell("trained", naive, dim, False, profile, model))]
    for spec, title in INFER_ONLY_DIMS.items():
        out.append((f"dim:{title}:inference", Cell("trained", naive, canonical(spec), False, profile, model)))
    return out


def interplay_cells(profile: str, model: str, k: int) -> list[tuple[str, Cell]]:
    """The train x inference grid over INTERPLAY strategies."""
    axis = [canonical(s, k) for s in INTERPLAY]
    return [(f"grid:{t}|{i}", Cell("trained", t, i, False, profile, model)) for t in axis for i in axis]


def phase1_cells(selection: str, profile: str, model: str, k: int) -> list[tuple[str, Cell]]:
    """Cells that do not depend on the best combination, as (role, cell); a cell may appear under several roles."""
    if selection not in CELL_SETS:
        raise ValueError(f"cells {selection!r}: expected one of {', '.join(CELL_SETS)}")
    naive = Cell("trained", NAIVE, NAIVE, False, profile, model)
    out: list[tuple[str, Cell]] = [("naive_sft", naive)]
    if selection in ("headline", "all"):
        out += [("tfidf", Cell("tfidf", "-", "-", False, profile, model)),
                ("zeroshot", Cell("zeroshot", "-", NAIVE, False, profile, model))]
    if selection in ("ablation", "all"):
        out += [("baseline", naive),  # the validation reference of the best-combination choice
                ("zeroshot_perplexity", Cell("zeroshot", "-", PERPLEXITY, False, profile, model))]
        out += single_dim_cells(profile, model, k) + interplay_cells(profile, model, k)
    return out


def phase2_cells(selection: str, profile: str, model: str, best: tuple[str, str]) -> list[tuple[str, Cell]]:
    """Cells built on the best combination (train strategy, inference strategy)."""
    train, infer = best
    out = [("gencls", Cell("trained", train, infer, True, profile, model))]
    if selection in ("ablation", "all"):
        reasoning_train = combine(train, REASONING)
        out += [("best_sft", Cell("trained", train, infer, False, profile, model)),
                ("reasoning", Cell("trained", reasoning_train, combine(infer, REASONING), True, profile, model))]
    return out


def keep_roles(cells: list[tuple[str, Cell]], only: Sequence[str] | None) -> list[tuple[str, Cell]]:
    """The planned (role, cell) pairs whose role is in `only` or starts with one of its prefixes (all when None)."""
    if not only:
        return cells
    return [(role, cell) for role, cell in cells if any(role == o or role.startswith(o) for o in only)]


def needs_validation(roles: Sequence[str]) -> bool:
    """Whether a cell is also measured on the validation slice (it feeds the best-combination choice)."""
    return any(role == "baseline" or (role.startswith("dim:") and role.endswith((":both", f"{PERPLEXITY}:inference")))
               for role in roles)


def dedupe(cells: Iterable[tuple[str, Cell]]) -> list[tuple[str, Cell]]:
    """Keep the first role of every distinct cell (order kept)."""
    seen: set[Cell] = set()
    out = []
    for role, cell in cells:
        if cell not in seen:
            seen.add(cell)
            out.append((role, cell))
    return out


def group_cells(cells: Sequence[Cell]) -> dict[tuple[str, str, bool], list[Cell]]:
    """Cells by shared adapter (kind, train strategy, rl); insertion order kept."""
    groups: dict[tuple[str, str, bool], list[Cell]] = {}
    for cell in cells:
        groups.setdefault(cell.group, []).append(cell)
    return groups


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
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- best combination
def select_best(results: Sequence[dict], k: int, metric: str = "val_accuracy") -> dict:
    """Pick the best combination from single-dimension gains on the validation slice.

    Args:
        results: cell results (dicts with kind, train, infer, rl and `metric`).
        k: demonstrations per prompt for in-context strategies.
        metric: the validation metric compared (default validation accuracy).

    Returns:
        {"train", "infer", "source": "validation"|"default", "gains": {dim: gain}, "base": value, "rule"}.
    """
    val = {(r["train"], r["infer"]): r.get(metric) for r in results
           if r.get("kind") == "trained" and not r.get("rl") and r.get(metric) is not None}
    naive = NAIVE
    base = val.get((naive, naive))
    rule = ("dimension on if its matched train=inference cell beats naive SFT on the validation slice "
            "(better of icl=random/semantic); perplexity decoding on if it beats generative on the naive adapter")
    def prior(reason: str) -> dict:
        return {"train": canonical(DEFAULT_BEST[0], k), "infer": canonical(DEFAULT_BEST[1], k), "source": "default",
                "gains": {}, "base": base, "rule": f"{reason}: DEFAULT_BEST prior {DEFAULT_BEST_WHY}"}

    if base is None:
        return prior("no validation results")
    gains: dict[str, float] = {}
    for spec, title in TRAIN_DIMS.items():
        dim = canonical(spec, k)
        if val.get((dim, dim)) is not None:
            gains[title] = val[(dim, dim)] - base
    for spec, title in INFER_ONLY_DIMS.items():
        if val.get((naive, canonical(spec))) is not None:
            gains[title] = val[(naive, canonical(spec))] - base
    if not gains:
        return prior("no single-dimension validation results")
    chosen = [t for t in TRAIN_DIMS.values() if not t.startswith("icl=") and gains.get(t, 0) > 0]
    icl = max((t for t in TRAIN_DIMS.values() if t.startswith("icl=") and gains.get(t, 0) > 0),
              key=lambda t: gains[t], default=None)
    train_specs = chosen + ([icl] if icl else [])
    train = combine(*train_specs, k=k) if train_specs else naive
    infer_extra = [t for t in INFER_ONLY_DIMS.values() if gains.get(t, 0) > 0]
    infer = combine(train, *infer_extra, k=k) if infer_extra else train
    return {"train": train, "infer": infer, "source": "validation", "gains": gains, "base": base, "rule": rule}


# ----------------------------------------------------------------------------- results
def result_path(reports_root: Path, dataset: str, key: str) -> Path:
    """reports/study/<dataset>/<cell_key>/result.json."""
    return Path(reports_root) / dataset / key / RESULT_FILE


def read_result(path: Path) -> dict | None:
    """A finished cell's result, or None."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return None


def write_result(path: Path, result: dict) -> None:
    """Write a cell result atomically (it marks the cell finished)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def metric_subset(metrics: dict, prefix: str = "") -> dict[str, float]:
    """The headline numbers of a metrics dict (finite floats only)."""
    out = {}
    for key in METRIC_KEYS + ("n", "seconds"):
        value = metrics.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value)):
            out[f"{prefix}{key}"] = float(value)
    return out


# ----------------------------------------------------------------------------- machine
def machine_info() -> dict:
    """Platform, CPU count, torch device (and GPU name) of this machine."""
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "hostname": platform.node()}
    try:
        import torch

        cuda = torch.cuda.is_available()
        info.update({"torch": torch.__version__, "torch_device": "cuda" if cuda else "cpu",
                     "torch_threads": torch.get_num_threads(),
                     "gpu": torch.cuda.get_device_name(0) if cuda else None})
    except ImportError:  # pragma: no cover - torch is a core dependency
        info["torch_device"] = "unknown"
    return info


# ----------------------------------------------------------------------------- aggregation
HEADLINE_ROWS = (("tfidf", "TF-IDF + LR"), ("zeroshot", "zero-shot"), ("zeroshot_perplexity", "zero-shot (perplexity)"),
                 ("naive_sft", "naive SFT"), ("gencls", "GenCLS++ (best + RL)"))


def measured_rows(summary: dict) -> list[tuple[str, str]]:
    """HEADLINE_ROWS measured on at least one dataset (zero-shot perplexity is an ablation cell)."""
    return [(role, title) for role, title in HEADLINE_ROWS if summary["rows"][role]["datasets"]]


def _mean(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def aggregate(datasets: dict[str, dict], meta: dict) -> dict:
    """Build study.json from per-dataset cell results.

    Args:
        datasets: {dataset: {"cells": [result, ...] (each with roles, key, metrics), "best": {...},
            "subsample": {...}, "register": {...} | None, "seconds": float}}.
        meta: study-level facts (profile, cells, model, runner, machine, budget, run ids, timings).

    Returns:
        The study.json dict: meta, per-dataset cells + headline + grid, and a summary with means,
        the mean gain of GenCLS++ over naive SFT and the TF-IDF mean.
    """
    out_ds: dict[str, Any] = {}
    headline: dict[str, dict[str, dict | None]] = {}
    for name, info in datasets.items():
        cells = sorted(info.get("cells", []), key=lambda r: r["key"])
        by_role = {}
        for r in cells:
            for role in r.get("roles", []):
                by_role.setdefault(role, r)
        headline[name] = {role: _pick(by_role.get(role)) for role, _ in HEADLINE_ROWS}
        extra = {role: _pick(by_role.get(role)) for role in ("best_sft", "reasoning")}
        out_ds[name] = {"subsample": info.get("subsample"), "best": info.get("best"), "register": info.get("register"),
                        "seconds": info.get("seconds"), "headline": headline[name], "best_variants": extra,
                        "grid": interplay_grid(cells), "single_dims": single_dim_table(cells), "cells": cells}
    summary = {}
    for role, title in HEADLINE_ROWS:
        summary[role] = {"title": title,
                         "mean_accuracy": _mean((h.get(role) or {}).get("accuracy") for h in headline.values()),
                         "mean_macro_f1": _mean((h.get(role) or {}).get("macro_f1") for h in headline.values()),
                         "datasets": sum(1 for h in headline.values() if h.get(role))}
    gains = {name: h["gencls"]["accuracy"] - h["naive_sft"]["accuracy"] for name, h in headline.items()
             if h.get("gencls") and h.get("naive_sft")}
    gain_mean = _mean(gains.values())
    tfidf_mean = summary["tfidf"]["mean_accuracy"]
    gencls_mean = summary["gencls"]["mean_accuracy"]
    summary_out = {
        "rows": summary, "gain_over_naive_sft": gains,
        "mean_gain_over_naive_sft_points": None if gain_mean is None else 100 * gain_mean,
        "tfidf_mean_accuracy": tfidf_mean, "gencls_mean_accuracy": gencls_mean,
        "targets": {"gain_over_naive_sft_points": 4.0, "beats_tfidf_mean": True},
        "target_met": {
            "gain_over_naive_sft": None if gain_mean is None else bool(100 * gain_mean >= 4.0),
            "beats_tfidf_mean": None if tfidf_mean is None or gencls_mean is None else bool(gencls_mean > tfidf_mean),
        },
    }
    return {"meta": meta, "datasets": out_ds, "summary": summary_out}


def _pick(result: dict | None) -> dict | None:
    """The reported part of a cell result."""
    if not result:
        return None
    keys = ("key", "name", "kind", "train", "infer", "rl", "accuracy", "macro_f1", "invalid_rate", "abstention_rate",
            "val_accuracy", "val_macro_f1", "n", "run_id", "seconds")
    return {k: result.get(k) for k in keys}


def interplay_grid(cells: Sequence[dict]) -> dict:
    """{"axis": [...], "accuracy": [[...]], "macro_f1": [[...]]} of the train x inference grid (None = missing)."""
    axis = []
    for r in cells:
        for role in r.get("roles", []):
            if role.startswith("grid:"):
                t, i = role[5:].split("|")
                for s in (t, i):
                    if s not in axis:
                        axis.append(s)
    lookup = {(r["train"], r["infer"]): r for r in cells if r.get("kind") == "trained" and not r.get("rl")}
    order = [canonical(s) for s in INTERPLAY]
    axis = sorted(axis, key=lambda s: next((n for n, o in enumerate(order) if _same_dims(o, s)), 99))
    grid = {"axis": axis}
    for metric in ("accuracy", "macro_f1", "val_accuracy"):
        grid[metric] = [[(lookup.get((t, i)) or {}).get(metric) for i in axis] for t in axis]
    return grid


def _same_dims(a: str, b: str) -> bool:
    """Same strategy apart from k."""
    from components.model.prompts import Strategy

    return Strategy.parse(a).replace(k=4) == Strategy.parse(b).replace(k=4)


def single_dim_table(cells: Sequence[dict]) -> list[dict]:
    """Rows: dimension, where it is on (train / inference / both), test and validation accuracy."""
    rows = []
    for r in cells:
        for role in r.get("roles", []):
            if role.startswith("dim:"):
                _, dim, where = role.split(":")
                rows.append({"dimension": dim, "on_at": where, "train": r["train"], "infer": r["infer"],
                             "accuracy": r.get("accuracy"), "macro_f1": r.get("macro_f1"),
                             "val_accuracy": r.get("val_accuracy"), "invalid_rate": r.get("invalid_rate")})
    order = list(TRAIN_DIMS.values()) + list(INFER_ONLY_DIMS.values())
    where_order = ("train", "inference", "both")
    return sorted(rows, key=lambda r: (order.index(r["dimension"]) if r["dimension"] in order else 99,
                                       where_order.index(r["on_at"]) if r["on_at"] in where_order else 9))


# ----------------------------------------------------------------------------- markdown
def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def render_markdown(study: dict) -> str:
    """study.md: what was measured, on which machine and budget, headline, gains, ablation tables."""
    meta, summary = study["meta"], study["summary"]
    machine = meta.get("machine", {})
    lines = ["# GenCLS++ study", "",
             f"Profile `{meta.get('profile')}`, cells `{meta.get('cells')}`, model `{meta.get('model')}`, "
             f"runner `{meta.get('runner')}`; MLflow study run `{meta.get('study_run_id')}` "
             f"(experiment `gencls-study`, one child run per cell).", "",
             "## What was measured", "",
             f"- Machine: {machine.get('platform')}, {machine.get('cpu_count')} CPU cores, torch device "
             f"`{machine.get('torch_device')}`{' (' + machine['gpu'] + ')' if machine.get('gpu') else ''}, "
             f"Python {machine.get('python')}.",
             f"- Budget: {meta.get('seconds', 0):.0f} s wall-clock for this invocation "
             f"(cells already finished earlier were not re-run: {meta.get('cells_reused', 0)} reused, "
             f"{meta.get('cells_run', 0)} run now).",
             f"- Subsampling ({meta.get('profile')} profile): {json.dumps(meta.get('subsampling'))}; exact sizes and "
             f"id hashes per dataset below.",
             f"- Training: SFT `{json.dumps(meta.get('sft_config_summary'))}` (first dataset's; SFT prompts per "
             f"dataset below); RL `{json.dumps(meta.get('rl_config_summary'))}`.",
             "- Accuracy and macro-F1 are on the (subsampled) test split; the best combination is chosen on a "
             "validation slice of the training split, never on test.", ""]
    lines += ["## Headline (accuracy % / macro-F1 %)", ""]
    shown = measured_rows(summary)
    header = "| dataset | " + " | ".join(title for _, title in shown) + " | GenCLS++ - naive SFT | compute (min) |"
    lines += [header, "|" + "---|" * (len(shown) + 3)]
    for name, info in study["datasets"].items():
        h = info["headline"]
        cells = [f"{_pct((h.get(role) or {}).get('accuracy'))} / {_pct((h.get(role) or {}).get('macro_f1'))}"
                 for role, _ in shown]
        gain = summary["gain_over_naive_sft"].get(name)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {'-' if gain is None else f'{100 * gain:+.1f}'} | "
                     f"{(info.get('seconds') or 0) / 60:.1f} |")
    rows = summary["rows"]
    gain_pts = summary["mean_gain_over_naive_sft_points"]
    mean_gain = "-" if gain_pts is None else f"{gain_pts:+.2f}"
    lines.append("| **mean** | " + " | ".join(
        f"{_pct(rows[role]['mean_accuracy'])} / {_pct(rows[role]['mean_macro_f1'])}" for role, _ in shown)
        + f" | {mean_gain} | {sum((i.get('seconds') or 0) for i in study['datasets'].values()) / 60:.1f} (sum) |")
    met = summary["target_met"]
    lines += ["", "## Against the target", "",
              f"- Mean gain of GenCLS++ over naive SFT: "
              f"{'not measured' if gain_pts is None else f'{gain_pts:+.2f} points'} (target >= +4.0): "
              f"{_verdict(met['gain_over_naive_sft'])}.",
              f"- Per dataset: {_gain_spread(summary['gain_over_naive_sft'])}.",
              f"- GenCLS++ mean accuracy {_pct(summary['gencls_mean_accuracy'])} vs TF-IDF mean "
              f"{_pct(summary['tfidf_mean_accuracy'])}: {_verdict(met['beats_tfidf_mean'])}.",
              "- The paper (arXiv 2504.19898) reports +3.46 points over naive SFT on average (+4.00 on its public "
              "datasets) with full training data and larger models; with a subsampled profile these means are not "
              "comparable to full-data figures. Means are over the datasets that have both numbers.", ""]
    for name, info in study["datasets"].items():
        lines += _dataset_section(name, info)
    return "\n".join(lines) + "\n"


def _gain_spread(gains: dict[str, float]) -> str:
    """Median, range and how many datasets gained, of the per-dataset gains over naive SFT."""
    if not gains:
        return "no dataset has both numbers"
    pts = sorted(100 * g for g in gains.values())
    return (f"median gain {statistics.median(pts):+.1f} points, range {pts[0]:+.1f} to {pts[-1]:+.1f}, "
            f"GenCLS++ ahead on {sum(p > 0 for p in pts)} of {len(pts)} datasets")


def _sft_budget_text(budget: dict | None) -> str:
    if not budget:
        return ""
    if not budget.get("sft_tokens"):
        size = budget.get("train_size")
        return f"SFT prompts: {'the pool minus the held-out prompts' if not size else f'at most {size}'}. "
    return (f"SFT prompts: {budget['train_size']} (as many naive prompts as fit in {budget['sft_tokens']} tokens; "
            f"mean {budget['mean_naive_prompt_tokens']} tokens each). ")


def _verdict(value: bool | None) -> str:
    return "not measured" if value is None else ("met" if value else "NOT met")


def _dataset_section(name: str, info: dict) -> list[str]:
    sub = info.get("subsample") or {}
    best = info.get("best") or {}
    lines = [f"## {name}", "",
             f"Subsample: sizes {sub.get('sizes')} from {sub.get('source_sizes')}, seed {sub.get('seed')}; "
             f"ids sha256 {({k: v[:12] for k, v in (sub.get('ids_sha256') or {}).items()})}. "
             f"{_sft_budget_text(sub.get('sft_budget'))}"
             f"Compute spent on these cells (training + evaluation, summed, model loading excluded, "
             f"including earlier invocations): {info.get('seconds') or 0:.0f} s.", "",
             f"Best combination ({best.get('source')}): train `{best.get('train')}`, inference `{best.get('infer')}`. "
             f"Rule: {best.get('rule')}.", ""]
    if best.get("gains"):
        lines += ["| dimension | validation gain over naive SFT (points) |", "|---|---|"]
        lines += [f"| {dim} | {100 * gain:+.1f} |" for dim, gain in best["gains"].items()]
        lines.append("")
    variants = info.get("best_variants") or {}
    if any(variants.values()):
        lines += ["| variant | accuracy | macro-F1 |", "|---|---|---|"]
        for role, title in (("best_sft", "best, SFT only"), ("reasoning", "best + reasoning (+RL)")):
            v = variants.get(role)
            if v:
                lines.append(f"| {title} (`{v['train']}` -> `{v['infer']}`) | {_pct(v['accuracy'])} | {_pct(v['macro_f1'])} |")
        g = (info.get("headline") or {}).get("gencls")
        if g:
            lines.append(f"| best + RL, direct answer | {_pct(g['accuracy'])} | {_pct(g['macro_f1'])} |")
        lines.append("")
    dims = info.get("single_dims") or []
    if dims:
        lines += ["| dimension | on at | train | inference | accuracy | macro-F1 | val accuracy | invalid |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['dimension']} | {r['on_at']} | `{r['train']}` | `{r['infer']}` | {_pct(r['accuracy'])} | "
                  f"{_pct(r['macro_f1'])} | {_pct(r['val_accuracy'])} | {_pct(r['invalid_rate'])} |" for r in dims]
        lines.append("")
    grid = info.get("grid") or {}
    if grid.get("axis"):
        axis = grid["axis"]
        lines += [f"Interplay grid, test accuracy % (rows: training strategy, columns: inference strategy); "
                  f"heatmap `study/{name}/interplay.png`.", "",
                  "| train \\ inference | " + " | ".join(f"`{a}`" for a in axis) + " |", "|" + "---|" * (len(axis) + 1)]
        for t, row in zip(axis, grid["accuracy"]):
            lines.append(f"| `{t}` | " + " | ".join(_pct(v) for v in row) + " |")
        lines.append("")
    reg = info.get("register")
    if reg:
        lines += [f"Registry: `{reg.get('model')}` v{reg.get('version')}: {reg.get('decision')} ({reg.get('reason')}).", ""]
    lines += ["All cells:", "", "| cell | key | accuracy | macro-F1 | val accuracy | invalid | MLflow run |",
              "|---|---|---|---|---|---|---|"]
    for r in info.get("cells", []):
        lines.append(f"| {r.get('name')} | `{r['key']}` | {_pct(r.get('accuracy'))} | {_pct(r.get('macro_f1'))} | "
                     f"{_pct(r.get('val_accuracy'))} | {_pct(r.get('invalid_rate'))} | `{r.get('run_id')}` |")
    lines.append("")
    return lines


# ----------------------------------------------------------------------------- plots
def plot_heatmap(grid: dict, path: Path, title: str, metric: str = "accuracy") -> Path | None:
    """Heatmap PNG of the interplay grid (None when the grid is empty)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    axis = grid.get("axis") or []
    if not axis:
        return None
    values = np.array([[np.nan if v is None else 100 * v for v in row] for row in grid[metric]], dtype=float)
    fig, ax = plt.subplots(figsize=(2.0 + 1.3 * len(axis), 1.6 + 1.0 * len(axis)))
    image = ax.imshow(values, cmap="viridis", vmin=np.nanmin(values) if np.isfinite(values).any() else 0,
                      vmax=np.nanmax(values) if np.isfinite(values).any() else 100)
    ax.set_xticks(range(len(axis)), axis, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(axis)), axis, fontsize=8)
    ax.set_xlabel("inference strategy")
    ax.set_ylabel("training strategy")
    for i in range(len(axis)):
        for j in range(len(axis)):
            text = "-" if np.isnan(values[i, j]) else f"{values[i, j]:.1f}"
            ax.text(j, i, text, ha="center", va="center", color="white", fontsize=9)
    fig.colorbar(image, ax=ax, label=f"{metric} %")
    ax.set_title(title, fontsize=10)
    return save_figure(fig, path)


def plot_headline(study: dict, path: Path) -> Path:
    """Grouped bar chart: accuracy of each headline configuration per dataset (and the mean)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(study["datasets"])
    rows = measured_rows(study["summary"])
    data = np.array([[(((study["datasets"][n]["headline"].get(role)) or {}).get("accuracy") or np.nan) * 100
                      for n in names] for role, _ in rows], dtype=float)
    means = [study["summary"]["rows"][role]["mean_accuracy"] for role, _ in rows]
    data = np.column_stack([data, [np.nan if m is None else 100 * m for m in means]]) if names else data
    labels = names + ["mean"]
    width = 0.8 / len(rows)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(labels) + 2), 4.2))
    x = np.arange(len(labels))
    for n, (role, title) in enumerate(rows):
        ax.bar(x + (n - (len(rows) - 1) / 2) * width, np.nan_to_num(data[n]), width, label=title)
    ax.set_xticks(x, labels, rotation=20, ha="right")
    ax.set_ylabel("test accuracy %")
    ax.set_ylim(0, 100)
    ax.set_title(f"GenCLS++ study ({study['meta'].get('profile')} profile, {study['meta'].get('model')})")
    ax.legend(fontsize=8, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.18))
    return save_figure(fig, path)


def roles_by_cell(planned: Sequence[tuple[str, Cell]]) -> dict[Cell, list[str]]:
    """Every role of each cell (a cell can be both a grid point and a single-dimension point)."""
    out: dict[Cell, list[str]] = defaultdict(list)
    for role, cell in planned:
        if role not in out[cell]:
            out[cell].append(role)
    return dict(out)
