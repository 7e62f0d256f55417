"""The CatalogSource of a Feast feature repo, read through Feast's offline store API.

`pull_latest_from_table_or_query` gives each item's newest attribute / popularity row and
`pull_all_from_table_or_query` the behaviour events in a time range. Every offline store implements
both (file, duckdb, BigQuery, Snowflake, Redshift, Postgres...), so serving runs on whatever offline
store the repo's feature_store.yaml names, not only on local parquet files. The sources are the ones
the registry names for the feature views (item_attributes, item_popularity) and the event log data
source (events_source): the gateway, the feedback service and training read the same rows.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from sources.interface import (EVENT_COLUMNS, EVENT_TIMESTAMP, ITEM_ID, ITEM_TIMESTAMP, POPULARITY, empty_events,
                               empty_popularity)

if TYPE_CHECKING:  # feast costs seconds to import; the objects come from the caller's FeatureStore
    from feast import FeatureStore
    from feast.data_source import DataSource
    from feast.feature_view import FeatureView
    from feast.infra.offline_stores.offline_store import OfflineStore
    from feast.repo_config import RepoConfig

ITEMS_VIEW = "item_attributes"
POPULARITY_VIEW = "item_popularity"
EVENTS_SOURCE = "events_source"

# pull_latest_from_table_or_query requires a time range; "everything" is the epoch up to a date that
# every offline store (and pandas' datetime64[ns]) can hold.
ALL_FROM = datetime(1970, 1, 1, tzinfo=timezone.utc)
ALL_TO = datetime(2200, 1, 1, tzinfo=timezone.utc)

# One offline-store query at a time per process: the duckdb store runs every query on ibis' one
# default duckdb connection, which is not safe to share between threads, and a test process can
# hold several gateways whose refreshes run in worker threads. The queries here take milliseconds.
_QUERY_LOCK = threading.Lock()


def _quiet_ibis() -> None:
    """Hide ibis' DeprecationWarning about duckdb's fetch_arrow_table (ibis' call, nothing to fix here).
    Feast turns DeprecationWarning to "once" process-wide when imported, so the first query of every
    process would print it, e.g. into the feedback service's output before its "feedback service on"
    line. Added before each query: idempotent, and ahead of any filter Feast inserts later."""
    warnings.filterwarnings("ignore", message=r"fetch_arrow_table\(\) is deprecated", category=DeprecationWarning)


@dataclass(frozen=True)
class _Table:
    """One source and the interface's names for its columns."""

    source: DataSource
    keys: tuple[str, ...]  # the source's column names (after reversing its field_mapping)
    columns: dict[str, str]  # source column -> interface column, for every column we may read
    timestamp: str  # the source's timestamp column
    created: str | None  # the source's created-timestamp column: breaks ties between equal timestamps

    def source_names(self, names: Sequence[str]) -> list[str]:
        back = {v: k for k, v in self.columns.items()}
        return [back.get(n, n) for n in names]


def _table(source: DataSource, keys: Sequence[str], names: Sequence[str], timestamp_as: str) -> _Table:
    # field_mapping maps source columns to feature names; the offline store API speaks source names
    # (as Feast's own materialization does, reversing the mapping before the call).
    mapping: dict[str, str] = dict(source.field_mapping or {})
    back = {v: k for k, v in mapping.items()}
    timestamp = back.get(source.timestamp_field, source.timestamp_field)
    columns = {back.get(n, n): n for n in (*keys, *names)}
    columns[timestamp] = timestamp_as
    created = source.created_timestamp_column or None
    return _Table(source=source, keys=tuple(back.get(k, k) for k in keys), columns=columns,
                  timestamp=timestamp, created=back.get(created, created) if created else None)


class FeastCatalogSource:
    """A CatalogSource over a feature repo's offline store. Reads nothing until asked; each call
    is one offline-store query."""

    def __init__(self, config: RepoConfig, offline_store: OfflineStore, items_view: FeatureView,
                 popularity_view: FeatureView, events: DataSource, *, stat_files: bool = True):
        self._config = config
        self._offline = offline_store
        self._attributes = tuple(f.name for f in items_view.features)
        self._items = _table(self._batch_source(items_view), self._item_keys(items_view), self._attributes,
                             ITEM_TIMESTAMP)
        if POPULARITY not in {f.name for f in popularity_view.features}:
            raise ValueError(f"feature view {popularity_view.name!r} has no {POPULARITY!r} feature")
        self._popularity = _table(self._batch_source(popularity_view), self._item_keys(popularity_view),
                                  (POPULARITY,), ITEM_TIMESTAMP)
        self._events = _table(events, (), [c for c in EVENT_COLUMNS if c != EVENT_TIMESTAMP], EVENT_TIMESTAMP)
        self.stat_files = stat_files

    @classmethod
    def from_feature_store(cls, store: FeatureStore, *, items_view: str = ITEMS_VIEW,
                           popularity_view: str = POPULARITY_VIEW, events_source: str = EVENTS_SOURCE,
                           stat_files: bool = True) -> FeastCatalogSource:
        return cls(store.config, store._get_provider().offline_store, store.get_feature_view(items_view),
                   store.get_feature_view(popularity_view), store.get_data_source(events_source),
                   stat_files=stat_files)

    @staticmethod
    def _batch_source(view: FeatureView) -> DataSource:
        if view.batch_source is None:
            raise ValueError(f"feature view {view.name!r} has no batch source to read offline")
        return view.batch_source

    @staticmethod
    def _item_keys(view: FeatureView) -> tuple[str, ...]:
        keys = tuple(c.name for c in view.entity_columns)
        if keys != (ITEM_ID,):
            raise ValueError(f"feature view {view.name!r} is keyed by {keys}, expected ({ITEM_ID!r},)")
        return keys

    # -- the interface -------------------------------------------------------------------------

    def version(self) -> Hashable:
        return tuple(self._marker(t) for t in (self._items, self._popularity, self._events))

    def latest_items(self, columns: Sequence[str] | None = None) -> pd.DataFrame:
        wanted = self._attributes if columns is None else tuple(c for c in columns if c not in (ITEM_ID, ITEM_TIMESTAMP))
        unknown = set(wanted) - set(self._attributes)
        if unknown:
            raise ValueError(f"not features of the item view: {sorted(unknown)}")
        return self._latest(self._items, wanted)

    def latest_popularity(self) -> pd.DataFrame:
        if self._missing(self._popularity):
            return empty_popularity()
        return self._latest(self._popularity, (POPULARITY,))

    def events(self, since: datetime | None = None) -> pd.DataFrame:
        t = self._events
        if self._missing(t):
            return empty_events()
        features = t.source_names([c for c in EVENT_COLUMNS if c != EVENT_TIMESTAMP])
        if since is not None and since.tzinfo is None:
            since = since.replace(tzinfo=timezone.utc)  # naive is taken as UTC (Feast would take local time)
        with _QUERY_LOCK:
            _quiet_ibis()
            job = self._offline.pull_all_from_table_or_query(
                config=self._config, data_source=t.source, join_key_columns=[], feature_name_columns=features,
                timestamp_field=t.timestamp, created_timestamp_column=None, start_date=since, end_date=None)
            table = job.to_arrow()
        return self._frame(table, t, EVENT_COLUMNS)

    # -- helpers -------------------------------------------------------------------------------

    def _latest(self, t: _Table, features: Sequence[str]) -> pd.DataFrame:
        with _QUERY_LOCK:
            _quiet_ibis()
            job = self._offline.pull_latest_from_table_or_query(
                config=self._config, data_source=t.source, join_key_columns=list(t.keys),
                feature_name_columns=t.source_names(features), timestamp_field=t.timestamp,
                created_timestamp_column=t.created, start_date=ALL_FROM, end_date=ALL_TO)
            table = job.to_arrow()
        return self._frame(table, t, (ITEM_ID, *features, ITEM_TIMESTAMP))

    @staticmethod
    def _frame(table: pa.Table, t: _Table, names: Sequence[str]) -> pd.DataFrame:
        frame = table.to_pandas().rename(columns=t.columns)
        # Some stores hand timestamps back naive (in UTC) or as another unit; the interface says UTC.
        for c in (ITEM_TIMESTAMP, EVENT_TIMESTAMP):
            if c in names and c in frame:
                frame[c] = pd.to_datetime(frame[c], utc=True)
        return frame[list(names)]

    def _local_file(self, source: DataSource) -> Path | None:
        """The local file behind a FileSource (None for any other source, or a remote URI)."""
        from feast.infra.offline_stores.file_source import FileSource

        if not isinstance(source, FileSource):
            return None
        uri = FileSource.get_uri_for_file_path(self._config.repo_path, source.path)
        parsed = urlparse(uri)
        if parsed.scheme and parsed.scheme != "file":
            return None
        return Path(parsed.path if parsed.scheme else uri)

    def _missing(self, t: _Table) -> bool:
        # A shop before its first import has no popularity snapshots or events yet: serve without
        # them (a file that is not there), rather than not at all. Only a local file can be "not there".
        path = self._local_file(t.source)
        return path is not None and not path.exists()

    def _marker(self, t: _Table) -> Any:
        if self._missing(t):
            return None
        # Fast path, for a local file only: its (mtime, size) is a stat, not a query (this runs every
        # refresh interval on cores serving requests), and it also sees a file rewritten in place
        # (a re-import, a restored copy). A directory (a partitioned dataset) goes the general way.
        path = self._local_file(t.source) if self.stat_files else None
        if path is not None and not path.is_dir():
            try:
                st = path.stat()
            except FileNotFoundError:  # removed since _missing() looked
                return None
            return ("file", st.st_mtime_ns, st.st_size)
        # Any offline store: the source's newest timestamp. Offline sources are append-only event
        # tables, so a new or changed row has a newer timestamp. No join keys and no features: SQL
        # stores answer with the one newest row; the max is still taken here, because the file (dask)
        # store answers with every row, and all their columns.
        with _QUERY_LOCK:
            _quiet_ibis()
            job = self._offline.pull_latest_from_table_or_query(
                config=self._config, data_source=t.source, join_key_columns=[], feature_name_columns=[],
                timestamp_field=t.timestamp, created_timestamp_column=None, start_date=ALL_FROM, end_date=ALL_TO)
            newest = job.to_arrow()
        return ("newest", pc.max(newest.column(t.timestamp)).as_py() if newest.num_rows else None)
