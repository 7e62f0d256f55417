"""The synthetic shop: reproducible, valid, and carrying the signals the models must learn."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import numpy as np
import pandas as pd
import pytest

from scorer.data import vocab
from scorer.data.importer import load_and_validate
from scorer.data.synthetic import SIZES, generate_shop

END = datetime(2026, 11, 1, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def shop():
    return generate_shop("tiny", seed=3, end=END)


@pytest.fixture(scope="module")
def small():
    # Big enough for the statistical checks to be far from noise.
    return generate_shop("small", seed=5, end=END)


def test_same_seed_same_shop(shop):
    again = generate_shop("tiny", seed=3, end=END)
    pd.testing.assert_frame_equal(shop.items, again.items)
    pd.testing.assert_frame_equal(shop.events, again.events)
    other = generate_shop("tiny", seed=4, end=END)
    assert not shop.events["event_id"].isin(other.events["event_id"]).any()


def test_sizes_and_period(shop):
    spec = SIZES["tiny"]
    assert len(shop.items) == spec.n_items and len(shop.users) == spec.n_users
    ts = shop.events["timestamp"]
    assert ts.max() <= pd.Timestamp(END) and ts.min() >= pd.Timestamp(END - timedelta(days=spec.n_days))
    assert set(shop.events["event_type"]) == {"QUERY", "IMPRESSION", "CLICK", "ADD_TO_CART", "PURCHASE"}
    assert shop.items["category"].nunique() == len(vocab.CATEGORIES)


def test_output_passes_the_import_validation(shop, tmp_path):
    shop.write(tmp_path)
    data = load_and_validate(tmp_path)
    assert len(data.events) == len(shop.events)


def test_impressions_carry_request_and_position(shop):
    imp = shop.events[shop.events["event_type"] == "IMPRESSION"]
    assert imp["request_id"].notna().all()
    assert imp.groupby("request_id")["position"].apply(lambda p: sorted(p) == list(range(1, len(p) + 1))).all()
    clicks = shop.events[shop.events["event_type"] == "CLICK"]
    shown = set(zip(imp["request_id"], imp["item_id"]))
    assert all(pair in shown for pair in zip(clicks["request_id"], clicks["item_id"]))  # clicks are attributable


def _impressions_with_clicks(shop) -> pd.DataFrame:
    ev = shop.events
    imp = ev[ev["event_type"] == "IMPRESSION"][["request_id", "item_id", "user_id", "query", "position"]]
    clicks = ev[ev["event_type"] == "CLICK"][["request_id", "item_id"]].drop_duplicates().assign(clicked=1)
    out = imp.merge(clicks, on=["request_id", "item_id"], how="left").fillna({"clicked": 0})
    return out.merge(shop.items[["item_id", "title", "brand", "price", "category"]], on="item_id")


def test_text_match_is_learnable(small):
    """Items whose title contains the query's product type are clicked far more often."""
    df = _impressions_with_clicks(small)
    df = df[df["query"].notna()]
    types = [t for c in vocab.CATEGORIES for t in c.types]
    qtype = df["query"].map(lambda q: next((t for t in sorted(types, key=len, reverse=True) if t in q), None))
    has = qtype.notna()
    match = df[has].apply(lambda r: qtype[r.name].lower() in r["title"].lower(), axis=1)
    ctr_match, ctr_other = df[has][match]["clicked"].mean(), df[has][~match]["clicked"].mean()
    assert ctr_match > 1.5 * ctr_other, (ctr_match, ctr_other)


def test_personalization_is_learnable(small):
    """The same user clicks their (hidden) favourite brands more often than other brands."""
    df = _impressions_with_clicks(small)
    fav = dict(zip(small.user_latent["user_id"], small.user_latent["fav_brands"]))
    is_fav = df.apply(lambda r: r["brand"] in fav[r["user_id"]], axis=1)
    ctr_fav, ctr_other = df[is_fav]["clicked"].mean(), df[~is_fav]["clicked"].mean()
    assert ctr_fav > 1.5 * ctr_other, (ctr_fav, ctr_other)


def test_position_bias(small):
    df = _impressions_with_clicks(small)
    by_pos = df.groupby("position")["clicked"].mean()
    assert by_pos.iloc[0] > 1.3 * by_pos.iloc[-1]


def test_cold_start_users_and_new_items_exist(small):
    start = pd.Timestamp(END - timedelta(days=SIZES["small"].n_days))
    holdout_start = start + (pd.Timestamp(END) - start) * 0.8
    first_seen = small.events.groupby("user_id")["timestamp"].min()
    late = (first_seen >= holdout_start).sum()
    assert late >= 0.05 * len(small.users)  # users with no history before the last 20% of the period
    new_items = (small.items["created_at"] > start).sum()
    assert new_items >= 0.04 * len(small.items)
    # New items only appear in events after they were created.
    ev = small.events.merge(small.items[["item_id", "created_at"]], on="item_id")
    assert (ev["timestamp"] >= ev["created_at"]).all()


def test_preferences_drift_for_some_users(small):
    lat = small.user_latent
    drifting = lat[lat["drift"] > 0]
    assert 0.3 < len(drifting) / len(lat) < 0.7
    change = [np.abs(np.array(a) - np.array(b)).sum() for a, b in zip(drifting["cat_pref0"], drifting["cat_pref1"])]
    assert np.median(change) > 0.5
