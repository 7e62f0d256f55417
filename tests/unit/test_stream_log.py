"""The Redis Streams event log's and its consumers' pure logic: key layout and hash slots, the stored
form, node strings, lease planning, settings. (Against real Redis: tests/integration/test_event_stream.py.)"""

from __future__ import annotations

import pytest
import redis
from pydantic import ValidationError
from redis.crc import key_slot

from eventlog.event_log import COLUMNS
from eventlog.stream_log import StreamLayout, decode_event, encode_event, entry_ms, parse_nodes
from feedback.server import FeedbackSettings
from feedback.stream_consumers import ConsumerSettings, fair_share, plan_leases

EVENT = {"event_id": "e-1", "event_type": "CLICK", "user_id": "u-1", "session_id": "s", "item_id": "i-9",
         "request_id": None, "position": 3, "query": None, "quantity": None,
         "timestamp": "2026-12-01T10:00:00.000001+00:00", "received_at": "2026-12-01T10:00:00.100000+00:00"}


def test_every_key_of_a_shard_is_in_one_hash_slot_and_shards_spread() -> None:
    layout = StreamLayout("recsys:events", 8)
    for shard in range(8):
        slots = {key_slot(k.encode()) for k in (layout.stream(shard), layout.dedupe(shard, "any-id"),
                                                 layout.dedupe(shard, "{odd}id"), layout.lease(shard))}
        assert len(slots) == 1, shard  # one Lua script may touch them all, on one master
    assert len({key_slot(layout.stream(s).encode()) for s in range(8)}) == 8


def test_a_user_has_one_shard_and_users_spread_over_all() -> None:
    layout = StreamLayout(shards=8)
    assert layout.shard_of("u-1") == layout.shard_of("u-1")
    counts = [0] * 8
    for i in range(8000):
        counts[layout.shard_of(f"user-{i}")] += 1
    assert min(counts) > 800, counts  # ~1000 each


@pytest.mark.parametrize("prefix,shards", [("", 8), ("a{b}", 8), ("a b", 8), ("ok", 0), ("ok", 2000)])
def test_bad_layouts_are_refused_naming_the_field(prefix: str, shards: int) -> None:
    with pytest.raises(ValueError, match="prefix|shards"):
        StreamLayout(prefix, shards)


def test_the_stored_form_round_trips_and_drops_nulls() -> None:
    payload = encode_event(EVENT)
    assert b"request_id" not in payload and b"null" not in payload
    assert decode_event(payload) == EVENT
    assert list(decode_event(payload)) == list(COLUMNS)  # the SQLite log's dict shape
    odd = {**EVENT, "query": "caf\u00e9 \u2603"}
    assert decode_event(encode_event(odd)) == odd


def test_entry_ids_and_node_strings() -> None:
    assert entry_ms(b"1764583200123-7") == 1764583200123
    assert parse_nodes("10.0.0.5:6379, 10.0.0.6:6380,password=x") == [("10.0.0.5", 6379), ("10.0.0.6", 6380)]
    for bad in ("", "host", "host:port", "password=x"):
        with pytest.raises(ValueError, match="event stream nodes"):
            parse_nodes(bad)


def test_fair_share_and_lease_planning() -> None:
    assert fair_share(8, 0) == 8 and fair_share(8, 1) == 8 and fair_share(8, 2) == 4 and fair_share(8, 3) == 3
    # alone: take every free shard
    assert plan_leases([], range(8), 8) == (list(range(8)), [])
    # a second replica joined: hand back the extras, take nothing
    assert plan_leases(range(8), [], 4) == ([], [4, 5, 6, 7])
    # the other replica died: its shards are free again
    assert plan_leases([0, 1, 2, 3], [4, 5, 6, 7], 8) == ([4, 5, 6, 7], [])
    # at its share: nothing to do, even with free shards (another replica takes them)
    assert plan_leases([0, 1, 2, 3], [4, 5], 4) == ([], [])
    assert plan_leases([1], [1, 2], 2) == ([2], [])  # an owned shard is never "free"


def test_consumer_settings_out_of_range_are_refused() -> None:
    with pytest.raises(ValueError, match="consumer settings"):
        ConsumerSettings(lease_ms=10)
    with pytest.raises(ValueError, match="consumer settings"):
        ConsumerSettings(batch=0)


