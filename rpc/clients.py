"""Typed clients of both services, synchronous and asyncio (CLI, demo, simulator, tests, the gateway).

    with RecommendClient("127.0.0.1:50051") as gateway:
        response = gateway.recommend("rain jacket", user_id="u1", num_results=5)
    async with AsyncFeedbackClient("127.0.0.1:50052") as feedback:
        reply = await feedback.log([event])

Every method takes the generated message classes (recsys.v1) and returns the generated reply type;
`timeout_s` per call (the client's default otherwise: DEFAULT_TIMEOUT_S, STREAM_TIMEOUT_S for a
client stream); `request_id` names the call (metadata `x-request-id`; the gateway's Recommend and
Rank also carry it in the message's own field, which the gateway prefers); `metadata` adds entries
to the client's own. Errors are grpc's: grpc.RpcError (sync) and grpc.aio.AioRpcError (async);
`request_id_of(error)` reads the id the server used. `.stub` is the generated stub, for what the
methods do not cover (e.g. `stub.Recommend.with_call` for the response metadata).

Channels: messages up to `max_message_bytes` each way (4 MiB: the feedback service's receive limit;
a larger request fails at the client instead of costing a round trip), and keepalive pings every
5 minutes while a call is open (gRPC servers refuse more frequent pings without data with GOAWAY
"too_many_pings"; that is their default minimum), answered within 20 s or the connection is dropped.
An asyncio client must be made inside the running event loop (a grpc.aio channel binds to it).

Keys and TLS (docs/security.md): `api_key` is sent as `authorization: Bearer <key>` on every call
(None: $RECSYS_API_KEY when set; "": no key); `credentials` (rpc.auth.channel_credentials) makes
the channel TLS / mTLS. `channel()` / `aio_channel()` make bare channels that send a key the same
way (for code that uses the generated stubs directly: benchmarks, tests).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Sequence
from types import TracebackType
from typing import Any, NamedTuple

import grpc

from recsys.v1 import common_pb2, feedback_pb2, feedback_pb2_grpc, recommend_pb2, recommend_pb2_grpc
from rpc.auth import auth_metadata
from rpc.ids import REQUEST_ID_METADATA, Metadata, request_id_in

DEFAULT_TIMEOUT_S = 2.0
STREAM_TIMEOUT_S = 60.0  # a client stream of events may run long
MAX_MESSAGE_BYTES = 4 << 20
KEEPALIVE_TIME_MS = 300_000
KEEPALIVE_TIMEOUT_MS = 20_000

API_KEY_ENV = "RECSYS_API_KEY"  # the key a client sends when it is given none

ChannelOptions = Sequence[tuple[str, Any]]


def api_key_or_env(api_key: str | None) -> str:
    """`api_key`; None: $RECSYS_API_KEY ("" when unset)."""
    return os.environ.get(API_KEY_ENV, "").strip() if api_key is None else api_key


class _CallDetails(NamedTuple):
    method: str
    timeout: float | None
    metadata: Any
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: Any


class _SendKey(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
               grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds fixed metadata (the key) to every call of a synchronous channel."""

    def __init__(self, entries: Metadata):
        self.entries = tuple(entries)

    def _details(self, d: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return _CallDetails(d.method, d.timeout, (*(d.metadata or ()), *self.entries), d.credentials,  # type: ignore[return-value]
                            getattr(d, "wait_for_ready", None), getattr(d, "compression", None))

    def intercept_unary_unary(self, continuation: Callable[..., Any], client_call_details: grpc.ClientCallDetails,
                              request: Any) -> Any:
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation: Callable[..., Any], client_call_details: grpc.ClientCallDetails,
                               request: Any) -> Any:
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation: Callable[..., Any], client_call_details: grpc.ClientCallDetails,
                               request_iterator: Any) -> Any:
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation: Callable[..., Any], client_call_details: grpc.ClientCallDetails,
                                request_iterator: Any) -> Any:
        return continuation(self._details(client_call_details), request_iterator)


