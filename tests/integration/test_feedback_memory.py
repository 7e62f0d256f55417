"""The feedback service's memory stays flat under a flood of maximum-size LogServed calls.

The real service runs as its own process (`python -m feedback`, default bounds except a
smaller pending bound, so the flood reaches every bound within the warm-up). Two threads send
maximum-size valid LogServed calls (200-item lists, just under the 4 MiB message limit, fresh
request ids each call), a third logs impressions for what was served during the warm-up, and
oversized calls are mixed in. Once the learner's held bytes reach their bounds (read from its /metrics), the RSS is sampled:
it must not grow by more than GROWTH_LIMIT_MB while the LogServed flood goes on. Afterwards the
service is healthy and answers Log.
"""

from __future__ import annotations

import re
import statistics
import threading
import time
import urllib.request

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from recsys.v1 import feedback_pb2 as fb
from recsys.v1 import feedback_pb2_grpc
from scripts.local_redis import free_port
from rpc.clients import channel as authed_channel
from tests.keys import ADMIN_KEY
from tests.processes import FeedbackProcess

pytestmark = pytest.mark.integration

MAX_MESSAGE = 4 * 1024 * 1024  # the service's default max_receive_message_length
MAX_SERVED_BYTES = 64 * 1024 * 1024  # the learner's default bound on served lists
MAX_PENDING = 30_000  # smaller than the default (400k) so the impressions reach it within the warm-up
WARM_UP_LIMIT_S = 35.0
MEASURE_S = 25.0
GROWTH_LIMIT_MB = 8.0
CALL = b"cAAAAAA"  # placeholder in every request id, replaced per call (same length: same encoding)


def template() -> tuple[bytes, int, list[str]]:
    """A serialized LogServedRequest of 200-item lists as large as fits under MAX_MESSAGE."""
    items = [fb.ServedItem(item_id=f"i{k:05d}", parts=[0.5, 0.25, 0.125, 0.0625]) for k in range(200)]
    one = fb.ServedList(request_id=CALL.decode() + "-l00000", items=items).ByteSize() + 4
    n = (MAX_MESSAGE - 1024) // one
    req = fb.LogServedRequest(lists=[fb.ServedList(request_id=f"{CALL.decode()}-l{i:05d}", items=items)
                                     for i in range(n)])
    data = req.SerializeToString()
    assert MAX_MESSAGE - 64 * 1024 < len(data) < MAX_MESSAGE
    return data, n, [f"i{k:05d}" for k in range(200)]


