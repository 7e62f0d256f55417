"""Batch feature engineering: events + items -> the feature tables the Feast feature views read.

Every table carries `event_timestamp` = the moment its values became true, so Feast's point-in-time
join gives a training row only what was known at the label's time:
- item_features:   one row per item, as of its creation.
- item_popularity: a snapshot per item at each day's end (windowed counts).
- user_profile:    a snapshot per user at the end of each day the user was active (cumulative).
- user_session:    a snapshot after every query / click / cart / purchase (the same values the
                   feedback service pushes live, so training and serving see the same features).

Serving a backfill (`as_of`): the profile-like tables (user_profile, item_popularity) also get one
*current* snapshot per entity stamped at the import's as-of time (default: the moment of the import),
holding the state at the end of the log. Feast's TTLs count from a row's timestamp, so without it a
log whose events are months old would be materialized as expired everywhere; with it the profile is
fresh for its TTL from the import, as a snapshot taken "now" is. Historical snapshots keep their true
times, so point-in-time joins for training are unchanged (every label lies before the as-of row).
The session view keeps true event times: an old session is correctly expired.
"""

from __future__ import annotations

from collections import Counter, deque

import numpy as np
import pandas as pd

from contract.session import SessionState
from scorer.data.labels import attribute
from scorer.data.offline_schema import SCHEMAS

# The profile's newest distinct items, newest first. 100, not 20: the learned fusion's "bought it
# before, and how long ago" features read this list, and on Online Retail (re-buying is much of the
# trade) the whole recent history scored +0.0075 NDCG@10 over the newest 20 (docs/models.md, "The
# learned fusion, served"). The interest model and the co-visitation seeds read only its head.
PROFILE_RECENT_ITEMS = 100
PROFILE_TOP_K = 5
# How much each interaction says about taste (impressions say nothing on their own).
INTERACTION_WEIGHT = {"CLICK": 1.0, "ADD_TO_CART": 3.0, "PURCHASE": 5.0}
PROFILE_HALF_LIFE_DAYS = 14.0
UNKNOWN_CREATED_AT = pd.Timestamp("2000-01-01", tz="UTC")


def _us(s: pd.Series) -> pd.Series:
    return pd.to_datetime(s, utc=True).astype("datetime64[us, UTC]")


def item_features(items: pd.DataFrame) -> pd.DataFrame:
    out = items[["item_id", "title", "description", "category", "brand", "price"]].copy()
    out["attributes"] = items["attributes"]  # already normalised JSON text
    out["price"] = out["price"].astype("float64")
    out["event_timestamp"] = _us(items["created_at"].fillna(UNKNOWN_CREATED_AT))
    return out


def _day_ends(events: pd.DataFrame) -> pd.DatetimeIndex:
    first = events["timestamp"].min().floor("D")
    last = events["timestamp"].max()
    ends = pd.date_range(first + pd.Timedelta(days=1), last.ceil("D"), freq="D", tz="UTC")
    # The last snapshot is at the newest event, never in the future of the data.
    return ends[:-1].append(pd.DatetimeIndex([last])) if len(ends) else pd.DatetimeIndex([last])


def item_popularity(events: pd.DataFrame) -> pd.DataFrame:
    """Windowed counts per item at each day end: 7-day impressions/clicks/carts/purchases, 30-day purchases."""
    ev = events[events["item_id"].notna()]
    if ev.empty:
        return _empty_popularity()
    ends = _day_ends(events)
    day = np.searchsorted(ends.asi8, ev["timestamp"].astype("datetime64[ns, UTC]").array.asi8, side="left")
    items = pd.Index(sorted(ev["item_id"].unique()))
    item_pos = items.get_indexer(ev["item_id"])
    n_days = len(ends)
    counts = {}
    for etype in ("IMPRESSION", "CLICK", "ADD_TO_CART", "PURCHASE"):
        mask = (ev["event_type"] == etype).to_numpy()
        grid = np.zeros((len(items), n_days))
        np.add.at(grid, (item_pos[mask], day[mask]), 1.0)
        counts[etype] = grid
    win7 = {k: _rolling(g, 7) for k, g in counts.items()}
    purchases_30d = _rolling(counts["PURCHASE"], 30)
    active = (_rolling(counts["IMPRESSION"] + counts["CLICK"], 30) + purchases_30d) > 0
    ii, dd = np.nonzero(active)
    imp, clk = win7["IMPRESSION"][ii, dd], win7["CLICK"][ii, dd]
    crt, pur = win7["ADD_TO_CART"][ii, dd], win7["PURCHASE"][ii, dd]
    out = pd.DataFrame(
        {
            "item_id": items[ii],
            "impressions_7d": imp.astype("int64"),
            "clicks_7d": clk.astype("int64"),
            "carts_7d": crt.astype("int64"),
            "purchases_7d": pur.astype("int64"),
            "purchases_30d": purchases_30d[ii, dd].astype("int64"),
            # Smoothed towards a 5% prior so 1 click out of 1 impression is not "100% CTR".
            "ctr_7d": ((clk + 1.0) / (imp + 20.0)).astype("float32"),
            "popularity_7d": np.log1p(clk + 3.0 * crt + 5.0 * pur).astype("float32"),
            "event_timestamp": _us(pd.Series(ends[dd])),
        }
    )
    return out.sort_values(["event_timestamp", "item_id"], kind="stable").reset_index(drop=True)


