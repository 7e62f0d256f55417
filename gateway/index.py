"""The item vector index: faiss HNSW (inner product on unit vectors = cosine) over catalog positions.

Filtered search matters here (brand/category/price constraints): a small allowed set is searched
exactly (one matrix-vector product over the subset beats walking the graph), a large one goes
through HNSW with an ID selector so the filter is applied during the walk, not after it.
An index is never mutated once it serves: new items give a copy with the vectors added (no
rebuild), an encoder change a new index; either replaces the old one atomically (state.py).
"""

from __future__ import annotations

import faiss
import numpy as np

HNSW_M = 32
EF_CONSTRUCTION = 128
EF_SEARCH = 256  # top-100 needs a wide beam: recall@100 ~0.95+ on catalog-like vectors (bench/index_bench.py)
# Below this many (allowed) vectors an exact scan is at least as fast as HNSW on this machine:
# bench/index_bench.py measures it (docs/benchmarks.md).
EXACT_MAX = 20_000
# An exact search over an allowed subset copies the subset's rows only when it is under 1/GATHER_SHARE
# of the catalog; otherwise it scores every row (a matrix-vector product beats a large copy).
GATHER_SHARE = 8


class ItemIndex:
    def __init__(self, embeddings: np.ndarray, encoder_version: str, exact_max: int = EXACT_MAX):
        if embeddings.ndim != 2 or embeddings.shape[0] == 0:
            raise ValueError(f"need a non-empty [n, dim] embedding matrix, got shape {embeddings.shape}")
        self.encoder_version = encoder_version
        self.exact_max = exact_max
        self.dim = embeddings.shape[1]
        self._emb = np.ascontiguousarray(embeddings, dtype=np.float32)
        self._n = embeddings.shape[0]
        self._hnsw = faiss.IndexHNSWFlat(self.dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        self._hnsw.hnsw.efConstruction = EF_CONSTRUCTION
        self._hnsw.add(self._emb)

    def __len__(self) -> int:
        return self._n

    @property
    def embeddings(self) -> np.ndarray:
        return self._emb

    def with_added(self, embeddings: np.ndarray) -> "ItemIndex":
        """A new index with vectors appended for new catalog positions n, n+1, ...: the graph is
        copied and extended, not rebuilt, and this index stays unchanged for requests still using it."""
        embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        if embeddings.ndim != 2 or embeddings.shape[1] != self.dim:
            raise ValueError(f"need [k, {self.dim}] vectors, got shape {embeddings.shape}")
        new = object.__new__(ItemIndex)
        new.encoder_version, new.exact_max, new.dim = self.encoder_version, self.exact_max, self.dim
        new._emb = np.concatenate([self._emb, embeddings])
        new._n = new._emb.shape[0]
        new._hnsw = faiss.clone_index(self._hnsw)
        new._hnsw.add(embeddings)
        return new

    def search(self, query: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k positions and cosine scores for one unit query vector, within `allowed` (bool mask)."""
        query = np.ascontiguousarray(query, dtype=np.float32).reshape(1, -1)
        if allowed is not None:
            subset = np.flatnonzero(allowed)
            if len(subset) <= self.exact_max:
                return self._exact(query[0], k, subset)
        elif self._n <= self.exact_max:
            return self._exact(query[0], k, None)
        params = faiss.SearchParametersHNSW(efSearch=max(EF_SEARCH, 2 * k))
        if allowed is not None:
            # The bitmap must outlive the search call; keep a reference in this frame.
            bitmap = np.packbits(allowed.astype(np.uint8), bitorder="little")
            params.sel = faiss.IDSelectorBitmap(self._n, faiss.swig_ptr(bitmap))
        scores, ids = self._hnsw.search(query, k, params=params)
        keep = ids[0] >= 0
        return ids[0][keep].astype(np.int64), scores[0][keep]

    def _exact(self, query: np.ndarray, k: int, subset: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        if subset is not None and len(subset) == 0:
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)
        if subset is None:
            scores = self._emb @ query
        elif len(subset) * GATHER_SHARE < self._n:
            scores = self._emb[subset] @ query
        else:
            # Most of the catalog is allowed (the usual case: in stock, no filter): scoring every row
            # and picking the allowed scores is ~35x cheaper than copying the allowed rows first
            # (5k x 384: 0.25 vs 9 ms on 2 cores, and it runs on the event loop twice a request).
            scores = (self._emb @ query)[subset]
        k = min(k, len(scores))
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.argsort(-scores[top], kind="stable")]
        positions = top if subset is None else subset[top]
        return positions.astype(np.int64), scores[top]

    def similarity(self, query: np.ndarray, positions: np.ndarray) -> np.ndarray:
        return self._emb[positions] @ np.asarray(query, dtype=np.float32)
