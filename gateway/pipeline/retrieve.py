"""Stages `interest`, `next_item` and `retrieve`: the user's interest vector (Triton's interest
model, else its untrained formula) and the next-item model's list (when Triton serves one), called
concurrently, then the candidates from every source (or, for Rank, the caller's known ids)."""

from __future__ import annotations

import asyncio

import numpy as np

from contract.next_item import NEXT_ITEM_HISTORY

from gateway import metrics
from gateway.degradation import Part
from gateway.pipeline.context import RequestContext
from gateway.pipeline.services import Services
from gateway.retrieval import (CALLER, SOURCE_NAMES, Candidates, NextItems, fallback_interest, history_positions,
                               next_item_positions, retrieve)


async def retrieve_candidates(ctx: RequestContext, svc: Services) -> None:
    """Fills `page`, `history`, `interest`, `cands` and (Rank) `unknown`."""
    req, catalog = ctx.req, ctx.catalog
    ctx.page = catalog.position.get(req.context.page_item_id) if req.context.page_item_id else None
    ctx.history = history_positions(ctx.user, ctx.page, svc.settings.interest_recent_items)
    wants_next = bool(svc.next_item_version) and req.candidate_ids is None and bool(ctx.history)
    ctx.interest, next_items = await asyncio.gather(
        interest_vector(ctx, svc) if ctx.history else _none(),
        next_item_list(ctx, svc) if wants_next else _none())
    ctx.next_item_used = next_items is not None
    with ctx.timed("retrieve"):
        if req.candidate_ids is not None:
            ctx.cands = Candidates()
            known = [catalog.position[i] for i in req.candidate_ids if i in catalog.position]
            ctx.unknown = [i for i in req.candidate_ids if i not in catalog.position]
            ctx.cands.add([p for p in known if ctx.allowed[p]], CALLER)
        else:
            # Without a query vector the query's words still find items (BM25).
            ctx.cands = retrieve(ctx.snap, svc.settings.candidates_per_source, ctx.allowed, ctx.query_vec,
                                 req.query if ctx.query_vec is None else "", ctx.interest, ctx.user, ctx.page,
                                 svc.settings.covisit_recent_items, svc.settings.covisit_seed_decay, next_items)
        for source, name in SOURCE_NAMES.items():
            metrics.CANDIDATES.labels(name).observe(ctx.cands.count(source))


async def interest_vector(ctx: RequestContext, svc: Services) -> np.ndarray | None:
    """The user's interest vector from Triton's interest model, else its untrained formula."""
    snap, history, query_vec = ctx.snap, ctx.history, ctx.query_vec
    if svc.interest_version:
        k = svc.settings.interest_recent_items
        items = np.zeros((k, snap.index.dim), np.float32)
        items[: len(history)] = snap.index.embeddings[history]
        mask = np.zeros(k, np.float32)
        mask[: len(history)] = 1.0
        query = query_vec if query_vec is not None else np.zeros(snap.index.dim, np.float32)
        triton = svc.triton
        # The ranker still has to run after this: leave it its typical time.
        got = await svc.guard.call(
            Part.INTEREST, "interest",
            lambda t: triton.interest(query, query_vec is not None, items, mask, timeout_s=t),
            ctx, "recency-weighted history",
            reserve_s=svc.reserve_s + svc.guard.latency[Part.RANKER].typical)
        if got is not None:
            return got
    return fallback_interest(snap, history, query_vec)


async def _none() -> None:
    return None


async def next_item_list(ctx: RequestContext, svc: Services) -> NextItems | None:
    """The next-item model's list for the user's recent items (up to NEXT_ITEM_HISTORY, newest first: the
    page's item, the session's, then the profile's); None when it does not answer (the other sources
    serve the request: no next-item candidates, the answer says why)."""
    catalog = ctx.catalog
    recent = [catalog.item_ids[p] for p in history_positions(ctx.user, ctx.page, NEXT_ITEM_HISTORY)]
    triton = svc.triton
    got = await svc.guard.call(
        Part.NEXT_ITEM, "next_item", lambda t: triton.next_items(recent, timeout_s=t), ctx,
        "the other sources without it", reserve_s=svc.reserve_s + svc.guard.latency[Part.RANKER].typical)
    return None if got is None else next_item_positions(catalog.position, *got)
