"""The catalog the gateway retrieves from: ids, text, brand, category, price, popularity, co-visitation.

Read through a `sources.interface.CatalogSource` (in production Feast's offline store API over the
sources the registry names: item_attributes, item_popularity and the event log), so the gateway and
training read the same rows, whatever the offline store, and a new item appears here as soon as it
is in the item source. Everything is column arrays indexed by an item's *position*: filters become
boolean masks and the ANN index stores positions.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Hashable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from contract.item_text import catalog_texts
from contract.session import INTERACTION_EVENTS
from sources.interface import POPULARITY, CatalogSource

if TYPE_CHECKING:
    from feast import FeatureStore

log = logging.getLogger(__name__)

COVISIT_EVENTS = INTERACTION_EVENTS
COVISIT_NEIGHBOURS = 20
# Steps apart in a shopper's sequence that still count as co-visited; chosen on Online Retail's
# validation (bench/real_data_bench.py: window 10 beat 3 and 5).
COVISIT_WINDOW = 10
CATALOG_COLUMNS = ("title", "brand", "category", "price", "attributes")  # what catalog_texts and filters read


class CatalogSources:
    """The gateway's name for where its catalog comes from (gateway/server.py calls
    `CatalogSources.from_feature_store(store)`): the feature repo's Feast-backed CatalogSource."""

    @staticmethod
    def from_feature_store(store: FeatureStore) -> CatalogSource:
        # Imported here: importing gateway.catalog (cli/simulate.py wants epoch_seconds) stays light.
        from sources.feast_source import FeastCatalogSource

        return FeastCatalogSource.from_feature_store(store)


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
    source_version: Hashable = None  # the source's version() when this was read (reload when it moves)
    # position -> the weights of `covisit[position]` (same order); absent: rank-based weights 1/(1 + rank)
    covisit_weights: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

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


def _latest_popularity(source: CatalogSource, item_ids: list[str]) -> np.ndarray:
    latest = source.latest_popularity().set_index("item_id")
    return latest[POPULARITY].astype("float64").reindex(item_ids).fillna(0.0).to_numpy(np.float32)


def covisitation(events: pd.DataFrame, position: dict[str, int], k: int = COVISIT_NEIGHBOURS) -> dict[int, np.ndarray]:
    """Items touched near each other in a shopper's sequence, strongest first (`covisit_table`)."""
    return covisit_table(events, position, k)[0]


def covisit_table(events: pd.DataFrame, position: dict[str, int], k: int = COVISIT_NEIGHBOURS,
                  window: int = COVISIT_WINDOW) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """Per position, its top-k co-visited positions and their weights: items touched (click/cart/
    purchase) within `window` steps of each other in one shopper's time-ordered sequence (across
    sessions; anonymous events: within their session), each pair weighted 1/distance, summed.

    Across sessions because on real shops' logs a session is often one basket, and the next basket
    says most about it: co-visitation over shoppers' sequences (window 10) is the strongest single
    method of the Online Retail benchmark (bench/real_data_bench.py, docs/models.md)."""
    ev = events[events["event_type"].isin(COVISIT_EVENTS) & events["item_id"].notna()]
    ev = ev.assign(pos=ev["item_id"].map(position)).dropna(subset=["pos"])
    if ev.empty:
        return {}, {}
    users = ev["user_id"].astype("string").fillna("") if "user_id" in ev else pd.Series("", index=ev.index)
    who = ("u:" + users).where(users != "", "s:" + ev["session_id"].astype("string").fillna(""))
    ev = ev.assign(who=who).sort_values(["who", "timestamp"], kind="stable")
    who_arr, pos_arr = ev["who"].to_numpy(), ev["pos"].to_numpy(np.int64)
    repeat = np.r_[False, (who_arr[1:] == who_arr[:-1]) & (pos_arr[1:] == pos_arr[:-1])]
    who_arr, pos_arr = who_arr[~repeat], pos_arr[~repeat]  # the same item twice in a row: once
    xs, ys, ws = [], [], []
    for d in range(1, window + 1):
        if len(pos_arr) <= d:
            break
        same = (who_arr[d:] == who_arr[:-d]) & (pos_arr[d:] != pos_arr[:-d])
        a, b = pos_arr[:-d][same], pos_arr[d:][same]
        xs += [a, b]
        ys += [b, a]
        ws += [np.full(len(a), 1.0 / d)] * 2
    if not xs or sum(len(x) for x in xs) == 0:
        return {}, {}
    pairs = pd.DataFrame({"pos_x": np.concatenate(xs), "pos_y": np.concatenate(ys), "w": np.concatenate(ws)})
    weights = pairs.groupby(["pos_x", "pos_y"], sort=False)["w"].sum().reset_index()
    weights = weights.sort_values(["pos_x", "w", "pos_y"], ascending=[True, False, True]).groupby("pos_x").head(k)
    groups = weights.groupby("pos_x")
    return ({int(p): g["pos_y"].to_numpy(np.int64) for p, g in groups},
            {int(p): g["w"].to_numpy(np.float32) for p, g in groups})


def epoch_seconds(timestamps: pd.Series) -> np.ndarray:
    """Unix seconds, whatever the column's unit: parquet files carry datetime64[us] as often as [ns],
    and a bare astype("int64") would return micro- or nanoseconds accordingly."""
    return pd.to_datetime(timestamps, utc=True).astype("datetime64[ns, UTC]").astype("int64").to_numpy() / 1e9


def load_catalog(source: CatalogSource, order: tuple[str, ...] = (), covisit_since: datetime | None = None,
                 covisit_neighbours: int = COVISIT_NEIGHBOURS) -> Catalog:
    """order: the ids of the catalog being replaced; they keep their positions (new items come
    after them), so an index over the old catalog stays valid and only needs the new items added.
    covisit_since: co-visitation from the events since then (None: all of them); covisit_neighbours:
    how many co-visited items each item keeps."""
    t0 = time.perf_counter()
    version = source.version()  # before the reads: a change during them shows as a change next time
    items = source.latest_items(CATALOG_COLUMNS)
    # The source returns rows in any order: creation time, then id, is the order of new items
    # (deterministic whatever the offline store; the ANN index stores positions).
    items = items.sort_values(["event_timestamp", "item_id"], kind="stable")
    if order:
        rank = {item_id: i for i, item_id in enumerate(order)}
        items = items.assign(_order=items["item_id"].map(rank).fillna(len(rank)))
        items = items.sort_values("_order", kind="stable").drop(columns="_order")
    items = items.reset_index(drop=True)
    ids = items["item_id"].astype(str).tolist()
    position = {item_id: i for i, item_id in enumerate(ids)}
    popularity = _latest_popularity(source, ids)
    events = source.events(covisit_since)
    covisit, covisit_weights = covisit_table(events, position, covisit_neighbours)
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
        covisit=covisit,
        source_version=version,
        covisit_weights=covisit_weights,
    )
    log.info("catalog loaded: %d items, %d with co-visitation neighbours (%.1fs)",
             len(ids), len(catalog.covisit), time.perf_counter() - t0)
    return catalog
