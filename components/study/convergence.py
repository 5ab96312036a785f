"""Convergence check: was the study's naive SFT trained long enough?

The main study (profile `cpu`) trains every SFT arm under one budget rule (up to 2 epochs, best held-out
checkpoint). A second profile with a longer rule (`cpu-long`: up to 6 epochs, early stopping on the same
held-out slice) trains the headline's SFT arms again on the same N, held-out slice, test sample, text cut and
seed (and, where measured, the recipe's SFT + RL from that longer-trained SFT). This module compares the two
from their committed cell files:

    comparison = compare(main_datasets, long_datasets, recipe)   # {"datasets": {dataset: row}, "mean"}
    # study.json keeps it as "convergence"; components/study/markdown.py renders the "Convergence check" section

Per dataset: naive SFT under each rule (test accuracy / macro-F1, steps run, kept step), the longer rule minus
the main one with its paired-bootstrap interval (same test examples), GenCLS++ SFT (the recipe, no RL) under the
longer rule against naive SFT under it, and TF-IDF on the same N (does the longer-trained naive SFT beat it?).
Pure functions; flows/study_report.py reads the cell folders.
"""
from __future__ import annotations

from components.study import report
from components.study.plan import NAIVE


def _roles(info: dict, recipe: dict | None) -> dict[str, dict]:
    """A dataset's cell results by role (report.assign_roles: naive_sft, tfidf, best_sft = the recipe without RL ...)."""
    results = report.assign_roles([c["result"] for c in info.get("cells") or []], recipe)
    return report.first_by_role(sorted(results, key=lambda r: r["key"]))  # the order report.aggregate uses


def _metrics(result: dict | None) -> dict | None:
    return None if result is None else {k: result.get(k) for k in ("key", "accuracy", "macro_f1", "n")}


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
        profile: the longer profile's name.
        rule: its SFT settings (epochs, patience, min_epochs, eval_every_steps) to report; None reads them from the longer
            profile's dataset records (what its cells were trained with).

    Returns:
        {"profile", "rule", "datasets": {name: row}, "skipped": {name: why}, "mean": pooled longer - main naive SFT
        (accuracy/macro-F1 with interval) or None}.
    """
    from components.evaluate import stats

    rows, pooled, skipped, rl_pooled = {}, [], {}, []
    for name in sorted(set(main) & set(longer)):
        a, b = _roles(main[name], recipe), _roles(longer[name], recipe)
        short, long_ = a.get("naive_sft"), b.get("naive_sft")
        if short is None or long_ is None:
            continue
        files = {f"{side}:{c['result']['key']}": c for side, info in (("main", main[name]), ("longer", longer[name]))
                 for c in info.get("cells") or []}  # cell keys per profile, kept apart
        labels = list(main[name].get("labels") or longer[name].get("labels") or [])
        try:  # different test examples (another test_size) or a cell without predictions: not comparable
            pair = report.paired_rows(files, f"longer:{long_['key']}", f"main:{short['key']}", labels)
        except ValueError as exc:
            pair, skipped[name] = None, str(exc)
        if pair is None:
            skipped.setdefault(name, "a naive SFT cell has no test predictions")
            continue
        pooled.append(pair)
        gencls = b.get("best_sft")
        gencls_pair = (report.paired_rows(files, f"longer:{gencls['key']}", f"longer:{long_['key']}", labels)
                       if gencls else None)
        rl = b.get("gencls")  # the recipe's SFT + RL under the longer rule: the headline's pair, converged SFT
        rl_pair = report.paired_rows(files, f"longer:{rl['key']}", f"longer:{long_['key']}", labels) if rl else None
        if rl_pair:
            rl_pooled.append(rl_pair)
        training = [((info[name].get("record") or {}).get("training") or {}).get(f"{NAIVE} sft") or {}
                    for info in (main, longer)]
        rows[name] = {"main": {**_metrics(short), "budget": _budget(training[0])},
                      "longer": {**_metrics(long_), "budget": _budget(training[1])},
                      "longer_vs_main": stats.paired_bootstrap(*pair),
                      "gencls_sft": _metrics(gencls),
                      "gencls_sft_vs_naive": stats.paired_bootstrap(*gencls_pair) if gencls_pair else None,
                      "gencls": _metrics(rl),
                      "gencls_vs_naive": stats.paired_bootstrap(*rl_pair) if rl_pair else None,
                      "tfidf": _metrics(a.get("tfidf"))}
    if rule is None:  # the settings the longer cells were trained with (dataset.json), not today's params.yaml
        rule = next((((longer[n].get("record") or {}).get("settings") or {}).get("sft") for n in rows), None)
    return {"profile": profile, "rule": {k: (rule or {}).get(k) for k in ("epochs", "patience", "min_epochs", "eval_every_steps")},
            "datasets": rows, "skipped": skipped, "mean": stats.mean_bootstrap(pooled) if pooled else None,
            "gencls_mean": {**stats.mean_bootstrap(rl_pooled), "datasets": len(rl_pooled)} if rl_pooled else None}

