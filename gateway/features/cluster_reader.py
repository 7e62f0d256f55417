"""Fast online feature reads from a Redis Cluster (Feast's `redis_type: redis_cluster`).

The same HMGETs as the single-node reader (online_reader.py), grouped by hash slot -> master: one
buffer per master, written to every master before any reply is read, so the masters work in
parallel and a read costs one round trip to the slowest of them, not one per node.

The slot map and the per-node connections come from redis-py's cluster client (`RedisCluster`'s
NodesManager: CLUSTER SLOTS, node discovery), so topology handling is the library's; what is ours
is only how the commands are batched:
- MOVED: the command is re-sent at once to the node named in the reply, and the slot map is
  re-learned before the next read (a resharded or failed-over slot).
- ASK (a slot being migrated): the command is re-sent to the importing node behind `ASKING`.
- A node that does not answer (killed master, network): the read raises redis's ConnectionError /
  TimeoutError, which the gateway turns into its usual "online store unavailable" degradation; the
  slot map is re-learned on the next read (at most every `refresh_interval_s`), so once the cluster
  has promoted the replica reads succeed again without a restart.
- Any other error reply (CLUSTERDOWN, TRYAGAIN during a failover) fails the whole read: a read is
  either complete and correct or a clean failure, never partial.
Reads go to masters only (as Feast's own client does): a replica may lag behind a session push.
"""

from __future__ import annotations

import math
import threading
import time
from functools import lru_cache
from typing import Any, Iterable

import redis
from redis.cluster import REDIS_CLUSTER_HASH_SLOTS, ClusterNode, RedisCluster
from redis.crc import key_slot
from redis.exceptions import AskError, MovedError, ResponseError

from gateway.features.layout import FeatureLayout
from gateway.features.online_reader import OnlineFeatures, _RedisCommands

_ASKING = b"*1\r\n$6\r\nASKING\r\n"
# Connection-string options handed to redis-py (Feast passes the same names to RedisCluster).
_CONNECTION_OPTIONS = ("password", "username", "ssl")


class SlotMapUnavailable(redis.ConnectionError):
    """No usable slot map (no startup node answered, or a slot has no master)."""


