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
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from functools import lru_cache
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Protocol, Sequence

import redis
import redis.asyncio
from google.protobuf.timestamp_pb2 import Timestamp

from gateway.features.layout import EntityKeyEncoder, FeatureLayout, ViewSpec
from feast.protos.feast.types.Value_pb2 import Value


class ViewStatus(enum.Enum):
    FRESH = "fresh"
    MISSING = "missing"  # never written for this entity
    EXPIRED = "expired"  # written, but older than the view's TTL: values are withheld


@dataclass(slots=True)
class EntityFeatures:
    values: dict[str, Any] = field(default_factory=dict)  # feature name -> value (None if unavailable)
    status: dict[str, ViewStatus] = field(default_factory=dict)  # view name -> status
    timestamps: dict[str, float] = field(default_factory=dict)  # view name -> event time (epoch s) of its values

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

    Decoding is most of a read's CPU time (~2.5 us per value; 100 items carry ~1,300 values) and the
    same bytes come back request after request (a catalog changes slowly), so results are cached by
    raw bytes. Lists therefore come back as (immutable) tuples: they are shared between requests.
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


@lru_cache(maxsize=1 << 16)
def _redis_ts(raw: bytes) -> float:
    """Feast's `_ts:<view>` field (a protobuf Timestamp) -> epoch seconds; materialized rows share it."""
    ts = Timestamp.FromString(raw)
    return ts.seconds + ts.nanos / 1e9


def _fill(ent: EntityFeatures, view: ViewSpec, raws: Sequence[bytes | None] | None, ts: float | None,
          now: float) -> None:
    """Put one view's values into `ent`, withholding them when absent or older than the TTL."""
    if raws is None or ts is None:
        status = ViewStatus.MISSING
    elif view.ttl_seconds is not None and now - ts > view.ttl_seconds:
        status = ViewStatus.EXPIRED
    else:
        status = ViewStatus.FRESH
    ent.status[view.name] = status
    if status is ViewStatus.FRESH:
        ent.timestamps[view.name] = ts
        ent.values.update(zip(view.features, map(decode_value, raws)))
    else:
        ent.values.update(dict.fromkeys(view.features))


class _Base:
    def __init__(self, layout: FeatureLayout):
        self.layout = layout
        self._keys = EntityKeyEncoder(layout.entity_key_serialization_version)
        self._user_views = layout.views_for("user")
        self._item_views = layout.views_for("item")
        if not self._user_views or not self._item_views:
            raise ValueError("the feature service must have at least one user view and one item view")
        self._user_join_key = self._user_views[0].join_key
        self._item_join_key = self._item_views[0].join_key


class RedisFeatureReader(_Base):
    """Reads Feast's Redis layout: hash per entity key (+ project), field per feature, `_ts:<view>`."""

    def __init__(self, layout: FeatureLayout, url: str, timeout_s: float = 0.05):
        super().__init__(layout)
        self._project = layout.project.encode()
        self._client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self._aclient = redis.asyncio.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        # Commands are packed here rather than by redis-py's pipeline, which spends ~5 us per
        # command re-encoding the same field list: only the key differs between the items' HMGETs.
        self._user_tail = _resp_args(f for v in self._user_views for f in v.redis_fields)
        self._item_tail = _resp_args(f for v in self._item_views for f in v.redis_fields)
        self._user_nargs = 2 + sum(len(v.redis_fields) for v in self._user_views)
        self._item_nargs = 2 + sum(len(v.redis_fields) for v in self._item_views)

    @classmethod
    def from_connection_string(cls, layout: FeatureLayout, conn: str, timeout_s: float = 0.05) -> "RedisFeatureReader":
        """Feast's `host:port,db=N,password=...` form."""
        host_port, *opts = conn.split(",")
        kv = dict(o.split("=", 1) for o in opts if "=" in o)
        auth = f":{kv['password']}@" if "password" in kv else ""
        scheme = "rediss" if kv.get("ssl", "").lower() == "true" else "redis"
        return cls(layout, f"{scheme}://{auth}{host_port}/{kv.get('db', 0)}", timeout_s)

    def _packed(self, user_id: str, item_ids: list[str]) -> bytes:
        """One buffer with all HMGETs in RESP: the user's first, then one per item."""
        enc = self._keys.encode
        parts = [_hmget_head(self._user_nargs, enc(self._user_join_key, user_id) + self._project), self._user_tail]
        for i in item_ids:
            parts.append(_hmget_head(self._item_nargs, enc(self._item_join_key, i) + self._project))
            parts.append(self._item_tail)
        return b"".join(parts)

    def _assemble(self, user_id: str, item_ids: list[str], replies: list[list[bytes | None]], now: float) -> OnlineFeatures:
        user = self._entity(self._user_views, replies[0], now)
        items = {i: self._entity(self._item_views, r, now) for i, r in zip(item_ids, replies[1:])}
        return OnlineFeatures(user=user, items=items)

    @staticmethod
    def _entity(views: tuple[ViewSpec, ...], reply: list[bytes | None], now: float) -> EntityFeatures:
        # One HMGET reply holds every view of the entity: its features, then its `_ts:<view>` field.
        ent = EntityFeatures()
        pos = 0
        for view in views:
            n = len(view.features)
            raw_ts = reply[pos + n]
            if raw_ts is None:
                _fill(ent, view, None, None, now)
            else:
                _fill(ent, view, reply[pos : pos + n], _redis_ts(raw_ts), now)
            pos += n + 1
        return ent

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
        return self._assemble(user_id, item_ids, replies, time.time() if now is None else now)

    async def aread(self, user_id: str, item_ids: Iterable[str], now: float | None = None) -> OnlineFeatures:
        item_ids = list(item_ids)
        pool = self._aclient.connection_pool
        conn = await pool.get_connection()
        try:
            await conn.send_packed_command([self._packed(user_id, item_ids)])
            replies = [await conn.read_response() for _ in range(1 + len(item_ids))]
        except BaseException:  # includes cancellation by a request deadline
            await conn.disconnect()
            raise
        finally:
            await pool.release(conn)
        return self._assemble(user_id, item_ids, replies, time.time() if now is None else now)

    def close(self) -> None:
        self._client.close()

    async def aclose(self) -> None:
        await self._aclient.aclose()


