"""Non-LLM controls of the study: TF-IDF + logistic regression (same N and all training data) and MiniLM
sentence embeddings + logistic regression on the same N, as prediction records in the decoding format.
"""
from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np

MINILM_CS = (0.1, 1.0, 10.0, 100.0)  # inverse regularisation strengths tried by 5-fold CV on the training examples


def minilm_records(train: Sequence[dict], test: Sequence[dict], seed: int = 0) -> list[dict]:
    """all-MiniLM-L6-v2 embeddings (L2-normalised) + logistic regression, C chosen by CV on `train` only.

    Returns records ({id, label, pred, probs, abstained, invalid}) for `test`.
    """
    from sklearn.linear_model import LogisticRegressionCV

    from components.model import retrieval

    encode = retrieval.sentence_transformer_encoder(retrieval.minilm_path())
    x_train = np.asarray(encode([ex["text"] for ex in train]), dtype=np.float32)
    x_test = np.asarray(encode([ex["text"] for ex in test]), dtype=np.float32)
    y = [ex["label"] for ex in train]
    folds = max(2, min(5, min(y.count(label) for label in set(y))))
    model = LogisticRegressionCV(Cs=list(MINILM_CS), cv=folds, max_iter=3000, random_state=seed, scoring="accuracy")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # sklearn 1.8 announces default changes; ours are explicit
        model.fit(x_train, y)
    probs = model.predict_proba(x_test)
    classes = [str(c) for c in model.classes_]
    records = []
    for ex, row in zip(test, probs):
        best = classes[int(row.argmax())]
        records.append({"id": ex["id"], "label": ex["label"], "pred": best, "raw": best,
                        "probs": {c: float(p) for c, p in zip(classes, row)}, "abstained": False, "invalid": False})
    return records