class RedisClusterFeatureReader(_RedisCommands):
    """Reads Feast's Redis layout from a Redis Cluster; the OnlineFeatureReader protocol."""

    def __init__(self, layout: FeatureLayout, startup_nodes: list[tuple[str, int]], timeout_s: float = 0.05,
                 refresh_interval_s: float = 0.1, max_redirects: int = 3, **connection: Any):
        super().__init__(layout)
        if not startup_nodes:
            raise ValueError("startup_nodes: a Redis Cluster reader needs at least one host:port")
        self._startup = list(startup_nodes)
        self._connection = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s, **connection}
        self.refresh_interval_s = refresh_interval_s
        self.max_redirects = max_redirects
        self._client: RedisCluster | None = None  # created on the first read: the gateway starts without the cluster
        self._owners: list[ClusterNode | None] | None = None  # slot -> its master
        self._stale = True
        self._refreshed_at = -math.inf
        self._refresh_lock = threading.Lock()
        self.slot_map_refreshes = 0  # for tests and operators: how often the topology was re-learned
        self._item_slot_command = lru_cache(maxsize=1 << 20)(self._slot_and_item_command)

    @classmethod
    def from_connection_string(cls, layout: FeatureLayout, conn: str, timeout_s: float = 0.05) -> "RedisClusterFeatureReader":
        """Feast's cluster form `host1:port1,host2:port2,...,password=...,ssl=true`, parsed by Feast's own parser."""
        from feast.infra.online_stores.redis import RedisOnlineStore

        nodes, params = RedisOnlineStore._parse_connection_string(conn)
        startup = [(n["host"], int(n["port"])) for n in nodes]
        options = {k: params[k] for k in _CONNECTION_OPTIONS if k in params}
        if "password" in options:
            options["password"] = str(options["password"])  # Feast json-decodes values: 1234 arrives as an int
        return cls(layout, startup, timeout_s, **options)

    def _slot_and_item_command(self, item_id: str) -> tuple[int, bytes]:
        return key_slot(self._item_key(item_id)), self._item_command(item_id)

    # -- topology ---------------------------------------------------------------------------------

    def _slot_map(self) -> list[ClusterNode | None]:
        owners = self._owners
        if owners is not None and not self._stale:
            return owners
        return self._refresh()

    def _refresh(self) -> list[ClusterNode | None]:
        """Re-learn slot -> master from the cluster (rate-limited; one thread at a time, the others
        keep using the map they have rather than wait)."""
        owners = self._owners
        if not self._refresh_lock.acquire(blocking=owners is None):
            return owners  # type: ignore[return-value]  # not None: blocking acquire otherwise
        try:
            if self._owners is not None and (not self._stale or
                                             time.monotonic() - self._refreshed_at < self.refresh_interval_s):
                return self._owners
            self._refreshed_at = time.monotonic()
            try:
                if self._client is None:
                    nodes = [ClusterNode(host, port) for host, port in self._startup]
                    self._client = RedisCluster(startup_nodes=nodes, require_full_coverage=False, **self._connection)
                else:
                    self._client.nodes_manager.initialize()
            except redis.RedisError as e:
                raise SlotMapUnavailable(f"Redis Cluster slot map unavailable: {e}") from e
            cache = self._client.nodes_manager.slots_cache
            self._owners = [cache[s][0] if cache.get(s) else None for s in range(REDIS_CLUSTER_HASH_SLOTS)]
            self._stale = False
            self.slot_map_refreshes += 1
            return self._owners
        finally:
            self._refresh_lock.release()

    def _node(self, host: str, port: int) -> ClusterNode:
        """The node a MOVED / ASK reply names (known to the slot map, or learned now)."""
        assert self._client is not None
        node = self._client.get_node(host=host, port=port)
        if node is None:
            self._stale, self._refreshed_at = True, -math.inf
            self._refresh()
            node = self._client.get_node(host=host, port=port)
        if node is None:
            raise SlotMapUnavailable(f"redirected to {host}:{port}, which the cluster does not list")
        return node

    # -- reads ------------------------------------------------------------------------------------

    def read(self, user_id: str, item_ids: Iterable[str], now: float | None = None) -> OnlineFeatures:
        item_ids = list(item_ids)
        commands = [(key_slot(self._user_key(user_id)), self._user_command(user_id))]
        commands += map(self._item_slot_command, item_ids)
        replies = self._execute(commands)
        return self._assemble(item_ids, replies, time.time() if now is None else now)

    def _execute(self, commands: list[tuple[int, bytes]]) -> list[Any]:
        """Every command's reply, in order. Redirected commands are re-sent (max_redirects rounds)."""
        replies: list[Any] = [None] * len(commands)
        pending = range(len(commands))
        redirects: dict[int, tuple[ClusterNode, bool]] = {}  # command -> (node, behind ASKING?)
        for _ in range(self.max_redirects + 1):
            owners = self._slot_map()
            batches: dict[str, tuple[ClusterNode, list[tuple[int, bool]]]] = {}
            for i in pending:
                node, asking = redirects.get(i) or (owners[commands[i][0]], False)
                if node is None:
                    self._stale = True
                    raise SlotMapUnavailable(f"hash slot {commands[i][0]} has no master in the slot map")
                batch = batches.get(node.name)
                if batch is None:
                    batch = batches[node.name] = (node, [])
                batch[1].append((i, asking))
            pending = self._round_trip(list(batches.values()), commands, replies, redirects)
            if not pending:
                return replies
        raise redis.ConnectionError(f"{len(pending)} commands still redirected after {self.max_redirects} rounds")

    def _round_trip(self, batches: list[tuple[ClusterNode, list[tuple[int, bool]]]], commands: list[tuple[int, bytes]],
                    replies: list[Any], redirects: dict[int, tuple[ClusterNode, bool]]) -> list[int]:
        """Send each node its batch, then read all replies; return the commands to re-send."""
        held = []
        failure: ResponseError | None = None
        again: list[int] = []
        try:
            for node, entries in batches:
                pool = node.redis_connection.connection_pool
                conn = pool.get_connection()
                held.append((pool, conn))
                conn.send_packed_command(
                    [b"".join(_ASKING + commands[i][1] if asking else commands[i][1] for i, asking in entries)],
                    check_health=False)
            # Every node has its batch now and works on it while we read the first node's replies.
            for (node, entries), (_, conn) in zip(batches, held):
                for i, asking in entries:
                    try:
                        if asking:
                            conn.read_response()  # ASKING's +OK
                        replies[i] = conn.read_response()
                    except MovedError as e:
                        self._stale = True  # this slot moved: re-learn the map before the next read
                        redirects[i] = (self._node(e.host, e.port), False)
                        again.append(i)
                    except AskError as e:
                        redirects[i] = (self._node(e.host, e.port), True)
                        again.append(i)
                    except ResponseError as e:  # CLUSTERDOWN, TRYAGAIN, ...: keep reading, then fail
                        self._stale = True
                        failure = failure or e
        except (redis.ConnectionError, redis.TimeoutError, OSError):
            self._stale = True  # a node is gone or slow: its replica may be taking over
            for _, conn in held:
                conn.disconnect()  # unread replies would corrupt the next read on these connections
            raise
        except BaseException:
            for _, conn in held:
                conn.disconnect()
            raise
        finally:
            for pool, conn in held:
                pool.release(conn)
        if failure is not None:
            raise failure  # after the loop: every reply was read, so the connections stay usable
        return again

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
