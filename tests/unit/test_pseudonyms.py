"""Pseudonymised ids (rpc/pseudonyms.py): stable, keyed, rule-conforming; applied where ids enter the
gateway and the feedback service; never a raw id in a log line when on."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram

from contract.rules import ID_PATTERN
from eventlog.event_log import EventLog
from feedback.service import FeedbackServicer
from gateway.config import GatewaySettings
from gateway.pipeline.context import EMPTY_QUERY, Outcome
from gateway.service import ACCESS_LOG, LOGGED_IDS, RecommendServicer
from recsys.v1 import feedback_pb2 as fb
from recsys.v1 import recommend_pb2, recommend_pb2_grpc
from rpc.interceptors import server_interceptors
from rpc.logs import JsonFormatter
from rpc.pseudonyms import KEY_ENV, KEY_FILE_ENV, PseudonymKeyError, Pseudonyms, load, new_key

KEY = b"k" * 32
ids = st.from_regex(ID_PATTERN, fullmatch=True)


@settings(max_examples=200, deadline=None)
@given(ids)
def test_a_pseudonym_is_a_valid_id_stable_and_not_the_id(user_id):
    p = Pseudonyms(KEY)
    pseudonym = p.user(user_id)
    assert ID_PATTERN.fullmatch(pseudonym) and pseudonym.startswith("p_") and len(pseudonym) == 34
    assert pseudonym == Pseudonyms(KEY).user(user_id)  # stable across processes with the same key
    assert pseudonym != user_id
    assert Pseudonyms(b"x" * 32).user(user_id) != pseudonym  # another key, another pseudonym
    assert p.session(user_id) != pseudonym  # kinds are separated
    assert p.audit_subject(user_id) not in (pseudonym, user_id) and pseudonym not in p.audit_subject(user_id)


@settings(max_examples=50, deadline=None)
@given(st.lists(ids, min_size=2, max_size=20, unique=True))
def test_different_ids_get_different_pseudonyms(many):
    p = Pseudonyms(KEY)
    assert len({p.user(i) for i in many}) == len(many)


def test_off_leaves_ids_unchanged_and_empty_stays_empty():
    off = Pseudonyms()
    assert not off.on and off.user("u1") == "u1" and off.session("s1") == "s1"
    assert Pseudonyms(KEY).user("") == "" and Pseudonyms(KEY).session("") == ""
    event = {"user_id": "u1", "session_id": None, "item_id": "i1"}
    assert Pseudonyms(KEY).event(event) == {"user_id": Pseudonyms(KEY).user("u1"), "session_id": None, "item_id": "i1"}
    assert event["user_id"] == "u1"  # a copy


def test_the_key_comes_from_a_file_or_the_environment(tmp_path: Path):
    key_file = tmp_path / "key"
    key_file.write_text(new_key() + "\n")
    from_file = load(environ={KEY_FILE_ENV: str(key_file)})
    assert from_file.on and from_file.user("u1") == load(key_file).user("u1")
    assert load(environ={KEY_ENV: key_file.read_text().strip()}).user("u1") == from_file.user("u1")
    assert not load(environ={}).on
    with pytest.raises(PseudonymKeyError, match="at least 16 bytes"):
        load(environ={KEY_ENV: "short"})
    with pytest.raises(PseudonymKeyError, match="missing"):
        load(tmp_path / "missing")
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(PseudonymKeyError, match="empty"):
        load(tmp_path / "empty")


# --- where ids enter ------------------------------------------------------------------------------

class Recorded:
    """The gateway's recommender, faked: records the Request the servicer built."""

    def __init__(self) -> None:
        self.requests: list = []

    async def run(self, req, budget_s):
        self.requests.append(req)
        return Outcome([], {}, [], EMPTY_QUERY)


class AllLines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(JsonFormatter().format(record))


