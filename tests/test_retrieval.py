"""Semantic retrieval: nearest neighbours, exclusion, on-disk embedding cache, real MiniLM."""
from __future__ import annotations

import numpy as np
import pytest

from components.model.retrieval import Retriever, hashed_bow_encode

TRAIN = [
    {"id": "a", "text": "who wrote hamlet"},
    {"id": "b", "text": "who painted the mona lisa"},
    {"id": "c", "text": "how many legs does a spider have"},
    {"id": "d", "text": "what is the capital of france"},
]


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GENCLS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_nearest_by_cosine_and_exclusion():
    retriever = Retriever(TRAIN, encode=hashed_bow_encode)
    assert retriever.nearest("who wrote macbeth", 1) == ["a"]
    assert retriever.nearest("who wrote macbeth", 2, exclude_ids={"a"})[0] == "b"
    assert len(retriever.nearest("anything", 10)) == 4 and retriever.nearest("x", 0) == []
    assert np.allclose(np.linalg.norm(retriever.matrix, axis=1), 1.0)


def test_nearest_is_the_cosine_ranking_minus_the_exclusions():
    """sentence-transformers' semantic_search, over-fetched by the exclusions, returns exactly the k best
    remaining pool examples of a brute-force cosine ranking (many queries, random embeddings)."""
    rng = np.random.default_rng(0)
    pool = [{"id": f"p{i}", "text": f"pool {i}"} for i in range(300)]
    vectors = {ex["text"]: rng.normal(size=32) for ex in pool}
    queries = [f"query {i}" for i in range(50)]
    vectors.update({q: rng.normal(size=32) for q in queries})
    retriever = Retriever(pool, encode=lambda texts: np.stack([vectors[t] for t in texts]), cache=False)
    unit = {t: v / np.linalg.norm(v) for t, v in vectors.items()}
    matrix = np.stack([unit[ex["text"]] for ex in pool])
    for i, query in enumerate(queries + [ex["text"] for ex in pool[:50]]):
        exclude = {f"p{j}" for j in rng.choice(300, size=i % 7, replace=False)} | ({f"p{i - 50}"} if i >= 50 else set())
        ranked = [pool[j]["id"] for j in np.argsort(-(matrix @ unit[query]))]
        assert retriever.nearest(query, 3, exclude_ids=exclude) == [r for r in ranked if r not in exclude][:3]


def test_embeddings_cached_on_disk(isolated_cache):
    calls = []

    def encode(texts):
        calls.append(len(texts))
        return hashed_bow_encode(texts)

    first = Retriever(TRAIN, encode=encode)
    first.embed(["who wrote macbeth", "how many legs"])  # a test split, batched
    files = list((isolated_cache / "embeddings").glob("*.npy"))
    assert len(files) == 2 and calls == [4, 2]
    second = Retriever(TRAIN, encode=encode)
    second.embed(["who wrote macbeth", "how many legs"])
    assert calls == [4, 2]  # both came from the cache
    assert second.nearest("who wrote macbeth", 1) == ["a"] and calls == [4, 2]  # query memoised by embed
    changed = Retriever(TRAIN[:3], encode=encode)
    assert calls == [4, 2, 3] and changed.matrix.shape[0] == 3
    # SFT/RL prompts query with pool texts: their embeddings come from the pool matrix, not one encode each
    found = [changed.nearest(ex["text"], 1, exclude_ids={ex["id"]}) for ex in TRAIN[:3]]
    assert all(len(ids) == 1 and ids[0] != ex["id"] for ids, ex in zip(found, TRAIN[:3]))  # never itself
    assert calls == [4, 2, 3]


@pytest.mark.slow
def test_real_minilm(isolated_cache):
    retriever = Retriever(TRAIN)
    assert retriever.matrix.shape == (4, 384)
    assert retriever.nearest("which author wrote the play macbeth", 1) == ["a"]
    assert retriever.nearest("what city is the french capital", 1) == ["d"]


def test_exact_ties_go_to_the_lower_pool_index():
    """Copies of a text (or case-only variants under an uncased encoder) tie exactly: the earlier pool
    example wins, at every k, so demonstrations and hence prompts are reproducible. (Why `nearest` is a stable
    argsort and not sentence-transformers' semantic_search: that sorts its torch.topk(sorted=False) hits by
    score only, so tied hits come back in heap order; here it returns p9, p12, p21, p24.)"""
    pool = [{"id": f"p{i}", "text": "same text" if i % 3 == 0 else f"other {i}"} for i in range(30)]
    retriever = Retriever(pool, encode=hashed_bow_encode, cache=False)
    assert retriever.nearest("same text", 4) == ["p0", "p3", "p6", "p9"]
    assert retriever.nearest("same text", 2, exclude_ids={"p0"}) == ["p3", "p6"]
