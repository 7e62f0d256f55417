"""Fast online feature reads for the serving path: 1 user + N items in ONE store round trip.

Why not `FeatureStore.get_online_features`: it costs 5-8 ms median / 10-20 ms p99 for 1 user + 100
items, does one read per feature view, and does not enforce feature-view TTLs (upstream #6821).
These readers read Feast's own online layout (see layout.py) directly:
- Redis: one HMGET per entity (user + items), all views' fields at once, sent as one buffer.
- SQLite: one UNION ALL query over the views' tables.
Both decode Feast's `Value` protos into plain Python values and treat a view whose stored timestamp
is older than its TTL as missing. Parity with the Feast SDK is tested on both stores.
"""

from __future__ import annotations

import asyncio
import enum
import math
import sqlite3
import threading
import time
from dataclasses import dataclass
from functools import lru_cache
from datetime import datetime, timezone
from pathlib import Path
from types import MappingProxyType
from typing import Any, Iterable, Mapping, Protocol

import redis
from google.protobuf.timestamp_pb2 import Timestamp

from feast.protos.feast.types.Value_pb2 import Value

from gateway.features.layout import EntityKeyEncoder, FeatureLayout, ViewSpec


class ViewStatus(enum.Enum):
    FRESH = "fresh"
    MISSING = "missing"  # never written for this entity
    EXPIRED = "expired"  # written, but older than the view's TTL: values are withheld


@dataclass(slots=True)
class EntityFeatures:
    # All three are read-only mappings: decoded rows are cached and shared between requests.
    values: Mapping[str, Any]  # feature name -> value (None if unavailable)
    status: Mapping[str, ViewStatus]  # view name -> status
    timestamps: Mapping[str, float]  # view name -> event time (epoch seconds) of its fresh values

    def has(self, view: str) -> bool:
        return self.status.get(view) is ViewStatus.FRESH


@dataclass(slots=True)
class OnlineFeatures:
    user: EntityFeatures
    items: dict[str, EntityFeatures]  # item id -> features, for every requested item (in request order)


class OnlineFeatureReader(Protocol):
    layout: FeatureLayout

    def read(self, user_id: str, item_ids: Iterable[str], now: float | None = None) -> OnlineFeatures: ...

    async def aread(self, user_id: str, item_ids: Iterable[str], now: float | None = None) -> OnlineFeatures: ...

    def close(self) -> None: ...


@lru_cache(maxsize=1 << 18)
def decode_value(raw: bytes | None) -> Any:
    """Feast `Value` proto bytes -> Python value (tuples for *_list_val, None for unset).

    Cached by raw bytes (values such as brands and categories repeat across items), so lists come
    back as immutable tuples: they are shared between requests.
    """
    if not raw:
        return None
    v = Value.FromString(raw)
    kind = v.WhichOneof("val")
    if kind is None or kind == "null_val":
        return None
    x = getattr(v, kind)
    if kind.endswith("_list_val"):
        return tuple(x.val)
    if kind == "unix_timestamp_val":
        return datetime.fromtimestamp(x, tz=timezone.utc)
    return x


def _redis_ts(raw: bytes) -> float:
    """Feast's `_ts:<view>` Redis field (a protobuf Timestamp) -> epoch seconds."""
    ts = Timestamp.FromString(raw)
    return ts.seconds + ts.nanos / 1e9


def _sqlite_ts(v: Any) -> float:
    """Stored event_ts -> epoch seconds. Feast 0.67 stores integer epoch seconds; older versions
    stored naive-UTC ISO text."""
    if isinstance(v, (int, float)):
        return float(v)
    return datetime.fromisoformat(str(v)).replace(tzinfo=timezone.utc).timestamp()


class _EntityDecoder:
    """Turns one entity's stored row into EntityFeatures, for one entity kind (user or item).

    The stored row is a flat tuple: each view's raw feature values followed by its raw timestamp
    (or None), in layout order; exactly the shape of a Redis HMGET reply. Decoding it is the bulk
    of a read's CPU time and the same rows come back request after request (a catalog changes
    slowly, a user's features change per event, not per request), so decoded rows are cached by
    their raw bytes. Only the TTL check depends on the time, and it runs on every read.
    """

    def __init__(self, views: tuple[ViewSpec, ...], parse_ts, cache_size: int = 1 << 16):
        self.views = views
        self._parse_ts = parse_ts
        self._decode = lru_cache(maxsize=cache_size)(self._decode_row)
        self._none = {v.name: dict.fromkeys(v.features) for v in views}

    def _decode_row(self, row: tuple) -> tuple[EntityFeatures, float]:
        """Decode a row as if read the moment it was written; also return when it first expires."""
        values: dict[str, Any] = {}
        status: dict[str, ViewStatus] = {}
        stamps: dict[str, float] = {}
        expires_at = math.inf
        pos = 0
        for view in self.views:
            n = len(view.features)
            raw_ts = row[pos + n]
            if raw_ts is None:
                values.update(self._none[view.name])
                status[view.name] = ViewStatus.MISSING
            else:
                values.update(zip(view.features, map(decode_value, row[pos : pos + n])))
                status[view.name] = ViewStatus.FRESH
                stamps[view.name] = ts = self._parse_ts(raw_ts)
                if view.ttl_seconds is not None:
                    expires_at = min(expires_at, ts + view.ttl_seconds)
            pos += n + 1
        return EntityFeatures(MappingProxyType(values), MappingProxyType(status), MappingProxyType(stamps)), expires_at

    def entity(self, row: tuple, now: float) -> EntityFeatures:
        cached, expires_at = self._decode(row)
        if now <= expires_at:
            return cached  # the common case: shared, read-only, nothing to recompute
        # Some view is past its TTL: withhold its values in a private copy.
        values = dict(cached.values)
        status = dict(cached.status)
        stamps = dict(cached.timestamps)
        for view in self.views:
            ts = stamps.get(view.name)
            if ts is not None and view.ttl_seconds is not None and now - ts > view.ttl_seconds:
                status[view.name] = ViewStatus.EXPIRED
                del stamps[view.name]
                values.update(self._none[view.name])
        return EntityFeatures(MappingProxyType(values), MappingProxyType(status), MappingProxyType(stamps))