def test_the_gateway_looks_up_and_logs_only_pseudonyms(monkeypatch):
    raw_user, raw_session = "shopper-4242", "visit-77"
    p = Pseudonyms(KEY)
    recorder = Recorded()
    lines = AllLines()
    root = logging.getLogger()
    root.addHandler(lines)
    old_level = root.level
    root.setLevel(logging.DEBUG)

    async def go():
        registry = CollectorRegistry()
        server = grpc.aio.server(interceptors=server_interceptors(
            access_log=logging.getLogger(ACCESS_LOG), requests=Counter("p_requests_total", "", ["method", "code"],
                                                                       registry=registry),
            request_seconds=Histogram("p_seconds", "", ["method"], registry=registry),
            services=("recsys.v1.RecommendService",), id_fields=(*LOGGED_IDS, "session_id"), pseudonyms=p))
        recommend_pb2_grpc.add_RecommendServiceServicer_to_server(RecommendServicer(GatewaySettings(), recorder, p),
                                                                  server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = recommend_pb2_grpc.RecommendServiceStub(channel)
                await stub.Recommend(recommend_pb2.RecommendRequest(user_id=raw_user, session_id=raw_session), timeout=5)
                await stub.Rank(recommend_pb2.RankRequest(user_id=raw_user, item_ids=["i1"]), timeout=5)
                with pytest.raises(grpc.aio.AioRpcError) as err:  # refused: the caller sees its own input
                    await stub.Recommend(recommend_pb2.RecommendRequest(user_id=raw_user, num_results=-1), timeout=5)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        finally:
            await server.stop(0)
        await asyncio.sleep(0.05)

    try:
        asyncio.run(go())
    finally:
        root.removeHandler(lines)
        root.setLevel(old_level)
    assert [(r.user_id, r.session_id) for r in recorder.requests] == [
        (p.user(raw_user), p.session(raw_session)), (p.user(raw_user), "")]
    access = [json.loads(x) for x in lines.lines if json.loads(x)["logger"] == ACCESS_LOG]
    assert len(access) == 3 and all(a["user_id"] == p.user(raw_user) for a in access)
    assert access[0]["session_id"] == p.session(raw_session)
    assert not [x for x in lines.lines if raw_user in x or raw_session in x]


def test_the_access_log_logs_an_invalid_id_only_as_its_marker_when_on():
    from rpc.interceptors import AccessLog

    log = AccessLog(logging.getLogger("t"), None, None, id_fields=("user_id",), pseudonyms=Pseudonyms(KEY))
    assert log.logged_id("user_id", "bad id!") == "<invalid id, 7 chars>"
    assert log.logged_id("user_id", "u1") == Pseudonyms(KEY).user("u1")
    assert AccessLog(logging.getLogger("t"), None, None, pseudonyms=Pseudonyms()).logged_id("user_id", "u1") == "u1"


def test_the_feedback_service_stores_only_pseudonyms(tmp_path: Path):
    p = Pseudonyms(KEY)
    log = EventLog(tmp_path)
    seen: list[list[dict]] = []

    async def hook(events):
        seen.append(events)

    service = FeedbackServicer(log, [hook], pseudonyms=p)
    request = fb.LogRequest(events=[
        fb.Event(event_id="e1", type=fb.EVENT_TYPE_CLICK, user_id="shopper-1", session_id="visit-1", item_id="i1"),
        fb.Event(event_id="e2", type=fb.EVENT_TYPE_QUERY, user_id="shopper-1", query="shoes"),
        fb.Event(event_id="e3", type=fb.EVENT_TYPE_CLICK, user_id="bad id", item_id="i1")])

    class Context:
        async def abort(self, code, message):
            raise AssertionError(message)

    reply = asyncio.run(service.Log(request, Context()))
    assert (reply.accepted, reply.rejected) == (2, 1)
    assert "'bad id'" in reply.errors[0].message  # the caller's own bad input, back to the caller
    stored = list(log.read_all())
    assert [(e["user_id"], e["session_id"]) for e in stored] == [(p.user("shopper-1"), p.session("visit-1")),
                                                                  (p.user("shopper-1"), None)]
    assert [e["user_id"] for e in seen[0]] == [p.user("shopper-1")] * 2  # sessions and learner hooks too
    log.close()
    assert not [f for f in tmp_path.iterdir() if b"shopper-1" in f.read_bytes() or b"visit-1" in f.read_bytes()]