class SqliteFeatureReader(_Base):
    """Reads Feast's SQLite layout: a table per view, a row per (entity_key, feature_name)."""

    def __init__(self, layout: FeatureLayout, path: str | Path):
        super().__init__(layout)
        # Read-only URI: the serving path must never write (or lock) the embedded store.
        self._conn = sqlite3.connect(f"file:{Path(path).resolve()}?mode=ro", uri=True, check_same_thread=False)
        self._conn.execute("PRAGMA query_only = 1")
        self._index = {v.name: (k, v) for k, v in enumerate(self.layout.views)}
        self._sql_cache: dict[int, str] = {}
        self._lock = threading.Lock()

    def _sql(self, n_items: int) -> str:
        sql = self._sql_cache.get(n_items)
        if sql is None:
            parts = []
            for k, view in enumerate(self.layout.views):
                where = "entity_key = ?" if view.entity == "user" else f"entity_key IN ({','.join('?' * n_items)})"
                parts.append(
                    f'SELECT {k}, entity_key, feature_name, value, event_ts FROM "{view.table}" WHERE {where}'
                )
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
        with self._lock:  # one connection shared by aread's worker threads
            rows = self._conn.execute(self._sql(len(item_keys)), params).fetchall()
        # (view index, entity key) -> {feature: raw}, and its timestamp
        found: dict[tuple[int, bytes], dict[str, bytes]] = {}
        stamps: dict[tuple[int, bytes], Any] = {}
        for k, ek, name, raw, ts in rows:
            found.setdefault((k, ek), {})[name] = raw
            stamps[(k, ek)] = ts
        now = time.time() if now is None else now

        def entity(key: bytes, views: tuple[ViewSpec, ...]) -> EntityFeatures:
            ent = EntityFeatures()
            for view in views:
                k = self._index[view.name][0]
                raw = found.get((k, key))
                if raw is None:
                    _fill(ent, view, None, None, now)
                else:
                    _fill(ent, view, [raw.get(f) for f in view.features], _sqlite_ts(stamps[(k, key)]), now)
            return ent

        return OnlineFeatures(
            user=entity(user_key, self._user_views),
            items={i: entity(key, self._item_views) for i, key in zip(item_ids, item_keys)},
        )

    async def aread(self, user_id: str, item_ids: Iterable[str], now: float | None = None) -> OnlineFeatures:
        # sqlite3 is blocking: keep it off the event loop.
        return await asyncio.to_thread(self.read, user_id, list(item_ids), now)

    def close(self) -> None:
        self._conn.close()


def _resp_bulk(b: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(b), b)


def _resp_args(args: Iterable[bytes]) -> bytes:
    return b"".join(_resp_bulk(a) for a in args)


def _hmget_head(nargs: int, key: bytes) -> bytes:
    return b"*%d\r\n$5\r\nHMGET\r\n%s" % (nargs, _resp_bulk(key))


def _sqlite_ts(v: Any) -> float:
    """Stored event_ts -> epoch seconds. Feast 0.67 stores integer epoch seconds; older versions
    stored naive-UTC ISO text."""
    if isinstance(v, (int, float)):
        return float(v)
    return datetime.fromisoformat(str(v)).replace(tzinfo=timezone.utc).timestamp()


def open_reader(store_config: Any, layout: FeatureLayout, repo_path: Path) -> OnlineFeatureReader:
    """A reader for the online store configured in a Feast RepoConfig (sqlite or redis)."""
    online = store_config.online_store
    kind = getattr(online, "type", None)
    if kind == "sqlite":
        path = Path(online.path)
        return SqliteFeatureReader(layout, path if path.is_absolute() else repo_path / path)
    if kind == "redis":
        return RedisFeatureReader.from_connection_string(layout, online.connection_string)
    raise ValueError(f"online store type {kind!r} is not supported by the fast reader (sqlite, redis are)")