class _Base:
    def __init__(self, layout: FeatureLayout, parse_ts):
        self.layout = layout
        self._keys = EntityKeyEncoder(layout.entity_key_serialization_version)
        user_views, item_views = layout.views_for("user"), layout.views_for("item")
        if not user_views or not item_views:
            raise ValueError("the feature service must have at least one user view and one item view")
        self._users = _EntityDecoder(user_views, parse_ts)
        self._items = _EntityDecoder(item_views, parse_ts, cache_size=1 << 18)
        self._user_join_key = user_views[0].join_key
        self._item_join_key = item_views[0].join_key

    def read(self, user_id: str, item_ids: Iterable[str], now: float | None = None) -> OnlineFeatures:
        raise NotImplementedError

    async def aread(self, user_id: str, item_ids: Iterable[str], now: float | None = None) -> OnlineFeatures:
        """`read` off the event loop, in a worker thread. For Redis this beat redis.asyncio here
        (1.6 vs 2.4 ms median for 1 user + 100 items): the asyncio client awaits once per reply,
        101 times per read. sqlite3 is blocking anyway."""
        return await asyncio.to_thread(self.read, user_id, list(item_ids), now)


class _RedisCommands(_Base):
    """Feast's Redis layout as ready-made RESP commands: a hash per entity key (+ project), a field
    per feature (mmh3 of `<view>:<feature>`) and `_ts:<view>` per view.

    Commands are packed here rather than by redis-py's pipeline, which spends ~5 us per command
    re-encoding the same field list: only the key differs between the items' HMGETs."""

    def __init__(self, layout: FeatureLayout):
        super().__init__(layout, _redis_ts)
        self._project = layout.project.encode()
        self._user_fields = user_fields = [f for v in self._users.views for f in v.redis_fields]
        self._item_fields = item_fields = [f for v in self._items.views for f in v.redis_fields]
        self._user_tail, self._user_nargs = _resp_args(user_fields), 2 + len(user_fields)
        self._item_tail, self._item_nargs = _resp_args(item_fields), 2 + len(item_fields)

    def _user_key(self, user_id: str) -> bytes:
        return self._keys.encode(self._user_join_key, user_id) + self._project

    def _item_key(self, item_id: str) -> bytes:
        return self._keys.encode(self._item_join_key, item_id) + self._project

    def _user_command(self, user_id: str) -> bytes:
        return _hmget_head(self._user_nargs, self._user_key(user_id)) + self._user_tail

    def _item_command(self, item_id: str) -> bytes:
        return _hmget_head(self._item_nargs, self._item_key(item_id)) + self._item_tail

    def _assemble(self, item_ids: list[str], replies: list[list[bytes | None]], now: float) -> OnlineFeatures:
        item = self._items.entity
        return OnlineFeatures(
            user=self._users.entity(tuple(replies[0]), now),
            items={i: item(tuple(r), now) for i, r in zip(item_ids, replies[1:])},
        )


class RedisFeatureReader(_RedisCommands):
    """One Redis node: all HMGETs in one buffer on one connection, one network round trip."""

    def __init__(self, layout: FeatureLayout, url: str, timeout_s: float = 0.05):
        super().__init__(layout)
        self._client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self._item_command_cached = lru_cache(maxsize=1 << 20)(self._item_command)

    @classmethod
    def from_connection_string(cls, layout: FeatureLayout, conn: str, timeout_s: float = 0.05) -> "RedisFeatureReader":
        """Feast's `host:port,db=N,password=...` form."""
        host_port, *opts = conn.split(",")
        kv = dict(o.split("=", 1) for o in opts if "=" in o)
        auth = f":{kv['password']}@" if "password" in kv else ""
        scheme = "rediss" if kv.get("ssl", "").lower() == "true" else "redis"
        return cls(layout, f"{scheme}://{auth}{host_port}/{kv.get('db', 0)}", timeout_s)

    def _packed(self, user_id: str, item_ids: list[str]) -> bytes:
        """One buffer with all HMGETs in RESP: the user's first, then one per item (cached per item)."""
        return self._user_command(user_id) + b"".join(map(self._item_command_cached, item_ids))

    def read(self, user_id: str, item_ids: Iterable[str], now: float | None = None) -> OnlineFeatures:
        item_ids = list(item_ids)
        pool = self._client.connection_pool
        conn = pool.get_connection()
        try:
            conn.send_packed_command([self._packed(user_id, item_ids)])
            replies = [conn.read_response() for _ in range(1 + len(item_ids))]
        except BaseException:
            conn.disconnect()  # unread replies would corrupt the next request on this connection
            raise
        finally:
            pool.release(conn)
        return self._assemble(item_ids, replies, time.time() if now is None else now)

    def close(self) -> None:
        self._client.close()


