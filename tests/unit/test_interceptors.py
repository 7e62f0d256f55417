"""The server interceptors (rpc/interceptors.py) on a real in-process grpc.aio server: request ids,
the access log and request metrics, exceptions -> status codes, undecodable requests, the auth seam.

The servicers here are fakes with scripted behaviour; the chain is the one both services use
(`server_interceptors`), each test with a Prometheus registry and a logger of its own."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from prometheus_client import CollectorRegistry, Counter, Histogram

from recsys.v1 import feedback_pb2 as fb
from recsys.v1 import feedback_pb2_grpc, recommend_pb2, recommend_pb2_grpc
from rpc.ids import REQUEST_ID_METADATA
from rpc.interceptors import AccessLog, DecodeErrors, ErrorStatus, RequestIds, server_interceptors
from rpc.logs import JsonFormatter, request_id_var

FEEDBACK = "recsys.v1.FeedbackService"
RECOMMEND = "recsys.v1.RecommendService"
GENERATED_ID = re.compile(r"[0-9a-f]{16}")


class Known(RuntimeError):
    """A service's known failure (like the gateway's Unavailable)."""


class MoreSpecific(Known):
    pass


class Lines(logging.Handler):
    """Log records of one logger, formatted as the services do, at the moment they are written
    (JsonFormatter reads the call's request id then)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self.lines: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.lines.append(json.loads(JsonFormatter().format(record)))

    def access(self) -> list[dict[str, Any]]:
        return [line for line in self.lines if line["level"] == "info"]


Behaviour = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]


class Feedback(feedback_pb2_grpc.FeedbackServiceServicer):
    """Log and GetBlendWeights run the test's script; Stream counts events; every call notes the
    request id its handler saw."""

    def __init__(self) -> None:
        self.script: Behaviour | None = None
        self.seen_ids: list[str] = []

    async def Log(self, request, context):
        self.seen_ids.append(request_id_var.get())
        logging.getLogger("test.handler").warning("handling %d events", len(request.events))
        if self.script is not None:
            return await self.script(request, context)
        return fb.LogResponse(accepted=len(request.events))

    async def GetBlendWeights(self, request, context):
        self.seen_ids.append(request_id_var.get())
        return await self.script(request, context)

    async def Stream(self, request_iterator, context):
        self.seen_ids.append(request_id_var.get())
        n = 0
        async for _ in request_iterator:
            n += 1
        return fb.LogResponse(accepted=n)


class Recommend(recommend_pb2_grpc.RecommendServiceServicer):
    def __init__(self) -> None:
        self.seen_ids: list[str] = []

    async def Recommend(self, request, context):
        self.seen_ids.append(request_id_var.get())
        if request.query == "abort":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "query: refused")
        return recommend_pb2.RecommendResponse(request_id=request_id_var.get())


# Streaming handlers of both styles: async generators and coroutines writing with context.write.
async def _gen(request: fb.Event, context) -> AsyncIterator[fb.Event]:
    for n in range(3):
        yield fb.Event(event_id=f"{request.event_id}-{n}", request_id=request_id_var.get())
    if request.event_id == "fail":
        raise ValueError("after three replies")


async def _writer(request: fb.Event, context) -> None:
    for n in range(2):
        await context.write(fb.Event(event_id=f"{request.event_id}-w{n}", request_id=request_id_var.get()))


async def _chat(requests: AsyncIterator[fb.Event], context) -> AsyncIterator[fb.Event]:
    async for event in requests:
        yield fb.Event(event_id=event.event_id + "!")


def _echo_handlers() -> grpc.GenericRpcHandler:
    kw = dict(request_deserializer=fb.Event.FromString, response_serializer=fb.Event.SerializeToString)
    return grpc.method_handlers_generic_handler("test.Echo", {
        "Gen": grpc.unary_stream_rpc_method_handler(_gen, **kw),
        "Write": grpc.unary_stream_rpc_method_handler(_writer, **kw),
        "Chat": grpc.stream_stream_rpc_method_handler(_chat, **kw),
    })


