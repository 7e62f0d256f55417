"""Both real services through the typed clients (rpc/clients.py) and the shared interceptors
(rpc/interceptors.py): the request id each call names (or gets) is the one the service answers
with and logs, every call writes exactly one access-log line, and the request metrics count it.

The feedback service runs as its own process (`python -m feedback`, JSON log lines at INFO, its
/metrics endpoint on); the gateway in-process (real Triton, real Feast), its access log captured
as the service writes it (rpc.logs.JsonFormatter), with the feedback service as its online learner."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from prometheus_client import REGISTRY

from recsys.v1 import feedback_pb2 as fb
from recsys.v1 import recommend_pb2
from rpc.clients import AsyncFeedbackClient, AsyncRecommendClient, FeedbackClient, RecommendClient, request_id_of
from rpc.ids import REQUEST_ID_METADATA
from rpc.logs import JsonFormatter
from tests.keys import ADMIN_KEY, ADMIN_NAME, SHOP
from tests.processes import LoggedFeedback

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def _wait_for(predicate, timeout_s: float = 10.0, what: str = ""):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what or predicate}")


class FeedbackService(LoggedFeedback):
    """`python -m feedback` on a free port, logging at INFO, its JSON lines kept."""

    def __init__(self, log_dir: Path):
        from scripts.local_redis import free_port

        self.metrics_port = free_port()
        super().__init__(log_dir, {"RECSYS_FEEDBACK_METRICS_PORT": str(self.metrics_port), "RECSYS_LOG_LEVEL": "INFO"})

    def entries(self) -> list[dict]:
        out = []
        for line in list(self.lines):
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def access(self, request_id: str | None = None) -> list[dict]:
        return [e for e in self.entries() if e.get("logger") == "feedback.access"
                and (request_id is None or e.get("request_id") == request_id)]

    def metric(self, name: str, **labels: str) -> float:
        body = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()
        want = name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"
        values = [float(line.rsplit(" ", 1)[1]) for line in body.splitlines() if line.startswith(want + " ")]
        return values[0] if values else 0.0



class AccessLines(logging.Handler):
    """The gateway's access log lines, formatted as the service writes them (at emit time, when
    the call's request id is still in rpc.logs.request_id_var)."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[dict] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(JsonFormatter().format(record)))

    def for_id(self, request_id: str) -> list[dict]:
        return [line for line in self.lines if line.get("request_id") == request_id and line["level"] == "info"]


@pytest.fixture(scope="module")
def feedback_service(tmp_path_factory):
    service = FeedbackService(tmp_path_factory.mktemp("plumbing_events"))
    yield service
    service.stop()


@pytest.fixture(scope="module")
def gateway(feature_repo, triton_gw, tmp_path_factory, feedback_service):
    from cli.background import BackgroundGateway
    from gateway.config import GatewaySettings

    settings = GatewaySettings(port=0, feature_repo=feature_repo.path, triton_url=triton_gw.grpc_url,
                               embedding_cache_dir=tmp_path_factory.getbasetemp() / "embeddings",
                               request_timeout_ms=10_000, embed_timeout_ms=5_000, feature_timeout_ms=2_000,
                               interest_timeout_ms=2_000, rank_timeout_ms=5_000, feedback_url=feedback_service.address,
                               online_weights_poll_s=0.2)
    with BackgroundGateway(settings) as gw:
        yield gw


