"""bench/tune_fusion_scores.py: the per-source scores it fuses are the ones the gateway sorted by,
and its normalisations keep what the experiment's variants assume."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import numpy as np
import pandas as pd

from bench.tune_fusion_scores import _minmax, _unit_range, _z
from gateway.retrieval import covisit_scores
from gateway.catalog import load_catalog
from gateway.retrieval import covisit_neighbours
from sources.interface import EVENT_COLUMNS
from sources.memory import InMemoryCatalogSource

T0 = datetime(2026, 11, 1, tzinfo=timezone.utc)


def _catalog():
    ids = [f"i{j}" for j in range(8)]
    items = pd.DataFrame([{"item_id": i, "title": f"Item {i}", "description": "", "category": "c", "brand": "b",
                           "price": 1.0, "attributes": "{}", "event_timestamp": pd.Timestamp(T0)} for i in ids])
    popularity = pd.DataFrame([{"item_id": i, "popularity_7d": float(j), "event_timestamp": pd.Timestamp(T0)}
                               for j, i in enumerate(ids)])
    rng = np.random.default_rng(0)
    rows = []
    for s in range(30):  # sessions of 2-4 random items: uneven co-visitation
        for n, j in enumerate(rng.choice(8, size=int(rng.integers(2, 5)), replace=False)):
            rows.append({"session_id": f"s{s}", "item_id": ids[j], "event_type": "CLICK",
                         "timestamp": pd.Timestamp(T0 + timedelta(minutes=10 * s + n))})
    events = pd.DataFrame(rows, columns=list(EVENT_COLUMNS))
    return load_catalog(InMemoryCatalogSource(items, popularity, events))


def test_the_recomputed_covisitation_scores_order_the_source_as_the_gateway_does():
    snap = SimpleNamespace(catalog=_catalog())
    allowed = np.ones(len(snap.catalog.item_ids), dtype=bool)
    for seeds in ([0], [3, 1], [5, 2, 7], [6, 0, 4, 1]):
        for decay in (0.2, 0.8):
            got = covisit_neighbours(snap, seeds, 100, allowed, decay).tolist()
            scores = covisit_scores(snap, seeds, decay)
            assert len(got) >= 2 and set(got) == set(scores)
            assert [scores[p] for p in got] == sorted(scores.values(), reverse=True)


def test_normalisations():
    x = np.array([2.0, np.nan, 4.0, 3.0])
    np.testing.assert_allclose(_minmax(x), [0.0, 0.0, 1.0, 0.5])  # not found: 0
    np.testing.assert_allclose(_minmax(np.array([5.0, np.nan])), [1.0, 0.0])  # one value: 1
    z = _z(x)
    assert z[1] == z[0] == z.min() and z[2] > z[3] > z[0]  # not found: the source's lowest z
    np.testing.assert_allclose(_z(np.array([np.nan, 1.0])), [0.0, 0.0])  # one found: no spread, no signal
    np.testing.assert_allclose(_unit_range(np.array([-1.0, 1.0, 0.0])), [0.0, 1.0, 0.5])
