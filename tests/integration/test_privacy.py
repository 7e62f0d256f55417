"""Privacy against the real parts: a shop imported with pseudonymised ids into a real Feast repo
(SQLite and Redis online stores, materialized with the feast CLI), the real feedback service as a
process (auth on, pseudonym key, live session pushes, the online learner), labels built from its
event log; then AdminService.EraseUser for one shopper. Every file under the work folder (SQLite
databases and their WAL/journal, parquet decoded, JSON, the service's log, the audit file) and every
Redis key and value is scanned for the shopper's raw id and pseudonym: none remain, the other
shopper's data is untouched, and the audit record names neither.

The shop's own export (raw ids, the input of `recsys data import`) lies outside the work folder: it
is the shop's copy, not something the project writes."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import grpc
import pandas as pd
import pyarrow.parquet as pq
import pytest

from eventlog.event_log import DB_NAME, read_rows
from recsys.v1 import admin_pb2, admin_pb2_grpc, feedback_pb2 as fb, feedback_pb2_grpc
from rpc.clients import channel
from rpc.pseudonyms import KEY_FILE_ENV, Pseudonyms, load, new_key
from scorer.data import feast_ops
from scorer.data.labels import build_labels
from scorer.data.synthetic import generate_shop
from scripts.local_redis import RedisServer, local_redis
from tests.keys import ADMIN_KEY, ADMIN_NAME, GATEWAY_KEY, SHOP_KEY
from tests.processes import LoggedFeedback

pytestmark = pytest.mark.integration

REDIS_YAML = "feature_store.redis.yaml"
# Ids of their own, so a byte scan cannot mistake part of another id for them.
ERASED, KEPT, BY_CLI = "erase-me-7f3a9c", "keep-me-2b9c41", "erase-me-too-4c8d1e"
RECSYS = str(Path(sys.executable).with_name("recsys"))


def recsys(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """The command line as an operator runs it (the installed entry point, a wide terminal)."""
    return subprocess.run([RECSYS, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COLUMNS": "200", **env})


@dataclass
class World:
    work: Path  # everything the project writes in this test lies under it
    repo: Path
    key_file: Path
    pseudonyms: Pseudonyms
    redis: RedisServer

    @property
    def offline(self) -> Path:
        return self.repo / "data" / "offline"


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("privacy")
    work = root / "work"
    work.mkdir()
    key_file = work / "pseudonym.key"
    key_file.write_text(new_key() + "\n")
    pseudonyms = load(key_file)
    shop = generate_shop("tiny", seed=23, end=datetime.now(timezone.utc))
    busiest = shop.events["user_id"].value_counts().index[:3]
    renamed = {busiest[0]: ERASED, busiest[1]: KEPT, busiest[2]: BY_CLI}
    for table in (shop.users, shop.events, shop.user_latent):
        table["user_id"] = table["user_id"].replace(renamed)
    shop.write(root / "export")
    repo = feast_ops.copy_feature_repo(work / "feature_repo")
    done = recsys({KEY_FILE_ENV: str(key_file)}, "data", "import", str(root / "export"), "--repo", str(repo))
    assert done.returncode == 0, done.stdout + done.stderr
    users = pd.read_parquet(repo / "data" / "offline" / "users.parquet")["user_id"]
    assert pseudonyms.user(ERASED) in set(users) and ERASED not in set(users)  # imported as pseudonyms
    end = datetime.now(timezone.utc)
    with local_redis() as redis:
        env = {"REDIS_CONNECTION_STRING": redis.connection_string}
        feast_ops.apply(repo, quiet=True)
        feast_ops.materialize_all(repo, end=end, quiet=True)
        feast_ops.apply(repo, yaml=REDIS_YAML, env=env, quiet=True)
        feast_ops.materialize_all(repo, end=end, yaml=REDIS_YAML, env=env, quiet=True)
        yield World(work, repo, key_file, pseudonyms, redis)


def traces(root: Path, needles: list[str]) -> list[str]:
    """Where under `root` any needle occurs: in a file's bytes, or (parquet, which compresses) in its
    decoded rows."""
    found = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        data = path.read_bytes()
        found += [f"{path.relative_to(root)}: bytes contain {n!r}" for n in needles if n.encode() in data]
        if path.suffix == ".parquet":
            rows = json.dumps(pq.read_table(path).to_pylist(), default=str)
            found += [f"{path.relative_to(root)}: a row contains {n!r}" for n in needles if n in rows]
    return found


def redis_traces(server: RedisServer, needles: list[str]) -> list[str]:
    import redis

    client = redis.Redis.from_url(server.url)
    found = []
    for key in client.scan_iter(count=1000):
        blobs = [key] + (list(client.hgetall(key).values()) if client.type(key) == b"hash" else [])
        found += [f"redis key {key[:40]!r}" for n in needles if any(n.encode() in b for b in blobs)]
    client.close()
    return found


# Request and event ids are the caller's (random in real use): ids of their own, not derived from the user's.
TAG = {ERASED: "a5d1", KEPT: "b7e2"}


def events_of(user: str, n: int) -> list[fb.Event]:
    session, request, tag = f"visit-{user}", f"req-{TAG[user]}", TAG[user]
    out = [fb.Event(event_id=f"{tag}-q", type=fb.EVENT_TYPE_QUERY, user_id=user, session_id=session,
                    query="rain jacket")]
    out += [fb.Event(event_id=f"{tag}-imp{i}", type=fb.EVENT_TYPE_IMPRESSION, user_id=user, session_id=session,
                     item_id=f"item-{i}", request_id=request, position=i + 1) for i in range(n)]
    out += [fb.Event(event_id=f"{tag}-click", type=fb.EVENT_TYPE_CLICK, user_id=user, session_id=session,
                     item_id="item-0", request_id=request, position=1),
            fb.Event(event_id=f"{tag}-cart", type=fb.EVENT_TYPE_ADD_TO_CART, user_id=user, session_id=session,
                     item_id="item-0", quantity=1)]
    return out


def served(user: str, n: int) -> fb.ServedList:
    return fb.ServedList(request_id=f"req-{TAG[user]}",
                         items=[fb.ServedItem(item_id=f"item-{i}", parts=[0.5, 0.3, 0.2, 0.1]) for i in range(n)])


def rows_of(world: World, pseudonym: str) -> dict[str, int]:
    """The user's rows per offline parquet file and in the event log."""
    counts = {}
    for path in sorted(world.offline.rglob("*.parquet")):
        if "user_id" in pq.read_schema(path).names:
            counts[path.name] = int((pd.read_parquet(path, columns=["user_id"])["user_id"] == pseudonym).sum())
    log = world.work / "events" / DB_NAME
    counts["event_log"] = sum(1 for e in read_rows(log) if e["user_id"] == pseudonym) if log.exists() else 0
    return counts