@pytest.fixture
def gateway_access():
    logger = logging.getLogger("gateway.access")
    handler, level = AccessLines(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


def _gateway_count(method: str, code: str) -> float:
    return REGISTRY.get_sample_value("recsys_requests_total", {"method": method, "code": code}) or 0.0


def test_gateway_calls_are_named_answered_and_logged_once(gateway, gateway_access):
    ok_before, bad_before = _gateway_count("Recommend", "OK"), _gateway_count("Recommend", "INVALID_ARGUMENT")
    rank_before = _gateway_count("Rank", "OK")
    with RecommendClient(gateway.address, timeout_s=30) as client:
        # The caller's id (message field and metadata): used, echoed in the reply and the initial metadata.
        named = client.recommend("trail running shoes", user_id="plumb-user", num_results=5, request_id="plumb-1")
        assert named.request_id == "plumb-1" and len(named.items) == 5
        # Only the x-request-id metadata: the interceptor's id is the servicer's (one id per call).
        reply, call = client.stub.Recommend.with_call(recommend_pb2.RecommendRequest(query="rain jacket", num_results=3),
                                                      metadata=((REQUEST_ID_METADATA, "plumb-meta"),), timeout=30)
        assert reply.request_id == "plumb-meta" == request_id_of(call)
        # No id at all: the generated one is the same in the reply and the metadata.
        reply, call = client.stub.Recommend.with_call(recommend_pb2.RecommendRequest(query="backpack"), timeout=30)
        generated = reply.request_id
        assert generated and request_id_of(call) == generated
        ranked = client.rank([i.item_id for i in named.items][::-1], query="trail running shoes", request_id="plumb-rank")
        assert ranked.request_id == "plumb-rank" and len(ranked.items) == 5
        # A refused call names its field and still carries its id.
        with pytest.raises(grpc.RpcError) as err:
            client.recommend("shoes", num_results=500, request_id="plumb-bad")
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith("num_results:")
        assert request_id_of(err.value) == "plumb-bad"

    async def go():
        async with AsyncRecommendClient(gateway.address, timeout_s=30) as aclient:
            return await aclient.recommend("headphones", num_results=3, request_id="plumb-async")

    assert asyncio.run(go()).request_id == "plumb-async"

    expected = {"plumb-1": ("Recommend", "OK"), "plumb-meta": ("Recommend", "OK"), generated: ("Recommend", "OK"),
                "plumb-rank": ("Rank", "OK"), "plumb-bad": ("Recommend", "INVALID_ARGUMENT"),
                "plumb-async": ("Recommend", "OK")}
    _wait_for(lambda: all(gateway_access.for_id(rid) for rid in expected), what="the gateway's access lines")
    for rid, (method, code) in expected.items():
        (line,) = gateway_access.for_id(rid)  # exactly one per call
        assert (line["method"], line["code"], line["logger"]) == (method, code, "gateway.access"), line
        assert isinstance(line["ms"], float) and line["ms"] > 0
    assert gateway_access.for_id("plumb-1")[0]["user_id"] == "plumb-user"
    assert len([x for x in gateway_access.lines if x["level"] == "info"]) == len(expected)  # nothing else, no duplicate
    assert _gateway_count("Recommend", "OK") - ok_before == 4
    assert _gateway_count("Recommend", "INVALID_ARGUMENT") - bad_before == 1
    assert _gateway_count("Rank", "OK") - rank_before == 1


def test_feedback_calls_are_named_answered_and_logged_once(feedback_service):
    ok_before = feedback_service.metric("recsys_feedback_requests_total", method="Log", code="OK")
    events = [fb.Event(event_id=f"plumb-e{n}", type=fb.EVENT_TYPE_CLICK, user_id="u1", session_id="s1",
                       item_id=f"i{n}", request_id="r1", position=1 + n) for n in range(4)]
    with FeedbackClient(feedback_service.address, timeout_s=10, api_key=ADMIN_KEY) as client:  # every method
        reply, call = client.stub.Log.with_call(fb.LogRequest(events=events[:2]), timeout=10,
                                                metadata=((REQUEST_ID_METADATA, "fb-log"),))
        assert reply.accepted == 2 and request_id_of(call) == "fb-log"
        assert client.log(events[:2], request_id="fb-again").duplicate == 2
        assert client.stream(iter(events), request_id="fb-stream").accepted == 2
        served = fb.ServedList(request_id="r1", items=[fb.ServedItem(item_id="i0", parts=[1, 0, 0, 0])])
        assert client.log_served([served], request_id="fb-served").accepted == 1
        assert client.get_blend_weights(request_id="fb-weights").version >= 0
        with pytest.raises(grpc.RpcError) as err:
            client.log([], request_id="fb-empty")
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and request_id_of(err.value) == "fb-empty"

    async def go():
        async with AsyncFeedbackClient(feedback_service.address) as aclient:
            return await aclient.log(events[:1], request_id="fb-async")

    assert asyncio.run(go()).duplicate == 1

    expected = {"fb-log": ("Log", "OK"), "fb-again": ("Log", "OK"), "fb-stream": ("Stream", "OK"),
                "fb-served": ("LogServed", "OK"), "fb-weights": ("GetBlendWeights", "OK"),
                "fb-empty": ("Log", "INVALID_ARGUMENT"), "fb-async": ("Log", "OK")}
    _wait_for(lambda: all(feedback_service.access(rid) for rid in expected), what="the feedback service's access lines")
    for rid, (method, code) in expected.items():
        (line,) = feedback_service.access(rid)  # exactly one per call
        assert (line["method"], line["code"], line["level"]) == (method, code, "info"), line
        assert line["msg"] == f"{method} {code}" and isinstance(line["ms"], float)
        assert line["caller"] == (SHOP if rid == "fb-async" else ADMIN_NAME), line  # the key's name
    assert feedback_service.metric("recsys_feedback_requests_total", method="Log", code="OK") - ok_before == 3
    assert feedback_service.metric("recsys_feedback_requests_total", method="Log", code="INVALID_ARGUMENT") >= 1
    assert feedback_service.metric("recsys_feedback_request_seconds_count", method="Stream") >= 1


def test_the_gateway_reaches_its_learner_through_the_feedback_client(gateway, feedback_service):
    """The gateway's online blend (gateway/online_blend.py) polls weights and reports served lists
    with AsyncFeedbackClient: those calls show up, answered OK, in the feedback service's log."""
    with RecommendClient(gateway.address, timeout_s=30) as client:
        served = client.recommend("running shoes", user_id="u00001", num_results=5, request_id="plumb-served")

    def reported():
        return [e for e in feedback_service.access() if e["method"] == "LogServed" and e["code"] == "OK"
                and e["request_id"] != "fb-served"]

    _wait_for(reported, what="a LogServed call from the gateway")
    assert any(e["method"] == "GetBlendWeights" and e["code"] == "OK" for e in feedback_service.access())
    assert served.model_versions["blend"].startswith("online-v")
    assert not [e for e in feedback_service.entries() if e.get("level") in ("error", "critical")]
