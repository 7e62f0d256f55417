"""Erasing a user from everything the project writes, and the audit record of it.

One implementation, two callers: the feedback service's AdminService.EraseUser (feedback/admin.py:
it holds the live sessions and the learner's records in memory, so a running service must do it)
and `recsys privacy erase --offline` (a stopped service's files). What goes, in this order:

1. the event log: every event of the user (eventlog/event_log.py `erase`: overwritten, WAL
   truncated) and their lines in the former segment files; their request ids are kept for step 4;
2. the online store: every row of every user-keyed feature view, the live session included
   (SQLite: every Feast table's rows with the user's entity key, deleted with secure_delete; Redis:
   the user's hash, which holds all their views), with the service's session pushes held off, and
   the user's in-memory session;
3. the offline sources: the rows with the user's id of every parquet file under data/offline
   (users, events, user_profile, user_session, labels: the label log, ...), each file replaced
   atomically;
4. the online learner's records: the user's budget window and whatever is held for their requests;
5. one audit record, appended to a JSON-lines file: when, who, the subject (rpc/pseudonyms.py
   `audit_subject`: neither the id nor its pseudonym), what was removed where, what was not reached.

With pseudonyms on, both the raw id and its pseudonym are erased (data written before the key was
configured is keyed by the raw id). A user with no data anywhere succeeds with zero counts.
Not reached (docs/security.md#erasing-a-user): backups and copies made outside the project,
aggregates (item popularity counts), and model weights or blend weights trained before the erasure.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import logging
import os
import sqlite3
from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from contract.rules import id_error
from eventlog.event_log import DB_NAME, EventLog, erase_from_segments
from rpc.pseudonyms import Pseudonyms

if TYPE_CHECKING:
    from feedback.blend_learner import BlendLearner
    from feedback.sessions import SessionUpdater

log = logging.getLogger(__name__)

AUDIT_FILE = "privacy_audit.jsonl"  # default: beside the event log
USER_ENTITY = "user"  # the Feast entity of shoppers (feature_repo/entities.py)


class EraseError(ValueError):
    """The request cannot be carried out as given (e.g. an invalid id); the message says why."""


@dataclass
class Stores:
    """What an erasure reaches. `event_log`: the open log (the service's), else `event_log_dir` is
    opened for the erasure; `online`: Feast FeatureStores whose online stores hold user features;
    `offline_dir`: the feature repo's data/offline; `learner`, `sessions`: a running service's."""

    audit_file: Path
    event_log: EventLog | None = None
    event_log_dir: Path | None = None
    online: Sequence[Any] = ()
    offline_dir: Path | None = None
    learner: BlendLearner | None = None
    sessions: SessionUpdater | None = None
    not_configured: list[str] = field(default_factory=list)  # what this caller cannot reach, and why


@dataclass
class Erasure:
    subject: str
    pseudonymised: bool
    audit_file: Path
    removed: dict[str, int] = field(default_factory=dict)
    not_reached: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.removed.values())


async def erase_user(user_id: str, pseudonyms: Pseudonyms, stores: Stores, by: str) -> Erasure:
    """Erase `user_id` (the shop's raw id) from `stores`; append the audit record; return it.
    EraseError for an invalid id; store errors (EventLogError, OSError, Redis errors) propagate
    after what was erased so far is audited."""
    if not user_id:
        raise EraseError("user_id: is required")
    if (problem := id_error(user_id)) is not None:
        raise EraseError(f"user_id: {problem}")
    ids = sorted({user_id, pseudonyms.user(user_id)})
    result = Erasure(pseudonyms.audit_subject(user_id), pseudonyms.on, stores.audit_file,
                     not_reached=list(stores.not_configured))
    try:
        request_ids = await asyncio.to_thread(_erase_event_log, ids, stores, result)
        await _erase_online(ids, stores, result)
        if stores.offline_dir is not None:
            await asyncio.to_thread(_erase_offline, ids, stores.offline_dir, result)
        if stores.learner is not None:
            result.removed["learner"] = stores.learner.forget(ids, request_ids)
    except BaseException as e:
        result.not_reached.append(f"stopped by an error: {type(e).__name__}")
        _audit(result, by, complete=False)
        raise
    _audit(result, by, complete=True)
    log.info("erased a user (subject %s): %d records removed", result.subject, result.total,
             extra={"fields": {"subject": result.subject, "removed": result.removed}})
    return result


# --- the event log ----------------------------------------------------------------------------------

def _erase_event_log(ids: list[str], stores: Stores, result: Erasure) -> frozenset[str]:
    event_log, opened = stores.event_log, None
    directory = event_log.directory if event_log is not None else stores.event_log_dir
    if directory is None:
        return frozenset()
    if event_log is None:
        if not (Path(directory) / DB_NAME).exists() and not any(Path(directory).glob("segment-*.jsonl")):
            result.removed["event_log"] = 0
            return frozenset()
        event_log = opened = EventLog(Path(directory))
    try:
        erased = event_log.erase(ids)
    finally:
        if opened is not None:
            opened.close()
    result.removed["event_log"] = erased.events
    segments = erase_from_segments(Path(directory), ids)
    if segments:
        result.removed["event_log/segments"] = segments
    return erased.request_ids


# --- the online store -------------------------------------------------------------------------------

async def _erase_online(ids: list[str], stores: Stores, result: Erasure) -> None:
    async with AsyncExitStack() as stack:
        if stores.sessions is not None:
            # No session push between forgetting the user's session and deleting their rows.
            await stack.enter_async_context(stores.sessions.push_lock)
            result.removed["sessions_in_memory"] = stores.sessions.forget(ids)
        for store in stores.online:
            for name, n in (await asyncio.to_thread(erase_online_store, store, ids)).items():
                result.removed[name] = result.removed.get(name, 0) + n


def user_entity_keys(store: Any, ids: Sequence[str]) -> list[Any]:
    """The Feast EntityKey protos of these user ids."""
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value

    join_key = store.get_entity(USER_ENTITY).join_key
    return [EntityKey(join_keys=[join_key], entity_values=[Value(string_val=i)]) for i in ids]


def erase_online_store(store: Any, ids: Sequence[str]) -> dict[str, int]:
    """Delete the users from a FeatureStore's online store; {"online/<where>": entities removed}."""
    config = store.config
    kind = config.online_store.type
    keys = user_entity_keys(store, ids)
    version = config.entity_key_serialization_version
    if kind == "sqlite":
        from feast.infra.key_encoding_utils import serialize_entity_key

        path = Path(config.online_store.path)
        if not path.is_absolute():
            path = Path(config.repo_path) / path
        return _erase_sqlite_online(path, [serialize_entity_key(k, entity_key_serialization_version=version)
                                           for k in keys], config.project)
    if kind == "redis":
        from feast.infra.online_stores.helpers import _redis_key
        from feast.infra.online_stores.redis import RedisOnlineStore

        # Feast's own client: a single node or a Redis Cluster (redis_type), as configured. One DEL
        # per key: the keys of two ids hash to different cluster slots.
        client = RedisOnlineStore()._get_client(config.online_store)
        removed = sum(int(client.delete(_redis_key(config.project, k, entity_key_serialization_version=version)))
                      for k in keys)
        return {"online/redis": removed}
    raise EraseError(f"online store type {kind!r}: erasing is implemented for sqlite and redis")


def _erase_sqlite_online(path: Path, keys: list[bytes], project: str) -> dict[str, int]:
    """Every Feast table (entity_key, feature_name, ...) loses the keys' rows; deleted content is
    overwritten (secure_delete) so the file keeps no copy. Counted per table in entities."""
    if not path.exists():
        return {}
    conn = sqlite3.connect(path, timeout=30, isolation_level=None)
    removed: dict[str, int] = {}
    try:
        conn.execute("PRAGMA secure_delete=ON")
        conn.execute("BEGIN IMMEDIATE")
        tables = [name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        marks = ", ".join("?" * len(keys))
        for table in tables:
            columns = {row[1] for row in conn.execute(f"PRAGMA table_info(\"{table}\")")}
            if not {"entity_key", "feature_name"} <= columns:
                continue
            n = conn.execute(f"SELECT count(DISTINCT entity_key) FROM \"{table}\" WHERE entity_key IN ({marks})",
                             keys).fetchone()[0]
            if n:
                conn.execute(f"DELETE FROM \"{table}\" WHERE entity_key IN ({marks})", keys)
            removed[f"online/{table.removeprefix(project + '_')}"] = n
        conn.execute("COMMIT")
        if conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal":
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    finally:
        conn.close()
    return removed


# --- offline sources --------------------------------------------------------------------------------

def _erase_offline(ids: list[str], offline_dir: Path, result: Erasure) -> None:
    """Every parquet file under offline_dir with a user_id column loses the users' rows."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    wanted = pa.array(ids, pa.string())
    for path in sorted(Path(offline_dir).rglob("*.parquet")):
        if "user_id" not in pq.read_schema(path).names:
            continue
        table = pq.read_table(path)
        users = table.column("user_id")
        if not pa.types.is_string(users.type) and not pa.types.is_large_string(users.type):
            users = pc.cast(users, pa.string())
        hit = pc.fill_null(pc.is_in(users, value_set=wanted), False)
        n = pc.sum(hit).as_py() or 0
        result.removed[f"offline/{path.relative_to(offline_dir)}"] = n
        if n:
            tmp = path.with_name(f".{path.name}.erase-tmp")
            pq.write_table(table.filter(pc.invert(hit)), tmp)
            os.replace(tmp, path)  # readers see the old file or the new one


# --- the audit record -------------------------------------------------------------------------------

def _audit(result: Erasure, by: str, complete: bool) -> None:
    """Append one JSON line (fsync'd) to the audit file, created owner-only. Append-only: nothing
    here rewrites or truncates it."""
    record = {
        "at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "action": "erase_user", "by": by,
        "subject": result.subject, "pseudonymised": result.pseudonymised, "complete": complete,
        "removed": result.removed, "total": result.total, "not_reached": result.not_reached,
    }
    path = result.audit_file
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, (json.dumps(record, sort_keys=True) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def offline_operator() -> str:
    """Who runs an offline erasure: the OS user (the audit's `by`)."""
    try:
        return "offline:" + getpass.getuser()
    except (KeyError, OSError):
        return "offline:unknown"