def _empty_popularity() -> pd.DataFrame:
    return SCHEMAS["item_popularity"].empty_table().to_pandas()


def _rolling(grid: np.ndarray, window: int) -> np.ndarray:
    c = np.cumsum(grid, axis=1)
    shifted = np.zeros_like(c)
    shifted[:, window:] = c[:, :-window]
    return c - shifted


def user_profile(items: pd.DataFrame, events: pd.DataFrame) -> pd.DataFrame:
    """Cumulative, time-decayed taste per user, snapshotted at the end of each active day."""
    ev = events[events["event_type"].isin(list(INTERACTION_WEIGHT))].merge(
        items[["item_id", "category", "brand", "price"]], on="item_id", how="left"
    )
    if ev.empty:
        return SCHEMAS["user_profile"].empty_table().to_pandas()
    # Price position of an item within its category, in log space: < 0 cheaper than typical.
    # Items without a price (NaN) count for taste but not for price: they are left out of the
    # price averages, and a user who only touched unpriced items has no price band (None).
    median = items.groupby("category")["price"].median()
    ev["price_pos"] = np.log((ev["price"].clip(lower=0.01)) / ev["category"].map(median).clip(lower=0.01))
    ev["w"] = ev["event_type"].map(INTERACTION_WEIGHT)
    ends = _day_ends(events)
    ev["snap"] = ends[np.searchsorted(ends.asi8, ev["timestamp"].astype("datetime64[ns, UTC]").array.asi8)]
    ev = ev.sort_values("timestamp", kind="stable")
    rows = []
    for user_id, g in ev.groupby("user_id", sort=True):
        ts = g["timestamp"].astype("datetime64[ns, UTC]").array.asi8 / 86400e9
        for snap in g["snap"].unique():
            upto = (g["snap"] <= snap).to_numpy()
            h = g[upto]
            decay = 0.5 ** ((snap.value / 86400e9 - ts[upto]) / PROFILE_HALF_LIFE_DAYS)
            w = h["w"].to_numpy() * decay
            cats = _top_scores(h["category"].to_numpy(), w)
            brands = _top_scores(h["brand"].to_numpy(), w)
            price_pos = _weighted_mean(h["price_pos"].to_numpy(), w)
            avg_price = _weighted_mean(h["price"].to_numpy(dtype=float), w)
            recent = list(dict.fromkeys(h["item_id"].to_numpy()[::-1]))[:PROFILE_RECENT_ITEMS]
            kinds = Counter(h["event_type"])
            rows.append(
                {
                    "user_id": user_id,
                    "top_categories": [c for c, _ in cats],
                    "top_category_scores": [s for _, s in cats],
                    "top_brands": [b for b, _ in brands],
                    "top_brand_scores": [s for _, s in brands],
                    "avg_price": avg_price,
                    "price_band": None if np.isnan(price_pos) else
                    "budget" if price_pos < -0.25 else "premium" if price_pos > 0.25 else "mid",
                    "n_clicks": int(kinds["CLICK"]),
                    "n_carts": int(kinds["ADD_TO_CART"]),
                    "n_purchases": int(kinds["PURCHASE"]),
                    "recent_item_ids": recent,
                    "event_timestamp": snap,
                }
            )
    out = pd.DataFrame(rows)
    out["event_timestamp"] = _us(out["event_timestamp"])
    return out


