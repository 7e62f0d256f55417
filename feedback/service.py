"""FeedbackService over gRPC: per-event validation, durable writes before the reply, idempotency.

Ids enter here: a valid event's user and session ids become their pseudonyms (rpc/pseudonyms.py,
when a key is configured) before the event log, the live session push and the learner see it.
LogServed carries no user ids (request and item ids only)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import grpc

from feedback import metrics
from feedback.blend_learner import BlendLearner
from eventlog.event_log import EventLog, EventLogError, EventLogFull
from feedback.events import MAX_BATCH, EventError, validate_event
from feedback.served import ServedError, ServedLimits, parse_served
from contract.scores import PART_NAMES
from recsys.v1 import feedback_pb2, feedback_pb2_grpc
from rpc.auth import caller_var
from rpc.pseudonyms import Pseudonyms

log = logging.getLogger(__name__)

MAX_ERRORS = 100
STREAM_CHUNK = 500  # a stream is made durable every this many events (group commit)
# LogServed calls parsed at once, in threads of their own: a maximum-size call takes ~150 ms of
# CPU and ~15 MB of intermediate objects; more in parallel would only add memory (one GIL), and a
# small fixed pool keeps malloc's per-thread arenas (memory each thread keeps after freeing) few.
SERVED_PARSERS = 2

OnStored = Callable[[list[dict]], Awaitable[None]]


class Tally:
    def __init__(self) -> None:
        self.response = feedback_pb2.LogResponse()

    def reject(self, index: int, event: feedback_pb2.Event, message: str) -> None:
        self.response.rejected += 1
        if len(self.response.errors) < MAX_ERRORS:
            self.response.errors.add(index=index, event_id=event.event_id, message=message)


class FeedbackServicer(feedback_pb2_grpc.FeedbackServiceServicer):
    def __init__(self, event_log: EventLog, on_stored: Sequence[OnStored] = (), learner: BlendLearner | None = None,
                 served_limits: ServedLimits = ServedLimits(), pseudonyms: Pseudonyms = Pseudonyms(),
                 learn_from_log: bool = True):
        """`learn_from_log`: the learner observes the events this replica stored (the SQLite log);
        False on the event stream, where its consumer group feeds it (feedback/stream_consumers.py)
        and this servicer only takes LogServed and answers GetBlendWeights."""
        self.log = event_log
        self.pseudonyms = pseudonyms
        self.on_stored = list(on_stored)
        self.learner = learner
        self.served_limits = served_limits
        self._parsers = ThreadPoolExecutor(SERVED_PARSERS, thread_name_prefix="log-served")
        if learner is not None and learn_from_log:
            self.on_stored.append(learner)

    async def _store(self, indexed: list[tuple[int, feedback_pb2.Event]], tally: Tally) -> None:
        valid = []
        pseudonymise = self.pseudonyms.event if self.pseudonyms.on else None
        for index, event in indexed:
            try:
                stored = validate_event(event)
            except EventError as e:
                tally.reject(index, event, str(e))  # the caller's own input, back to the caller only
                continue
            valid.append(pseudonymise(stored) if pseudonymise else stored)
        if not valid:
            return
        fresh = await asyncio.to_thread(self.log.append, valid)  # returns after fsync
        stored = [e for e, is_new in zip(valid, fresh) if is_new]
        tally.response.accepted += len(stored)
        tally.response.duplicate += len(valid) - len(stored)
        for hook in self.on_stored if stored else ():
            # After the durable write: a failure here loses no event, only freshness.
            try:
                await hook(stored)
            except Exception:  # noqa: BLE001
                log.exception("post-store hook %s failed (events are stored)", type(hook).__name__)

    @staticmethod
    async def _refuse(context, error: EventLogError, stored_before: int = 0) -> None:
        """The event log could not store a batch (full disk, I/O error, damage): an error status,
        never an acknowledgement; the service keeps running and stores again once it can.
        RESOURCE_EXHAUSTED for a full disk (gRPC's own meaning: "the entire file system is out of
        space"), UNAVAILABLE otherwise; both tell the producer to resend later."""
        log.error("event log refused a batch: %s", error)
        code = grpc.StatusCode.RESOURCE_EXHAUSTED if isinstance(error, EventLogFull) else grpc.StatusCode.UNAVAILABLE
        if stored_before:
            earlier = (f"; this stream's first {stored_before} events were processed before it (resent, the stored "
                       "ones count as duplicates)")
        else:
            earlier = "; nothing of this call was acknowledged, resend it later"
        await context.abort(code, f"{error}{earlier}")

    async def Log(self, request: feedback_pb2.LogRequest, context) -> feedback_pb2.LogResponse:
        n = len(request.events)
        if not 1 <= n <= MAX_BATCH:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"events: 1-{MAX_BATCH} events per call, got {n}")
        tally = Tally()
        try:
            await self._store(list(enumerate(request.events)), tally)
        except EventLogError as e:
            await self._refuse(context, e)
        return tally.response

    async def Stream(self, request_iterator: AsyncIterator[feedback_pb2.Event], context) -> feedback_pb2.LogResponse:
        tally = Tally()
        chunk: list[tuple[int, feedback_pb2.Event]] = []
        index = 0
        try:
            async for event in request_iterator:
                chunk.append((index, event))
                index += 1
                if len(chunk) == STREAM_CHUNK:
                    await self._store(chunk, tally)
                    chunk = []
            if chunk:
                await self._store(chunk, tally)
        except EventLogError as e:
            await self._refuse(context, e, stored_before=index - len(chunk))
        return tally.response

    async def LogServed(self, request: feedback_pb2.LogServedRequest, context) -> feedback_pb2.LogServedResponse:
        if self.learner is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                "online learning is off in this feedback service (RECSYS_FEEDBACK_ONLINE_LEARNING=false)")
        try:  # in a thread, so Log and health checks are answered meanwhile
            parsed = await asyncio.get_running_loop().run_in_executor(self._parsers, parse_served, request,
                                                                      self.served_limits)
        except ServedError as e:
            metrics.SERVED_REFUSED.labels(e.field.rsplit(".", 1)[-1].split("[")[0]).inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        caller = caller_var.get()  # the key's name: the learner's per-caller budget ("": auth off)
        accepted = sum(self.learner.add_served_arrays(s.request_id, s.item_ids, s.parts, caller=caller) for s in parsed)
        self.learner.publish()
        metrics.SERVED_LISTS.inc(accepted)
        return feedback_pb2.LogServedResponse(accepted=accepted)

    async def GetBlendWeights(self, request: feedback_pb2.GetBlendWeightsRequest, context) -> feedback_pb2.BlendWeights:
        if self.learner is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                "online learning is off in this feedback service (RECSYS_FEEDBACK_ONLINE_LEARNING=false)")
        reply = feedback_pb2.BlendWeights(part_names=PART_NAMES, mean=self.learner.weights().tolist(),
                                          variance=self.learner.variances().tolist(), labelled=self.learner.labelled,
                                          version=self.learner.version)
        reply.updated_at.FromDatetime(self.learner.updated_at)
        return reply