class _AioSendKey:
    def __init__(self, entries: Metadata):
        self.entries = tuple(entries)

    def _details(self, d: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        return d._replace(metadata=grpc.aio.Metadata(*tuple(d.metadata or ()), *self.entries))  # type: ignore[attr-defined]


class _AioUnaryUnary(_AioSendKey, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, client_call_details: grpc.aio.ClientCallDetails,
                                    request: Any) -> Any:
        return await continuation(self._details(client_call_details), request)


class _AioUnaryStream(_AioSendKey, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, client_call_details: grpc.aio.ClientCallDetails,
                                     request: Any) -> Any:
        return await continuation(self._details(client_call_details), request)


class _AioStreamUnary(_AioSendKey, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, client_call_details: grpc.aio.ClientCallDetails,
                                     request_iterator: Any) -> Any:
        return await continuation(self._details(client_call_details), request_iterator)


class _AioStreamStream(_AioSendKey, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Any, client_call_details: grpc.aio.ClientCallDetails,
                                      request_iterator: Any) -> Any:
        return await continuation(self._details(client_call_details), request_iterator)


def channel(address: str, *, api_key: str | None = None, credentials: grpc.ChannelCredentials | None = None,
            options: ChannelOptions = ()) -> grpc.Channel:
    """A synchronous channel whose every call sends `api_key` (None: $RECSYS_API_KEY); TLS with `credentials`."""
    raw = (grpc.secure_channel(address, credentials, options=list(options)) if credentials is not None
           else grpc.insecure_channel(address, options=list(options)))
    entries = auth_metadata(api_key_or_env(api_key))
    return grpc.intercept_channel(raw, _SendKey(entries)) if entries else raw


def aio_channel(address: str, *, api_key: str | None = None, credentials: grpc.ChannelCredentials | None = None,
                options: ChannelOptions = ()) -> grpc.aio.Channel:
    """An asyncio channel whose every call sends `api_key` (None: $RECSYS_API_KEY); make it inside the loop."""
    entries = auth_metadata(api_key_or_env(api_key))
    interceptors: list[Any] = [cls(entries) for cls in (_AioUnaryUnary, _AioUnaryStream, _AioStreamUnary,
                                                        _AioStreamStream)] if entries else []
    if credentials is not None:
        return grpc.aio.secure_channel(address, credentials, options=list(options), interceptors=interceptors)
    return grpc.aio.insecure_channel(address, options=list(options), interceptors=interceptors)


def channel_options(max_message_bytes: int = MAX_MESSAGE_BYTES, extra: ChannelOptions = ()) -> list[tuple[str, Any]]:
    """The clients' channel options; `extra` entries override them."""
    options: dict[str, Any] = {
        "grpc.max_send_message_length": max_message_bytes,
        "grpc.max_receive_message_length": max_message_bytes,
        "grpc.keepalive_time_ms": KEEPALIVE_TIME_MS,
        "grpc.keepalive_timeout_ms": KEEPALIVE_TIMEOUT_MS,
        "grpc.keepalive_permit_without_calls": 0,
    }
    options.update(dict(extra))
    return list(options.items())


def request_id_of(call: grpc.Call | grpc.RpcError | grpc.aio.AioRpcError) -> str:
    """The id the server used for a finished call (its `x-request-id` initial metadata); "" if none.
    Takes what a sync `with_call` returns, a sync grpc.RpcError, or a grpc.aio.AioRpcError."""
    initial = getattr(call, "initial_metadata", None)
    return request_id_in(initial()) if callable(initial) else ""


class _Calls:
    """What the four clients share: default timeout and metadata, per-call overrides."""

    def __init__(self, timeout_s: float, stream_timeout_s: float, metadata: Metadata):
        self.timeout_s = timeout_s
        self.stream_timeout_s = stream_timeout_s
        self.metadata = tuple(metadata)

    def _timeout(self, timeout_s: float | None, stream: bool = False) -> float:
        if timeout_s is not None:
            return timeout_s
        return self.stream_timeout_s if stream else self.timeout_s

    def _metadata(self, request_id: str, metadata: Metadata | None) -> tuple[tuple[str, str | bytes], ...] | None:
        entries = (*self.metadata, *(metadata or ()), *(((REQUEST_ID_METADATA, request_id),) if request_id else ()))
        return entries or None


def _recommend_request(query: str, user_id: str, session_id: str, num_results: int, explain: bool,
                       context: common_pb2.Context | None, filters: common_pb2.Filters | None,
                       candidate_item_ids: Iterable[str], request_id: str) -> recommend_pb2.RecommendRequest:
    return recommend_pb2.RecommendRequest(query=query, user_id=user_id, session_id=session_id, num_results=num_results,
                                          explain=explain, context=context, filters=filters,
                                          candidate_item_ids=candidate_item_ids, request_id=request_id)


def _rank_request(item_ids: Iterable[str], query: str, user_id: str, session_id: str, explain: bool,
                  context: common_pb2.Context | None, request_id: str) -> recommend_pb2.RankRequest:
    return recommend_pb2.RankRequest(item_ids=item_ids, query=query, user_id=user_id, session_id=session_id,
                                     explain=explain, context=context, request_id=request_id)


# --- the gateway ---------------------------------------------------------------------------------------

class RecommendClient(_Calls):
    """RecommendService (the gateway), synchronous."""

    def __init__(self, address: str, timeout_s: float = DEFAULT_TIMEOUT_S, *, metadata: Metadata = (),
                 max_message_bytes: int = MAX_MESSAGE_BYTES, options: ChannelOptions = (), api_key: str | None = None,
                 credentials: grpc.ChannelCredentials | None = None):
        super().__init__(timeout_s, STREAM_TIMEOUT_S, metadata)
        self.address = address
        # The key is the channel's (rpc.clients.channel): `.stub` calls send it too.
        self.channel = channel(address, api_key=api_key, credentials=credentials,
                               options=channel_options(max_message_bytes, options))
        self.stub = recommend_pb2_grpc.RecommendServiceStub(self.channel)

    def recommend(self, query: str = "", user_id: str = "", session_id: str = "", num_results: int = 10,
                  explain: bool = True, *, context: common_pb2.Context | None = None,
                  filters: common_pb2.Filters | None = None, candidate_item_ids: Iterable[str] = (),
                  request_id: str = "", timeout_s: float | None = None,
                  metadata: Metadata | None = None) -> recommend_pb2.RecommendResponse:
        request = _recommend_request(query, user_id, session_id, num_results, explain, context, filters,
                                     candidate_item_ids, request_id)
        return self.recommend_request(request, timeout_s=timeout_s, metadata=metadata)

    def recommend_request(self, request: recommend_pb2.RecommendRequest, *, timeout_s: float | None = None,
                          metadata: Metadata | None = None) -> recommend_pb2.RecommendResponse:
        return self.stub.Recommend(request, timeout=self._timeout(timeout_s),
                                   metadata=self._metadata(request.request_id, metadata))

    def rank(self, item_ids: Iterable[str], query: str = "", user_id: str = "", explain: bool = True, *,
             session_id: str = "", context: common_pb2.Context | None = None, request_id: str = "",
             timeout_s: float | None = None, metadata: Metadata | None = None) -> recommend_pb2.RankResponse:
        request = _rank_request(item_ids, query, user_id, session_id, explain, context, request_id)
        return self.rank_request(request, timeout_s=timeout_s, metadata=metadata)

    def rank_request(self, request: recommend_pb2.RankRequest, *, timeout_s: float | None = None,
                     metadata: Metadata | None = None) -> recommend_pb2.RankResponse:
        return self.stub.Rank(request, timeout=self._timeout(timeout_s),
                              metadata=self._metadata(request.request_id, metadata))

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> RecommendClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


GatewayClient = RecommendClient  # the name callers used before the typed clients


class AsyncRecommendClient(_Calls):
    """RecommendService (the gateway), asyncio; make it inside the running loop."""

    def __init__(self, address: str, timeout_s: float = DEFAULT_TIMEOUT_S, *, metadata: Metadata = (),
                 max_message_bytes: int = MAX_MESSAGE_BYTES, options: ChannelOptions = (), api_key: str | None = None,
                 credentials: grpc.ChannelCredentials | None = None):
        super().__init__(timeout_s, STREAM_TIMEOUT_S, metadata)
        self.address = address
        # The key is the channel's (rpc.clients.aio_channel): `.stub` calls send it too.
        self.channel = aio_channel(address, api_key=api_key, credentials=credentials,
                                   options=channel_options(max_message_bytes, options))
        self.stub = recommend_pb2_grpc.RecommendServiceStub(self.channel)

    async def recommend(self, query: str = "", user_id: str = "", session_id: str = "", num_results: int = 10,
                        explain: bool = True, *, context: common_pb2.Context | None = None,
                        filters: common_pb2.Filters | None = None, candidate_item_ids: Iterable[str] = (),
                        request_id: str = "", timeout_s: float | None = None,
                        metadata: Metadata | None = None) -> recommend_pb2.RecommendResponse:
        request = _recommend_request(query, user_id, session_id, num_results, explain, context, filters,
                                     candidate_item_ids, request_id)
        return await self.recommend_request(request, timeout_s=timeout_s, metadata=metadata)

    async def recommend_request(self, request: recommend_pb2.RecommendRequest, *, timeout_s: float | None = None,
                                metadata: Metadata | None = None) -> recommend_pb2.RecommendResponse:
        return await self.stub.Recommend(request, timeout=self._timeout(timeout_s),
                                         metadata=self._metadata(request.request_id, metadata))

    async def rank(self, item_ids: Iterable[str], query: str = "", user_id: str = "", explain: bool = True, *,
                   session_id: str = "", context: common_pb2.Context | None = None, request_id: str = "",
                   timeout_s: float | None = None, metadata: Metadata | None = None) -> recommend_pb2.RankResponse:
        request = _rank_request(item_ids, query, user_id, session_id, explain, context, request_id)
        return await self.rank_request(request, timeout_s=timeout_s, metadata=metadata)

    async def rank_request(self, request: recommend_pb2.RankRequest, *, timeout_s: float | None = None,
                           metadata: Metadata | None = None) -> recommend_pb2.RankResponse:
        return await self.stub.Rank(request, timeout=self._timeout(timeout_s),
                                    metadata=self._metadata(request.request_id, metadata))

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncRecommendClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()


# --- the feedback service ------------------------------------------------------------------------------

class FeedbackClient(_Calls):
    """FeedbackService, synchronous: Log, Stream, LogServed, GetBlendWeights."""

    def __init__(self, address: str, timeout_s: float = DEFAULT_TIMEOUT_S, *, stream_timeout_s: float = STREAM_TIMEOUT_S,
                 metadata: Metadata = (), max_message_bytes: int = MAX_MESSAGE_BYTES, options: ChannelOptions = (),
                 api_key: str | None = None, credentials: grpc.ChannelCredentials | None = None):
        super().__init__(timeout_s, stream_timeout_s, metadata)
        self.address = address
        # The key is the channel's (rpc.clients.channel): `.stub` calls send it too.
        self.channel = channel(address, api_key=api_key, credentials=credentials,
                               options=channel_options(max_message_bytes, options))
        self.stub = feedback_pb2_grpc.FeedbackServiceStub(self.channel)

    def log(self, events: Iterable[feedback_pb2.Event], *, request_id: str = "", timeout_s: float | None = None,
            metadata: Metadata | None = None) -> feedback_pb2.LogResponse:
        """One batch (1-10,000 events), stored durably before the reply; per-event errors in the reply."""
        return self.stub.Log(feedback_pb2.LogRequest(events=events), timeout=self._timeout(timeout_s),
                             metadata=self._metadata(request_id, metadata))

    def stream(self, events: Iterable[feedback_pb2.Event], *, request_id: str = "", timeout_s: float | None = None,
               metadata: Metadata | None = None) -> feedback_pb2.LogResponse:
        """A client stream of events (any number), stored in durable chunks; one reply at the end."""
        return self.stub.Stream(iter(events), timeout=self._timeout(timeout_s, stream=True),
                                metadata=self._metadata(request_id, metadata))

    def log_served(self, lists: Iterable[feedback_pb2.ServedList], *, request_id: str = "",
                   timeout_s: float | None = None, metadata: Metadata | None = None) -> feedback_pb2.LogServedResponse:
        """What the gateway served (score parts per item), for the online blend learner."""
        return self.stub.LogServed(feedback_pb2.LogServedRequest(lists=lists), timeout=self._timeout(timeout_s),
                                   metadata=self._metadata(request_id, metadata))

    def get_blend_weights(self, *, request_id: str = "", timeout_s: float | None = None,
                          metadata: Metadata | None = None) -> feedback_pb2.BlendWeights:
        return self.stub.GetBlendWeights(feedback_pb2.GetBlendWeightsRequest(), timeout=self._timeout(timeout_s),
                                         metadata=self._metadata(request_id, metadata))

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> FeedbackClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


async def _aiter(events: Iterable[feedback_pb2.Event] | AsyncIterable[feedback_pb2.Event]) -> AsyncIterator[feedback_pb2.Event]:
    if isinstance(events, AsyncIterable):
        async for event in events:
            yield event
    else:
        for event in events:
            yield event


class AsyncFeedbackClient(_Calls):
    """FeedbackService, asyncio; make it inside the running loop."""

    def __init__(self, address: str, timeout_s: float = DEFAULT_TIMEOUT_S, *, stream_timeout_s: float = STREAM_TIMEOUT_S,
                 metadata: Metadata = (), max_message_bytes: int = MAX_MESSAGE_BYTES, options: ChannelOptions = (),
                 api_key: str | None = None, credentials: grpc.ChannelCredentials | None = None):
        super().__init__(timeout_s, stream_timeout_s, metadata)
        self.address = address
        # The key is the channel's (rpc.clients.aio_channel): `.stub` calls send it too.
        self.channel = aio_channel(address, api_key=api_key, credentials=credentials,
                                   options=channel_options(max_message_bytes, options))
        self.stub = feedback_pb2_grpc.FeedbackServiceStub(self.channel)

    async def log(self, events: Iterable[feedback_pb2.Event], *, request_id: str = "", timeout_s: float | None = None,
                  metadata: Metadata | None = None) -> feedback_pb2.LogResponse:
        return await self.stub.Log(feedback_pb2.LogRequest(events=events), timeout=self._timeout(timeout_s),
                                   metadata=self._metadata(request_id, metadata))

    async def stream(self, events: Iterable[feedback_pb2.Event] | AsyncIterable[feedback_pb2.Event], *,
                     request_id: str = "", timeout_s: float | None = None,
                     metadata: Metadata | None = None) -> feedback_pb2.LogResponse:
        return await self.stub.Stream(_aiter(events), timeout=self._timeout(timeout_s, stream=True),
                                      metadata=self._metadata(request_id, metadata))

    async def log_served(self, lists: Iterable[feedback_pb2.ServedList], *, request_id: str = "",
                         timeout_s: float | None = None,
                         metadata: Metadata | None = None) -> feedback_pb2.LogServedResponse:
        return await self.stub.LogServed(feedback_pb2.LogServedRequest(lists=lists), timeout=self._timeout(timeout_s),
                                         metadata=self._metadata(request_id, metadata))

    async def get_blend_weights(self, *, request_id: str = "", timeout_s: float | None = None,
                                metadata: Metadata | None = None) -> feedback_pb2.BlendWeights:
        return await self.stub.GetBlendWeights(feedback_pb2.GetBlendWeightsRequest(), timeout=self._timeout(timeout_s),
                                               metadata=self._metadata(request_id, metadata))

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncFeedbackClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()


__all__ = ["AsyncFeedbackClient", "AsyncRecommendClient", "FeedbackClient", "GatewayClient", "RecommendClient",
           "aio_channel", "api_key_or_env", "channel", "channel_options", "request_id_of", "API_KEY_ENV", "DEFAULT_TIMEOUT_S", "STREAM_TIMEOUT_S", "MAX_MESSAGE_BYTES"]