def metrics(port: int) -> dict[tuple[str, str], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {(s.name, s.labels.get("store", "")): s.value for f in text_string_to_metric_families(text)
            for s in f.samples if s.name.startswith("recsys_feedback_learner_held")}


def test_memory_stays_flat_under_a_logserved_flood_and_the_service_stays_healthy(tmp_path):
    metrics_port = free_port()
    # The flood is one caller and one user far past their hourly budgets: this test is about the
    # learner's memory bounds, so those budgets (tests/unit on the learner) are lifted here.
    service = FeedbackProcess(tmp_path / "events", env={"RECSYS_FEEDBACK_METRICS_PORT": str(metrics_port),
                                                        "RECSYS_FEEDBACK_MAX_PER_CALLER": str(10**12),
                                                        "RECSYS_FEEDBACK_MAX_PER_USER": str(10**12),
                                                        "RECSYS_FEEDBACK_MAX_PENDING": str(MAX_PENDING)}).start()
    try:
        _flood_and_measure(service, metrics_port)
    finally:
        service.stop()


def _flood_and_measure(service: FeedbackProcess, metrics_port: int) -> None:
    # LogServed (role internal) and Log (role events) on one channel: the admin key may call both.
    channel = authed_channel(f"127.0.0.1:{service.port}", api_key=ADMIN_KEY)
    stub = feedback_pb2_grpc.FeedbackServiceStub(channel)
    # Raw bytes: the client builds each 4 MiB call by a byte substitution instead of protobuf work,
    # so the two shared cores go to the service under test.
    send_raw = channel.unary_unary("/recsys.v1.FeedbackService/LogServed", request_serializer=None,
                                   response_deserializer=fb.LogServedResponse.FromString)
    data, n_lists, item_ids = template()
    process = psutil.Process(service.process.pid)
    stop = threading.Event()
    # Impressions only during the warm-up (to fill the pending bound): this test measures the
    # learner's memory, not the event log's (SQLite on disk; its own test: tests/unit/test_event_log.py).
    warm = threading.Event()
    calls = iter(range(1, 10**6))
    lock = threading.Lock()
    served: list[str] = []  # a recent call's placeholder value, for the impressions thread
    errors: list[BaseException] = []

    def flood() -> None:
        try:
            while not stop.is_set():
                with lock:
                    call = f"c{next(calls):06d}".encode()
                reply = send_raw(data.replace(CALL, call), timeout=30)
                assert reply.accepted == n_lists
                served.append(call.decode())
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    def impressions() -> None:
        k = 0
        try:
            while not stop.is_set() and not warm.is_set():
                if not served:
                    time.sleep(0.05)
                    continue
                call = served[-1]
                events = [fb.Event(event_id=f"e{k}-{j}", type=fb.EVENT_TYPE_IMPRESSION, user_id="u1",
                                   request_id=f"{call}-l{j % n_lists:05d}", item_id=item_ids[j % 200],
                                   position=1 + j % 200) for j in range(2_000)]
                reply = stub.Log(fb.LogRequest(events=events), timeout=30)
                assert reply.accepted == 2_000, reply.errors[:3]
                k += 1
                time.sleep(0.2)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=flood), threading.Thread(target=flood), threading.Thread(target=impressions)]
    for t in threads:
        t.start()
    try:
        start = time.monotonic()
        rss0 = process.memory_info().rss
        while True:  # warm-up: until the served lists and the impressions are at their bounds
            held = metrics(metrics_port)
            full = (held.get(("recsys_feedback_learner_held_bytes", "served"), 0) > 0.95 * MAX_SERVED_BYTES
                    and held.get(("recsys_feedback_learner_held", "pending"), 0) >= MAX_PENDING * 0.99)
            if full or errors:
                break
            assert time.monotonic() - start < WARM_UP_LIMIT_S, f"bounds not reached during the warm-up: {held}"
            time.sleep(0.5)
        assert not errors, errors
        warm.set()
        threads[2].join(30)
        time.sleep(2.0)
        warm_s = time.monotonic() - start
        _oversized_calls_are_refused(channel, stub, data)
        samples = []
        t_end = time.monotonic() + MEASURE_S
        while time.monotonic() < t_end and not errors:
            samples.append(process.memory_info().rss)
            time.sleep(0.5)
        held = metrics(metrics_port)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert not errors, errors
    mb = 1 / 2**20
    baseline, end = statistics.median(samples[:4]), statistics.median(samples[-4:])
    n_calls = next(calls) - 1
    print(f"\nfeedback service RSS: {rss0 * mb:.1f} MB at start, {baseline * mb:.1f} MB after the {warm_s:.1f} s "
          f"warm-up, {end * mb:.1f} MB at the end of {MEASURE_S:.0f} s more (max {max(samples) * mb:.1f} MB, "
          f"growth {(end - baseline) * mb:+.1f} MB); {n_calls} LogServed calls of {n_lists} x 200 items "
          f"({len(data) * mb:.2f} MB each, {n_calls * n_lists:,} lists); held: "
          + ", ".join(f"{name.removeprefix('recsys_feedback_learner_')}[{store}]={v:,.0f}" for (name, store), v in
                      sorted(held.items())))
    assert (end - baseline) * mb < GROWTH_LIMIT_MB
    assert held[("recsys_feedback_learner_held_bytes", "served")] <= MAX_SERVED_BYTES

    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    query = fb.Event(event_id="after-flood", type=fb.EVENT_TYPE_QUERY, user_id="u1", query="rain jacket")
    nul = fb.Event(event_id="after-flood-nul", type=fb.EVENT_TYPE_QUERY, user_id="u1", query="rain\x00jacket")
    reply = stub.Log(fb.LogRequest(events=[query, nul]), timeout=10)
    assert (reply.accepted, reply.rejected) == (1, 1)
    assert reply.errors[0].message == "query: contains control characters"


def _oversized_calls_are_refused(channel: grpc.Channel, stub, data: bytes) -> None:
    items = [fb.ServedItem(item_id=f"i{k}", parts=[0, 0, 0, 0]) for k in range(201)]
    cases = [
        (fb.LogServedRequest(lists=[fb.ServedList(request_id="big", items=items)]), grpc.StatusCode.INVALID_ARGUMENT,
         "lists[0].items: at most 200 items, got 201"),
        (fb.LogServedRequest(lists=[fb.ServedList(request_id=f"r{k}", items=items[:1]) for k in range(10_001)]),
         grpc.StatusCode.INVALID_ARGUMENT, "lists: 1-10000 lists per call, got 10001"),
        (fb.LogServedRequest(lists=[fb.ServedList(request_id="bad id", items=items[:1])]),
         grpc.StatusCode.INVALID_ARGUMENT, "lists[0].request_id: 'bad id' is not a valid id"),
    ]
    for request, code, details in cases:
        with pytest.raises(grpc.RpcError) as err:
            stub.LogServed(request, timeout=30)
        assert err.value.code() == code and err.value.details().startswith(details), err.value.details()
    # Over the message limit: refused by grpc before it is parsed.
    send_raw = channel.unary_unary("/recsys.v1.FeedbackService/LogServed", request_serializer=None,
                                   response_deserializer=fb.LogServedResponse.FromString)
    for _ in range(3):
        with pytest.raises(grpc.RpcError) as err:
            send_raw(data + data[: 512 * 1024], timeout=30)  # 4.5 MiB: refused on its length, never parsed
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value.details()
        assert re.search(r"larger than max", err.value.details()), err.value.details()

