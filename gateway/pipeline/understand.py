"""Stage `parse`: the query's text and constraints, and the request's hard mask and soft boosts."""

from __future__ import annotations

import numpy as np

from gateway.pipeline.context import EMPTY_QUERY, Request, RequestContext
from gateway.query_parser import ParsedQuery
from gateway.state import Snapshot
from recsys.v1 import common_pb2


def understand_query(ctx: RequestContext) -> None:
    """Fills `parsed`, `allowed`, `boosts`, `constraints`."""
    with ctx.timed("parse"):
        ctx.parsed = ctx.snap.parser.parse(ctx.req.query) if ctx.req.query else EMPTY_QUERY
        ctx.allowed, ctx.boosts, ctx.constraints = constraints(ctx.snap, ctx.req, ctx.parsed)


def constraints(snap: Snapshot, req: Request, parsed: ParsedQuery) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Hard mask (caller filters + parsed price, brand, category) and soft boosts.

    A brand or category read from the query is a hard filter when any item passes it together
    with the other constraints; otherwise it becomes a relevance boost (the parser can be
    wrong, and an empty page is the worst answer).
    """
    catalog, f = snap.catalog, req.filters
    n = len(catalog)
    mask = np.ones(n, dtype=bool)
    described: list[str] = []
    boosts = np.zeros(n, dtype=np.float32)
    if not req.apply_filters:
        for values, column in ((parsed.categories, snap.categories_lower), (parsed.brands, snap.brands_lower)):
            if values:
                boosts += np.isin(column, [v.lower() for v in values])
        return mask, boosts, described
    if f.brands:
        mask &= np.isin(snap.brands_lower, [b.lower() for b in f.brands])
    if f.categories:
        mask &= np.isin(snap.categories_lower, [c.lower() for c in f.categories])
    if req.context.surface == common_pb2.SURFACE_CATEGORY and req.context.page_category:
        mask &= snap.categories_lower == req.context.page_category.lower()
    lo = max(f.min_price if f.HasField("min_price") else -np.inf, parsed.min_price if parsed.min_price is not None else -np.inf)
    hi = min(f.max_price if f.HasField("max_price") else np.inf, parsed.max_price if parsed.max_price is not None else np.inf)
    if np.isfinite(lo) or np.isfinite(hi):
        mask &= (catalog.prices >= lo) & (catalog.prices <= hi)
    if parsed.max_price is not None and parsed.min_price is not None:
        described.append(f"{parsed.min_price:g}-{parsed.max_price:g}")
    elif parsed.max_price is not None:
        described.append(f"under {parsed.max_price:g}")
    elif parsed.min_price is not None:
        described.append(f"over {parsed.min_price:g}")
    for exclude in f.exclude_item_ids:
        if (p := catalog.position.get(exclude)) is not None:
            mask[p] = False
    for values, column in ((parsed.categories, snap.categories_lower), (parsed.brands, snap.brands_lower)):
        if not values:
            continue
        match = np.isin(column, [v.lower() for v in values])
        if req.candidate_ids is None and bool((mask & match).any()):
            mask &= match
            described.extend(values)
        else:
            boosts += match
    return mask, boosts, described