class Rig:
    """A grpc.aio server with the services' interceptor chain, fakes behind it, a client channel."""

    def __init__(self, auth: tuple[grpc.aio.ServerInterceptor, ...] = ()):
        self.registry = CollectorRegistry()
        self.counter = Counter("t_requests_total", "calls", ["method", "code"], registry=self.registry)
        self.histogram = Histogram("t_request_seconds", "latency", ["method"], registry=self.registry)
        self.logger = logging.getLogger(f"test.access.{uuid.uuid4().hex[:8]}")
        self.logger.setLevel(logging.INFO)
        self.logger.propagate = False
        self.log = Lines()
        self.logger.addHandler(self.log)
        self.handler_log = Lines()
        logging.getLogger("test.handler").addHandler(self.handler_log)
        self.feedback = Feedback()
        self.recommend = Recommend()
        self.auth = auth

    async def __aenter__(self) -> "Rig":
        self.server = grpc.aio.server(interceptors=server_interceptors(
            access_log=self.logger, requests=self.counter, request_seconds=self.histogram,
            services=(FEEDBACK, RECOMMEND, "test.Echo"), id_fields=("user_id",),
            errors={Known: grpc.StatusCode.UNAVAILABLE}, auth=self.auth))
        feedback_pb2_grpc.add_FeedbackServiceServicer_to_server(self.feedback, self.server)
        recommend_pb2_grpc.add_RecommendServiceServicer_to_server(self.recommend, self.server)
        self.health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.server.add_generic_rpc_handlers((_echo_handlers(),))
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self.fb = feedback_pb2_grpc.FeedbackServiceStub(self.channel)
        self.rec = recommend_pb2_grpc.RecommendServiceStub(self.channel)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.channel.close()
        await self.server.stop(0)
        logging.getLogger("test.handler").removeHandler(self.handler_log)

    def count(self, method: str, code: str) -> float:
        return self.registry.get_sample_value("t_requests_total", {"method": method, "code": code}) or 0.0

    def observed(self, method: str) -> float:
        return self.registry.get_sample_value("t_request_seconds_count", {"method": method}) or 0.0

    async def lines_for(self, n: int, timeout_s: float = 5.0) -> list[dict[str, Any]]:
        """The access lines once there are n (the server logs right after sending the status)."""
        for _ in range(int(timeout_s / 0.01)):
            if len(self.log.access()) >= n:
                break
            await asyncio.sleep(0.01)
        return self.log.access()


