"""The catalog source's consumers (the gateway's catalog and refresh, the feedback service's
categories) on the in-memory CatalogSource: no Feast, no files, no Triton."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from feedback.sessions import SessionUpdater, load_categories
from gateway.catalog import load_catalog
from gateway.state import ServingState
from sources.interface import EVENT_COLUMNS, CatalogSource
from sources.memory import InMemoryCatalogSource

T0 = datetime(2026, 11, 1, tzinfo=timezone.utc)


def _ts(hours: float) -> pd.Timestamp:
    return pd.Timestamp(T0 + timedelta(hours=hours))


def _item(item_id: str, hours: float, title: str | None = None, category: str = "Tents", brand: str | None = "Osprey",
          price: float = 100.0) -> dict:
    return {"item_id": item_id, "title": title or f"Item {item_id}", "description": "", "category": category,
            "brand": brand, "price": price, "attributes": "{}", "event_timestamp": _ts(hours)}


def _items(*rows: dict) -> pd.DataFrame:
    return pd.DataFrame(list(rows))


def _events(rows: list[tuple[str, str, str, float]]) -> pd.DataFrame:
    """(session, item, type, hours) -> an event frame."""
    return pd.DataFrame([{"session_id": s, "item_id": i, "event_type": t, "timestamp": _ts(h)} for s, i, t, h in rows],
                        columns=list(EVENT_COLUMNS))


def _shop() -> InMemoryCatalogSource:
    items = _items(_item("a", 0), _item("b", 1), _item("c", 2, category="Boots"),
                   _item("a", 5, title="Item a, renamed", category="Backpacks"))  # a's newest row wins
    popularity = pd.DataFrame([{"item_id": "a", "popularity_7d": 1.0, "event_timestamp": _ts(0)},
                               {"item_id": "a", "popularity_7d": 3.0, "event_timestamp": _ts(24)},
                               {"item_id": "c", "popularity_7d": 2.0, "event_timestamp": _ts(24)}])
    events = _events([("s1", "a", "CLICK", 1), ("s1", "b", "ADD_TO_CART", 2), ("s1", "x", "CLICK", 2.5),
                      ("s2", "b", "CLICK", 30), ("s2", "c", "PURCHASE", 31), ("s2", "a", "IMPRESSION", 31)])
    return InMemoryCatalogSource(items, popularity, events)


def test_the_in_memory_source_is_a_catalog_source():
    assert isinstance(_shop(), CatalogSource)


def test_catalog_reads_each_items_newest_row_and_its_newest_popularity():
    catalog = load_catalog(_shop())
    assert catalog.item_ids == ("b", "c", "a")  # by creation (newest row) time: a was rewritten last
    a = catalog.position["a"]
    assert catalog.titles[a] == "Item a, renamed" and catalog.categories[a] == "Backpacks"
    assert catalog.popularity.tolist() == [0.0, 2.0, 3.0]  # b has none
    assert [catalog.item_ids[p] for p in catalog.popular] == ["a", "c", "b"]
    assert catalog.created[a] == _ts(5).timestamp()
    assert catalog.source_version == 0


def test_covisitation_comes_from_the_events_the_source_returns():
    catalog = load_catalog(_shop())
    # s1: a, b (x is not in the catalog); s2: b, c (the impression does not count)
    assert _neighbours(catalog) == {"a": {"b"}, "b": {"a", "c"}, "c": {"b"}}
    recent = load_catalog(_shop(), covisit_since=T0 + timedelta(hours=24))
    assert _neighbours(recent) == {"b": {"c"}, "c": {"b"}}


def _neighbours(catalog) -> dict[str, set[str]]:
    return {catalog.item_ids[p]: {catalog.item_ids[x] for x in v} for p, v in catalog.covisit.items()}


def test_a_reload_keeps_the_old_positions_and_appends_new_items():
    source = _shop()
    first = load_catalog(source)
    source.put(items=_items(_item("z", -10), _item("b", 1), _item("c", 2), _item("a", 5), _item("y", 50)))
    again = load_catalog(source, order=first.item_ids)
    assert again.item_ids == ("b", "c", "a", "z", "y")  # z is old but new here: after the known ones
    assert again.source_version == 1 != first.source_version


def test_an_empty_popularity_and_event_history_is_served():
    catalog = load_catalog(InMemoryCatalogSource(_items(_item("a", 0), _item("b", 1))))
    assert catalog.popularity.tolist() == [0.0, 0.0] and catalog.covisit == {}


def test_the_source_filters_events_by_time_and_takes_naive_times_as_utc():
    source = _shop()
    assert len(source.events()) == 6
    assert sorted(source.events(T0 + timedelta(hours=30))["item_id"]) == ["a", "b", "c"]
    assert len(source.events((T0 + timedelta(hours=30)).replace(tzinfo=None))) == 3
    assert list(source.latest_items(["category"]).columns) == ["item_id", "category", "event_timestamp"]


def test_feedback_categories_are_each_items_newest_category():
    assert load_categories(_shop()) == {"a": "Backpacks", "b": "Tents", "c": "Boots"}


def test_session_features_use_the_sources_categories():
    updater = SessionUpdater(store=None, categories=load_categories(_shop()))
    rows = updater.apply([{"event_type": "CLICK", "user_id": "u1", "session_id": "s1", "item_id": "a",
                           "timestamp": T0.isoformat()}])
    assert rows.iloc[0]["session_categories"] == ["Backpacks"]


class FakeTriton:
    """The two calls ServingState makes: which encoder serves, and embed (a vector per text)."""

    encoder_model = "encoder"

    def __init__(self) -> None:
        self.embedded: list[str] = []

    async def serving_version(self, ensemble: str, component: str, timeout_s: float = 2.0) -> str:
        return "1"

    async def embed(self, texts: list[str], timeout_s: float, version: str) -> np.ndarray:
        self.embedded += texts
        rng = [np.random.default_rng(abs(hash(t)) % 2**32).standard_normal(8) for t in texts]
        return np.stack([v / np.linalg.norm(v) for v in rng]).astype(np.float32)


def test_the_gateway_reloads_only_when_the_source_version_moves(tmp_path: Path):
    async def scenario() -> None:
        source, triton = _shop(), FakeTriton()
        state = ServingState(source, triton, tmp_path)  # type: ignore[arg-type]
        await state.load()
        reads = source.reads
        assert await state.refresh() == "unchanged" and source.reads == reads  # a version check, no read
        source.put(items=_items(_item("a", 5, title="Item a, renamed", category="Backpacks"), _item("b", 1),
                                _item("c", 2, category="Boots"), _item("n", 60, title="Brand new tent")))
        triton.embedded.clear()
        assert await state.refresh() == "added 1 new items"
        assert state.snapshot is not None and state.snapshot.catalog.item_ids[-1] == "n"
        assert len(state.snapshot.index) == 4 and len(triton.embedded) == 1  # only the new item was embedded
        assert await state.refresh() == "unchanged"

    asyncio.run(scenario())


@pytest.mark.parametrize("columns", [None, ["category"], ["title", "price"]])
def test_latest_items_returns_the_columns_asked_for(columns):
    frame = _shop().latest_items(columns)
    expected = ["item_id", "title", "description", "category", "brand", "price", "attributes", "event_timestamp"]
    assert list(frame.columns) == (expected if columns is None else ["item_id", *columns, "event_timestamp"])
    assert sorted(frame["item_id"]) == ["a", "b", "c"]
