"""Server interceptors shared by the gateway and the feedback service.

Both servers build their chain with `server_interceptors()`; outermost first:

  RequestIds    one id per call: the message's own `request_id` field when the message has one and it
                is a valid id (the gateway's Recommend/Rank), else the caller's `x-request-id` metadata
                when valid, else a generated one. Set in rpc.logs.request_id_var for the whole call
                (every log line carries it) and sent back at once as initial metadata `x-request-id`
                (before the handler runs, so an aborted call carries it too; handlers must not send
                initial metadata of their own).
  AccessLog     timing: one structured log line per call (method, code, ms, request_id, caller: the
                API key's name set by rpc.auth.Authenticate, and the
                service's id fields, e.g. the gateway's user_id through rpc.logs.loggable_id, or their
                pseudonyms when rpc.pseudonyms has a key: never the raw id then) and the
                service's Prometheus counter (method, code) and histogram (method). Only the methods
                of the service's own gRPC services (not health checks, not reflection).
  ErrorStatus   an exception a handler did not turn into a status: a known type becomes its status
                with the exception's message (the gateway's Unavailable -> UNAVAILABLE); anything else
                becomes INTERNAL naming the request id, with the traceback logged once and none sent
                to the caller. A handler's own `context.abort` passes through unchanged.
  (auth)        authentication / authorization (rpc.auth.Authenticate: API keys, roles):
                `server_interceptors(auth=[...])` puts it here, after the id and the
                access log (a refused call is logged and counted with its id) and inside ErrorStatus
                (a bug in it answers INTERNAL); its aborts (UNAUTHENTICATED, PERMISSION_DENIED) pass.
  DecodeErrors  a request whose bytes are not a valid message of the method's type is the caller's
                error. grpcio answers it with UNKNOWN ("Unexpected DecodeError") and a traceback in
                the log; here it becomes INVALID_ARGUMENT naming the message type, at the cost of one
                isinstance check. The interceptor swaps each handler's request deserializer for one
                that returns a marker instead of raising, and the handler's behaviour answers the
                marker with the status.

Each interceptor wraps the method handler grpc.aio found (all four kinds; streaming handlers either
as async generators or as coroutines writing with `context.write`, like grpc's Health.Watch) and
keeps its (de)serializers, so DecodeErrors' deserializer reaches the server through the outer ones.
Synchronous handlers are left alone. grpc.aio runs every call in a task of its own, so what a call
sets in a context variable ends with it.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Any

import grpc
from prometheus_client import Counter, Histogram

from rpc.auth import caller_var
from rpc.ids import REQUEST_ID_METADATA, new_request_id, request_id_in, valid_request_id
from rpc.logs import loggable_id, request_id_var
from rpc.pseudonyms import SESSION, USER, Pseudonyms

if TYPE_CHECKING:
    Context = grpc.aio.ServicerContext[Any, Any]
    Handler = grpc.RpcMethodHandler[Any, Any]

log = logging.getLogger(__name__)

_CODES = {code.value[0]: code for code in grpc.StatusCode}


def method_name(method: str) -> str:
    """"/recsys.v1.RecommendService/Recommend" -> "Recommend" (the metrics' and logs' label)."""
    return method.rsplit("/", 1)[-1]


def service_name(method: str) -> str:
    """"/recsys.v1.RecommendService/Recommend" -> "recsys.v1.RecommendService"."""
    return method.strip("/").rsplit("/", 1)[0]


def call_code(context: Context) -> grpc.StatusCode | None:
    """The status the call has so far (set by `abort` or `set_code`), or None."""
    code: object = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    if isinstance(code, int):
        return _CODES.get(code, grpc.StatusCode.UNKNOWN)
    return None


class Around(grpc.aio.ServerInterceptor):
    """An interceptor that runs each call of the handlers it wraps inside `call(...)`, an async
    context manager entered before the handler and left with its outcome (exceptions included).
    Subclasses may also replace the request deserializer and the client stream's iterator."""

    def wraps(self, method: str) -> bool:
        return True

    def call(self, method: str, request: Any, context: Context) -> AbstractAsyncContextManager[None]:
        """`request`: the message for unary-request methods, None for client streams."""
        raise NotImplementedError

    def deserializer(self, deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
        return deserializer

    def requests(self, method: str, requests: AsyncIterator[Any], context: Context) -> AsyncIterator[Any]:
        return requests

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
                                handler_call_details: grpc.HandlerCallDetails) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None or not self.wraps(handler_call_details.method):
            return handler
        return _wrapped(handler, handler_call_details.method, self)


