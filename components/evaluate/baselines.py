"""Discriminative baseline every study reports: TF-IDF (word 1-2 grams) + logistic regression.

    python -c "from components.evaluate.baselines import tfidf_baseline; print(tfidf_baseline('trec6'))"
"""
from __future__ import annotations

import time
from typing import Sequence


def fit_tfidf(train: Sequence[dict], seed: int = 0):
    """Fit a TF-IDF + logistic-regression pipeline on examples with `text` and `label`."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    pipeline = make_pipeline(
        TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1),  # ENVIRONMENT's reference setup
        LogisticRegression(max_iter=2000, C=10.0, random_state=seed),
    )
    pipeline.fit([ex["text"] for ex in train], [ex["label"] for ex in train])
    return pipeline


def tfidf_records(train: Sequence[dict], test: Sequence[dict], seed: int = 0) -> list[dict]:
    """Predict the test split; records in the decoding format ({id, label, pred, probs, ...})."""
    pipeline = fit_tfidf(train, seed)
    probs = pipeline.predict_proba([ex["text"] for ex in test])
    classes = list(pipeline.classes_)
    records = []
    for ex, row in zip(test, probs):
        best = classes[int(row.argmax())]
        records.append({
            "id": ex["id"], "label": ex["label"], "pred": best, "raw": best,
            "probs": {c: float(p) for c, p in zip(classes, row)}, "abstained": False, "invalid": False,
        })
    return records


def tfidf_baseline(dataset: str, train: Sequence[dict] | None = None, test: Sequence[dict] | None = None,
                   data_dir=None, seed: int = 0) -> dict:
    """Accuracy and macro-F1 of the TF-IDF baseline on a dataset (full splits unless given)."""
    from components.data.datasets import load_labels, load_split
    from components.evaluate.evaluation import compute_metrics

    start = time.time()
    train = load_split(dataset, "train", data_dir) if train is None else train
    test = load_split(dataset, "test", data_dir) if test is None else test
    metrics = compute_metrics(tfidf_records(train, test, seed), list(load_labels(dataset, data_dir)))
    metrics.update(n_train=len(train), n=len(test), seconds=round(time.time() - start, 2))
    return metrics
