"""Stages `features_item_features` and `rank`: the head of the pre-score order gets fresh item
features (one online-store round trip) and the Triton ranker's scores for its top `rerank_depth`,
when the ranker is applied at all (Services.rerank_depth: ranker_mode and the served version's verdict)."""

from __future__ import annotations

from typing import Any

import numpy as np

from gateway.catalog import Catalog
from gateway.degradation import Cause, Degradation, Part
from gateway.features.online_reader import EntityFeatures
from gateway.pipeline.context import RequestContext
from gateway.pipeline.features import read_online
from gateway.pipeline.services import Services
from gateway.scoring import BOOST
from contract.ranker_inputs import numeric_features
from contract.scores import POPULARITY_SCALE


async def read_head_features(ctx: RequestContext, svc: Services) -> None:
    """Fills `head`, `head_n`, `item_feats`; a head item's fresh 7-day popularity replaces the
    catalog's (which is as old as the last catalog load)."""
    catalog, positions, order = ctx.catalog, ctx.positions, ctx.order
    ctx.head_n = max(min(svc.rerank_depth, len(order)), 0)
    # What the ranker scores and, when more are asked for, every item that can be shown.
    ctx.head = head = order[:max(ctx.head_n, min(ctx.req.num_results, len(order)))]
    head_ids = [catalog.item_ids[positions[i]] for i in head]
    if head_ids:
        _, ctx.item_feats = await read_online(svc, ctx, ctx.req.user_id, head_ids, "item features")
    for j, i in enumerate(head):
        f = ctx.item_feats.get(head_ids[j])
        if f is not None and f.has("item_popularity"):
            ctx.pop[i] = float(f.values.get("popularity_7d") or 0.0) / POPULARITY_SCALE


async def rank_head(ctx: RequestContext, svc: Services) -> None:
    """Replaces the relevance of head[:head_n] by the ranker's scores (fused relevance: re-orders it
    by them, `reorder_by`) and sets `ranked`; without a context vector the ranker is left out (NO_INPUT)."""
    if not ctx.head_n:
        return
    if ctx.ctx_vec is None:
        ctx.degraded.append(Degradation(Part.RANKER, Cause.NO_INPUT, "retrieval scores", "no context embedding"))
        return
    catalog, positions = ctx.catalog, ctx.positions
    rank_idx = ctx.head[:ctx.head_n]
    items = [item_values(catalog, positions[i], ctx.item_feats.get(catalog.item_ids[positions[i]])) for i in rank_idx]
    sims = ctx.snap.index.similarity(ctx.ctx_vec, positions[rank_idx])
    numeric = np.array([numeric_features(it, ctx.user.values, float(s)) for it, s in zip(items, sims)], dtype=np.float32)
    texts = [catalog.texts[positions[i]] for i in rank_idx]
    triton, context = svc.triton, ctx.ctx_text
    scores = await svc.guard.call(
        Part.RANKER, "rank", lambda t: triton.rank(context, texts, numeric, timeout_s=t), ctx,
        "retrieval scores", reserve_s=svc.reserve_s)
    if scores is not None:
        if ctx.fused:
            ctx.relevance[rank_idx] = reorder_by(ctx.relevance[rank_idx], scores)
        else:
            ctx.relevance[rank_idx] = scores + BOOST * ctx.boosts[positions[rank_idx]]
        ctx.ranked = True


def reorder_by(values: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """The same values, re-assigned so the highest goes to the best-scored item, and so on.

    Why: with a query, relevance is RANKER_PRIOR x cosine, the ranker's own scale (its score is
    prior x cosine + a learned head), so its scores replace the head's and still compare with the
    unranked items below. Without a query, relevance is the sources' rank fusion, on no common
    scale with the ranker's scores: replacing them sank a ranked head under items the ranker never
    saw (Online Retail, depth 10: Recall@10 0.270 -> 0.045, docs/models.md). So there the ranker
    decides the order within the head and the head keeps the relevance the fusion gave it."""
    out = np.empty_like(values)
    out[np.argsort(-np.asarray(scores), kind="stable")] = np.sort(values)[::-1]
    return out


def item_values(catalog: Catalog, p: int, feats: EntityFeatures | None) -> dict[str, Any]:
    """An item's features for the ranker: the online store's, the catalog's where it has none."""
    values = dict(feats.values) if feats is not None else {}
    values.setdefault("price", catalog.prices[p])
    values.setdefault("category", catalog.categories[p])
    values.setdefault("brand", catalog.brands[p])
    return values
