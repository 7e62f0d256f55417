"""Helpers for tests that call the real services over gRPC."""

from __future__ import annotations

from collections.abc import Callable

import grpc


def status_of(fn: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    """(status code, details) of one call: OK and "" when it did not raise."""
    try:
        fn()
    except grpc.RpcError as e:
        return e.code(), e.details()
    return grpc.StatusCode.OK, ""
