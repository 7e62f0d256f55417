"""The catalog the gateway retrieves from: ids, text, brand, category, price, popularity, co-visitation.

Loaded from the Feast offline sources named in the registry (item_attributes, item_popularity and
the event log), so the gateway and training read the same files and a new item appears here as
soon as it is in the item source. Everything is column arrays indexed by an item's *position*:
filters become boolean masks and the ANN index stores positions.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from contract.item_text import catalog_texts

log = logging.getLogger(__name__)

COVISIT_EVENTS = ("CLICK", "ADD_TO_CART", "PURCHASE")
COVISIT_NEIGHBOURS = 20
COVISIT_MAX_SESSION_ITEMS = 30  # a basket of 300 items would add 90k pairs and say little


@dataclass(frozen=True)
class CatalogSources:
    items: Path
    popularity: Path
    events: Path

    @classmethod
    def from_feature_store(cls, store) -> "CatalogSources":
        return cls(
            items=Path(store.get_feature_view("item_attributes").batch_source.path),
            popularity=Path(store.get_feature_view("item_popularity").batch_source.path),
            events=Path(store.get_data_source("events_source").path),
        )

    def mtimes(self) -> tuple[float, ...]:
        return tuple(os.path.getmtime(p) if p.exists() else 0.0 for p in (self.items, self.popularity, self.events))


@dataclass(frozen=True)
class Catalog:
    item_ids: tuple[str, ...]
    position: dict[str, int]
    titles: np.ndarray  # object
    brands: np.ndarray  # object (None when unknown)
    categories: np.ndarray  # object
    prices: np.ndarray  # float64, NaN when unknown
    created: np.ndarray  # float64 epoch seconds
    texts: tuple[str, ...]  # contract.item_text: what the encoder embeds
    popularity: np.ndarray  # float32, latest popularity_7d (0 when none)
    popular: np.ndarray  # positions, most popular first
    covisit: dict[int, np.ndarray] = field(repr=False)  # position -> co-visited positions, strongest first
    source_mtimes: tuple[float, ...] = ()

    def __len__(self) -> int:
        return len(self.item_ids)

    def brands_lower(self) -> np.ndarray:
        return np.array([b.lower() if isinstance(b, str) else "" for b in self.brands], dtype=object)

    def vocabulary(self) -> tuple[list[str], list[str], dict[str, np.ndarray]]:
        """Brands, categories and each category's prices: the query parser's vocabulary."""
        brands = sorted({b for b in self.brands if isinstance(b, str) and b})
        cats = sorted({c for c in self.categories if isinstance(c, str) and c})
        prices = {c: self.prices[(self.categories == c) & ~np.isnan(self.prices)] for c in cats}
        return brands, cats, prices


def _latest_popularity(path: Path, item_ids: list[str]) -> np.ndarray:
    if not path.exists():
        return np.zeros(len(item_ids), dtype=np.float32)
    pop = pd.read_parquet(path, columns=["item_id", "popularity_7d", "event_timestamp"])
    latest = pop.sort_values("event_timestamp").drop_duplicates("item_id", keep="last").set_index("item_id")
    return latest["popularity_7d"].reindex(item_ids).fillna(0.0).to_numpy(np.float32)


def covisitation(events: pd.DataFrame, position: dict[str, int], k: int = COVISIT_NEIGHBOURS) -> dict[int, np.ndarray]:
    """Items touched (click/cart/purchase) in the same session, weighted 1/(1 + distance in the session)."""
    ev = events[events["event_type"].isin(COVISIT_EVENTS) & events["item_id"].notna()]
    ev = ev.sort_values(["session_id", "timestamp"], kind="stable").drop_duplicates(["session_id", "item_id"])
    ev = ev.assign(pos=ev["item_id"].map(position)).dropna(subset=["pos"])
    ev = ev.groupby("session_id", sort=False).tail(COVISIT_MAX_SESSION_ITEMS)
    ev = ev.assign(rank=ev.groupby("session_id", sort=False).cumcount())
    pairs = ev[["session_id", "pos", "rank"]].merge(ev[["session_id", "pos", "rank"]], on="session_id")
    pairs = pairs[pairs["pos_x"] != pairs["pos_y"]]
    if pairs.empty:
        return {}
    pairs = pairs.assign(w=1.0 / (1.0 + (pairs["rank_x"] - pairs["rank_y"]).abs()))
    weights = pairs.groupby(["pos_x", "pos_y"], sort=False)["w"].sum().reset_index()
    weights = weights.sort_values(["pos_x", "w"], ascending=[True, False]).groupby("pos_x").head(k)
    return {int(p): g["pos_y"].to_numpy(np.int64) for p, g in weights.groupby("pos_x")}


def epoch_seconds(timestamps: pd.Series) -> np.ndarray:
    """Unix seconds, whatever the column's unit: parquet files carry datetime64[us] as often as [ns],
    and a bare astype("int64") would return micro- or nanoseconds accordingly."""
    return pd.to_datetime(timestamps, utc=True).astype("datetime64[ns, UTC]").astype("int64").to_numpy() / 1e9


def load_catalog(sources: CatalogSources, order: tuple[str, ...] = ()) -> Catalog:
    """order: the ids of the catalog being replaced; they keep their positions (new items come
    after them), so an index over the old catalog stays valid and only needs the new items added."""
    t0 = time.perf_counter()
    mtimes = sources.mtimes()
    items = pd.read_parquet(sources.items)
    items = items.sort_values("event_timestamp", kind="stable").drop_duplicates("item_id", keep="last")
    if order:
        rank = {item_id: i for i, item_id in enumerate(order)}
        items = items.assign(_order=items["item_id"].map(rank).fillna(len(rank)))
        items = items.sort_values(["_order", "event_timestamp"], kind="stable").drop(columns="_order")
    items = items.reset_index(drop=True)
    ids = items["item_id"].astype(str).tolist()
    position = {item_id: i for i, item_id in enumerate(ids)}
    popularity = _latest_popularity(sources.popularity, ids)
    events = (pd.read_parquet(sources.events, columns=["session_id", "item_id", "event_type", "timestamp"])
              if sources.events.exists() else pd.DataFrame(columns=["session_id", "item_id", "event_type", "timestamp"]))
    catalog = Catalog(
        item_ids=tuple(ids),
        position=position,
        titles=items["title"].to_numpy(object),
        brands=items["brand"].to_numpy(object),
        categories=items["category"].to_numpy(object),
        prices=items["price"].astype("float64").to_numpy(),
        created=epoch_seconds(items["event_timestamp"]),
        texts=tuple(catalog_texts(items)),
        popularity=popularity,
        popular=np.argsort(-popularity, kind="stable"),
        covisit=covisitation(events, position),
        source_mtimes=mtimes,
    )
    log.info("catalog loaded: %d items, %d with co-visitation neighbours (%.1fs)",
             len(ids), len(catalog.covisit), time.perf_counter() - t0)
    return catalog