class SqliteFeatureReader(_Base):
    """Reads Feast's SQLite layout: a table per view, a row per (entity_key, feature_name)."""

    def __init__(self, layout: FeatureLayout, path: str | Path):
        super().__init__(layout, _sqlite_ts)
        # Read-only URI: the serving path must never write (or lock) the embedded store.
        self._conn = sqlite3.connect(f"file:{Path(path).resolve()}?mode=ro", uri=True, check_same_thread=False)
        self._conn.execute("PRAGMA query_only = 1")
        self._lock = threading.Lock()
        self._sql_cache: dict[int, str] = {}

    def _sql(self, n_items: int) -> str:
        sql = self._sql_cache.get(n_items)
        if sql is None:
            parts = []
            for view in self.layout.views:
                where = "entity_key = ?" if view.entity == "user" else f"entity_key IN ({','.join('?' * n_items)})"
                parts.append(f"SELECT '{view.name}', entity_key, feature_name, value, event_ts FROM \"{view.table}\" WHERE {where}")
            sql = self._sql_cache[n_items] = " UNION ALL ".join(parts)
        return sql

    def read(self, user_id: str, item_ids: Iterable[str], now: float | None = None) -> OnlineFeatures:
        item_ids = list(item_ids)
        enc = self._keys.encode
        user_key = enc(self._user_join_key, user_id)
        item_keys = [enc(self._item_join_key, i) for i in item_ids]
        params: list[bytes] = []
        for view in self.layout.views:
            params.extend([user_key] if view.entity == "user" else item_keys)
        with self._lock:  # one connection, shared by aread's worker threads
            rows = self._conn.execute(self._sql(len(item_keys)), params).fetchall()
        found: dict[tuple[str, bytes], dict[str, Any]] = {}  # (view, entity key) -> {feature: raw, ...}
        for view_name, ek, name, raw, ts in rows:
            cell = found.setdefault((view_name, ek), {})
            cell[name] = raw
            cell[_TS] = ts
        now = time.time() if now is None else now

        def row(key: bytes, views: tuple[ViewSpec, ...]) -> tuple:
            # The same flat shape as a Redis HMGET reply: features then timestamp, per view.
            out: list[Any] = []
            for view in views:
                cell = found.get((view.name, key), {})
                out.extend(cell.get(f) for f in view.features)
                out.append(cell.get(_TS))
            return tuple(out)

        return OnlineFeatures(
            user=self._users.entity(row(user_key, self._users.views), now),
            items={i: self._items.entity(row(k, self._items.views), now) for i, k in zip(item_ids, item_keys)},
        )

    def close(self) -> None:
        self._conn.close()


_TS = "\0ts"  # key of a view's timestamp inside a row cell (cannot clash with a feature name)


def _resp_bulk(b: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(b), b)


def _resp_args(args: Iterable[bytes]) -> bytes:
    return b"".join(_resp_bulk(a) for a in args)


def _hmget_head(nargs: int, key: bytes) -> bytes:
    return b"*%d\r\n$5\r\nHMGET\r\n%s" % (nargs, _resp_bulk(key))


def open_reader(store_config: Any, layout: FeatureLayout, repo_path: Path) -> OnlineFeatureReader:
    """A reader for the online store configured in a Feast RepoConfig (sqlite, redis or redis_cluster)."""
    online = store_config.online_store
    kind = getattr(online, "type", None)
    if kind == "sqlite":
        path = Path(online.path)
        return SqliteFeatureReader(layout, path if path.is_absolute() else repo_path / path)
    if kind == "redis":
        redis_type = getattr(getattr(online, "redis_type", None), "value", "redis")
        if redis_type == "redis_cluster":
            from gateway.features.cluster_reader import RedisClusterFeatureReader

            return RedisClusterFeatureReader.from_connection_string(layout, online.connection_string)
        if redis_type != "redis":
            raise ValueError(f"redis_type {redis_type!r} is not supported by the fast reader (redis, redis_cluster are)")
        return RedisFeatureReader.from_connection_string(layout, online.connection_string)
    raise ValueError(f"online store type {kind!r} is not supported by the fast reader (sqlite, redis are)")
