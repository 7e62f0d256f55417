"""A CatalogSource over frames held in memory: unit tests give the catalog and the sessions the
rows they need, with no Feast, files or offline store."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import pandas as pd

from sources.interface import (EVENT_COLUMNS, EVENT_TIMESTAMP, ITEM_ID, ITEM_TIMESTAMP, POPULARITY, empty_events,
                               empty_popularity)


def latest_per_item(frame: pd.DataFrame) -> pd.DataFrame:
    """Each item's newest row (the last one in frame order among equal timestamps)."""
    return (frame.sort_values(ITEM_TIMESTAMP, kind="stable").drop_duplicates(ITEM_ID, keep="last")
            .reset_index(drop=True))


class InMemoryCatalogSource:
    """Rows as given (several per item allowed: the newest wins, as in an offline store). `put`
    replaces a table and moves `version()` on, as a write to a real source would."""

    def __init__(self, items: pd.DataFrame, popularity: pd.DataFrame | None = None,
                 events: pd.DataFrame | None = None):
        self._items = items
        self._popularity = popularity if popularity is not None else empty_popularity()
        self._events = events if events is not None else empty_events()
        self._version = 0
        self.reads = 0  # full reads (not version checks): lets a test see that nothing was re-read

    def put(self, *, items: pd.DataFrame | None = None, popularity: pd.DataFrame | None = None,
            events: pd.DataFrame | None = None) -> None:
        if items is not None:
            self._items = items
        if popularity is not None:
            self._popularity = popularity
        if events is not None:
            self._events = events
        self._version += 1

    def version(self) -> int:
        return self._version

    def latest_items(self, columns: Sequence[str] | None = None) -> pd.DataFrame:
        self.reads += 1
        latest = latest_per_item(self._items)
        if columns is None:
            return latest
        return latest[[ITEM_ID, *(c for c in columns if c not in (ITEM_ID, ITEM_TIMESTAMP)), ITEM_TIMESTAMP]]

    def latest_popularity(self) -> pd.DataFrame:
        self.reads += 1
        return latest_per_item(self._popularity[[ITEM_ID, POPULARITY, ITEM_TIMESTAMP]])

    def events(self, since: datetime | None = None) -> pd.DataFrame:
        self.reads += 1
        events = self._events[list(EVENT_COLUMNS)]
        if since is not None:
            start = pd.Timestamp(since)
            start = start.tz_localize("UTC") if start.tzinfo is None else start  # naive is taken as UTC (as FeastCatalogSource does)
            events = events[pd.to_datetime(events[EVENT_TIMESTAMP], utc=True) >= start]
        return events.reset_index(drop=True)
