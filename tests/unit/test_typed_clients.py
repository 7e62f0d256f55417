"""The typed clients (rpc/clients.py): mypy over rpc/ and over code using them (the mypy-protobuf
stubs make replies and arguments typed, so a misuse is a type error), and each client, sync and
asyncio, against fake services behind the real interceptor chain (timeouts, metadata, request
ids, channel limits, closing)."""

from __future__ import annotations

import asyncio
import logging
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram

from recsys.v1 import feedback_pb2 as fb
from recsys.v1 import feedback_pb2_grpc, recommend_pb2, recommend_pb2_grpc
from rpc.clients import (DEFAULT_TIMEOUT_S, AsyncFeedbackClient, AsyncRecommendClient, FeedbackClient, GatewayClient,
                         RecommendClient, request_id_of)
from rpc.ids import REQUEST_ID_METADATA
from rpc.interceptors import server_interceptors
from rpc.logs import request_id_var

ROOT = Path(__file__).resolve().parents[2]


def near(remaining: float, timeout_s: float) -> bool:
    """The server's time_remaining() for a call made with timeout_s: grpc rounds the deadline up
    a little on the wire (20 s arrives as 20.1 s), the call's travel takes a little off."""
    return timeout_s - 1 < remaining <= timeout_s * 1.01 + 0.05

# --- static typing ------------------------------------------------------------------------------------

TYPED_USE = '''
from rpc.clients import AsyncFeedbackClient, AsyncRecommendClient, FeedbackClient, GatewayClient, RecommendClient
from rpc.clients import request_id_of
from recsys.v1 import common_pb2, feedback_pb2, recommend_pb2


def sync_use(address: str) -> str:
    with RecommendClient(address, timeout_s=1.0, metadata=(("x-tenant", "t1"),)) as gateway:
        response: recommend_pb2.RecommendResponse = gateway.recommend(
            "shoes", user_id="u1", num_results=5, filters=common_pb2.Filters(brands=["Nike"]), request_id="r1")
        ranked: recommend_pb2.RankResponse = gateway.rank(["i1", "i2"], query="shoes", timeout_s=0.5)
        again = gateway.recommend_request(recommend_pb2.RecommendRequest(query="shoes"))
        score: float = response.items[0].score + ranked.items[0].score + again.items[0].score
        reply, call = gateway.stub.Recommend.with_call(recommend_pb2.RecommendRequest(), timeout=1.0)
        rid: str = request_id_of(call) + reply.request_id
    with GatewayClient(address) as old:
        old.recommend("shoes")
    with FeedbackClient(address) as feedback:
        event = feedback_pb2.Event(event_id="e1", type=feedback_pb2.EVENT_TYPE_CLICK, user_id="u1")
        logged: feedback_pb2.LogResponse = feedback.log([event], request_id="r2")
        streamed: feedback_pb2.LogResponse = feedback.stream(iter([event]))
        served: feedback_pb2.LogServedResponse = feedback.log_served([feedback_pb2.ServedList(request_id="r1")])
        weights: feedback_pb2.BlendWeights = feedback.get_blend_weights()
        total: int = logged.accepted + streamed.accepted + served.accepted + weights.version
    return f"{score} {rid} {total}"


async def async_use(address: str) -> float:
    async with AsyncRecommendClient(address) as gateway, AsyncFeedbackClient(address) as feedback:
        response: recommend_pb2.RecommendResponse = await gateway.recommend("shoes")
        ranked: recommend_pb2.RankResponse = await gateway.rank(["i1"])
        weights: feedback_pb2.BlendWeights = await feedback.get_blend_weights(timeout_s=1.0)
        await feedback.stream([feedback_pb2.Event(event_id="e1")])
        await feedback.log_served([])
        return response.items[0].score + ranked.items[0].score + sum(weights.mean)
'''

MISUSE = '''
from rpc.clients import AsyncFeedbackClient, FeedbackClient, RecommendClient
from recsys.v1 import feedback_pb2, recommend_pb2


async def misuse(address: str) -> None:
    gateway = RecommendClient(address)
    count: int = gateway.recommend("shoes")  # line 8: a RecommendResponse is no int
    gateway.recommend("shoes", num_results="ten")  # line 9: num_results is an int
    gateway.rank(["i1"]).no_such_field  # line 10: RankResponse has no such field
    FeedbackClient(address).log([recommend_pb2.RecommendRequest()])  # line 11: events are Events
    weights: feedback_pb2.BlendWeights = AsyncFeedbackClient(address).get_blend_weights()  # line 12: not awaited
    gateway.recommend("shoes", timeout=1.0)  # line 13: the keyword is timeout_s
'''


