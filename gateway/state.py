"""What a request reads besides the online store: catalog, vector index, lexical index, query parser.

All of it lives in one immutable `Snapshot`; `ServingState.snapshot` is replaced in a single
assignment on the event loop, so a request sees either the old or the new snapshot, never a mix.
`refresh()` runs in the background: a new encoder version re-embeds the catalog and builds a new
index; new items are embedded alone and added to a copy of the current index.

Queries must be embedded by the encoder that embedded the index. `triton_encoder` is the version
Triton serves, as last seen (by a refresh, or by an answer's ENCODER_VERSION); while it differs
from the snapshot's, the gateway embeds queries with the snapshot's version (kept loaded by the
publisher) and a refresh is due now (`wake`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import bm25s
import numpy as np

from gateway.catalog import Catalog, load_catalog
from gateway.catalog_embeddings import EmbeddingCache, embed_texts
from gateway.index import ItemIndex
from gateway.query_parser import QueryParser
from gateway.triton_client import TritonClient
from sources.interface import CatalogSource

# bm25s sets its own logger to DEBUG: once anything installs a root handler (the gateway's logging,
# a CLI), every index build printed "Building index from IDs objects". Its warnings still show.
logging.getLogger("bm25s").setLevel(logging.WARNING)

log = logging.getLogger(__name__)


class LexicalIndex:
    """BM25 over the item texts: the query source when the encoder is unavailable (degraded mode)."""

    def __init__(self, texts: tuple[str, ...]):
        self.size = len(texts)
        self._bm25 = bm25s.BM25()
        self._bm25.index(bm25s.tokenize(list(texts), stopwords="en", show_progress=False), show_progress=False)

    def scores(self, query: str) -> np.ndarray:
        """One score per item (all zero when the query has no indexed token: "the", "👟", "???")."""
        tokens = bm25s.tokenize([query], stopwords="en", show_progress=False, return_ids=False)[0]
        return self._bm25.get_scores(tokens) if tokens else np.zeros(self.size, dtype=np.float32)


@dataclass(frozen=True)
class Snapshot:
    catalog: Catalog
    index: ItemIndex
    lexical: LexicalIndex
    parser: QueryParser
    brands_lower: np.ndarray  # object, for case-insensitive filters
    categories_lower: np.ndarray
    built_at: float

    @property
    def encoder_version(self) -> str:
        return self.index.encoder_version


def _lower(values: np.ndarray) -> np.ndarray:
    return np.array([v.lower() if isinstance(v, str) else "" for v in values], dtype=object)


def build_snapshot(catalog: Catalog, index: ItemIndex, lexical: LexicalIndex | None = None) -> Snapshot:
    brands, categories, prices = catalog.vocabulary()
    return Snapshot(catalog=catalog, index=index, lexical=lexical or LexicalIndex(catalog.texts),
                    parser=QueryParser(brands, categories, prices),
                    brands_lower=_lower(catalog.brands), categories_lower=_lower(catalog.categories),
                    built_at=time.time())


async def serving_encoder_version(triton: TritonClient) -> str:
    """The encoder version Triton serves now (the version the ensemble is pinned to, else the newest)."""
    return await triton.serving_version(triton.encoder_model, component="encoder_onnx")


class ServingState:
    def __init__(self, sources: CatalogSource, triton: TritonClient, cache_dir: Path):
        self.sources = sources
        self.triton = triton
        self.cache_dir = cache_dir
        self.snapshot: Snapshot | None = None
        self.triton_encoder = ""  # the encoder version Triton serves, as last seen
        self.wake = asyncio.Event()  # set: refresh now, not at the next interval
        self._lock = asyncio.Lock()

    def encoder_switched(self, served: str) -> None:
        """An answer came from encoder `served`, not the index's: re-embed as soon as possible."""
        if served != self.triton_encoder:
            log.info("Triton serves encoder v%s; the index holds v%s: re-indexing now", served,
                     self.snapshot.encoder_version if self.snapshot else "-")
        self.triton_encoder = served
        self.wake.set()

    def index_behind(self, snap: Snapshot) -> bool:
        """True while Triton serves another encoder than the one `snap`'s vectors came from."""
        return self.triton_encoder not in ("", snap.encoder_version)

    async def _embed(self, catalog: Catalog, version: str) -> np.ndarray:
        cache = await asyncio.to_thread(EmbeddingCache, self.cache_dir, version)
        last = [0.0]

        def progress(done: int, total: int) -> None:
            if time.monotonic() - last[0] > 5 or done == total:
                last[0] = time.monotonic()
                log.info("embedding catalog with encoder v%s: %d/%d", version, done, total)

        return await embed_texts(self.triton, catalog.texts, cache, version, progress)

    async def load(self) -> Snapshot:
        """First load: catalog + embeddings (cache or Triton) + index. Raises if Triton is unusable."""
        async with self._lock:
            version = await serving_encoder_version(self.triton)
            self.triton_encoder = version
            catalog = await asyncio.to_thread(load_catalog, self.sources)
            vectors = await self._embed(catalog, version)
            index = await asyncio.to_thread(ItemIndex, vectors, version)
            self.snapshot = await asyncio.to_thread(build_snapshot, catalog, index)
            log.info("serving %d items, encoder v%s", len(catalog), version)
            return self.snapshot

    async def refresh(self) -> str:
        """Pick up a new encoder version or a changed catalog source; return what happened."""
        async with self._lock:
            current = self.snapshot
            if current is None:
                raise RuntimeError("refresh() before load()")
            version = await serving_encoder_version(self.triton)
            self.triton_encoder = version
            # In a thread: for a source other than a local file, version() is an offline-store query.
            catalog_changed = await asyncio.to_thread(self.sources.version) != current.catalog.source_version
            if version == current.encoder_version and not catalog_changed:
                return "unchanged"
            catalog = (await asyncio.to_thread(load_catalog, self.sources, current.catalog.item_ids)
                       if catalog_changed else current.catalog)
            old = current.catalog
            appended = (version == current.encoder_version and len(catalog) >= len(old)
                        and catalog.texts[: len(old)] == old.texts)
            if appended:
                new_vectors = await self._embed_tail(catalog, len(old), version)
                index = current.index.with_added(new_vectors) if len(new_vectors) else current.index
                what = f"added {len(catalog) - len(old)} new items"
            else:
                vectors = await self._embed(catalog, version)
                index = await asyncio.to_thread(ItemIndex, vectors, version)
                what = (f"re-embedded {len(catalog)} items for encoder v{version}" if version != current.encoder_version
                        else f"rebuilt the index for {len(catalog)} items (changed item texts)")
            lexical = current.lexical if catalog is current.catalog else None
            self.snapshot = await asyncio.to_thread(build_snapshot, catalog, index, lexical)
            log.info("index swapped: %s", what)
            return what

    async def _embed_tail(self, catalog: Catalog, start: int, version: str) -> np.ndarray:
        if start >= len(catalog):
            return np.empty((0, 0), dtype=np.float32)
        cache = await asyncio.to_thread(EmbeddingCache, self.cache_dir, version)
        return await embed_texts(self.triton, catalog.texts[start:], cache, version)
