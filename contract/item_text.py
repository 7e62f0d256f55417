"""The text a model reads for an item. Training, catalog embedding and ranking must all use this one
function: an encoder fine-tuned on one wording and served another silently loses quality."""

from __future__ import annotations

import json
from typing import Any


def item_text(title: str, brand: str | None = None, category: str | None = None,
              attributes: str | dict[str, str] | None = None, price: float | None = None) -> str:
    """'Title | brand Nike | Running Shoes | colour: blue, features: waterproof | price 119.99'."""
    parts = [title.strip()]
    if brand:
        parts.append(f"brand {brand}")
    if category:
        parts.append(category)
    attrs = json.loads(attributes) if isinstance(attributes, str) and attributes else attributes or {}
    if attrs:
        parts.append(", ".join(f"{k}: {v}" for k, v in sorted(attrs.items())))
    if price is not None and price == price:  # not NaN
        parts.append(f"price {price:.2f}")
    return " | ".join(parts)


def item_text_from_features(f: dict[str, Any]) -> str:
    """From a feature row (Feast item_attributes names)."""
    return item_text(f.get("title") or "", f.get("brand"), f.get("category"), f.get("attributes"), f.get("price"))


def catalog_texts(items) -> list[str]:
    """item_text for every row of a frame with item_attributes columns (title, brand, ...)."""
    return [item_text(t if isinstance(t, str) else "", b, c, a, p) for t, b, c, a, p in
            zip(items["title"], items["brand"], items["category"], items["attributes"], items["price"])]
