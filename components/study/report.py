"""The study report: aggregation of the cell results per dataset, reports/study.md, the interplay heatmaps
and the headline bar chart.
"""
from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any, Iterable, Sequence

from components.evaluate.evaluation import save_figure
from components.study.plan import INFER_ONLY_DIMS, INTERPLAY, NAIVE, TRAIN_DIMS, canonical


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
HEADLINE_ROWS = (("tfidf", "TF-IDF + LR, same N"), ("tfidf_all", "TF-IDF + LR, all data"),
                 ("minilm", "MiniLM + LR, same N"), ("zeroshot", "zero-shot"),
                 ("zeroshot_perplexity", "zero-shot, perplexity"), ("naive_sft", "naive SFT"),
                 ("naive_sft_perplexity", "naive SFT, perplexity"), ("best_sft", "GenCLS++ SFT"),
                 ("gencls", "GenCLS++ SFT + RL"))
REFERENCE = "naive_sft"  # every interval is a difference to this row on the same test examples
TARGET_POINTS = 4.0
PHASE2_ROLES = ("gencls", "best_sft", "reasoning")


def measured_rows(summary: dict) -> list[tuple[str, str]]:
    """HEADLINE_ROWS measured on at least one dataset."""
    return [(role, title) for role, title in HEADLINE_ROWS if summary["rows"][role]["datasets"]]


