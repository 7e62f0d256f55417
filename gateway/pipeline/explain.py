"""Stage `fuse` (second half): the answer's ScoredItems (score, rank, sources; with `explain`, the
score's breakdown and reasons), the served list for the online blend learner, and the model versions."""

from __future__ import annotations

from gateway.pipeline.context import RequestContext
from gateway.pipeline.services import Services
from gateway.scoring import score_parts
from recsys.v1 import common_pb2


def explain(ctx: RequestContext, svc: Services) -> None:
    """Fills `items` from `chosen`, and tells the blend what was served with which score parts."""
    catalog, positions, cands = ctx.catalog, ctx.positions, ctx.cands
    explainer = svc.explainers.get(catalog) if ctx.req.explain else None
    # The breakdown is the final score's own parts (scoring.fuse adds exactly these).
    parts = score_parts(ctx.weights, ctx.relevance, ctx.pers, ctx.pop, ctx.fresh) if explainer is not None else None
    # A reason quotes the query only when the similarity really is to the query (not the interest vector).
    query_cosine = ctx.cosine if ctx.query_vec is not None else None
    items: list[common_pb2.ScoredItem] = []
    for rank, i in enumerate(ctx.chosen, start=1):
        p = int(positions[i])
        item = common_pb2.ScoredItem(item_id=catalog.item_ids[p], score=float(ctx.final[i]), rank=rank,
                                     sources=sorted(cands.sources[p]))
        if explainer is not None and parts is not None:
            rel_part, pers_part, pop_part, fresh_part = parts
            item.breakdown.CopyFrom(common_pb2.ScoreBreakdown(
                relevance=float(rel_part[i]), personalization=float(pers_part[i]),
                popularity=float(pop_part[i]), freshness=float(fresh_part[i])))
            item.reasons.extend(explainer.reasons(
                p, ctx.query_text, float(query_cosine[i]) if query_cosine is not None else None,
                ctx.user, float(catalog.popularity[p]), cands.sources[p], ctx.constraints, float(ctx.fresh[i])))
        items.append(item)
    ctx.items = items
    if svc.blend is not None:  # what was served and why: the online learner's training input
        svc.blend.record(ctx.req.request_id, [
            (catalog.item_ids[positions[i]], (ctx.relevance[i], ctx.pers[i], ctx.pop[i], ctx.fresh[i]))
            for i in ctx.chosen], draw=ctx.weight_draw)


def model_versions(ctx: RequestContext, svc: Services) -> dict[str, str]:
    """The versions that made this answer: the ranker's only when it scored, the blend's when online."""
    out = {"encoder": ctx.snap.encoder_version}
    if svc.interest_version:
        out["interest"] = svc.interest_version
    if ctx.next_item_used and svc.next_item_version:
        out["next_item"] = svc.next_item_version
    if ctx.ranked and svc.ranker_version:
        out["ranker"] = svc.ranker_version
    if ctx.blend_version:
        out["blend"] = ctx.blend_version
    if ctx.fusion_version:
        out["fusion"] = ctx.fusion_version
    return out
