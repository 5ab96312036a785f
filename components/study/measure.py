"""Measuring one study cell and keeping its result: evaluation on the test and validation views,
the committed cell file that marks a cell finished (result + every prediction, so the study resumes on
another machine and its intervals can be recomputed), and reading the finished results of a dataset back.

Cell files live in ``reports/study/cells/<profile>/<dataset>/<key>.json`` (in git):
``{"result": {...metrics, roles, run id...}, "predictions": {"test": [[id, gold, pred], ...], "val": [...]}}``.
"""
from __future__ import annotations

import functools
import json
import math
import os
import time
from pathlib import Path
from typing import Any

from components.evaluate.evaluation import read_predictions
from components.fingerprint import RECORD_FILE, read_record, source_hash
from components.study.plan import METRIC_KEYS, Cell


# ----------------------------------------------------------------------------- results
BASELINE_KINDS = ("tfidf", "tfidf_all", "minilm")  # cells that train no LLM
CODE_MODULES = ("components.study.measure", "components.train.sft", "components.train.rl")


@functools.lru_cache(maxsize=1)
def code_hash() -> str:
    """Hash of the code that trains and measures a cell (those modules' files and their imports'), recorded in
    every cell: `gencls study --verify --adopt` adopts only cells measured by the code that adopts them."""
    return source_hash(*CODE_MODULES)[:12]


def cell_path(ctx: dict, key: str) -> Path:
    """The committed cell file of a cell key: reports/study/cells/<profile>/<dataset>/<key>.json."""
    return Path(ctx["cells"]) / f"{key}.json"


