"""Convergence check: was the study's naive SFT trained long enough?

The main study (profile `cpu`) trains every SFT arm under one budget rule (up to 2 epochs, best held-out
checkpoint). A second profile with a longer rule (`cpu-long`: up to 6 epochs, early stopping on the same
held-out slice) trains the headline's SFT arms again on the same N, held-out slice, test sample, text cut and
seed. This module compares the two from their committed cell files:

    comparison = compare(main_datasets, long_datasets, recipe)   # {"datasets": {dataset: row}, "mean"}
    # study.json keeps it as "convergence"; components/study/markdown.py renders the "Convergence check" section

Per dataset: naive SFT under each rule (test accuracy / macro-F1, steps run, kept step), the longer rule minus
the main one with its paired-bootstrap interval (same test examples), GenCLS++ SFT (the recipe, no RL) under the
longer rule against naive SFT under it, and TF-IDF on the same N (does the longer-trained naive SFT beat it?).
Pure functions; flows/study_report.py reads the cell folders.
"""
from __future__ import annotations

from components.study.plan import NAIVE, canonical

NAIVE_CELL = ("trained", NAIVE, NAIVE, False)  # (kind, train, infer, rl) of naive SFT (generative)


def _cells(info: dict) -> dict[tuple, dict]:
    """A dataset's cell files by (kind, train, infer, rl)."""
    out = {}
    for cell in info.get("cells") or []:
        r = cell["result"]
        trained = r.get("kind") == "trained"
        out.setdefault((r.get("kind"), canonical(r["train"]) if trained else r.get("train"),
                        canonical(r["infer"]) if trained else r.get("infer"), bool(r.get("rl"))), cell)
    return out


def _find(cells: dict[tuple, dict], kind: str, train: str | None = None, infer: str | None = None,
          rl: bool = False) -> dict | None:
    if kind != "trained":
        return next((c for (k, *_), c in cells.items() if k == kind), None)
    return cells.get((kind, canonical(train), canonical(infer), rl))


def _metrics(cell: dict | None) -> dict | None:
    return None if cell is None else {k: cell["result"].get(k) for k in ("key", "accuracy", "macro_f1", "n")}


def _pair(cell_a: dict | None, cell_b: dict | None, labels: list[str]) -> tuple | None:
    """(gold, pred_a, pred_b, labels) over the test examples of two cells (None when either is missing)."""
    from components.evaluate import stats

    rows = [((c or {}).get("predictions") or {}).get("test") for c in (cell_a, cell_b)]
    return (*stats.align(*rows), labels) if all(rows) else None


def _budget(training: dict) -> dict | None:
    """Steps run (of the budget's maximum), kept step and held-out curve of one SFT adapter."""
    if not training:
        return None
    return {"steps": training.get("global_step"), "max_steps": training.get("max_steps", training.get("global_step")),
            "stopped_early": bool(training.get("stopped_early")), "kept_step": (training.get("best") or {}).get("step"),
            "seconds": training.get("seconds"),
            "held_out": [[h["step"], h["accuracy"]] for h in training.get("eval_history") or []]}


def compare(main: dict[str, dict], longer: dict[str, dict], recipe: dict | None, profile: str = "",
            rule: dict | None = None) -> dict:
    """Naive SFT under the main and the longer budget rule, per dataset measured under both.

    Args:
        main, longer: {dataset: {"cells": [cell file], "labels": [...], "record": dataset record}} of each profile
            (flows/study_report.py reads them with components.study.measure.read_dataset).
        recipe: the study's recipe ({"train", "infer"}); GenCLS++ SFT is its cell without RL.
        profile, rule: the longer profile's name and its SFT settings (epochs, patience, eval_every_steps), reported.

    Returns:
        {"profile", "rule", "datasets": {name: row}, "mean": pooled longer - main naive SFT (accuracy/macro-F1 with
        interval) or None}.
    """
    from components.evaluate import stats

    rows, pooled = {}, []
    for name in sorted(set(main) & set(longer)):
        a, b = _cells(main[name]), _cells(longer[name])
        short, long_ = _find(a, *NAIVE_CELL), _find(b, *NAIVE_CELL)
        if short is None or long_ is None:
            continue
        labels = list(main[name].get("labels") or longer[name].get("labels") or [])
        pair = _pair(long_, short, labels)
        pooled.append(pair)
        gencls = _find(b, "trained", recipe["train"], recipe["infer"]) if recipe else None
        gencls_pair = _pair(gencls, long_, labels) if gencls is not None else None
        tfidf = _find(a, "tfidf")
        training = [((info[name].get("record") or {}).get("training") or {}).get(f"{NAIVE} sft") or {}
                    for info in (main, longer)]
        rows[name] = {"main": {**_metrics(short), "budget": _budget(training[0])},
                      "longer": {**_metrics(long_), "budget": _budget(training[1])},
                      "longer_vs_main": stats.paired_bootstrap(*pair),
                      "gencls_sft": _metrics(gencls),
                      "gencls_sft_vs_naive": stats.paired_bootstrap(*gencls_pair) if gencls_pair else None,
                      "tfidf": _metrics(tfidf)}
    return {"profile": profile, "rule": {k: (rule or {}).get(k) for k in ("epochs", "patience", "eval_every_steps")},
            "datasets": rows, "mean": stats.mean_bootstrap(pooled) if pooled else None}