def _wrapped(handler: Handler, method: str, around: Around) -> Handler:
    serializer = handler.response_serializer
    deserializer = around.deserializer(handler.request_deserializer)
    behaviour: Any  # an async function of (request or request iterator, context)
    if handler.unary_unary is not None:
        uu: Any = handler.unary_unary
        if not inspect.iscoroutinefunction(uu):
            return handler

        async def unary_unary(request: Any, context: Context) -> Any:
            async with around.call(method, request, context):
                return await uu(request, context)

        return grpc.unary_unary_rpc_method_handler(unary_unary, deserializer, serializer)
    if handler.unary_stream is not None:
        us: Any = handler.unary_stream
        if inspect.isasyncgenfunction(us):
            async def unary_stream(request: Any, context: Context) -> AsyncIterator[Any]:
                async with around.call(method, request, context):
                    async for reply in us(request, context):
                        yield reply

            behaviour = unary_stream
        elif inspect.iscoroutinefunction(us):
            async def unary_stream_writer(request: Any, context: Context) -> None:
                async with around.call(method, request, context):
                    await us(request, context)

            behaviour = unary_stream_writer
        else:
            return handler
        return grpc.unary_stream_rpc_method_handler(behaviour, deserializer, serializer)
    if handler.stream_unary is not None:
        su: Any = handler.stream_unary
        if not inspect.iscoroutinefunction(su):
            return handler

        async def stream_unary(requests: AsyncIterator[Any], context: Context) -> Any:
            async with around.call(method, None, context):
                return await su(around.requests(method, requests, context), context)

        return grpc.stream_unary_rpc_method_handler(stream_unary, deserializer, serializer)
    if handler.stream_stream is not None:
        ss: Any = handler.stream_stream
        if inspect.isasyncgenfunction(ss):
            async def stream_stream(requests: AsyncIterator[Any], context: Context) -> AsyncIterator[Any]:
                async with around.call(method, None, context):
                    async for reply in ss(around.requests(method, requests, context), context):
                        yield reply

            behaviour = stream_stream
        elif inspect.iscoroutinefunction(ss):
            async def stream_stream_writer(requests: AsyncIterator[Any], context: Context) -> None:
                async with around.call(method, None, context):
                    await ss(around.requests(method, requests, context), context)

            behaviour = stream_stream_writer
        else:
            return handler
        return grpc.stream_stream_rpc_method_handler(behaviour, deserializer, serializer)
    return handler


# --- request ids -------------------------------------------------------------------------------------

class RequestIds(Around):
    """One id per call (see the module's docstring); `message_field`: the request message's field
    that names the call (None: metadata only)."""

    def __init__(self, message_field: str | None = "request_id"):
        self.message_field = message_field

    def request_id(self, request: Any, context: Context) -> str:
        from_message = valid_request_id(getattr(request, self.message_field, None)) if self.message_field else ""
        return from_message or request_id_in(context.invocation_metadata()) or new_request_id()

    @asynccontextmanager
    async def call(self, method: str, request: Any, context: Context) -> AsyncIterator[None]:
        rid = self.request_id(request, context)
        request_id_var.set(rid)
        try:
            await context.send_initial_metadata(((REQUEST_ID_METADATA, rid),))
        except Exception as e:  # noqa: BLE001 - the call is gone already; the handler finds out itself
            log.debug("x-request-id not sent for %s: %s", method, e)
        yield


# --- access log and metrics --------------------------------------------------------------------------

class AccessLog(Around):
    """One log line and one count per call of `services`' methods (None: every method).
    `requests`: a Counter labelled (method, code); `seconds`: a Histogram labelled (method);
    `id_fields`: the request message's id fields to log (through loggable_id: a rejected 4 MB id
    must not become 4 MB of log); `pseudonyms`: when on, a valid id is logged as its pseudonym (the
    same one the service stores) and an invalid one only as its length marker, never raw."""

    def __init__(self, logger: logging.Logger, requests: Counter, seconds: Histogram, *,
                 services: Collection[str] | None = None, id_fields: Sequence[str] = (),
                 pseudonyms: Pseudonyms | None = None):
        self.log = logger
        self.counter = requests
        self.histogram = seconds
        self.services = None if services is None else frozenset(services)
        self.id_fields = tuple(id_fields)
        self.pseudonyms = pseudonyms if pseudonyms is not None and pseudonyms.on else None

    def logged_id(self, field: str, value: str) -> str:
        logged = loggable_id(value)
        if self.pseudonyms is None or logged != value:  # off, or invalid: the marker
            return logged
        return self.pseudonyms.of(value, SESSION if field == "session_id" else USER)

    def wraps(self, method: str) -> bool:
        return self.services is None or service_name(method) in self.services

    @asynccontextmanager
    async def call(self, method: str, request: Any, context: Context) -> AsyncIterator[None]:
        t0 = time.perf_counter()
        code = grpc.StatusCode.UNKNOWN
        try:
            yield
        except BaseException as e:
            code = call_code(context) or _status_of(e, context)
            raise
        else:
            code = call_code(context) or grpc.StatusCode.OK
        finally:
            seconds = time.perf_counter() - t0
            name = method_name(method)
            self.counter.labels(name, code.name).inc()
            self.histogram.labels(name).observe(seconds)
            fields: dict[str, Any] = {"method": name, "code": code.name, "ms": round(seconds * 1e3, 2)}
            for field in self.id_fields:
                value = getattr(request, field, None)
                if isinstance(value, str):
                    fields[field] = self.logged_id(field, value)
            fields["request_id"] = loggable_id(request_id_var.get())
            fields["caller"] = caller_var.get()  # the API key's name ("": auth off or refused)
            self.log.info("%s %s", name, code.name, extra={"fields": fields})


