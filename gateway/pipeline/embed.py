"""Stage `embed`: the query and context vectors, one Triton call for whatever the query cache
does not hold, from the encoder version that embedded the snapshot's index."""

from __future__ import annotations

import time

import numpy as np

from gateway.degradation import Part
from gateway.pipeline.context import RequestContext
from gateway.pipeline.services import Services
from contract.ranker_inputs import context_text


def texts_to_embed(query_text: str, ctx_text: str, rerank_depth: int) -> list[str]:
    """The query (retrieval) and the context (the ranker's similarity feature; none without a
    ranker). A cold user's context text is the query itself: embed it once."""
    return list(dict.fromkeys(([query_text] if query_text else []) + ([ctx_text] if rerank_depth > 0 else [])))


async def embed(ctx: RequestContext, svc: Services) -> None:
    """Fills `query_text`, `ctx_text`, `query_vec`, `ctx_vec` (vectors None when the encoder is left
    out). With no query and no ranker applied there is nothing to embed: no encoder call at all."""
    depth = svc.rerank_depth
    ctx.query_text = ctx.parsed.text or ctx.req.query
    ctx.ctx_text = context_text(ctx.query_text or None, ctx.user.values)
    texts = texts_to_embed(ctx.query_text, ctx.ctx_text, depth)
    vectors = await embed_texts(ctx, svc, texts) if texts else None
    # texts is [query, context], [query] (same text, or no ranker) or [context] (no query).
    ctx.query_vec = vectors[0] if vectors is not None and ctx.query_text else None
    ctx.ctx_vec = vectors[-1] if vectors is not None and depth > 0 else None


async def embed_texts(ctx: RequestContext, svc: Services, texts: list[str]) -> np.ndarray | None:
    """Vectors of `texts` from the encoder version that embedded `ctx.snap`'s index (cached)."""
    snap, state, triton = ctx.snap, svc.state, svc.triton
    indexed = snap.encoder_version
    cached = [svc.query_cache.get(indexed, t) for t in texts]
    missing = [t for t, v in zip(texts, cached) if v is None]
    if missing:
        async def call(timeout_s: float) -> np.ndarray:
            if state.index_behind(snap):  # Triton switched; the catalog is being re-embedded
                return await triton.embed(missing, timeout_s=timeout_s, version=indexed)
            t0 = time.monotonic()
            vectors, served = await triton.embed_versioned(missing, timeout_s=timeout_s)
            if served != indexed:  # switched since the last refresh: these vectors do not fit the index
                state.encoder_switched(served)
                left = max(timeout_s - (time.monotonic() - t0), 0.001)
                vectors = await triton.embed(missing, timeout_s=left, version=indexed)
            return vectors

        # Keep time for the ranker's head read and call only when there is plenty; the query
        # embedding matters more (retrieval), so it may use what the ranker would have had.
        got = await svc.guard.call(Part.ENCODER, "embed", call, ctx, "BM25 retrieval", reserve_s=svc.reserve_s)
        if got is None:
            return None
        fresh = iter(got)
        for i, v in enumerate(cached):
            if v is None:
                cached[i] = vector = next(fresh)
                svc.query_cache.put(indexed, texts[i], vector)
    return np.stack([v for v in cached if v is not None])  # all filled by now