def _mypy(tmp_path: Path, *files: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mypy", "--config-file", "pyproject.toml", "--cache-dir",
                           str(tmp_path / ".mypy_cache"), "--no-error-summary", "--show-error-codes", "rpc", *map(str, files)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_rpc_and_code_using_the_clients_type_check(tmp_path):
    use = tmp_path / "typed_use.py"
    use.write_text(TYPED_USE)
    out = _mypy(tmp_path, use)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]

    misuse = tmp_path / "misuse.py"
    misuse.write_text(MISUSE)
    out = _mypy(tmp_path, misuse)
    flagged = {int(m.group(1)) for m in re.finditer(r"misuse\.py:(\d+): error", out.stdout)}
    assert out.returncode == 1 and flagged == {8, 9, 10, 11, 12, 13}, out.stdout[-4000:] + out.stderr[-2000:]
    assert "rpc/" not in out.stdout  # only the misuse is wrong


# --- the clients at run time ----------------------------------------------------------------------------

class FakeRecommend(recommend_pb2_grpc.RecommendServiceServicer):
    def __init__(self) -> None:
        self.calls: list[dict] = []

    def note(self, request, context) -> None:
        self.calls.append({"request": request, "metadata": dict(context.invocation_metadata() or ()),
                           "time_remaining": context.time_remaining(), "request_id": request_id_var.get()})

    async def Recommend(self, request, context):
        self.note(request, context)
        if request.query == "refuse":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "query: refused")
        response = recommend_pb2.RecommendResponse(request_id=request_id_var.get())
        response.items.add(item_id="i1", score=0.5, rank=1)
        return response

    async def Rank(self, request, context):
        self.note(request, context)
        response = recommend_pb2.RankResponse(request_id=request_id_var.get())
        for n, item in enumerate(request.item_ids):
            response.items.add(item_id=item, rank=n + 1)
        return response


class FakeFeedback(feedback_pb2_grpc.FeedbackServiceServicer):
    def __init__(self) -> None:
        self.calls: list[dict] = []

    def note(self, method, context, **kw) -> None:
        self.calls.append({"method": method, "metadata": dict(context.invocation_metadata() or ()),
                           "time_remaining": context.time_remaining(), "request_id": request_id_var.get(), **kw})

    async def Log(self, request, context):
        self.note("Log", context, events=len(request.events))
        return fb.LogResponse(accepted=len(request.events))

    async def Stream(self, request_iterator, context):
        n = 0
        async for _ in request_iterator:
            n += 1
        self.note("Stream", context, events=n)
        return fb.LogResponse(accepted=n)

    async def LogServed(self, request, context):
        self.note("LogServed", context, lists=len(request.lists))
        return fb.LogServedResponse(accepted=len(request.lists))

    async def GetBlendWeights(self, request, context):
        self.note("GetBlendWeights", context)
        return fb.BlendWeights(part_names=["relevance"], mean=[1.0], variance=[0.1], version=3)


