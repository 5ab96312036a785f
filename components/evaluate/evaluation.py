"""Evaluation: metrics over prediction records, confusion plots, and a full test-split run.

Usage:
    gencls evaluate --dataset trec6 --model smollm2-135m --strategy decoding=perplexity --limit 200
    # or: evaluate("trec6", "smollm2-135m", "decoding=perplexity", limit=200)

Writes predictions.jsonl, metrics.json, confusion.png and prompts_sample.txt into
``reports/<dataset>/eval/<model>-<strategy slug>/`` (or --out).
"""
from __future__ import annotations

import json
import random
import re
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from components.config import RUN_INFO_FILE, portable, run_info, stable

INVALID = "invalid"
ECE_BINS = 10


def expected_calibration_error(confidences: Sequence[float], correct: Sequence[bool], bins: int = ECE_BINS) -> float:
    """Expected calibration error: sum over equal-width confidence bins of |acc - conf| * share.

    Args:
        confidences: probability of the predicted label, one per example.
        correct: whether each prediction was right.
        bins: number of equal-width bins on [0, 1].

    Returns:
        ECE in [0, 1] (0.0 for no examples).

    Example:
        >>> expected_calibration_error([0.9, 0.9, 0.6, 0.6], [True, False, True, True])
        0.4
    """
    conf = np.asarray(confidences, dtype=float)
    hits = np.asarray(correct, dtype=float)
    if conf.size == 0:
        return 0.0
    index = np.minimum((conf * bins).astype(int), bins - 1)  # bin i holds [i/bins, (i+1)/bins)
    ece = 0.0
    for b in np.unique(index):
        members = index == b
        ece += members.mean() * abs(hits[members].mean() - conf[members].mean())
    return round(float(ece), 10)


def compute_metrics(records: Sequence[dict], labels: Sequence[str] | dict) -> dict:
    """Classification metrics over prediction records (see decoding.predict).

    Args:
        records: dicts with label (gold), pred (a label or "invalid"), probs, abstained, invalid.
        labels: the real labels (list, or labels.yaml mapping) in display order.

    Returns:
        accuracy, macro_f1 (over real labels; invalid counts as wrong), per_label
        (precision/recall/f1/support), confusion ({labels: rows, columns, matrix}; columns get
        "invalid" when any prediction is invalid), invalid_rate, abstention_rate,
        answered_accuracy (accuracy on non-abstained records; None if all abstained), ece
        (when every record has probs, else None), n.
    """
    from sklearn.metrics import accuracy_score, classification_report, confusion_matrix

    labels = list(labels)
    n = len(records)
    if n == 0:
        raise ValueError("compute_metrics: no records")
    gold = [r["label"] for r in records]
    pred = [r["pred"] for r in records]
    invalid = np.array([bool(r.get("invalid")) or r["pred"] == INVALID for r in records])
    abstained = np.array([bool(r.get("abstained")) for r in records])
    correct = np.array([g == p for g, p in zip(gold, pred)])
    report = classification_report(gold, pred, labels=labels, output_dict=True, zero_division=0)
    columns = labels + ([INVALID] if invalid.any() else [])
    matrix = confusion_matrix(gold, pred, labels=columns)[: len(labels)]
    answered = ~abstained
    metrics: dict[str, Any] = {
        "n": n,
        "accuracy": float(accuracy_score(gold, pred)),
        "macro_f1": float(report["macro avg"]["f1-score"]),
        "per_label": {
            label: {"precision": float(report[label]["precision"]), "recall": float(report[label]["recall"]),
                    "f1": float(report[label]["f1-score"]), "support": int(report[label]["support"])}
            for label in labels
        },
        "confusion": {"rows": labels, "columns": columns, "matrix": matrix.tolist()},
        "invalid_rate": float(invalid.mean()),
        "abstention_rate": float(abstained.mean()),
        "answered_accuracy": float(correct[answered].mean()) if answered.any() else None,
        "ece": None,
    }
    if all(r.get("probs") for r in records):
        conf = [max(r["probs"].values()) for r in records]
        metrics["ece"] = expected_calibration_error(conf, correct)
    return metrics


