"""An LRU of query and context embeddings keyed by (encoder version, text).

Shops repeat their head queries, and a user's context text stays the same between two clicks, so
many requests need no encoder call at all. Keyed by the encoder version that embedded the index,
so a new encoder never meets an old vector. functools.lru_cache does not fit: the value comes from
an async batched call, and only the misses of a request are sent.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from gateway import metrics


class QueryEmbeddingCache:
    def __init__(self, max_entries: int):
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()

    def get(self, version: str, text: str) -> np.ndarray | None:
        if not self.max_entries:
            return None
        vector = self._entries.get((version, text))
        if vector is None:
            metrics.QUERY_CACHE.labels("miss").inc()
            return None
        self._entries.move_to_end((version, text))
        metrics.QUERY_CACHE.labels("hit").inc()
        return vector

    def put(self, version: str, text: str, vector: np.ndarray) -> None:
        if not self.max_entries:
            return
        self._entries[(version, text)] = vector
        self._entries.move_to_end((version, text))
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)