def read_result(path: Path) -> dict | None:
    """A JSON file's content (a finished cell's file, register.json), or None when absent or unreadable."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return None


def write_result(path: Path, result: dict) -> None:
    """Write JSON atomically (a cell file marks the cell finished); compact rows for prediction lists."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # per process: Dask workers may write dataset.json together
    tmp.write_text(json.dumps(result, indent=1, sort_keys=True, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def write_cell(ctx: dict, result: dict, out: Path) -> dict:
    """The committed cell file: the result and the predictions of each measured view (from `out/<view>/`)."""
    predictions = {view: read_predictions(Path(out) / view / "predictions.jsonl") for view in ("test", "val")}
    cell = {"result": result, "predictions": {k: v for k, v in predictions.items() if v}}
    path = cell_path(ctx, result["key"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(dump_cell(cell), encoding="utf-8")
    os.replace(tmp, path)
    return cell


def dump_cell(cell: dict) -> str:
    """JSON of a cell file with one prediction row per line (readable diffs, small files)."""
    views = []
    for view, rows in sorted(cell["predictions"].items()):
        body = ",\n".join("  " + json.dumps(row, ensure_ascii=False) for row in rows)
        views.append(f' {json.dumps(view)}: [\n{body}\n ]')
    result = json.dumps(cell["result"], indent=1, sort_keys=True, default=str)
    return '{"result": ' + result + ',\n"predictions": {\n' + ",\n".join(views) + "\n}}\n"


def metric_subset(metrics: dict, prefix: str = "") -> dict[str, float]:
    """The headline numbers of a metrics dict (finite floats only)."""
    out = {}
    for key in METRIC_KEYS + ("n", "seconds"):
        value = metrics.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value)):
            out[f"{prefix}{key}"] = float(value)
    return out


def cell_key(ctx: dict, cell: Cell) -> str:
    """A cell's key: its fields and the dataset's settings fingerprint, plus the RL settings for an RL cell."""
    return cell.key(ctx["fingerprint"] + (f"/rl:{ctx['rl_fingerprint']}" if cell.rl else ""))


def cell_fields(cell: Cell, key: str, ctx: dict) -> dict:
    return {"key": key, "name": cell.name, "kind": cell.kind, "train": cell.train, "infer": cell.infer,
            "rl": cell.rl, "profile": cell.profile, "model": cell.model, "dataset": ctx["dataset"],
            "fingerprint": ctx["fingerprint"], **({"rl_fingerprint": ctx["rl_fingerprint"]} if cell.rl else {})}


def evaluate_cell(ctx: dict, cell: Cell, out: Path, loaded: Any = None, adapter: Path | None = None,
                  views: tuple[str, ...] = ("test", "val")) -> dict:
    """Measure one cell on the test view (and the validation view); returns {"test": m, "val": m}."""
    from components.data.datasets import load_labels, load_split
    from components.evaluate.baselines import tfidf_records
    from components.evaluate.evaluation import compute_metrics, evaluate, write_reports
    from components.study.baselines import minilm_records

    dataset, ev = ctx["dataset"], ctx["settings"]["eval"]
    out_metrics = {}
    for view in views:
        if cell.kind in BASELINE_KINDS:
            train = load_split(dataset, "train", ctx["views"]["all" if cell.kind == "tfidf_all" else view])
            test = load_split(dataset, "test", ctx["views"][view])
            started = time.perf_counter()
            fit = minilm_records if cell.kind == "minilm" else tfidf_records
            records = fit(train, test, seed=ctx["settings"]["seed"])
            labels = list(load_labels(dataset, ctx["views"][view]))
            metrics = compute_metrics(records, labels)
            metrics.update(seconds=round(time.perf_counter() - started, 2), strategy=cell.kind, dataset=dataset,
                           n_train=len(train))
            write_reports(out / view, records, metrics, labels, [])
        else:
            metrics = evaluate(dataset, ctx["model"] if adapter is None else None, cell.infer,
                               adapter=str(adapter) if adapter else None, out_dir=out / view,
                               batch_size=int(ev["batch_size"]), max_prompt_tokens=int(ev["max_prompt_tokens"]),
                               seed=ctx["settings"]["seed"], progress=False, data_dir=ctx["views"][view], loaded=loaded)
        out_metrics[view] = metrics
    return out_metrics


def read_cells(folder: Path, fingerprint: str, rl_fingerprint: str | None = None) -> list[dict]:
    """The cell files ({"result", "predictions"}) in a dataset's cell folder measured with this settings fingerprint
    (RL cells also with these RL settings)."""
    out = []
    for path in sorted(Path(folder).glob("*.json")):
        cell = read_result(path)
        result = cell.get("result") if isinstance(cell, dict) else None
        if (result or {}).get("fingerprint") == fingerprint and (
                not result.get("rl") or result.get("rl_fingerprint") == rl_fingerprint):
            out.append(cell)
    return out


def dataset_results(ctx: dict) -> list[dict]:
    """Every finished cell result of this dataset with the current settings fingerprints."""
    return [cell["result"] for cell in read_cells(Path(ctx["cells"]), ctx["fingerprint"], ctx["rl_fingerprint"])]


def current_record(info: dict, ctx: dict, rl: bool) -> bool:
    """Whether an adapter's training record was made with this dataset's current training (and RL) settings."""
    return info.get("settings") == ctx["train_fingerprint"] and info.get("rl_settings") == (
        ctx["rl_fingerprint"] if rl else None)


def compute_seconds(ctx: dict) -> float:
    """Training + evaluation seconds spent on this dataset's current cells (model loading excluded)."""
    total = sum(r.get("seconds", 0.0) + r.get("val_seconds", 0.0) for r in dataset_results(ctx))
    for record in Path(ctx["checkpoints"]).glob(f"*/*/{RECORD_FILE}"):
        info = read_record(record.parent)
        if current_record(info, ctx, record.parent.name == "rl"):
            total += float(info.get("seconds", 0.0))
    return round(total, 1)


# ----------------------------------------------------------------------------- dataset records
DATASET_FILE = "dataset.json"  # beside the cell files: what the report needs that is not a cell


def training_summaries(ctx: dict) -> dict[str, dict]:
    """Per finished adapter of this dataset's training settings: steps, seconds, loss and held-out curves,
    RL rewards (from the adapter's metrics.json / run.json), keyed `<train strategy> sft|rl`."""
    from components.config import RUN_INFO_FILE

    out = {}
    for record in sorted(Path(ctx["checkpoints"]).glob(f"*/*/{RECORD_FILE}")):
        info = read_record(record.parent)
        if not current_record(info, ctx, record.parent.name == "rl"):
            continue
        metrics = read_result(record.parent / "metrics.json") or {}
        timing = read_result(record.parent / RUN_INFO_FILE) or {}
        kind = metrics.get("kind", record.parent.name)
        out[f"{info.get('train')} {kind}"] = {
            "kind": kind, "train": info.get("train"), "global_step": metrics.get("global_step"),
            "seconds": timing.get("seconds", info.get("seconds")), "train_loss": metrics.get("train_loss"),
            "best": {k: (metrics.get("best") or {}).get(k) for k in ("step", "accuracy", "macro_f1")},
            "eval_history": [{k: h.get(k) for k in ("step", "accuracy", "macro_f1")} for h in metrics.get("eval_history") or []],
            "loss_history": metrics.get("loss_history") or [], "train_history": metrics.get("train_history") or [],
            **{k: metrics[k] for k in ("max_steps", "stopped_early") if k in metrics}}  # early-stopping budgets
    return out


def write_dataset_record(ctx: dict, register: dict | None = None) -> dict:
    """cells/<profile>/<dataset>/dataset.json: fingerprints, subsample, labels, compute, training curves, registry
    (`register`, else the last decision in the dataset's results/register.json)."""
    from components.data.datasets import load_labels

    register = register or read_result(Path(ctx["results"]) / "register.json")

    record = {"dataset": ctx["dataset"], "fingerprint": ctx["fingerprint"], "train_fingerprint": ctx["train_fingerprint"],
              "rl_fingerprint": ctx["rl_fingerprint"],
              "subsample": ctx["subsample"], "labels": list(load_labels(ctx["dataset"], ctx["views"]["test"])),
              "settings": ctx["settings"], "seconds": compute_seconds(ctx), "training": training_summaries(ctx),
              "register": register}
    write_result(Path(ctx["cells"]) / DATASET_FILE, record)
    return record


def read_dataset(folder: Path) -> dict | None:
    """A dataset's record and its cell files of the record's fingerprint: {"record", "labels", "cells"}."""
    record = read_result(Path(folder) / DATASET_FILE)
    if not record:
        return None
    return {"record": record, "labels": record.get("labels"),
            "cells": read_cells(folder, record["fingerprint"], record.get("rl_fingerprint"))}
