"""What the ranker sees for one (request, item): a context text, the item text, numeric features.

Shared by training (features from Feast's point-in-time join) and serving (features from the fast
online reader): both pass feature rows keyed by Feast feature names, so the two cannot drift.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from contract.scores import POPULARITY_SCALE

NUMERIC_FEATURES = (
    "text_similarity",  # bi-encoder cosine(context, item): the retrieval score, free at serving time
    "log_price",
    "popularity_7d",
    "ctr_7d",
    "user_category_affinity",
    "user_brand_affinity",
    "price_fit",
    "session_category_share",
)

# The ranker's validation verdict, as a parameter of the `ranker` ensemble's config (value "true" or
# "false"): written by the publisher from the version's validation.json (modelrepo/layout.py), read
# by the gateway, which applies a ranker in mode auto only when its served version says "true".
RANKER_VERDICT_PARAMETER = "beats_blend"


def _seq(v: Any) -> Sequence:
    # Feast/pandas give lists, numpy arrays, tuples or None/NaN for missing list features.
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ()
    return list(v)


def _num(v: Any, default: float = 0.0) -> float:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return default
    return default if math.isnan(x) else x


def context_text(query: str | None, user: Mapping[str, Any]) -> str:
    """Query plus a compact reading of the user's taste and session, e.g.
    'trail running shoes | likes Running Shoes, Jackets | brands Nike, Hoka | mid price | session: rain jacket'."""
    parts = [query.strip() if query else "no query"]
    cats = list(_seq(user.get("top_categories")))[:3]
    if cats:
        parts.append("likes " + ", ".join(cats))
    brands = list(_seq(user.get("top_brands")))[:3]
    if brands:
        parts.append("brands " + ", ".join(brands))
    band = user.get("price_band")
    if isinstance(band, str) and band:
        parts.append(f"{band} price")
    recent = [q for q in _seq(user.get("recent_queries")) if q and q != query][:2]
    if recent:
        parts.append("session: " + "; ".join(recent))
    return " | ".join(parts)


def numeric_features(item: Mapping[str, Any], user: Mapping[str, Any], text_similarity: float = 0.0) -> list[float]:
    """NUMERIC_FEATURES for one item and user, scaled to roughly unit range; missing -> neutral 0.

    text_similarity: cosine of the encoder's embeddings of the context text and the item text. It
    gives the fresh ranker head a strong relevance signal from step one; the cross-encoder learns
    finer distinctions on top of it.
    """
    price = _num(item.get("price"))
    category, brand = item.get("category"), item.get("brand")
    cat_aff = dict(zip(_seq(user.get("top_categories")), _seq(user.get("top_category_scores"))))
    brand_aff = dict(zip(_seq(user.get("top_brands")), _seq(user.get("top_brand_scores"))))
    avg_price = _num(user.get("avg_price"))
    price_fit = -abs(math.log(max(price, 0.01) / avg_price)) if avg_price > 0 and price > 0 else 0.0
    sess = dict(zip(_seq(user.get("session_categories")), _seq(user.get("session_category_counts"))))
    total = sum(_num(v) for v in sess.values())
    return [
        float(text_similarity),
        math.log1p(max(price, 0.0)) / 8.0,
        _num(item.get("popularity_7d")) / POPULARITY_SCALE,
        _num(item.get("ctr_7d")) * 5.0,
        _num(cat_aff.get(category)),
        _num(brand_aff.get(brand)),
        max(price_fit, -3.0) / 3.0,
        _num(sess.get(category)) / total if total else 0.0,
    ]