def _weighted_mean(values: np.ndarray, weights: np.ndarray) -> float:
    """Weighted mean over the finite values; NaN when there is none (no known price)."""
    known = np.isfinite(values)
    if not known.any() or weights[known].sum() <= 0:
        return float("nan")
    return float(np.average(values[known], weights=weights[known]))


def _top_scores(keys: np.ndarray, weights: np.ndarray) -> list[tuple[str, float]]:
    """Top-K keys by summed weight, with scores normalised to sum to 1 over all keys."""
    totals: dict[str, float] = {}
    for k, w in zip(keys, weights):
        if isinstance(k, str) and k:
            totals[k] = totals.get(k, 0.0) + float(w)
    norm = sum(totals.values()) or 1.0
    best = sorted(totals.items(), key=lambda kv: (-kv[1], kv[0]))[:PROFILE_TOP_K]
    return [(k, round(v / norm, 4)) for k, v in best]


def user_session(items: pd.DataFrame, events: pd.DataFrame) -> pd.DataFrame:
    ev = events[events["event_type"] != "IMPRESSION"].sort_values("timestamp", kind="stable")
    category = dict(zip(items["item_id"], items["category"]))
    states: dict[str, SessionState] = {}
    rows = []
    for user_id, session_id, etype, item_id, query, ts in ev[
        ["user_id", "session_id", "event_type", "item_id", "query", "timestamp"]
    ].itertuples(index=False):
        state = states.get(user_id)
        if state is None or state.session_id != session_id:
            state = states[user_id] = SessionState(session_id)
        state.apply(etype, item_id, query, category.get(item_id))
        rows.append({"user_id": user_id, **state.features(), "event_timestamp": ts})
    out = pd.DataFrame(rows)
    if out.empty:
        return SCHEMAS["user_session"].empty_table().to_pandas()
    out["event_timestamp"] = _us(out["event_timestamp"])
    # Two events of a user in the same microsecond: keep the last state (Feast keeps one row).
    return out.drop_duplicates(["user_id", "event_timestamp"], keep="last").reset_index(drop=True)


def current_snapshot(table: pd.DataFrame, key: str, as_of: pd.Timestamp, final_only: bool = False) -> pd.DataFrame:
    """`table` plus, per entity, its latest row re-stamped at `as_of` (see the module docstring).

    final_only: only entities that have a row at the table's newest time (item popularity: the
    windows measured back from the end of the log; an item idle by then has no current row).
    A user profile needs no recomputation at `as_of`: its decay is relative, so later snapshots of
    an unchanged history have the same normalised scores and weighted averages.
    """
    if table.empty:
        return table
    as_of = pd.Timestamp(as_of).tz_convert("UTC")
    latest = table.sort_values("event_timestamp", kind="stable").drop_duplicates(key, keep="last")
    if final_only:
        latest = latest[latest["event_timestamp"] == table["event_timestamp"].max()]
    latest = latest[latest["event_timestamp"] < as_of]
    current = latest.assign(event_timestamp=as_of).astype({"event_timestamp": "datetime64[us, UTC]"})
    return pd.concat([table, current], ignore_index=True)


def build_all(items: pd.DataFrame, events: pd.DataFrame, progress=None,
              as_of: pd.Timestamp | None = None) -> dict[str, pd.DataFrame]:
    """Every derived table; with `as_of`, user_profile and item_popularity also get their current
    snapshot at that time (it must not be before the newest event)."""
    say = progress or (lambda msg: None)
    if as_of is not None and len(events) and as_of < events["timestamp"].max():
        raise ValueError(f"as-of time {as_of} is before the newest event ({events['timestamp'].max()}): "
                         "a snapshot then would not include every event")
    say("item features")
    tables = {"item_features": item_features(items)}
    say("item popularity")
    tables["item_popularity"] = item_popularity(events)
    say("user profiles")
    tables["user_profile"] = user_profile(items, events)
    if as_of is not None:
        tables["item_popularity"] = current_snapshot(tables["item_popularity"], "item_id", as_of, final_only=True)
        tables["user_profile"] = current_snapshot(tables["user_profile"], "user_id", as_of)
    say("session snapshots")
    tables["user_session"] = user_session(items, events)
    say("labels (attribution windows)")
    tables["labels"] = attribute(events)
    return tables