def save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
    """Lay out, write and close a matplotlib figure (parent folders created); returns the path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def plot_confusion(metrics: dict, labels: Sequence[str] | None, path: str | Path, title: str = "") -> Path:
    """Save the confusion matrix of `metrics` as a PNG (rows gold, columns predicted; sklearn's
    ConfusionMatrixDisplay). Predicted-only columns (`invalid`, `uncertain`) get no gold row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    conf = metrics["confusion"]
    rows, cols = conf["rows"] if labels is None else list(labels), conf["columns"]
    matrix = np.asarray(conf["matrix"], dtype=int).reshape(len(rows), len(cols))
    square = np.zeros((len(cols), len(cols)), dtype=int)  # the display needs a square matrix
    square[: len(rows)] = matrix
    size = max(4.0, 0.6 * len(cols) + 2)
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    display = ConfusionMatrixDisplay(square, display_labels=cols)
    display.plot(ax=ax, cmap="Blues", colorbar=False, xticks_rotation=45, values_format="d",
                 text_kw={"fontsize": 8})
    for text in display.text_[len(rows):].ravel():
        text.set_visible(False)
    ax.set_ylim(len(rows) - 0.5, -0.5)  # hide the padding rows: nothing is ever gold `invalid`
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    ax.set_title(title or f"accuracy {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f}")
    return save_figure(fig, path, dpi=120)


def slugify(text: str) -> str:
    """File-system friendly name: `icl=semantic,k=4` -> `icl-semantic-k-4`."""
    return re.sub(r"[^A-Za-z0-9._]+", "-", text).strip("-") or "naive"


def default_out_dir(dataset: str, model: str, strategy_slug: str, adapter: str | None = None) -> Path:
    """reports/<dataset>/eval/<model or adapter>-<strategy slug>/."""
    from components.config import reports_dir

    who = slugify(Path(adapter).name if adapter else Path(str(model)).name)
    if adapter:
        who = f"{slugify(Path(adapter).parent.name)}-{who}"
    return reports_dir() / dataset / "eval" / f"{who}-{slugify(strategy_slug)}"


def select_examples(examples: Sequence[dict], limit: int | None, seed: int = 0) -> list[dict]:
    """The first `limit` examples after a seeded shuffle (all of them, in order, when None)."""
    examples = list(examples)
    if limit is None or limit >= len(examples):
        return examples
    rng = random.Random(seed)
    order = list(range(len(examples)))
    rng.shuffle(order)
    return [examples[i] for i in order[:limit]]


def build_retriever(train: Sequence[dict], strategy: Any, queries: Sequence[dict] = ()) -> Any:
    """A MiniLM retriever when the strategy needs semantic demos, else None.

    The query examples' embeddings are computed in one batch (and cached on disk).
    """
    if strategy.icl != "semantic":
        return None
    from components.model.retrieval import Retriever

    retriever = Retriever(train)
    retriever.embed([ex["text"] for ex in queries])
    return retriever


