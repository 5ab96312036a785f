"""Seeded, label-stratified slices of a training split: subsamples, held-out slices, class-balanced resampling."""
from __future__ import annotations

import random
from collections import defaultdict
from typing import Sequence


def stratified_sample(examples: Sequence[dict], n: int, seed: int, min_per_label: int = 0) -> list[dict]:
    """A seeded sample of `n` examples keeping label proportions (largest-remainder rounding).

    n <= 0 or n >= len(examples) returns all examples (shuffled with the seed). With
    `min_per_label`, every label keeps at least that many (or all it has, or n // labels when
    the floors alone would exceed n), taken from the largest labels' quotas.
    """
    rng = random.Random(seed)
    items = list(examples)
    if n <= 0 or n >= len(items):
        rng.shuffle(items)
        return items
    by_label: dict[str, list[dict]] = defaultdict(list)
    for ex in items:
        by_label[ex["label"]].append(ex)
    quotas = {label: n * len(group) / len(items) for label, group in by_label.items()}
    counts = {label: int(q) for label, q in quotas.items()}
    for label in sorted(quotas, key=lambda lb: (counts[lb] - quotas[lb], lb))[: n - sum(counts.values())]:
        counts[label] += 1
    floor = min(min_per_label, n // len(by_label))
    floors = {label: min(floor, len(group)) for label, group in by_label.items()}
    for label in by_label:
        while counts[label] < floors[label]:
            donor = max(counts, key=lambda lb: (counts[lb] - floors[lb], lb))
            counts[donor] -= 1
            counts[label] += 1
    chosen = []
    for label in sorted(by_label):
        group = by_label[label]
        rng.shuffle(group)
        chosen += group[: counts[label]]
    rng.shuffle(chosen)
    return chosen


def split_train_eval(examples: Sequence[dict], train_size: int, eval_size: int, seed: int) -> tuple[list, list]:
    """Held-out eval slice (stratified) first, then the training subsample from the rest."""
    held = stratified_sample(examples, eval_size, seed + 1) if eval_size > 0 else []
    held_ids = {ex["id"] for ex in held}
    rest = [ex for ex in examples if ex["id"] not in held_ids]
    return stratified_sample(rest, train_size, seed), held


def rebalance(examples: Sequence[dict], seed: int) -> list[dict]:
    """Class-balanced resampling: same size, every label gets an equal share of the rows.

    Each label's quota (n / K, remainder to the rarest labels) is filled by cycling through a
    seeded shuffle of its examples: minority examples repeat, majority ones are subsampled.
    This is what a WeightedRandomSampler with weights 1 / label frequency does in expectation,
    without its variance, and it keeps the data order deterministic for resume.
    """
    rng = random.Random(seed)
    by_label: dict[str, list[dict]] = defaultdict(list)
    for ex in examples:
        by_label[ex["label"]].append(ex)
    labels = sorted(by_label, key=lambda lb: (len(by_label[lb]), lb))
    n, k = len(examples), len(labels)
    out: list[dict] = []
    for i, label in enumerate(labels):
        group = list(by_label[label])
        rng.shuffle(group)
        quota = n // k + (1 if i < n % k else 0)
        out += [group[j % len(group)] for j in range(quota)]
    rng.shuffle(out)
    return out