def run(coro_fn: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(coro_fn())


async def _error(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    return err.value


def _sent_id(metadata) -> str:
    return dict(metadata or ())[REQUEST_ID_METADATA]


# --- request ids --------------------------------------------------------------------------------------

def test_the_callers_valid_request_id_is_used_logged_and_echoed():
    async def go():
        async with Rig() as rig:
            call = rig.fb.Log(fb.LogRequest(events=[fb.Event()]), timeout=5, metadata=((REQUEST_ID_METADATA, "caller-7"),))
            assert (await call).accepted == 1
            assert _sent_id(await call.initial_metadata()) == "caller-7"
            assert rig.feedback.seen_ids == ["caller-7"]
            assert [line["request_id"] for line in rig.handler_log.lines] == ["caller-7"]  # the handler's own line
            (line,) = await rig.lines_for(1)
            assert line["request_id"] == "caller-7"

    run(go)


@pytest.mark.parametrize("given", [None, "has spaces", "x" * 129, "slash/id", ""])
def test_a_missing_or_invalid_request_id_is_replaced_by_a_generated_one(given):
    async def go():
        async with Rig() as rig:
            md = None if given is None else ((REQUEST_ID_METADATA, given),)
            ids = []
            for _ in range(2):
                call = rig.fb.Log(fb.LogRequest(events=[fb.Event()]), timeout=5, metadata=md)
                await call
                ids.append(_sent_id(await call.initial_metadata()))
            assert all(GENERATED_ID.fullmatch(i) for i in ids) and ids[0] != ids[1], ids
            assert rig.feedback.seen_ids == ids
            assert [line["request_id"] for line in await rig.lines_for(2)] == ids

    run(go)


def test_the_messages_own_request_id_field_wins_over_the_metadata():
    async def go():
        async with Rig() as rig:
            meta = ((REQUEST_ID_METADATA, "from-metadata"),)
            call = rig.rec.Recommend(recommend_pb2.RecommendRequest(request_id="from-message"), timeout=5, metadata=meta)
            assert (await call).request_id == "from-message"
            assert _sent_id(await call.initial_metadata()) == "from-message"
            # An invalid message id is not taken (the gateway refuses it, naming the field): the metadata's is.
            call = rig.rec.Recommend(recommend_pb2.RecommendRequest(request_id="bad id"), timeout=5, metadata=meta)
            assert (await call).request_id == "from-metadata"
            assert _sent_id(await call.initial_metadata()) == "from-metadata"
            assert rig.recommend.seen_ids == ["from-message", "from-metadata"]

    run(go)


def test_an_aborted_call_carries_its_request_id_too():
    async def go():
        async with Rig() as rig:
            meta = ((REQUEST_ID_METADATA, "abort-me"),)
            e = await _error(rig.rec.Recommend(recommend_pb2.RecommendRequest(query="abort"), timeout=5, metadata=meta))
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and _sent_id(e.initial_metadata()) == "abort-me"

    run(go)


# --- access log and metrics ------------------------------------------------------------------------

def test_one_access_line_and_one_count_per_call_with_the_outcome():
    async def go():
        async with Rig() as rig:
            await rig.rec.Recommend(recommend_pb2.RecommendRequest(user_id="u-1"), timeout=5)
            await _error(rig.rec.Recommend(recommend_pb2.RecommendRequest(query="abort", user_id="u 2" * 100),
                                           timeout=5))
            await rig.fb.Stream(iter([fb.Event()] * 3), timeout=5)
            lines = await rig.lines_for(3)
            assert [(x["method"], x["code"]) for x in lines] == [
                ("Recommend", "OK"), ("Recommend", "INVALID_ARGUMENT"), ("Stream", "OK")]
            assert lines[0]["user_id"] == "u-1" and lines[0]["msg"] == "Recommend OK"
            assert lines[1]["user_id"] == "<invalid id, 300 chars>"  # loggable_id: no log amplification
            assert "user_id" not in lines[2]  # a client stream: no message to read it from
            assert all(isinstance(x["ms"], float) and x["ms"] >= 0 and GENERATED_ID.fullmatch(x["request_id"])
                       for x in lines)
            assert rig.count("Recommend", "OK") == 1 and rig.count("Recommend", "INVALID_ARGUMENT") == 1
            assert rig.count("Stream", "OK") == 1
            assert rig.observed("Recommend") == 2 and rig.observed("Stream") == 1

    run(go)


def test_a_code_set_without_abort_and_a_deadline_are_logged_as_the_caller_sees_them():
    async def set_code(request, context):
        context.set_code(grpc.StatusCode.NOT_FOUND)
        context.set_details("no weights")
        return fb.BlendWeights()

    async def slow(request, context):
        await asyncio.sleep(10)

    async def go():
        async with Rig() as rig:
            rig.feedback.script = set_code
            e = await _error(rig.fb.GetBlendWeights(fb.GetBlendWeightsRequest(), timeout=5))
            assert e.code() == grpc.StatusCode.NOT_FOUND
            rig.feedback.script = slow
            e = await _error(rig.fb.GetBlendWeights(fb.GetBlendWeightsRequest(), timeout=0.2))
            assert e.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            lines = await rig.lines_for(2)
            assert [x["code"] for x in lines] == ["NOT_FOUND", "DEADLINE_EXCEEDED"]
            assert lines[1]["ms"] >= 150
            assert rig.count("GetBlendWeights", "DEADLINE_EXCEEDED") == 1

    run(go)


def test_a_call_the_client_cancels_is_logged_as_cancelled():
    started = asyncio.Event

    async def go():
        entered = started()

        async def hang(request, context):
            entered.set()
            await asyncio.sleep(10)

        async with Rig() as rig:
            rig.feedback.script = hang
            call = rig.fb.GetBlendWeights(fb.GetBlendWeightsRequest(), timeout=10)
            await asyncio.wait_for(entered.wait(), 5)
            call.cancel()
            (line,) = await rig.lines_for(1)
            assert line["code"] == "CANCELLED"

    run(go)


def test_health_checks_get_a_request_id_but_no_access_line():
    async def go():
        async with Rig() as rig:
            call = health_pb2_grpc.HealthStub(rig.channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert (await call).status == health_pb2.HealthCheckResponse.SERVING
            assert GENERATED_ID.fullmatch(_sent_id(await call.initial_metadata()))
            await rig.fb.Log(fb.LogRequest(events=[fb.Event()]), timeout=5)
            assert [x["method"] for x in await rig.lines_for(1)] == ["Log"]
            assert rig.count("Check", "OK") == 0

    run(go)


# --- exceptions -> status codes ------------------------------------------------------------------------

def test_an_unexpected_exception_is_internal_naming_the_request_id_with_one_traceback_in_the_log():
    async def boom(request, context):
        raise ValueError("secret internals")

    async def go():
        async with Rig() as rig:
            rig.feedback.script = boom
            e = await _error(rig.fb.GetBlendWeights(fb.GetBlendWeightsRequest(), timeout=5,
                                                    metadata=((REQUEST_ID_METADATA, "req-boom"),)))
            assert e.code() == grpc.StatusCode.INTERNAL
            assert e.details() == "internal error (request_id=req-boom); see the server log"
            errors = [r for r in rig.log.records if r.levelno >= logging.ERROR]
            assert len(errors) == 1 and errors[0].exc_info and errors[0].exc_info[0] is ValueError
            error_line = next(x for x in rig.log.lines if x["level"] == "error")
            assert error_line["request_id"] == "req-boom" and "ValueError: secret internals" in error_line["exc"]
            (line,) = await rig.lines_for(1)
            assert line["code"] == "INTERNAL" and rig.count("GetBlendWeights", "INTERNAL") == 1

    run(go)


@pytest.mark.parametrize("error", [Known("the index is not loaded yet"), MoreSpecific("still loading")])
def test_a_known_exception_becomes_its_status_with_its_message(error):
    async def raise_it(request, context):
        raise error

    async def go():
        async with Rig() as rig:
            rig.feedback.script = raise_it
            e = await _error(rig.fb.GetBlendWeights(fb.GetBlendWeightsRequest(), timeout=5))
            assert e.code() == grpc.StatusCode.UNAVAILABLE and e.details() == str(error)
            assert not [r for r in rig.log.records if r.levelno >= logging.ERROR]  # known: no traceback
            (line,) = await rig.lines_for(1)
            assert line["code"] == "UNAVAILABLE"

    run(go)


def test_the_handlers_own_abort_passes_unchanged_with_its_trailing_metadata():
    async def shed(request, context):
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "at capacity",
                            trailing_metadata=(("grpc-retry-pushback-ms", "120"),))

    async def go():
        async with Rig() as rig:
            rig.feedback.script = shed
            e = await _error(rig.fb.Log(fb.LogRequest(events=[fb.Event()]), timeout=5))
            assert (e.code(), e.details()) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "at capacity")
            assert dict(e.trailing_metadata())["grpc-retry-pushback-ms"] == "120"
            assert not [r for r in rig.log.records if r.levelno >= logging.ERROR]
            (line,) = await rig.lines_for(1)
            assert line["code"] == "RESOURCE_EXHAUSTED"

    run(go)


# --- streaming handlers of both styles, undecodable requests ----------------------------------------

def test_streaming_handlers_of_both_styles_work_through_the_chain():
    async def go():
        async with Rig() as rig:
            kw = dict(request_serializer=fb.Event.SerializeToString, response_deserializer=fb.Event.FromString)
            gen = rig.channel.unary_stream("/test.Echo/Gen", **kw)
            meta = ((REQUEST_ID_METADATA, "gen-1"),)
            replies = [r async for r in gen(fb.Event(event_id="a"), timeout=5, metadata=meta)]
            assert [(r.event_id, r.request_id) for r in replies] == [("a-0", "gen-1"), ("a-1", "gen-1"), ("a-2", "gen-1")]
            write = rig.channel.unary_stream("/test.Echo/Write", **kw)
            assert [r.event_id async for r in write(fb.Event(event_id="b"), timeout=5)] == ["b-w0", "b-w1"]
            chat = rig.channel.stream_stream("/test.Echo/Chat", **kw)
            assert [r.event_id async for r in chat(iter([fb.Event(event_id="x"), fb.Event(event_id="y")]),
                                                    timeout=5)] == ["x!", "y!"]
            # An exception after some replies: INTERNAL, the replies before it delivered.
            got = []
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for r in gen(fb.Event(event_id="fail"), timeout=5):
                    got.append(r.event_id)
            assert err.value.code() == grpc.StatusCode.INTERNAL and len(got) == 3
            # grpc's Health.Watch is a coroutine writing with context.write (it broke an async-for wrapper).
            watch = health_pb2_grpc.HealthStub(rig.channel).Watch(health_pb2.HealthCheckRequest(), timeout=5)
            first = await watch.read()
            assert first.status == health_pb2.HealthCheckResponse.SERVING
            watch.cancel()
            lines = await rig.lines_for(4)
            assert [(x["method"], x["code"]) for x in lines] == [
                ("Gen", "OK"), ("Write", "OK"), ("Chat", "OK"), ("Gen", "INTERNAL")]

    run(go)


@pytest.mark.parametrize("junk", [b"\xff\xff\xff", b"\x0a\x80", b"\x12\x05abc"])
def test_undecodable_bytes_are_invalid_argument_in_unary_and_streamed_requests(junk):
    async def go():
        async with Rig() as rig:
            raw = rig.channel.unary_unary(f"/{FEEDBACK}/Log", request_serializer=None, response_deserializer=None)
            e = await _error(raw(junk, timeout=5))
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert e.details() == "request: the bytes are not a valid Log request message (protobuf decode failed)"
            stream = rig.channel.stream_unary(f"/{FEEDBACK}/Stream", request_serializer=None, response_deserializer=None)
            e = await _error(stream(iter([fb.Event(event_id="ok").SerializeToString(), junk]), timeout=5))
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "Stream request" in e.details()
            assert rig.feedback.seen_ids[:1] and not [r for r in rig.log.records if r.levelno >= logging.ERROR]
            lines = await rig.lines_for(2)
            assert [(x["method"], x["code"]) for x in lines] == [("Log", "INVALID_ARGUMENT"), ("Stream", "INVALID_ARGUMENT")]

    run(go)


# --- the chain and the auth seam ------------------------------------------------------------------------

class ApiKey(grpc.aio.ServerInterceptor):
    """What a later auth interceptor looks like: refuses calls without the key."""

    def __init__(self) -> None:
        self.saw_ids: list[str] = []

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if dict(handler_call_details.invocation_metadata or ()).get("x-api-key") == "k1":
            return handler
        inner = handler.unary_unary
        seen = self.saw_ids

        async def refuse(request, context):
            seen.append(request_id_var.get())
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "x-api-key: missing or unknown")
            return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(refuse, handler.request_deserializer, handler.response_serializer)


