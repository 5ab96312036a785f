"""Paired-bootstrap intervals of the study (components/evaluate/stats.py) against sklearn and simple cases."""
from __future__ import annotations

import random

import pytest

from components.evaluate import stats

LABELS = ["a", "b", "c"]


def _data(n=300, acc_a=0.8, acc_b=0.6, seed=0):
    rng = random.Random(seed)
    gold = [rng.choice(LABELS) for _ in range(n)]

    def noisy(acc):
        return [g if rng.random() < acc else rng.choice(["a", "b", "c", "invalid"]) for g in gold]

    return gold, noisy(acc_a), noisy(acc_b)


def test_point_metrics_match_the_evaluation_metrics():
    from components.evaluate.evaluation import compute_metrics

    gold, pred, _ = _data()
    records = [{"label": g, "pred": p, "invalid": p == "invalid"} for g, p in zip(gold, pred)]
    expected = compute_metrics(records, LABELS)
    got = stats.point(gold, pred, LABELS)
    assert got["accuracy"] == pytest.approx(expected["accuracy"])
    assert got["macro_f1"] == pytest.approx(expected["macro_f1"])
    # a label nobody predicts and nobody has counts as F1 0 in the macro average, as in sklearn
    assert stats.point(["a", "a"], ["a", "a"], ["a", "b"])["macro_f1"] == pytest.approx(0.5)


def test_interval_covers_the_difference_and_separates_real_gains():
    gold, a, b = _data(n=500, acc_a=0.85, acc_b=0.55)
    diff = stats.paired_bootstrap(gold, a, b, LABELS)
    acc = diff["accuracy"]
    observed = stats.point(gold, a, LABELS)["accuracy"] - stats.point(gold, b, LABELS)["accuracy"]
    assert acc["diff"] == pytest.approx(observed) and acc["low"] < acc["diff"] < acc["high"]
    assert acc["low"] > 0 and acc["p_not_better"] == 0.0 and diff["n"] == 500
    same = stats.paired_bootstrap(gold, a, a, LABELS)
    assert same["accuracy"] == {"diff": 0.0, "low": 0.0, "high": 0.0, "p_not_better": 1.0}
    close = stats.paired_bootstrap(*_data(n=200, acc_a=0.70, acc_b=0.69, seed=3), LABELS)
    assert close["accuracy"]["low"] < 0 < close["accuracy"]["high"]  # a 1-point difference on 200: not separable
    assert stats.paired_bootstrap(gold, a, b, LABELS, seed=1) != diff  # the seed is used; the width barely moves
    assert stats.paired_bootstrap(gold, a, b, LABELS) == diff  # seeded: reproducible


def test_mean_over_datasets_and_alignment():
    one = _data(n=200, seed=1)
    two = _data(n=300, acc_a=0.6, acc_b=0.6, seed=2)
    mean = stats.mean_bootstrap([(*one, LABELS), (*two, LABELS)])
    d1 = stats.paired_bootstrap(*one, LABELS)["accuracy"]["diff"]
    d2 = stats.paired_bootstrap(*two, LABELS)["accuracy"]["diff"]
    assert mean["accuracy"]["diff"] == pytest.approx((d1 + d2) / 2) and mean["datasets"] == 2
    assert mean["accuracy"]["low"] < mean["accuracy"]["diff"] < mean["accuracy"]["high"]
    assert stats.mean_bootstrap([(*one, LABELS)]) == {**{k: v for k, v in stats.paired_bootstrap(*one, LABELS).items()
                                                         if k != "n"}, "datasets": 1}
    rows_a = [["2", "b", "b"], ["1", "a", "a"]]
    rows_b = [["1", "a", "c"], ["2", "b", "b"]]
    assert stats.align(rows_a, rows_b) == (["b", "a"], ["b", "a"], ["b", "c"])
    with pytest.raises(ValueError, match="different examples"):
        stats.align(rows_a, rows_b[:1])
    with pytest.raises(ValueError, match="gold label"):
        stats.align(rows_a, [["1", "b", "c"], ["2", "b", "b"]])
    with pytest.raises(ValueError, match="aligned"):
        stats.paired_bootstrap([], [], [], LABELS)
