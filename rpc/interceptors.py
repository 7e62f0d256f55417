"""Server interceptors shared by the gateway and the feedback service.

`DecodeErrors`: a request whose bytes are not a valid message of the method's type is the caller's
error. grpcio answers it with UNKNOWN ("Unexpected DecodeError") and a traceback in the log; here
it becomes INVALID_ARGUMENT naming the message type, at the cost of one isinstance check. The
interceptor swaps each handler's request deserializer for one that returns a marker instead of
raising, and the handler's behaviour answers the marker with the status.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc


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
    return method.rsplit("/", 1)[-1] + " request"


async def _refuse(context: grpc.aio.ServicerContext, method: str) -> None:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                        f"request: the bytes are not a valid {_message_name(method)} message (protobuf decode failed)")


class DecodeErrors(grpc.aio.ServerInterceptor):
    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
                                handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        method = handler_call_details.method
        safe = _safe(handler.request_deserializer)
        if handler.unary_unary is not None:
            inner_uu = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                if isinstance(request, _Undecodable):
                    await _refuse(context, method)
                return await inner_uu(request, context)

            return grpc.unary_unary_rpc_method_handler(unary_unary, request_deserializer=safe,
                                                       response_serializer=handler.response_serializer)
        if handler.unary_stream is not None:
            inner_us = handler.unary_stream

            async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                if isinstance(request, _Undecodable):
                    await _refuse(context, method)
                async for reply in inner_us(request, context):
                    yield reply

            return grpc.unary_stream_rpc_method_handler(unary_stream, request_deserializer=safe,
                                                        response_serializer=handler.response_serializer)
        if handler.stream_unary is not None:
            inner_su = handler.stream_unary

            async def stream_unary(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
                return await inner_su(_checked(requests, context, method), context)

            return grpc.stream_unary_rpc_method_handler(stream_unary, request_deserializer=safe,
                                                        response_serializer=handler.response_serializer)
        if handler.stream_stream is not None:
            inner_ss = handler.stream_stream

            async def stream_stream(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                async for reply in inner_ss(_checked(requests, context, method), context):
                    yield reply

            return grpc.stream_stream_rpc_method_handler(stream_stream, request_deserializer=safe,
                                                         response_serializer=handler.response_serializer)
        return handler


async def _checked(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext, method: str) -> AsyncIterator[Any]:
    """A client stream whose undecodable message ends the call with INVALID_ARGUMENT. Messages
    before it were handled already (the service stores a stream in durable chunks)."""
    async for request in requests:
        if isinstance(request, _Undecodable):
            await _refuse(context, method)
        yield request