def test_feedback_settings_choose_the_event_store(monkeypatch: pytest.MonkeyPatch) -> None:
    assert FeedbackSettings().event_store == "sqlite"  # the default for one machine
    monkeypatch.setenv("RECSYS_FEEDBACK_EVENT_STORE", "redis_streams")
    monkeypatch.setenv("RECSYS_FEEDBACK_EVENT_STREAM_URL", "127.0.0.1:7000,127.0.0.1:7001")
    monkeypatch.setenv("RECSYS_FEEDBACK_EVENT_STREAM_CLUSTER", "true")
    monkeypatch.setenv("RECSYS_FEEDBACK_EVENT_STREAM_WAIT_REPLICAS", "1")
    s = FeedbackSettings()
    assert (s.event_store, s.event_stream_cluster, s.event_stream_wait_replicas) == ("redis_streams", True, 1)
    monkeypatch.setenv("RECSYS_FEEDBACK_EVENT_STORE", "kafka")
    with pytest.raises(ValidationError, match="event_store"):
        FeedbackSettings()


def test_the_stream_store_without_a_url_is_an_operator_error() -> None:
    from eventlog.event_log import EventLogError
    from feedback.server import open_event_log

    with pytest.raises(EventLogError, match="EVENT_STREAM_URL"):
        open_event_log(FeedbackSettings(event_store="redis_streams", event_stream_url=""))


class FakePipeline:
    """Records commands; `execute` answers from the client's script (our mapping is what is tested)."""

    def __init__(self, client: "FakeClient") -> None:
        self.client, self.command_stack = client, []

    def eval(self, script, numkeys, *args):
        self.command_stack.append(("eval", args[numkeys + 2:]))

    def execute_command(self, *args):
        self.command_stack.append(args)

    def execute(self, raise_on_error: bool = True):
        answer = self.client.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer(self.command_stack)


class FakeClient:
    def __init__(self, *answers) -> None:
        self.answers = list(answers)

    def ping(self) -> bool:
        return True

    def pipeline(self, transaction: bool = False) -> FakePipeline:
        return FakePipeline(self)

    def close(self) -> None:
        pass


def _stored(stack):  # every event new; WAIT (if sent) confirms 1
    return [[1] * len(c[1]) if c[0] == "eval" else 1 for c in stack]


@pytest.mark.parametrize("error", [redis.ConnectionError("refused"), redis.TimeoutError("t"),
                                   redis.exceptions.ClusterDownError("CLUSTERDOWN"),
                                   redis.exceptions.ReadOnlyError("READONLY"),
                                   redis.exceptions.SlotNotCoveredError("no master")])
def test_redis_errors_become_unavailable_with_nothing_acknowledged(error) -> None:
    from eventlog.event_log import EventLogUnavailable
    from eventlog.stream_log import StreamEventLog

    log = StreamEventLog(FakeClient(error), StreamLayout(shards=2))  # type: ignore[arg-type]
    with pytest.raises(EventLogUnavailable, match="nothing of it was acknowledged"):
        log.append([EVENT])


def test_too_few_replica_confirmations_refuse_the_call() -> None:
    from eventlog.event_log import EventLogUnavailable
    from eventlog.stream_log import StreamEventLog

    log = StreamEventLog(FakeClient(lambda stack: [[1], 0]), StreamLayout(shards=2), wait_replicas=1,  # type: ignore[arg-type]
                         wait_timeout_ms=20)
    with pytest.raises(EventLogUnavailable, match="0 of 1 replicas confirmed within 20 ms"):
        log.append([EVENT])
    ok = StreamEventLog(FakeClient(_stored), StreamLayout(shards=2), wait_replicas=1)  # type: ignore[arg-type]
    assert ok.append([EVENT, {**EVENT, "event_id": "e-2", "user_id": "u-2"}]) == [True, True]


def test_moved_is_retried_once_then_unavailable() -> None:
    from eventlog.event_log import EventLogUnavailable
    from eventlog.stream_log import StreamEventLog

    moved = redis.exceptions.MovedError("3999 127.0.0.1:7001")
    assert StreamEventLog(FakeClient(moved, _stored), StreamLayout(shards=2)).append([EVENT]) == [True]  # type: ignore[arg-type]
    with pytest.raises(EventLogUnavailable, match="MovedError"):
        StreamEventLog(FakeClient(moved, moved), StreamLayout(shards=2)).append([EVENT])  # type: ignore[arg-type]


def test_a_duplicate_within_one_call_is_sent_once_and_reported_as_a_duplicate() -> None:
    from eventlog.stream_log import StreamEventLog

    sent = []

    def answer(stack):
        sent.extend(stack)
        return _stored(stack)

    log = StreamEventLog(FakeClient(answer), StreamLayout(shards=1))  # type: ignore[arg-type]
    assert log.append([EVENT, dict(EVENT), {**EVENT, "event_id": "e-2"}]) == [True, False, True]
    assert len(sent[0][1]) == 2  # two payloads in the one script call
