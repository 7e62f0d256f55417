"""Request ids on the wire: one id per call, chosen by the caller or made by the server.

A caller names its call with the `x-request-id` metadata (and, for the gateway, the message's own
`request_id` field, which wins); the server answers with the id it used in the *initial* metadata
`x-request-id` (sent before the handler runs, so an aborted call carries it too) and logs every line
of the call with it (rpc.logs.request_id_var). Only ids the shared rule accepts (contract.rules.id_error)
are taken from a caller: anything else is replaced by a generated one.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence

from contract.rules import id_error

REQUEST_ID_METADATA = "x-request-id"

Metadata = Sequence[tuple[str, str | bytes]]


def new_request_id() -> str:
    """16 hex characters: valid by the id rule, unique enough for logs and impressions."""
    return uuid.uuid4().hex[:16]


def valid_request_id(value: object) -> str:
    """`value` when it is a non-empty str the id rule accepts, else ""."""
    if isinstance(value, str) and value and id_error(value) is None:
        return value
    return ""


def request_id_in(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """The valid `x-request-id` in `metadata` (the first one), else ""."""
    for key, value in metadata or ():
        if key == REQUEST_ID_METADATA:
            return valid_request_id(value)
    return ""