def online_entities(world: World, pseudonym: str) -> dict[str, int]:
    """Rows keyed by the user in the SQLite online store's tables, and whether Redis holds their hash."""
    from feast.infra.key_encoding_utils import serialize_entity_key
    from feast.infra.online_stores.helpers import _redis_key
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value
    import redis

    entity = EntityKey(join_keys=["user_id"], entity_values=[Value(string_val=pseudonym)])
    key = serialize_entity_key(entity, entity_key_serialization_version=3)
    conn = sqlite3.connect(world.repo / "data" / "online_store.db")
    counts = {t: conn.execute(f'SELECT count(DISTINCT entity_key) FROM "{t}" WHERE entity_key = ?', (key,)).fetchone()[0]
              for t in ("recsys_user_profile", "recsys_user_session")}
    conn.close()
    client = redis.Redis.from_url(world.redis.url)
    counts["redis"] = client.exists(_redis_key("recsys", entity, entity_key_serialization_version=3))
    client.close()
    return counts


def test_erasing_a_user_leaves_nothing_of_them_where_the_project_writes(world: World):
    ps = world.pseudonyms
    erased, kept = ps.user(ERASED), ps.user(KEPT)
    needles = [ERASED, erased, ps.session(f"visit-{ERASED}"), f"visit-{ERASED}"]
    service = LoggedFeedback(world.work / "events", {
        "RECSYS_FEEDBACK_FEATURE_REPO": str(world.repo), KEY_FILE_ENV: str(world.key_file),
        "RECSYS_FEEDBACK_ERASE_FEATURE_STORE_YAMLS": json.dumps(["feature_store.yaml", REDIS_YAML]),
        "REDIS_CONNECTION_STRING": world.redis.connection_string, "RECSYS_LOG_LEVEL": "INFO"})
    try:
        served_reply = feedback_pb2_grpc.FeedbackServiceStub(channel(service.address, api_key=GATEWAY_KEY)).LogServed(
            fb.LogServedRequest(lists=[served(ERASED, 4), served(KEPT, 4)]), timeout=10)
        assert served_reply.accepted == 2
        logged = feedback_pb2_grpc.FeedbackServiceStub(channel(service.address, api_key=SHOP_KEY)).Log(
            fb.LogRequest(events=events_of(ERASED, 4) + events_of(KEPT, 4)), timeout=10)
        assert (logged.accepted, logged.rejected) == (14, 0)
        build_labels(world.offline, world.work / "events")  # the label log, from the service's event log
        assert rows_of(world, erased)["labels.parquet"] >= 4 and rows_of(world, erased)["event_log"] == 7
        # profile materialized; session materialized and pushed live by the service
        assert online_entities(world, erased) == {"recsys_user_profile": 1, "recsys_user_session": 1, "redis": 1}
        # The scan finds the user before the erasure (it can fail), and never a raw id: they never reach a store.
        before = traces(world.work, needles)
        assert any("online_store.db" in t for t in before) and any(DB_NAME in t for t in before)
        assert any("labels.parquet" in t for t in before) and any("user_profile.parquet" in t for t in before)
        assert not [t for t in before if repr(ERASED) in t or repr(f"visit-{ERASED}") in t]
        assert redis_traces(world.redis, needles)
        kept_before = (rows_of(world, kept), online_entities(world, kept))
        assert kept_before[0]["event_log"] == 7 and kept_before[1]["redis"] == 1

        request = admin_pb2.EraseUserRequest(user_id=ERASED)
        for key, code in ((SHOP_KEY, grpc.StatusCode.PERMISSION_DENIED), ("", grpc.StatusCode.UNAUTHENTICATED)):
            with pytest.raises(grpc.RpcError) as refused:
                admin_pb2_grpc.AdminServiceStub(channel(service.address, api_key=key)).EraseUser(request, timeout=10)
            assert refused.value.code() == code
        admin_channel = channel(service.address, api_key=ADMIN_KEY)
        admin = admin_pb2_grpc.AdminServiceStub(admin_channel)
        for bad in ("", "two words", "x" * 129):  # bad input: INVALID_ARGUMENT naming the field, not audited
            with pytest.raises(grpc.RpcError) as refused:
                admin.EraseUser(admin_pb2.EraseUserRequest(user_id=bad), timeout=10)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "user_id" in refused.value.details()
        with pytest.raises(grpc.RpcError) as refused:  # undecodable bytes
            admin_channel.unary_unary("/recsys.v1.AdminService/EraseUser")(b"\xff\xff\xff", timeout=10)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert rows_of(world, erased)["event_log"] == 7  # refused calls erase nothing
        reply = admin.EraseUser(request, timeout=120)
        removed = dict(reply.removed)
        assert reply.pseudonymised and reply.subject == ps.audit_subject(ERASED) and not reply.not_reached
        assert removed["event_log"] == 7 and removed["online/redis"] == 1 and removed["online/user_session"] == 1
        assert removed["online/user_profile"] == 1 and removed["sessions_in_memory"] == 1
        assert removed["offline/labels.parquet"] >= 4 and removed["offline/users.parquet"] == 1
        assert removed["offline/events.parquet"] > 0 and removed["learner"] >= 2  # budget window, served list, ...
        assert traces(world.work, needles) == [] and redis_traces(world.redis, needles) == []  # while it runs
        again = admin.EraseUser(request, timeout=120)  # idempotent
        assert sum(again.removed.values()) == 0 and again.subject == reply.subject
        # The service keeps working for everyone else, and for the erased user's new events.
        assert feedback_pb2_grpc.FeedbackServiceStub(channel(service.address, api_key=SHOP_KEY)).Log(
            fb.LogRequest(events=events_of(KEPT, 1)[:1]), timeout=10).duplicate == 1
    finally:
        service.stop()
    (world.work / "feedback.log").write_text("".join(service.lines))  # its log, scanned with the rest
    assert any("erased a user" in line for line in service.lines)
    assert traces(world.work, needles) == [] and redis_traces(world.redis, needles) == []
    assert (rows_of(world, kept), online_entities(world, kept)) == kept_before  # the other shopper's data is whole
    assert online_entities(world, erased) == {"recsys_user_profile": 0, "recsys_user_session": 0, "redis": 0}
    audit = [json.loads(line) for line in (world.work / "events" / "privacy_audit.jsonl").read_text().splitlines()]
    audit = [a for a in audit if a["subject"] == reply.subject]
    assert [(a["by"], a["subject"], a["complete"], a["total"] > 0) for a in audit] == [
        (ADMIN_NAME, reply.subject, True, True), (ADMIN_NAME, reply.subject, True, False)]
    assert audit[0]["removed"] == removed


