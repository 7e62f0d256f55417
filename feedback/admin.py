"""AdminService over gRPC (protos/recsys/v1/admin.proto): EraseUser, for callers with an `admin` key.

Served by the feedback service because erasing must reach what that process holds in memory (the
live sessions, the learner's records) and it is the event log's writer. The logic is
feedback/erase.py's, shared with `recsys privacy erase --offline`.
"""

from __future__ import annotations

import asyncio
import logging

import grpc
from redis.exceptions import RedisError

from eventlog.event_log import EventLogError
from feedback.erase import EraseError, Stores, erase_user
from feedback.learner_state import StateUnavailable
from recsys.v1 import admin_pb2, admin_pb2_grpc
from rpc.auth import caller_var
from rpc.pseudonyms import Pseudonyms

log = logging.getLogger(__name__)


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self, stores: Stores, pseudonyms: Pseudonyms):
        self.stores = stores
        self.pseudonyms = pseudonyms
        self._lock = asyncio.Lock()  # one erasure at a time: each rewrites whole files

    async def EraseUser(self, request: admin_pb2.EraseUserRequest, context) -> admin_pb2.EraseUserResponse:
        async with self._lock:
            try:
                done = await erase_user(request.user_id, self.pseudonyms, self.stores, by=caller_var.get() or "-")
            except EraseError as e:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            except EventLogError as e:
                # What was erased before is audited (complete=false); the caller should retry.
                log.error("erasure stopped by the event log: %s", e)
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"{e}; erase again once it is resolved")
            except (StateUnavailable, RedisError, OSError) as e:
                # A store that holds the user's data (the learner's shared Redis, the online store,
                # a file) cannot be reached now: the erasure is incomplete (audited so), not a bug.
                log.error("erasure stopped by an unreachable store: %s: %s", type(e).__name__, e)
                await context.abort(grpc.StatusCode.UNAVAILABLE,
                                    f"a store could not be reached ({type(e).__name__}: {e}); erase again once it is back")
        return admin_pb2.EraseUserResponse(subject=done.subject, removed=done.removed, not_reached=done.not_reached,
                                           audit_file=str(done.audit_file), pseudonymised=done.pseudonymised)
