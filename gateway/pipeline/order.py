"""Stage `fuse` (first half): the final score, which candidates are answered (the ranked head is
preferred, at most `brand_cap` per brand), and their order: best final score first."""

from __future__ import annotations

import numpy as np

from gateway.catalog import Catalog
from gateway.pipeline.context import RequestContext
from gateway.pipeline.services import Services
from gateway.scoring import fuse


def order_answer(ctx: RequestContext, svc: Services) -> None:
    """Fills `final` and `chosen` (timed by the caller with `explain`, as stage `fuse`)."""
    final = ctx.final = fuse(ctx.weights, ctx.relevance, ctx.pers, ctx.pop, ctx.fresh)
    # Choosing: the ranked head first (the ranker saw more than retrieval did), then the rest by
    # pre-score, or by final score once the head's scores moved.
    ranked_set = set(ctx.head[:ctx.head_n].tolist()) if ctx.ranked else set()
    head_sorted = sorted(ranked_set, key=lambda i: -final[i])
    rest = [i for i in ctx.order if i not in ranked_set]
    if ctx.ranked:
        rest.sort(key=lambda i: -final[i])
    chosen = diversify(head_sorted + rest, ctx.positions, ctx.catalog, ctx.req.num_results, svc.settings.brand_cap)
    # The ranked head is preferred when choosing, but the answer is in score order (the API
    # promises "best first, higher is better": the fuzz test found rank 21 above rank 20).
    chosen.sort(key=lambda i: -final[i])
    ctx.chosen = chosen


def diversify(order: list[int], positions: np.ndarray, catalog: Catalog, n: int, cap: int) -> list[int]:
    """The first `n` of `order` with at most `cap` per brand (0: no cap)."""
    if not cap:
        return order[:n]
    counts: dict[str, int] = {}
    chosen: list[int] = []
    overflow: list[int] = []
    for i in order:
        brand = catalog.brands[positions[i]]
        if counts.get(brand, 0) < cap:
            counts[brand] = counts.get(brand, 0) + 1
            chosen.append(i)
            if len(chosen) == n:
                return chosen
        else:
            overflow.append(i)
    return (chosen + overflow)[:n]  # too few brands to honour the cap: fill rather than return less