def test_the_cli_erases_offline_and_through_the_service(world: World):
    ps = world.pseudonyms
    needles = [BY_CLI, ps.user(BY_CLI)]
    env = {KEY_FILE_ENV: str(world.key_file), "REDIS_CONNECTION_STRING": world.redis.connection_string}
    assert traces(world.work, needles) and redis_traces(world.redis, needles)  # imported and materialized
    audit_file = world.work / "cli_audit.jsonl"
    done = recsys(env, "privacy", "erase", BY_CLI, "--offline", "--repo", str(world.repo), "--event-log",
                  str(world.work / "events"), "--yaml", "feature_store.yaml", "--yaml", REDIS_YAML,
                  "--audit-file", str(audit_file))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "offline/users.parquet" in done.stdout and "online/redis" in done.stdout and "records removed" in done.stdout
    assert traces(world.work, needles) == [] and redis_traces(world.redis, needles) == []
    (record,) = [json.loads(line) for line in audit_file.read_text().splitlines()]
    assert record["by"].startswith("offline:") and record["subject"] == ps.audit_subject(BY_CLI) and record["total"] > 0

    service = LoggedFeedback(world.work / "events", {"RECSYS_FEEDBACK_FEATURE_REPO": str(world.repo),
                                                     KEY_FILE_ENV: str(world.key_file)})
    try:
        refused = recsys({**env, "RECSYS_API_KEY": SHOP_KEY}, "privacy", "erase", BY_CLI, "--feedback", service.address)
        assert refused.returncode == 1 and "PERMISSION_DENIED" in refused.stdout, refused.stdout + refused.stderr
        again = recsys({**env, "RECSYS_API_KEY": ADMIN_KEY}, "privacy", "erase", BY_CLI, "--feedback", service.address)
        assert again.returncode == 0 and "0 records removed; ids pseudonymised: yes" in again.stdout, again.stdout
    finally:
        service.stop()