def _mean(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def assign_roles(results: Sequence[dict], recipe: dict | None, k: int = 2) -> list[dict]:
    """Cell results with their roles, derived from what each cell is (kind, train, infer, rl), not from the
    run that first measured it: every phase-1 role the cell has in the full plan (a naive -> perplexity cell
    is both the headline's `naive_sft_perplexity` and the ablation's perplexity row), plus the recipe's roles
    (best_sft, gencls, reasoning) for the cells that match the study's current recipe."""
    from components.study.plan import REASONING, combine, phase1_cells, roles_by_cell

    planned = {(c.kind, c.train, c.infer, c.rl): roles for c, roles in roles_by_cell(phase1_cells("all", "-", "-", k)).items()}
    out = []
    for r in results:
        stored = [x for x in r.get("roles", []) if x not in PHASE2_ROLES]
        roles = list(dict.fromkeys(planned.get((r.get("kind"), r.get("train"), r.get("infer"), bool(r.get("rl"))), [])
                                   + stored))
        if recipe and r.get("kind") == "trained":
            pair = (r["train"], r["infer"])
            if pair == (recipe["train"], recipe["infer"]):
                roles.append("gencls" if r.get("rl") else "best_sft")
            elif r.get("rl") and pair == (combine(recipe["train"], REASONING), combine(recipe["infer"], REASONING)):
                roles.append("reasoning")
        out.append({**r, "roles": roles})
    return out


def _test_rows(files: dict[str, dict], key: str | None) -> list | None:
    return ((files.get(key) or {}).get("predictions") or {}).get("test") if key else None


def _paired(files: dict[str, dict], key_a: str | None, key_b: str | None, labels: list[str]) -> tuple | None:
    """(gold, pred_a, pred_b, labels) over the test examples both cells predicted (None when either is missing)."""
    from components.evaluate import stats

    rows_a, rows_b = _test_rows(files, key_a), _test_rows(files, key_b)
    return (*stats.align(rows_a, rows_b), labels) if rows_a and rows_b else None


def _difference(files: dict[str, dict], key_a: str | None, key_b: str | None, labels: list[str]) -> dict | None:
    """Paired-bootstrap difference a - b of two cells' test predictions (None when either is missing)."""
    from components.evaluate import stats

    pair = _paired(files, key_a, key_b, labels)
    return None if pair is None else stats.paired_bootstrap(*pair)


def aggregate(datasets: dict[str, dict], meta: dict, recipe: dict | None = None) -> dict:
    """Build study.json from the committed cell files of each dataset.

    Args:
        datasets: {dataset: {"cells": [cell file {"result", "predictions"}], "labels": [...], "record": the
            dataset record (subsample, seconds, training summaries, register)}}.
        meta: study-level facts (profile, model, machine, timings, run ids).
        recipe: the study's recipe (components.study.plan.select_recipe).

    Returns:
        {"meta", "recipe", "datasets": {d: {headline, single_dims, grid, rl_vs_sft, ...}}, "summary"}.
    """
    from components.evaluate import stats

    out_ds: dict[str, Any] = {}
    pairs: dict[str, list] = {role: [] for role, _ in HEADLINE_ROWS}
    ablation: dict[tuple[str, str], dict] = {}  # (dimension, on at) -> paired test rows over the datasets
    for name, info in datasets.items():
        files = {c["result"]["key"]: c for c in info.get("cells", [])}
        k = int(((info.get("record") or {}).get("settings") or {}).get("icl_k") or (recipe or {}).get("k") or 2)
        results = sorted(assign_roles([c["result"] for c in files.values()], recipe, k), key=lambda r: r["key"])
        labels = list(info.get("labels") or [])
        by_role: dict[str, dict] = {}
        for r in results:
            for role in r["roles"]:
                by_role.setdefault(role, r)
        ref = (by_role.get(REFERENCE) or {}).get("key")
        headline = {}
        for role, _ in HEADLINE_ROWS:
            r = by_role.get(role)
            headline[role] = None if r is None else {
                **_pick(r), "vs_naive_sft": None if role == REFERENCE else _difference(files, r["key"], ref, labels)}
            pair = _paired(files, r["key"], ref, labels) if r is not None and role != REFERENCE else None
            if pair:
                pairs[role].append(pair)
        base = (by_role.get(REFERENCE) or {}).get("val_accuracy")
        dims = single_dim_table(results)
        for row in dims:
            row["vs_naive_sft"] = _difference(files, row["key"], ref, labels)
            row["val_gain"] = None if base is None or row.get("val_accuracy") is None else row["val_accuracy"] - base
            if row["vs_naive_sft"]:
                pooled = ablation.setdefault((row["dimension"], row["on_at"]), {"pairs": [], "val": [], "datasets": []})
                pooled["pairs"].append(_paired(files, row["key"], ref, labels))
                pooled["datasets"].append(name)
                if row["val_gain"] is not None:
                    pooled["val"].append(row["val_gain"])
        gencls, best_sft = headline.get("gencls"), headline.get("best_sft")
        record = info.get("record") or {}
        out_ds[name] = {
            "subsample": record.get("subsample"), "register": record.get("register"), "seconds": record.get("seconds"),
            "training": record.get("training", {}), "headline": headline, "grid": interplay_grid(results),
            "single_dims": dims, "reasoning": _pick(by_role.get("reasoning")),
            "rl_vs_sft": _difference(files, gencls["key"], best_sft["key"], labels) if gencls and best_sft else None,
            "reasoning_vs_direct": _difference(files, by_role["reasoning"]["key"], gencls["key"], labels)
            if gencls and by_role.get("reasoning") else None,
            "cells": [{**_pick(r), "roles": r["roles"]} for r in results]}
    rows = {}
    for role, title in HEADLINE_ROWS:
        have = [n for n, d in out_ds.items() if d["headline"].get(role)]
        rows[role] = {"title": title, "datasets": len(have),
                      "mean_accuracy": _mean(out_ds[n]["headline"][role]["accuracy"] for n in have),
                      "mean_macro_f1": _mean(out_ds[n]["headline"][role]["macro_f1"] for n in have),
                      "vs_naive_sft": stats.mean_bootstrap(pairs[role]) if pairs[role] else None,
                      "vs_naive_sft_datasets": len(pairs[role])}
    pooled = sorted(({"dimension": dim, "on_at": where, "datasets": p["datasets"],
                      "vs_naive_sft": stats.mean_bootstrap(p["pairs"]),
                      "val_gain": _mean(p["val"]) if len(p["val"]) == len(p["datasets"]) else None}
                     for (dim, where), p in ablation.items()), key=_dim_order)
    return {"meta": meta, "recipe": recipe, "datasets": out_ds,
            "summary": {"rows": rows, "verdict": verdict(out_ds, rows, recipe_train=(recipe or {}).get("train")),
                        "ablation": pooled,
                        "grid_mean": mean_grid([d["grid"] for d in out_ds.values()])}}


def mean_grid(grids: Sequence[dict]) -> dict:
    """The interplay grid averaged over the datasets that measured every one of its cells ({"axis": [], ...} when
    none did); "datasets" says how many."""
    full = [g for g in grids if g.get("axis") and all(v is not None for row in g["accuracy"] for v in row)]
    axis = full[0]["axis"] if full and all(g["axis"] == full[0]["axis"] for g in full) else []
    if not axis:
        return {"axis": [], "datasets": 0}
    return {"axis": axis, "datasets": len(full),
            **{m: [[_mean(g[m][i][j] for g in full) for j in range(len(axis))] for i in range(len(axis))]
               for m in ("accuracy", "macro_f1")}}


WEAK_MARGIN = 0.10  # naive SFT this far below TF-IDF on the same N is not a competent baseline (report flags it)


def last_gain(history: list[dict]) -> float | None:
    """How much the last held-out accuracy beats the best earlier one (None with fewer than two evaluations)."""
    accs = [h["accuracy"] for h in history if h.get("accuracy") is not None]
    return accs[-1] - max(accs[:-1]) if len(accs) > 1 else None


def verdict(datasets: dict[str, dict], rows: dict[str, dict], expected: int = 7, recipe_train: str | None = None) -> dict:
    """The issue's target: GenCLS++ (SFT + RL) >= naive SFT + 4.0 points on the mean with the interval above
    zero, and >= TF-IDF on the same N on every dataset; with how many datasets it rests on, the datasets whose
    naive SFT was still rising at the budget's end (points), and whether the recipe trains naive prompts (then
    GenCLS++ SFT is the naive SFT adapter, and a longer SFT budget moves both arms together)."""
    mean = rows["gencls"].get("vs_naive_sft")
    gain = None if mean is None else 100 * mean["accuracy"]["diff"]
    beats = {n: bool(d["headline"]["gencls"]["accuracy"] >= d["headline"]["tfidf"]["accuracy"])
             for n, d in datasets.items() if d["headline"].get("gencls") and d["headline"].get("tfidf")}
    done = rows["gencls"].get("vs_naive_sft_datasets", 0)
    return {"gain_points": gain,
            "interval_points": None if mean is None else [100 * mean["accuracy"]["low"], 100 * mean["accuracy"]["high"]],
            "gain_met": None if mean is None else bool(gain >= TARGET_POINTS and mean["accuracy"]["low"] > 0),
            "beats_tfidf_same_n": beats, "beats_tfidf_met": None if not beats else all(beats.values()),
            "datasets": done, "expected_datasets": expected, "complete": done >= expected,
            "naive_rising": {n: round(100 * g, 1) for n, d in sorted(datasets.items())
                             for t in [(d.get("training") or {}).get(f"{NAIVE} sft") or {}]
                             if (g := last_gain(t.get("eval_history") or [])) is not None and round(g, 6) > 0.01},
            "naive_weak": {n: [d["headline"]["naive_sft"]["accuracy"], d["headline"]["tfidf"]["accuracy"]]
                           for n, d in sorted(datasets.items()) if d["headline"].get("naive_sft") and d["headline"].get("tfidf")
                           and d["headline"]["naive_sft"]["accuracy"] < d["headline"]["tfidf"]["accuracy"] - WEAK_MARGIN},
            "shared_adapter": recipe_train is not None and canonical(recipe_train) == canonical(NAIVE)}


def _pick(result: dict | None) -> dict | None:
    """The reported part of a cell result."""
    if not result:
        return None
    keys = ("key", "name", "kind", "train", "infer", "rl", "accuracy", "macro_f1", "invalid_rate", "abstention_rate",
            "val_accuracy", "val_macro_f1", "n", "val_n", "run_id", "seconds", "worker")
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
                rows.append({"dimension": dim, "on_at": where, "train": r["train"], "infer": r["infer"], "key": r["key"],
                             "accuracy": r.get("accuracy"), "macro_f1": r.get("macro_f1"),
                             "val_accuracy": r.get("val_accuracy"), "invalid_rate": r.get("invalid_rate")})
    return sorted(rows, key=_dim_order)


def _dim_order(row: dict) -> tuple[int, int]:
    """Ablation rows in the plan's order: dimension (TRAIN_DIMS, then inference-only), then train / inference / both."""
    order, where_order = list(TRAIN_DIMS.values()) + list(INFER_ONLY_DIMS.values()), ("train", "inference", "both")
    return (order.index(row["dimension"]) if row["dimension"] in order else 99,
            where_order.index(row["on_at"]) if row["on_at"] in where_order else 9)


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
            bright = np.isfinite(values[i, j]) and image.norm(values[i, j]) > 0.6  # dark text on the yellow end
            ax.text(j, i, text, ha="center", va="center", color="black" if bright else "white", fontsize=9)
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


def config_summary(config: dict) -> dict:
    keys = ("model", "lora", "lora_r", "learning_rate", "epochs", "max_steps", "batch_size", "train_size", "eval_size",
            "max_prompt_tokens", "num_generations", "beta", "focus")
    return {k: config[k] for k in keys if k in config}


def plot_learning(training: dict, path: Path, title: str) -> Path | None:
    """Training loss (lines) and held-out accuracy (markers) over steps of each SFT arm of a dataset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sft = {name: t for name, t in sorted(training.items()) if t.get("kind") == "sft" and t.get("loss_history")}
    if not sft:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    for name, t in sft.items():
        steps, losses = zip(*[(h["step"], h["loss"]) for h in t["loss_history"]])
        left.plot(steps, losses, label=t.get("train", name), linewidth=1)
        held = t.get("eval_history") or []
        if held:
            right.plot([h["step"] for h in held], [100 * h["accuracy"] for h in held], marker="o",
                       label=t.get("train", name))
    left.set(xlabel="optimizer step", ylabel="training loss", title=title, yscale="log")
    right.set(xlabel="optimizer step", ylabel="held-out accuracy % (generative)", title="checkpoint selection slice")
    left.legend(fontsize=7)
    if right.lines:  # no held-out slice (eval_size 0): nothing to label
        right.legend(fontsize=7)
    return save_figure(fig, path)


def plot_rl(training: dict, path: Path, title: str) -> Path | None:
    """Each RL adapter of a dataset: GRPO reward and zero-variance share per step (left), held-out accuracy at each
    checkpoint-selection step with the kept step ringed (right; step 0 is the SFT adapter)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rl = {name: t for name, t in sorted(training.items()) if t.get("kind") == "rl" and t.get("train_history")}
    if not rl:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    for name, t in rl.items():
        label = t.get("train", name)
        steps = [h["step"] for h in t["train_history"]]
        line, = left.plot(steps, [h.get("reward") for h in t["train_history"]], label=f"{label}: reward", linewidth=1)
        zero = [h.get("zero_variance_groups", h.get("frac_reward_zero_std")) for h in t["train_history"]]
        if any(z is not None for z in zero):
            left.plot(steps, zero, linestyle=":", color=line.get_color(), label=f"{label}: zero-variance groups")
        held = [h for h in t.get("eval_history") or [] if h.get("macro_f1") is not None]
        if held:
            steps = [h["step"] for h in held]
            right.plot(steps, [100 * h["macro_f1"] for h in held], marker="o", label=f"{label}: macro-F1 (selects)",
                       color=line.get_color())
            right.plot(steps, [100 * h["accuracy"] for h in held], marker=".", linestyle="--", linewidth=1,
                       label=f"{label}: accuracy", color=line.get_color())
            kept = (t.get("best") or {}).get("step")
            chosen = [h for h in held if h["step"] == kept]
            if chosen:
                right.scatter([kept], [100 * chosen[0]["macro_f1"]], s=160, facecolors="none",
                              edgecolors=line.get_color(), linewidths=2)
    left.set(xlabel="GRPO step", ylabel="mean reward / share", title=title)
    right.set(xlabel="GRPO step (0 = SFT)", ylabel="held-out %", title="checkpoint selection (ringed: kept)")
    left.legend(fontsize=7)
    if right.lines:
        right.legend(fontsize=7)
    return save_figure(fig, path)
