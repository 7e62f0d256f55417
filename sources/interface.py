"""The catalog source: what the gateway's catalog and the feedback service's sessions read from the
offline side, as a typing.Protocol, with the column names its frames carry.

Serving depends on this interface, never on where the rows live (parquet files, BigQuery,
Snowflake, Postgres...): `sources.feast_source` reads them through Feast's offline store API,
`sources.memory` from frames held in memory (unit tests).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from datetime import datetime
from typing import Protocol, runtime_checkable

import pandas as pd

# Column names of the frames a CatalogSource returns (whatever the source's own names are).
ITEM_ID = "item_id"
ITEM_TIMESTAMP = "event_timestamp"  # items and popularity: when the row became true
POPULARITY = "popularity_7d"
EVENT_COLUMNS = ("user_id", "session_id", ITEM_ID, "event_type", "timestamp")  # user_id: co-visitation follows a shopper across sessions
EVENT_TIMESTAMP = "timestamp"


def empty_popularity() -> pd.DataFrame:
    """latest_popularity() of a source with no popularity rows yet."""
    return pd.DataFrame({ITEM_ID: pd.Series(dtype=object), POPULARITY: pd.Series(dtype="float32"),
                         ITEM_TIMESTAMP: pd.Series(dtype="datetime64[us, UTC]")})


def empty_events() -> pd.DataFrame:
    """events() of a source with no events yet."""
    return pd.DataFrame({c: pd.Series(dtype="datetime64[us, UTC]" if c == EVENT_TIMESTAMP else object)
                         for c in EVENT_COLUMNS})


@runtime_checkable
class CatalogSource(Protocol):
    """Read-only, and every call reads the source as it is now (no caching between calls)."""

    def version(self) -> Hashable:
        """A cheap marker of the source's state: equal markers mean nothing changed that the other
        methods would return differently. Taken *before* a read, so a change during the read costs
        one more reload later, never a missed one."""
        ...

    def latest_items(self, columns: Sequence[str] | None = None) -> pd.DataFrame:
        """The newest catalog attribute row of every item: `item_id`, `event_timestamp` and the
        attribute columns asked for (all of the item view's features when None), any row order."""
        ...

    def latest_popularity(self) -> pd.DataFrame:
        """The newest `popularity_7d` of every item that has one: `item_id`, `popularity_7d`,
        `event_timestamp`, any row order. Empty (same columns) when there is no popularity yet."""
        ...

    def events(self, since: datetime | None = None) -> pd.DataFrame:
        """Behaviour events at or after `since` (all when None): EVENT_COLUMNS, any row order, any
        event type (the caller filters: the offline store API selects by time, not by value)."""
        ...
