"""Paired-bootstrap intervals (the study and the `make run` summary): the difference of two
configurations measured on the same test examples (accuracy and macro-F1), per dataset and for the mean over datasets.

    diff = paired_bootstrap(gold, pred_a, pred_b, labels)   # a - b, 95% interval, 2,000 resamples
    mean = mean_bootstrap([(gold, a, b, labels), ...])      # mean over datasets, each resampled on its own

Predictions that are not a label (invalid answers, `uncertain`) count as wrong, as in
components.evaluate.evaluation.compute_metrics; macro-F1 averages over the real labels.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

RESAMPLES = 2000
LEVEL = 0.95


def _encode(gold: Sequence[str], preds: Sequence[Sequence[str]], labels: Sequence[str]) -> tuple[np.ndarray, list]:
    """Label indices (gold) and prediction indices (anything not a label -> len(labels))."""
    index = {label: n for n, label in enumerate(labels)}
    g = np.array([index[x] for x in gold], dtype=np.int64)
    return g, [np.array([index.get(x, len(labels)) for x in p], dtype=np.int64) for p in preds]


def _scores(g: np.ndarray, p: np.ndarray, k: int, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Accuracy and macro-F1 of each resample (rows: resamples x examples, indices into g/p)."""
    gs, ps = g[rows], p[rows]
    acc = (gs == ps).mean(axis=1)
    flat = (np.arange(rows.shape[0])[:, None] * (k * (k + 1)) + gs * (k + 1) + ps).ravel()
    conf = np.bincount(flat, minlength=rows.shape[0] * k * (k + 1)).reshape(rows.shape[0], k, k + 1)
    tp = conf[:, np.arange(k), np.arange(k)]
    support = conf.sum(axis=2)  # gold counts per label
    predicted = conf[:, :, :k].sum(axis=1)  # predictions per real label
    denom = support + predicted
    f1 = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)
    return acc, f1.mean(axis=1)


def point(gold: Sequence[str], pred: Sequence[str], labels: Sequence[str]) -> dict:
    """Accuracy and macro-F1 of one prediction list (the same definitions the intervals use)."""
    g, (p,) = _encode(gold, [pred], labels)
    acc, f1 = _scores(g, p, len(labels), np.arange(len(g))[None, :])
    return {"accuracy": float(acc[0]), "macro_f1": float(f1[0])}


def _diffs(gold, pred_a, pred_b, labels, rows) -> dict[str, np.ndarray]:
    g, (a, b) = _encode(gold, [pred_a, pred_b], labels)
    acc_a, f1_a = _scores(g, a, len(labels), rows)
    acc_b, f1_b = _scores(g, b, len(labels), rows)
    return {"accuracy": acc_a - acc_b, "macro_f1": f1_a - f1_b}