def evaluate(
    dataset: str,
    model: str | None,
    strategy: Any,
    adapter: str | None = None,
    limit: int | None = None,
    out_dir: str | Path | None = None,
    batch_size: int = 16,
    max_prompt_tokens: int = 384,
    seed: int = 0,
    calibrate: bool = False,
    progress: bool = True,
    data_dir: str | Path | None = None,
    loaded: tuple[Any, Any] | None = None,
) -> dict:
    """Run a model (zero-shot or with an adapter) on a dataset's test split and write reports.

    Args:
        dataset: dataset name (built under data/).
        model: registry name, folder or HF id; None takes the adapter's base model.
        strategy: a `Strategy` or a spec string.
        adapter: PEFT adapter folder.
        limit: evaluate the first N test examples after a seeded shuffle.
        out_dir: report folder (default reports/<dataset>/eval/<model>-<strategy>/).
        batch_size: prompts per forward pass.
        max_prompt_tokens: prompt token budget (the example text is truncated to fit).
        seed: seed for the subset and random demos.
        calibrate: contextual calibration for perplexity decoding.
        progress: show a progress bar.
        data_dir: folder holding datasets (default data/).
        loaded: an already loaded (model, tokenizer) pair to reuse.

    Returns:
        The metrics dict plus n, strategy, model, adapter, seconds, examples_per_s, out_dir.
    """
    from components.data.datasets import load_labels, load_split
    from components.model.decoding import predict
    from components.model.models import DEFAULT_MODEL, adapter_base_model, load_model
    from components.model.prompts import PromptBuilder, Strategy

    strategy = Strategy.parse(strategy) if isinstance(strategy, str) or strategy is None else strategy
    labels = load_labels(dataset, data_dir)
    train = load_split(dataset, "train", data_dir)
    test = select_examples(load_split(dataset, "test", data_dir), limit, seed)
    if model is None and adapter is None:
        model = DEFAULT_MODEL
    model_name = model or adapter_base_model(adapter)
    lm, tokenizer = loaded if loaded is not None else load_model(model, adapter=adapter)
    builder = PromptBuilder(tokenizer, labels, strategy, train, retriever=build_retriever(train, strategy, test),
                            max_prompt_tokens=max_prompt_tokens, seed=seed)
    started = time.perf_counter()
    records = predict(lm, tokenizer, builder, test, batch_size=batch_size, progress=progress, calibrate=calibrate)
    seconds = time.perf_counter() - started
    metrics = compute_metrics(records, list(labels))
    metrics.update({
        "dataset": dataset, "strategy": strategy.slug(), "model": str(model_name),
        "adapter": portable(adapter), "limit": limit, "seed": seed, "calibrate": calibrate,
        "truncated": builder.truncated, "seconds": round(seconds, 2),
        "examples_per_s": round(len(records) / seconds, 3) if seconds > 0 else None,
    })
    out = Path(out_dir) if out_dir else default_out_dir(
        dataset, str(model_name), strategy.slug() + (",calibrated" if calibrate else ""), adapter)
    write_reports(out, records, metrics, list(labels), [builder.prompt(ex) for ex in test[:3]])
    metrics["out_dir"] = str(out)
    return metrics


def read_predictions(path: str | Path) -> list[list[str]]:
    """[[id, gold, pred], ...] from a predictions.jsonl `write_reports` wrote ([] when absent)."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [[str(r["id"]), str(r["label"]), str(r["pred"])] for r in rows]


SCORES_FILE = "scores.json"  # the numbers `dvc metrics show` lists (metrics.json holds the full record)
SCORE_KEYS = ("accuracy", "macro_f1", "invalid_rate", "ece")  # ece only where decoding scores every label


def scores(metrics: dict, name: str) -> dict[str, dict[str, float]]:
    """The headline numbers of an evaluation under its name, rounded to 4 places: DVC's metrics file.
    Nested so that `dvc exp show` heads its columns `gencls.accuracy`, `sft.accuracy`, ... (unique keys)
    instead of `reports/<d>/gencls/scores.json:accuracy`."""
    return {name: {k: round(float(metrics[k]), 4) for k in SCORE_KEYS if isinstance(metrics.get(k), (int, float))}}


def write_reports(out: Path, records: Sequence[dict], metrics: dict, labels: list[str], prompts: Sequence[str]) -> None:
    """predictions.jsonl, metrics.json (no timings), scores.json, run.json (timings), confusion.png and
    prompts_sample.txt into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "predictions.jsonl", "w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
    (out / "metrics.json").write_text(json.dumps(stable(metrics), indent=2) + "\n", encoding="utf-8")
    (out / SCORES_FILE).write_text(json.dumps(scores(metrics, out.name), indent=2) + "\n", encoding="utf-8")
    (out / RUN_INFO_FILE).write_text(json.dumps(run_info(metrics), indent=2) + "\n", encoding="utf-8")
    plot_confusion(metrics, labels, out / "confusion.png", title=f"{metrics.get('dataset', '')} {metrics.get('strategy', '')}")
    sep = "\n" + "=" * 80 + "\n"
    (out / "prompts_sample.txt").write_text(sep.join(prompts) + "\n", encoding="utf-8")
