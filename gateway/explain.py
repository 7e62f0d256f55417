"""Short reasons a shopper (or the engineer debugging a ranking) can read, best first.

Reasons are derived from the same numbers as the score: a reason is only given when its part of
the score is actually there (a brand reason when the session really holds that brand, a
popularity reason when the item is really among its category's most popular).
"""

from __future__ import annotations

from collections.abc import Set as AbstractSet

import numpy as np

from gateway.catalog import Catalog
from gateway.scoring import UserView
from recsys.v1 import common_pb2

MATCH_COSINE = 0.35  # cosine above which the query "matches" (zero-shot MiniLM: unrelated ~0.0-0.2)
POPULAR_TOP_SHARE = 0.1  # top 10% of a category by 7-day popularity


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


class Explainer:
    def __init__(self, catalog: Catalog):
        self.catalog = catalog
        # Popularity threshold per category, computed once per catalog snapshot.
        self._popular_cut: dict[str, float] = {}
        for cat in {c for c in catalog.categories if isinstance(c, str)}:
            pops = catalog.popularity[catalog.categories == cat]
            if len(pops):
                self._popular_cut[cat] = max(float(np.quantile(pops, 1 - POPULAR_TOP_SHARE)), 1e-6)

    def reasons(self, pos: int, query_text: str, cosine: float | None, user: UserView, popularity: float,
                sources: AbstractSet[int], constraints: list[str], fresh: float, limit: int = 3) -> list[str]:
        cat, brand = self.catalog.categories[pos], self.catalog.brands[pos]
        out: list[tuple[float, str]] = []
        if query_text and cosine is not None and cosine >= MATCH_COSINE:
            out.append((2.0 + cosine, f"matches '{query_text}'"))
        if constraints:
            out.append((1.9, "fits your search: " + ", ".join(constraints)))
        if isinstance(brand, str) and (n := user.session_brands.get(brand, 0)) >= 1:
            out.append((1.5 + n / 10, f"you viewed {_count(n, brand + ' item')} this session"))
        elif isinstance(cat, str) and (n := user.session_categories.get(cat, 0)) >= 2:
            out.append((1.4 + n / 10, f"you browsed {cat} this session"))
        if common_pb2.CANDIDATE_SOURCE_SESSION in sources:
            # The newest of the user's items (session, then profile) that this one was co-visited with.
            covisit = self.catalog.covisit
            seed = next((s for s in user.session_positions + user.recent_positions if pos in covisit.get(s, ())), None)
            if seed is not None:
                out.append((1.3, f"often viewed with {self.catalog.titles[seed]}"))
        if isinstance(brand, str) and user.brand_affinity.get(brand, 0.0) >= 0.2:
            out.append((1.2, f"you often choose {brand}"))
        elif isinstance(cat, str) and user.category_affinity.get(cat, 0.0) >= 0.25:
            out.append((1.1, f"you often shop {cat}"))
        if isinstance(cat, str) and popularity >= self._popular_cut.get(cat, float("inf")) and popularity > 0:
            out.append((1.0, f"popular in {cat} this week"))
        if fresh > 0.5:
            out.append((0.9, "new this week"))
        if not out and common_pb2.CANDIDATE_SOURCE_POPULAR in sources:
            out.append((0.5, "popular right now"))
        out.sort(key=lambda r: -r[0])
        return [text for _, text in out[:limit]]


class ExplainerCache:
    """One Explainer for the catalog being served: its per-category popularity cuts cost a pass over
    the catalog, so they are computed once per catalog snapshot, not once per request."""

    def __init__(self) -> None:
        self._by_catalog: dict[int, Explainer] = {}

    def get(self, catalog: Catalog) -> Explainer:
        key = id(catalog)  # the cached Explainer holds the catalog, so its id cannot be reused meanwhile
        if key not in self._by_catalog:
            self._by_catalog = {key: Explainer(catalog)}  # only the newest catalog is ever asked for again
        return self._by_catalog[key]