def _rows(n: int, resamples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _summary(observed: dict[str, float], samples: dict[str, np.ndarray], level: float) -> dict:
    lo, hi = (1 - level) / 2, 1 - (1 - level) / 2
    out = {}
    for metric, values in samples.items():
        out[metric] = {"diff": observed[metric], "low": float(np.quantile(values, lo)),
                       "high": float(np.quantile(values, hi)), "p_not_better": float((values <= 0).mean())}
    return out


def paired_bootstrap(gold: Sequence[str], pred_a: Sequence[str], pred_b: Sequence[str], labels: Sequence[str],
                     resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL) -> dict:
    """Difference a - b (accuracy and macro-F1) with its percentile paired-bootstrap interval.

    Args:
        gold, pred_a, pred_b: aligned lists over the same test examples.
        labels: the real labels.

    Returns:
        {"accuracy": {"diff", "low", "high", "p_not_better"}, "macro_f1": {...}, "n": examples}.
    """
    if not (len(gold) == len(pred_a) == len(pred_b)) or not gold:
        raise ValueError(f"paired bootstrap needs aligned, non-empty lists (got {len(gold)}, {len(pred_a)}, {len(pred_b)})")
    observed = {m: float(v[0]) for m, v in _diffs(gold, pred_a, pred_b, labels, np.arange(len(gold))[None, :]).items()}
    out = _summary(observed, _diffs(gold, pred_a, pred_b, labels, _rows(len(gold), resamples, seed)), level)
    return {**out, "n": len(gold)}


def mean_bootstrap(datasets: Sequence[tuple[Sequence[str], Sequence[str], Sequence[str], Sequence[str]]],
                   resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL) -> dict:
    """The mean over datasets of a - b, each dataset resampled independently (same resample count).

    Args:
        datasets: [(gold, pred_a, pred_b, labels), ...].
    """
    if not datasets:
        raise ValueError("mean_bootstrap needs at least one dataset")
    observed: dict[str, list[float]] = {"accuracy": [], "macro_f1": []}
    samples: dict[str, list[np.ndarray]] = {"accuracy": [], "macro_f1": []}
    for n, (gold, a, b, labels) in enumerate(datasets):
        for m, v in _diffs(gold, a, b, labels, np.arange(len(gold))[None, :]).items():
            observed[m].append(float(v[0]))
        for m, v in _diffs(gold, a, b, labels, _rows(len(gold), resamples, seed + n)).items():
            samples[m].append(v)
    out = _summary({m: float(np.mean(v)) for m, v in observed.items()},
                   {m: np.mean(np.stack(v), axis=0) for m, v in samples.items()}, level)
    return {**out, "datasets": len(datasets)}


def align(test_a: Sequence[Sequence[str]], test_b: Sequence[Sequence[str]]) -> tuple[list, list, list]:
    """(gold, pred_a, pred_b) over the ids both cells predicted, from [[id, gold, pred], ...] rows.

    Raises:
        ValueError: the two cells were measured on different examples (or disagree on a gold label).
    """
    b = {row[0]: row for row in test_b}
    ids_a = [row[0] for row in test_a]
    if set(ids_a) != set(b):
        raise ValueError(f"cells measured on different examples ({len(set(ids_a) ^ set(b))} ids differ)")
    gold, pa, pb = [], [], []
    for ex_id, g, p in test_a:
        if b[ex_id][1] != g:
            raise ValueError(f"example {ex_id}: gold label {g!r} vs {b[ex_id][1]!r}")
        gold.append(g)
        pa.append(p)
        pb.append(b[ex_id][2])
    return gold, pa, pb


def mcnemar_p(candidate_correct: Sequence[bool], champion_correct: Sequence[bool],
              alternative: str = "greater") -> tuple[float, int, int]:
    """Exact McNemar test on the discordant pairs; one-sided by default: the candidate is right more often.

    Returns (p, b, c): b = examples only the candidate gets right, c = only the champion;
    p = P(X >= b) for X ~ Binomial(b + c, 1/2) (1.0 when b <= c). `alternative="two-sided"`: either side
    right more often (1.0 when b + c = 0; components/study/verify.py compares a re-run with its cell so; components/ops/gate.py gates the champion one-sided).

    Example:
        >>> mcnemar_p([True] * 10 + [False] * 2, [False] * 10 + [True] * 2)[0] < 0.05
        True
        >>> round(mcnemar_p([False] * 4 + [True] * 96, [True] * 100, "two-sided")[0], 3)
        0.125
    """
    if len(candidate_correct) != len(champion_correct):
        raise ValueError("candidate and champion were scored on different numbers of examples")
    b = sum(1 for x, y in zip(candidate_correct, champion_correct) if x and not y)
    c = sum(1 for x, y in zip(candidate_correct, champion_correct) if y and not x)
    if (b <= c if alternative == "greater" else b + c == 0):
        return 1.0, b, c
    from scipy.stats import binomtest

    return float(binomtest(b, b + c, 0.5, alternative=alternative).pvalue), b, c
