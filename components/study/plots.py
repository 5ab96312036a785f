"""The study's figures: the headline bars, the train x inference heatmaps, SFT learning curves and GRPO curves.

    from components.study import plots
    plots.plot_heatmap(study["datasets"]["trec6"]["grid"], Path("trec6-interplay.png"), "trec6")
    # flows/study_report.py writes them under reports/study/plots/ (plots-<profile>/ for a non-cpu profile).
"""
from __future__ import annotations

from pathlib import Path

from components.evaluate.evaluation import save_figure
from components.study.report import measured_rows


def _pyplot():
    """matplotlib.pyplot on the file-only Agg backend (servers have no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _arms(training: dict, kind: str, history: str) -> dict:
    """The dataset's adapters of one kind ("sft" or "rl") that logged `history`, by name."""
    return {name: t for name, t in sorted(training.items()) if t.get("kind") == kind and t.get(history)}


def plot_heatmap(grid: dict, path: Path, title: str, metric: str = "accuracy") -> Path | None:
    """Heatmap PNG of the interplay grid (None when the grid is empty)."""
    import numpy as np

    plt = _pyplot()
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


def plot_headline(study: dict, path: Path) -> Path | None:
    """Grouped bar chart: accuracy of each headline configuration per dataset (and the mean); None before any
    headline cell is measured (a study run with `--only none` writes its records and report only)."""
    import numpy as np

    names = list(study["datasets"])
    rows = measured_rows(study["summary"])
    if not rows:
        return None
    plt = _pyplot()
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


def plot_learning(training: dict, path: Path, title: str) -> Path | None:
    """Training loss (lines) and held-out accuracy (markers) over steps of each SFT arm of a dataset."""
    sft = _arms(training, "sft", "loss_history")
    if not sft:
        return None
    fig, (left, right) = _pyplot().subplots(1, 2, figsize=(11, 3.8))
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
    rl = _arms(training, "rl", "train_history")
    if not rl:
        return None
    fig, (left, right) = _pyplot().subplots(1, 2, figsize=(11, 3.8))
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