def test_the_chains_order_and_the_auth_seam():
    chain = server_interceptors(access_log=logging.getLogger("x"), requests=Counter("o_total", "x", ["method", "code"],
                                registry=CollectorRegistry()), request_seconds=Histogram("o_seconds", "x", ["method"],
                                registry=CollectorRegistry()), services=(FEEDBACK,), auth=[auth := ApiKey()])
    assert [type(i) for i in chain] == [RequestIds, AccessLog, ErrorStatus, ApiKey, DecodeErrors]
    assert chain[3] is auth

    async def go():
        key = ApiKey()
        async with Rig(auth=(key,)) as rig:
            e = await _error(rig.fb.Log(fb.LogRequest(events=[fb.Event()]), timeout=5,
                                        metadata=((REQUEST_ID_METADATA, "no-key"),)))
            assert e.code() == grpc.StatusCode.UNAUTHENTICATED and _sent_id(e.initial_metadata()) == "no-key"
            assert key.saw_ids == ["no-key"] and rig.feedback.seen_ids == []  # the handler never ran
            reply = await rig.fb.Log(fb.LogRequest(events=[fb.Event()]), timeout=5, metadata=(("x-api-key", "k1"),))
            assert reply.accepted == 1
            lines = await rig.lines_for(2)
            assert [(x["code"], x["request_id"]) for x in lines][0] == ("UNAUTHENTICATED", "no-key")
            assert lines[1]["code"] == "OK"

    run(go)