def _status_of(error: BaseException, context: Context) -> grpc.StatusCode:
    """What the caller sees for an exception nothing turned into a status."""
    if isinstance(error, (asyncio.CancelledError, GeneratorExit)):
        remaining = context.time_remaining()
        return grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0 else grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN  # grpc.aio's own answer to an unhandled exception


# --- errors -> status codes --------------------------------------------------------------------------

class ErrorStatus(Around):
    """`known`: exception type -> status (subclasses included; the nearest base wins)."""

    def __init__(self, known: Mapping[type[BaseException], grpc.StatusCode] | None = None,
                 logger: logging.Logger | None = None):
        self.known = dict(known or {})
        self.log = logger or log

    def status_for(self, error: BaseException) -> grpc.StatusCode | None:
        for cls in type(error).__mro__:
            if cls in self.known:
                return self.known[cls]
        return None

    @asynccontextmanager
    async def call(self, method: str, request: Any, context: Context) -> AsyncIterator[None]:
        try:
            yield
        except grpc.aio.AbortError:
            raise  # the handler's own status
        except Exception as e:
            code = self.status_for(e)
            if code is not None:
                await context.abort(code, str(e) or type(e).__name__)
            rid = request_id_var.get()
            self.log.error("unhandled error in %s", method_name(method), exc_info=True)
            await context.abort(grpc.StatusCode.INTERNAL,
                                f"internal error (request_id={rid or 'none'}); see the server log")


# --- undecodable requests ----------------------------------------------------------------------------

class _Undecodable:
    __slots__ = ("error",)

    def __init__(self, error: Exception):
        self.error = error


def _safe(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def decode(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as e:  # noqa: BLE001 - protobuf raises DecodeError, and others for odd bytes
            return _Undecodable(e)

    return decode


def _message_name(method: str) -> str:
    return method_name(method) + " request"


async def _refuse(context: Context, method: str) -> None:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                        f"request: the bytes are not a valid {_message_name(method)} message (protobuf decode failed)")


class DecodeErrors(Around):
    def deserializer(self, deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
        return _safe(deserializer)

    @asynccontextmanager
    async def call(self, method: str, request: Any, context: Context) -> AsyncIterator[None]:
        if isinstance(request, _Undecodable):
            await _refuse(context, method)
        yield

    def requests(self, method: str, requests: AsyncIterator[Any], context: Context) -> AsyncIterator[Any]:
        return _checked(requests, context, method)


async def _checked(requests: AsyncIterator[Any], context: Context, method: str) -> AsyncIterator[Any]:
    """A client stream whose undecodable message ends the call with INVALID_ARGUMENT. Messages
    before it were handled already (the service stores a stream in durable chunks)."""
    async for request in requests:
        if isinstance(request, _Undecodable):
            await _refuse(context, method)
        yield request


# --- the chain ---------------------------------------------------------------------------------------

def server_interceptors(*, access_log: logging.Logger, requests: Counter, request_seconds: Histogram,
                        services: Collection[str], id_fields: Sequence[str] = (),
                        errors: Mapping[type[BaseException], grpc.StatusCode] | None = None,
                        auth: Sequence[grpc.aio.ServerInterceptor] = (),
                        pseudonyms: Pseudonyms | None = None) -> list[grpc.aio.ServerInterceptor]:
    """The interceptors of a server, outermost first (see the module's docstring). `services`: the
    full names of the services whose calls are logged and counted; `errors`: known exception types
    and their status; `auth`: authentication / authorization interceptors (rpc.auth.server_auth);
    `pseudonyms`: the service's (rpc/pseudonyms.py): logged ids are pseudonyms when it is on."""
    return [
        RequestIds(),
        AccessLog(access_log, requests, request_seconds, services=services, id_fields=id_fields,
                  pseudonyms=pseudonyms),
        ErrorStatus(errors, access_log),
        *auth,
        DecodeErrors(),
    ]
