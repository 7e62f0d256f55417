"""Item embeddings computed through Triton, cached on disk per encoder version and item text.

Embedding a catalog on CPU runs at tens of items per second, so a restart must not redo it: the
cache maps sha1(item text) -> vector in one .npz per encoder version. Only texts not in the cache
(new or edited items) go to Triton. A cache is valid for exactly one encoder version, so a new
version starts a new file and the old one stays for a rollback.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from gateway.triton_client import TritonClient

log = logging.getLogger(__name__)

CHUNK = 64  # texts per Triton request (the encoder's max batch size)
CONCURRENCY = 2  # requests in flight: enough to keep 2 CPU cores busy without starving live traffic
CHUNK_TIMEOUT_S = 60.0


def text_key(text: str) -> bytes:
    return hashlib.sha1(text.encode("utf-8")).digest()


class EmbeddingCache:
    def __init__(self, directory: Path, encoder_version: str):
        self.path = directory / f"encoder-v{encoder_version}.npz"
        self._vectors: dict[bytes, np.ndarray] = {}
        if self.path.exists():
            try:
                data = np.load(self.path)
                self._vectors = dict(zip((bytes(k) for k in data["keys"]), data["vectors"]))
            except Exception as e:  # a torn or foreign file is only a cache: start over
                log.warning("ignoring unreadable embedding cache %s: %s", self.path, e)

    def get(self, text: str) -> np.ndarray | None:
        return self._vectors.get(text_key(text))

    def put(self, texts: Sequence[str], vectors: np.ndarray) -> None:
        for t, v in zip(texts, vectors):
            self._vectors[text_key(t)] = v

    def save(self) -> None:
        if not self._vectors:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        keys = np.array([np.frombuffer(k, dtype=np.uint8) for k in self._vectors])
        tmp = self.path.with_suffix(".tmp.npz")
        np.savez(tmp, keys=keys, vectors=np.stack(list(self._vectors.values())))
        os.replace(tmp, self.path)  # atomic: a crash leaves the old cache or the new one


async def embed_texts(client: TritonClient, texts: Sequence[str], cache: EmbeddingCache, version: str,
                      progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """Unit vectors for `texts` from encoder `version` (cached ones from disk, the rest through
    Triton, pinned to that version even if the serving one changes meanwhile); saves the cache."""
    missing = sorted({t for t in texts if cache.get(t) is None})
    if missing:
        t0 = time.perf_counter()
        done = 0
        sem = asyncio.Semaphore(CONCURRENCY)

        async def one(chunk: list[str]) -> None:
            nonlocal done
            async with sem:
                vectors = await client.embed(chunk, timeout_s=CHUNK_TIMEOUT_S, version=version)
            cache.put(chunk, vectors)
            done += len(chunk)
            if progress:
                progress(done, len(missing))

        await asyncio.gather(*(one(missing[i : i + CHUNK]) for i in range(0, len(missing), CHUNK)))
        await asyncio.to_thread(cache.save)
        seconds = time.perf_counter() - t0
        log.info("embedded %d item texts through Triton in %.1fs (%.0f/s)", len(missing), seconds, len(missing) / seconds)
    return np.stack([cache.get(t) for t in texts]).astype(np.float32)
