"""Pre-score: every candidate's relevance and feature terms, fused with the request's blend weights,
and the candidates in pre-score order (which picks the head the ranker re-scores).

No downstream call and no stage of its own in `x-recsys-stages-ms` (it never had one: the
metadata's stage names stay what dashboards and the benchmarks read).
"""

from __future__ import annotations

import numpy as np

from contract.fusion import FusionModel
from gateway.config import SourceFusion
from gateway.learned_fusion import candidate_features, model_relevance
from gateway.pipeline.context import RequestContext
from gateway.pipeline.services import Services
from gateway.retrieval import SOURCE_NAMES, Candidates
from gateway.scoring import BOOST, feature_terms, fuse, source_fusion, weight_vector
from gateway.state import Snapshot
from contract.scores import RANKER_PRIOR


def pre_score(ctx: RequestContext, svc: Services) -> None:
    """Fills `positions`, `cosine`, `pers`, `pop`, `fresh`, `fused`, `fusion_version`, `relevance`, `weights`,
    `blend_version`, `order`."""
    req, catalog = ctx.req, ctx.catalog
    ctx.positions = positions = np.array(ctx.cands.positions, dtype=np.int64)
    probe = ctx.query_vec if ctx.query_vec is not None else ctx.interest
    ctx.cosine = ctx.snap.index.similarity(probe, positions) if probe is not None else None
    ctx.pers, ctx.pop, ctx.fresh = feature_terms(positions, catalog, ctx.user, catalog.popularity[positions])
    ctx.fused = not req.query and req.candidate_ids is None
    fusion = svc.learned_fusion  # read once: a reload swaps it between requests, never inside one
    if ctx.fused and fusion is not None:  # no query: the learned fusion of the sources
        relevance = learned_relevance(ctx, fusion.model)
        ctx.fusion_version = fusion.version
    elif ctx.fused:  # no query: what the sources agree on, by rank
        relevance = fused_relevance(ctx.cands, positions, svc.settings.fusion)
    else:
        relevance = base_relevance(ctx.snap, req.query, positions, ctx.cosine)
    ctx.relevance = relevance + BOOST * ctx.boosts[positions]
    if svc.blend is not None:
        ctx.weight_draw = svc.blend.draw(req.user_id or req.session_id or req.request_id)
        ctx.weights, ctx.blend_version = ctx.weight_draw.weights, ctx.weight_draw.label
    else:
        ctx.weights, ctx.blend_version = weight_vector(svc.settings.weights), ""
    pre = fuse(ctx.weights, ctx.relevance, ctx.pers, ctx.pop, ctx.fresh)
    ctx.order = np.argsort(-pre, kind="stable")


def fused_relevance(cands: Candidates, positions: np.ndarray, fusion: SourceFusion) -> np.ndarray:
    """Relevance without a query: RANKER_PRIOR x fusion.scale x the sources' weighted reciprocal-rank
    fusion (in [0, 1], like the cosine it replaces). The scale is the fused order's weight against
    the feature terms of the final score (chosen on validation, bench/tune_fusion.py)."""
    weights = {source: getattr(fusion, name) for source, name in SOURCE_NAMES.items() if hasattr(fusion, name)}
    return (RANKER_PRIOR * fusion.scale * source_fusion(cands.ranks, positions, weights, fusion.k)).astype(np.float32)


def learned_relevance(ctx: RequestContext, model: FusionModel) -> np.ndarray:
    """Relevance without a query from the learned fusion (gateway/learned_fusion.py)."""
    features = candidate_features(ctx.snap, ctx.cands, ctx.positions, ctx.user, ctx.cosine, ctx.pop, ctx.pers,
                                  ctx.fresh)
    return model_relevance(model, features)


def base_relevance(snap: Snapshot, query: str, positions: np.ndarray, cosine: np.ndarray | None) -> np.ndarray:
    """Relevance before the ranker, on the untrained ranker's scale (RANKER_PRIOR x cosine), so
    ranked and unranked items compare."""
    if cosine is not None:
        relevance = RANKER_PRIOR * cosine
    elif query:  # encoder down: BM25 scores scaled into the cosine range
        lex = snap.lexical.scores(query)
        relevance = RANKER_PRIOR * 0.5 * (lex[positions] / max(float(lex[positions].max(initial=0)), 1e-9))
    else:
        relevance = np.zeros(len(positions), dtype=np.float32)
    return relevance.astype(np.float32)