async def _start_server(recommend: FakeRecommend, feedback: FakeFeedback) -> tuple[grpc.aio.Server, str]:
    registry = CollectorRegistry()
    server = grpc.aio.server(interceptors=server_interceptors(
        access_log=logging.getLogger("test.clients.access"),
        requests=Counter("c_requests_total", "x", ["method", "code"], registry=registry),
        request_seconds=Histogram("c_request_seconds", "x", ["method"], registry=registry),
        services=("recsys.v1.RecommendService", "recsys.v1.FeedbackService")))
    recommend_pb2_grpc.add_RecommendServiceServicer_to_server(recommend, server)
    feedback_pb2_grpc.add_FeedbackServiceServicer_to_server(feedback, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture
def services():
    """Both fakes on one grpc.aio server in a thread of its own (the sync clients block this one)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    recommend, feedback = FakeRecommend(), FakeFeedback()
    server, address = asyncio.run_coroutine_threadsafe(_start_server(recommend, feedback), loop).result(30)
    yield address, recommend, feedback
    asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def test_the_sync_recommend_client(services):
    address, recommend, _ = services
    assert GatewayClient is RecommendClient
    with RecommendClient(address, metadata=(("x-tenant", "shop-1"),)) as client:
        response = client.recommend("shoes", user_id="u1", num_results=3)
        assert isinstance(response, recommend_pb2.RecommendResponse) and response.items[0].item_id == "i1"
        sent = recommend.calls[-1]
        assert (sent["request"].query, sent["request"].user_id, sent["request"].num_results) == ("shoes", "u1", 3)
        assert sent["request"].explain  # the client's default
        assert sent["metadata"]["x-tenant"] == "shop-1" and REQUEST_ID_METADATA not in sent["metadata"]
        assert near(sent["time_remaining"], DEFAULT_TIMEOUT_S)

        # A request id: in the message's field and the metadata; the server uses and echoes it.
        response = client.recommend("shoes", request_id="req-9", timeout_s=7.5)
        sent = recommend.calls[-1]
        assert sent["request"].request_id == "req-9" and sent["metadata"][REQUEST_ID_METADATA] == "req-9"
        assert response.request_id == "req-9" == sent["request_id"] and near(sent["time_remaining"], 7.5)

        ranked = client.rank(["a", "b"], query="shoes", metadata=((REQUEST_ID_METADATA, "rank-1"),))
        assert [i.item_id for i in ranked.items] == ["a", "b"] and ranked.request_id == "rank-1"
        assert recommend.calls[-1]["metadata"]["x-tenant"] == "shop-1"  # per-call metadata adds to the client's

        _, call = client.stub.Recommend.with_call(recommend_pb2.RecommendRequest(), timeout=5)
        assert re.fullmatch(r"[0-9a-f]{16}", request_id_of(call))  # the server's generated id
        with pytest.raises(grpc.RpcError) as err:
            client.recommend("refuse", request_id="bad-1")
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and request_id_of(err.value) == "bad-1"
    with pytest.raises(ValueError):  # closed with the block
        client.recommend("shoes")


def test_the_sync_feedback_client_covers_every_rpc(services):
    address, _, feedback = services
    events = [fb.Event(event_id=f"e{n}") for n in range(5)]
    with FeedbackClient(address, timeout_s=3.0, stream_timeout_s=20.0) as client:
        assert client.log(events, request_id="log-1").accepted == 5
        assert client.stream(iter(events)).accepted == 5
        assert client.stream(events[:2], timeout_s=4.0).accepted == 2  # any iterable
        assert client.log_served([fb.ServedList(request_id="r1")] * 2).accepted == 2
        weights = client.get_blend_weights()
        assert isinstance(weights, fb.BlendWeights) and weights.version == 3
    calls = feedback.calls
    assert [c["method"] for c in calls] == ["Log", "Stream", "Stream", "LogServed", "GetBlendWeights"]
    assert calls[0]["request_id"] == "log-1" and calls[0]["metadata"][REQUEST_ID_METADATA] == "log-1"
    remaining = [c["time_remaining"] for c in calls]
    assert near(remaining[0], 3) and near(remaining[1], 20) and near(remaining[2], 4) and near(remaining[4], 3), remaining
    with pytest.raises(ValueError):
        client.log(events)


def test_a_message_over_the_clients_limit_fails_at_the_client(services):
    address, _, feedback = services
    big = [fb.Event(event_id="e", query="q" * 500)] * 10
    with FeedbackClient(address, max_message_bytes=2048) as client:
        assert client.log(big[:2]).accepted == 2
        with pytest.raises(grpc.RpcError) as err:
            client.log(big)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert len(feedback.calls) == 1  # never sent


def test_the_asyncio_clients():
    async def go():
        recommend, feedback = FakeRecommend(), FakeFeedback()
        server, address = await _start_server(recommend, feedback)
        try:
            async with AsyncRecommendClient(address, timeout_s=4.0) as gateway:
                response = await gateway.recommend("shoes", user_id="u1", request_id="a-1")
                assert response.request_id == "a-1" and near(recommend.calls[-1]["time_remaining"], 4)
                ranked = await gateway.rank(["x", "y", "z"], explain=False)
                assert [i.item_id for i in ranked.items] == ["x", "y", "z"] and not recommend.calls[-1]["request"].explain
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await gateway.recommend("refuse", request_id="a-2")
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and request_id_of(err.value) == "a-2"
            async with AsyncFeedbackClient(address) as client:
                events = [fb.Event(event_id=f"e{n}") for n in range(4)]
                assert (await client.log(events, request_id="b-1")).accepted == 4

                async def produce():
                    for event in events:
                        await asyncio.sleep(0)
                        yield event

                assert (await client.stream(produce())).accepted == 4
                assert (await client.stream(events)).accepted == 4
                assert (await client.log_served([fb.ServedList(request_id="r")])).accepted == 1
                assert (await client.get_blend_weights(timeout_s=0.5)).version == 3
            assert [c["method"] for c in feedback.calls] == ["Log", "Stream", "Stream", "LogServed", "GetBlendWeights"]
            assert feedback.calls[0]["request_id"] == "b-1" and near(feedback.calls[-1]["time_remaining"], 0.5)
            with pytest.raises(Exception):  # closed with the block
                await client.get_blend_weights()
        finally:
            await server.stop(0)

    t0 = time.perf_counter()
    asyncio.run(go())
    assert time.perf_counter() - t0 < 30
