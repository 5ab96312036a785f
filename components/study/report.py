"""The study report: aggregation of the cell results per dataset, reports/study.md, the interplay heatmaps
and the headline bar chart.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
from pathlib import Path
from typing import Any, Iterable, Sequence

from components.evaluate.evaluation import save_figure
from components.study.plan import INFER_ONLY_DIMS, INTERPLAY, TRAIN_DIMS, canonical


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


def config_summary(config: dict) -> dict:
    keys = ("model", "lora", "lora_r", "learning_rate", "epochs", "max_steps", "batch_size", "train_size", "eval_size",
            "max_prompt_tokens", "num_generations", "beta", "focus")
    return {k: config[k] for k in keys if k in config}
