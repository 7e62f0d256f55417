"""A generated fuzz of every RPC, against the real services: the gateway (real Triton, real Feast
online store on SQLite) and the feedback service (its own process, online learning on, with a 30 s
click window so that served lists and the fuzzed impressions and clicks join while the fuzz runs).

Requests come from Hypothesis strategies built from the proto descriptors (tests/fuzz_strategies.py),
so a new field or a new RPC is fuzzed without touching this file: huge strings (up to 6 MB), unicode,
NUL and control characters, extreme numbers, unknown enum values, huge repeated fields, tiny and zero
deadlines, client cancellations, and raw wire bytes (undecodable, truncated, random, invalid UTF-8)
sent through a generic channel call, for the client-streaming Stream mixed with valid frames.

Every answer is judged: no INTERNAL / UNKNOWN, only the documented error codes, INVALID_ARGUMENT
names a field (undecodable bytes must be INVALID_ARGUMENT), OK answers keep the contract their
.proto comments state. Every distinct failure is recorded (status, message, a short form of the
input) and the test fails once at the end with the whole list. Afterwards both services must still
answer normally and report SERVING.

Reproducible: Hypothesis runs derandomized without a database. RECSYS_FUZZ_SCALE (default 1.0)
multiplies the number of requests per RPC.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pandas as pd
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from recsys.v1 import admin_pb2, feedback_pb2, recommend_pb2
from rpc.clients import aio_channel, channel as authed_channel
from tests.keys import ADMIN_KEY
from tests.processes import LoggedFeedback
from tests.fuzz_strategies import (MessageStrategies, Vocab, decodes, named_field, nasty_doubles,
                                   normalize, short_repr, weighted)

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SCALE = float(os.environ.get("RECSYS_FUZZ_SCALE", "1.0"))
# Requests per RPC (structured and raw together), in the order they run: LogServed before the
# events that join with it, the feedback RPCs before the gateway's (which polls the learned weights).
REQUESTS = {"LogServed": 1500, "Log": 1500, "Stream": 600, "GetBlendWeights": 600, "Recommend": 2000, "Rank": 1500,
            "EraseUser": 150}
RAW_SHARE = 15  # percent of an RPC's requests sent as raw wire bytes
# Calls in flight per RPC: enough to keep 2 cores busy and to queue at the gateway's admission
# control, not so many that most well-formed requests are shed (RESOURCE_EXHAUSTED) before they run.
CONCURRENCY = 6
BATCH = 48
GENEROUS_S = 30.0
TINY_DEADLINES = (0.0, 1e-9, 1e-6, 1e-4, 5e-4, 1e-3, 2e-3, 0.01)

S = grpc.StatusCode
ALLOWED = {S.OK, S.INVALID_ARGUMENT, S.RESOURCE_EXHAUSTED, S.DEADLINE_EXCEEDED, S.UNAVAILABLE, S.FAILED_PRECONDITION,
           S.CANCELLED}
SERVICES: list[ServiceDescriptor] = [recommend_pb2.DESCRIPTOR.services_by_name["RecommendService"],
                                     feedback_pb2.DESCRIPTOR.services_by_name["FeedbackService"],
                                     admin_pb2.DESCRIPTOR.services_by_name["AdminService"]]  # on the feedback port
METHODS: dict[str, MethodDescriptor] = {m.name: m for s in SERVICES for m in s.methods}


def _cls(descriptor) -> type[Message]:
    return message_factory.GetMessageClass(descriptor)


# --- the services ------------------------------------------------------------------------------------

class FeedbackService(LoggedFeedback):
    """`python -m feedback` on a free port, its log lines kept (tests/processes.py LoggedFeedback)."""

    def errors(self) -> list[str]:
        """Error lines it logged (JSON lines; a traceback spans several plain lines)."""
        out = []
        for line in self.lines:
            try:
                entry = json.loads(line)
            except ValueError:
                if "Traceback" in line or "Error" in line:
                    out.append(line.strip()[:300])
                continue
            if entry.get("level") in ("error", "critical"):
                exc = (entry.get("exc") or "").strip().splitlines()
                tail = f" | {exc[-1][:200]}" if exc else ""
                out.append(f"{entry.get('logger')}: {entry.get('msg', '')[:200]}{tail}")
        return out



class ErrorLogs(logging.Handler):
    """ERROR records of the in-process gateway while the fuzz runs."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        exc = f" | {record.exc_info[0].__name__}: {str(record.exc_info[1])[:200]}" if record.exc_info else ""
        self.records.append(f"{record.name}: {record.getMessage()[:200]}{exc}")


@dataclass
class Services:
    gateway: object  # BackgroundGateway
    feedback: FeedbackService
    vocab: Vocab

    def address(self, method: MethodDescriptor) -> str:
        return self.gateway.address if method.containing_service.name == "RecommendService" else self.feedback.address


@pytest.fixture(scope="module")
def services(feature_repo, triton_gw, tmp_path_factory):
    from cli.background import BackgroundGateway
    from gateway.config import GatewaySettings

    tmp = tmp_path_factory.mktemp("fuzz")
    # A private copy: the fuzzed sessions must not reach other tests' online store.
    repo = shutil.copytree(feature_repo.path, tmp / "repo")
    feedback = FeedbackService(tmp / "events", {
        "RECSYS_FEEDBACK_FEATURE_REPO": str(repo), "RECSYS_FEEDBACK_LABEL_DELAY_S": "30.0",
        "RECSYS_FEEDBACK_LEARNER_MIN_BATCH": "4"})
    settings_ = GatewaySettings(  # tests/integration/test_gateway.py's _settings, on the private copy
        port=0, feature_repo=repo, triton_url=triton_gw.grpc_url,
        embedding_cache_dir=tmp_path_factory.getbasetemp() / "embeddings", request_timeout_ms=10_000,
        embed_timeout_ms=5_000, feature_timeout_ms=2_000, interest_timeout_ms=2_000,
        rank_timeout_ms=5_000, refresh_interval_s=0.5, feedback_url=feedback.address,
        online_weights_poll_s=0.2)
    items = pd.read_parquet(feature_repo.offline / "item_features.parquet")
    events = feature_repo.shop.events
    ids = [*items["item_id"].iloc[:6], *events["user_id"].drop_duplicates().iloc[:3], "req-fz-1", "sess-fz-1"]
    words = ["running shoes", "nike running shoes under 120", "waterproof rain jacket", "cheap headphones",
             "backpack $20-$40", "espresso", *items["brand"].drop_duplicates().iloc[:4],
             *items["category"].drop_duplicates().iloc[:4], *items["title"].iloc[:4], "en-GB", "de"]
    try:
        with BackgroundGateway(settings_) as gw:
            yield Services(gw, feedback, Vocab(ids=ids, words=words))
    finally:
        feedback.stop()


# --- cases ---------------------------------------------------------------------------------------------

@dataclass
class Case:
    method: MethodDescriptor
    payload: object  # a message, a list of messages (client streaming), bytes or a list of bytes (raw)
    raw: bool
    timeout: float
    cancel_after: float | None

    @property
    def frames(self) -> list:
        return list(self.payload) if self.method.client_streaming else [self.payload]

    @property
    def undecodable(self) -> bool:
        return self.raw and not all(decodes(self.method.input_type, f) for f in self.frames)

    @property
    def hurried(self) -> bool:
        return self.timeout < 0.05 or self.cancel_after is not None

    def decoded(self) -> list[Message]:
        cls = _cls(self.method.input_type)
        return [cls.FromString(f) if self.raw else f for f in self.frames]

    def describe(self) -> str:
        frames = self.frames
        shape = ""
        if self.method.client_streaming:
            sizes = [len(f) if self.raw else f.ByteSize() for f in frames]
            shape = f"{len(frames)} frames of {min(sizes, default=0)}-{max(sizes, default=0)} bytes: "
        body = ", ".join(short_repr(f, 300 if len(frames) == 1 else 160) for f in frames[:2])
        body += ", ..." if len(frames) > 2 else ""
        extra = f" timeout={self.timeout:g}s"
        extra += f" cancel_after={self.cancel_after:g}s" if self.cancel_after is not None else ""
        return f"{'raw ' if self.raw else ''}{shape}{body}{extra}"


def case_strategy(method: MethodDescriptor, ms: MessageStrategies) -> st.SearchStrategy[Case]:
    message = ms.message(method.input_type)
    raw = ms.raw(method.input_type)
    if method.client_streaming:
        def many(m: Message, n: int) -> list[Message]:
            return [m] * n

        structured = weighted((90, st.lists(message, max_size=20)),
                              (10, st.builds(many, message, st.sampled_from([501, 5_000]))))
        # Undecodable frames among valid ones, anywhere in the stream.
        raw_payload = st.lists(weighted((60, message.map(lambda m: m.SerializeToString())), (40, raw)),
                               min_size=1, max_size=12)
    else:
        structured, raw_payload = message, raw
    timeout = weighted((85, st.just(GENEROUS_S)), (15, st.sampled_from(TINY_DEADLINES)))
    cancel = weighted((95, st.none()), (5, st.sampled_from([0.0, 0.001, 0.01, 0.05])))
    is_raw = weighted((100 - RAW_SHARE, st.just(False)), (RAW_SHARE, st.just(True)))

    @st.composite
    def build(draw) -> Case:
        r = draw(is_raw)
        return Case(method, draw(raw_payload if r else structured), r, draw(timeout), draw(cancel))

    return build()


# --- calling -----------------------------------------------------------------------------------------

def _client_write_failed(e: grpc.aio.AioRpcError) -> bool:
    """The error is grpc.aio's own failed send of a request frame, not a status from the server."""
    debug = e.debug_error_string() or ""
    return "execute_batch" in debug and "SendMessageOperation" in debug


def _details(e: grpc.RpcError) -> str:
    details = e.details() or ""
    debug = e.debug_error_string() or ""
    if e.code() in (S.INTERNAL, S.UNKNOWN) and "execute_batch" in debug:  # the client library's own failure
        details += f" [client-side: {debug[:120]}]"
    return details


class Caller:
    """Generic calls from the method descriptors, over grpc.aio, on a loop owned by the test."""

    def __init__(self, services: Services):
        self.services = services
        self.loop = asyncio.new_event_loop()
        self.channels: dict[str, grpc.aio.Channel] = {}
        self.blocking: dict[str, grpc.Channel] = {}

    def _channel(self, address: str) -> grpc.aio.Channel:
        if address not in self.channels:
            self.channels[address] = aio_channel(address, api_key=ADMIN_KEY)  # every method: admin
        return self.channels[address]

    def _multicallable(self, case: Case):
        m = case.method
        path = f"/{m.containing_service.full_name}/{m.name}"
        serialize = None if case.raw else (lambda msg: msg.SerializeToString())
        deserialize = None if case.raw else _cls(m.output_type).FromString
        kind = {(False, False): "unary_unary", (True, False): "stream_unary", (False, True): "unary_stream",
                (True, True): "stream_stream"}[(m.client_streaming, m.server_streaming)]
        channel = self._channel(self.services.address(m))
        return getattr(channel, kind)(path, request_serializer=serialize, response_deserializer=deserialize)

    async def call(self, case: Case) -> tuple[grpc.StatusCode, str, object]:
        multicallable = self._multicallable(case)
        request = iter(case.payload) if case.method.client_streaming else case.payload
        call = multicallable(request, timeout=case.timeout)
        if case.cancel_after is not None:
            asyncio.get_running_loop().call_later(case.cancel_after, call.cancel)
        try:
            if case.method.server_streaming:
                response = [r async for r in call]
            else:
                response = await call
        except grpc.aio.AioRpcError as e:
            if e.code() == S.INTERNAL and _client_write_failed(e) and case.cancel_after is None:
                # grpc.aio's own write of a further frame failed because the server had already
                # closed the call (e.g. RESOURCE_EXHAUSTED for an oversized frame): not the server's
                # answer. Ask again with the blocking API, which reports what the server said.
                return await asyncio.to_thread(self.call_blocking, case)
            return e.code(), _details(e), None
        except asyncio.CancelledError:
            return S.CANCELLED, "cancelled by the client", None
        if case.raw:  # judge the answer like a typed one
            cls = _cls(case.method.output_type)
            if case.method.server_streaming:
                response = [cls.FromString(r) for r in response]
            else:
                response = cls.FromString(response)
        return S.OK, "", response

    def call_blocking(self, case: Case) -> tuple[grpc.StatusCode, str, object]:
        address = self.services.address(case.method)
        if address not in self.blocking:
            self.blocking[address] = authed_channel(address, api_key=ADMIN_KEY)
        m = case.method
        multicallable = self.blocking[address].stream_unary(
            f"/{m.containing_service.full_name}/{m.name}",
            request_serializer=None if case.raw else (lambda msg: msg.SerializeToString()),
            response_deserializer=None if case.raw else _cls(m.output_type).FromString)
        try:
            response = multicallable(iter(case.payload), timeout=case.timeout)
        except grpc.RpcError as e:
            return e.code(), _details(e), None
        return S.OK, "", _cls(m.output_type).FromString(response) if case.raw else response

    def run(self, cases: list[Case]) -> list[tuple[grpc.StatusCode, str, object]]:
        async def all_of() -> list:
            gate = asyncio.Semaphore(CONCURRENCY)

            async def one(case: Case):
                async with gate:
                    try:
                        return await self.call(case)
                    except Exception as e:  # noqa: BLE001 - the harness itself; reported, not raised
                        return None, f"client-side {type(e).__name__}: {e}", None

            return await asyncio.gather(*(one(c) for c in cases))

        return self.loop.run_until_complete(all_of())

    def close(self) -> None:
        for channel in self.channels.values():
            self.loop.run_until_complete(channel.close())
        for blocking in self.blocking.values():
            blocking.close()
        self.loop.close()


# --- judging -------------------------------------------------------------------------------------------

def _finite(x: float) -> bool:
    return math.isfinite(x)


def _check_ranked(items, limit: int | None) -> list[str]:
    problems = []
    if limit is not None and len(items) > limit:
        problems.append(f"{len(items)} items for num_results {limit}")
    if [i.rank for i in items] != list(range(1, len(items) + 1)):
        problems.append("ranks are not 1..n")
    scores = [i.score for i in items]
    if not all(map(_finite, scores)):
        problems.append("a score is not finite")
    else:
        worse = next((k for k, (a, b) in enumerate(zip(scores, scores[1:]), 1) if a < b - 1e-6), None)
        if worse is not None:
            problems.append(f"items are not best first (rank {worse}: {scores[worse - 1]:.4f} < rank {worse + 1}: "
                            f"{scores[worse]:.4f}, of {len(scores)})")
    if len({i.item_id for i in items}) != len(items):
        problems.append("an item appears twice")
    return problems


def check_response(request: Message, frames: list[Message], response: Message) -> list[str]:
    """The contract the .proto comments state for OK answers."""
    name = response.DESCRIPTOR.name
    if name == "RecommendResponse":
        problems = _check_ranked(response.items, request.num_results or 20)
        got = {i.item_id for i in response.items}
        if got & set(request.filters.exclude_item_ids):
            problems.append("returned an id in filters.exclude_item_ids")
        if request.candidate_item_ids and not got <= set(request.candidate_item_ids):
            problems.append("returned an id outside candidate_item_ids")
        return problems
    if name == "RankResponse":
        problems = _check_ranked(response.items, None)
        got, unknown = [i.item_id for i in response.items], list(response.unknown_item_ids)
        if sorted(got + unknown) != sorted(request.item_ids):
            problems.append("items + unknown_item_ids != item_ids")
        return problems
    if name == "LogResponse":
        n = sum(len(f.events) for f in frames) if frames and frames[0].DESCRIPTOR.name == "LogRequest" else len(frames)
        r = response
        problems = []
        if r.accepted + r.duplicate + r.rejected != n:
            problems.append(f"accepted+duplicate+rejected = {r.accepted + r.duplicate + r.rejected} for {n} events")
        if len(r.errors) != min(r.rejected, 100):
            problems.append(f"{len(r.errors)} errors for {r.rejected} rejected")
        for e in r.errors:
            if named_field(feedback_pb2.Event.DESCRIPTOR, e.message) is None:
                problems.append(f"EventError names no field: {e.message[:120]!r}")
                break
            if not 0 <= e.index < n:
                problems.append(f"EventError.index {e.index} out of range")
                break
        return problems
    if name == "LogServedResponse":
        if not 0 <= response.accepted <= len(request.lists):
            return [f"accepted {response.accepted} of {len(request.lists)} lists"]
        return []
    if name == "EraseUserResponse":  # the fuzz's service has no pseudonym key
        r = response
        if not r.subject.startswith("sha256:") or r.pseudonymised or min(r.removed.values(), default=0) < 0:
            return [f"subject {r.subject[:20]!r}, pseudonymised {r.pseudonymised}, removed {dict(r.removed)}"]
        return []
    if name == "BlendWeights":
        w = response
        if not (len(w.part_names) == len(w.mean) == len(w.variance) == 4):
            return ["part_names / mean / variance lengths differ from 4"]
        if not all(map(_finite, [*w.mean, *w.variance])) or min(w.variance) <= 0:
            return [f"weights not finite or variance <= 0: mean={list(w.mean)} variance={list(w.variance)}"]
    return []


def _over_size_limit(details: str) -> bool:
    """grpc's own refusal of a message over the server's max_receive_message_length (checked before
    decoding, so an undecodable request that is also too big may get it)."""
    m = re.search(r"larger than max \((\d+) vs\. (\d+)\)", details)
    return m is not None and int(m.group(1)) > int(m.group(2))


@dataclass
class Failure:
    rpc: str
    code: str
    problem: str
    example: str
    count: int = 0


@dataclass
class Report:
    failures: dict[tuple[str, str, str], Failure] = field(default_factory=dict)
    codes: dict[str, Counter] = field(default_factory=dict)
    degraded: Counter = field(default_factory=Counter)
    rejected: Counter = field(default_factory=Counter)  # (rpc, field named by INVALID_ARGUMENT)
    other: Counter = field(default_factory=Counter)  # (rpc, code, message) of the other errors
    seconds: dict[str, float] = field(default_factory=dict)

    def fail(self, rpc: str, code: str, problem: str, example: str) -> None:
        key = (rpc, code, normalize(problem))
        entry = self.failures.setdefault(key, Failure(rpc, code, problem[:300], example))
        entry.count += 1

    def judge(self, case: Case, code: grpc.StatusCode | None, details: str, response) -> None:
        rpc = case.method.name
        self.codes.setdefault(rpc, Counter())[code.name if code else "CLIENT_ERROR"] += 1
        if code is None:
            self.fail(rpc, "CLIENT_ERROR", details, case.describe())
            return
        if code not in ALLOWED:
            self.fail(rpc, code.name, details or "(no message)", case.describe())
            return
        if case.undecodable:
            excused = (code == S.RESOURCE_EXHAUSTED and _over_size_limit(details)) or \
                      (case.hurried and code in (S.DEADLINE_EXCEEDED, S.CANCELLED))
            if code != S.INVALID_ARGUMENT and not excused:
                self.fail(rpc, code.name, f"undecodable request answered {code.name}: {details}", case.describe())
            return
        if code == S.INVALID_ARGUMENT:
            descriptor = feedback_pb2.Event.DESCRIPTOR if case.method.client_streaming else case.method.input_type
            named = named_field(descriptor, details)
            if named is None:
                self.fail(rpc, code.name, f"message names no field: {details}", case.describe())
            else:
                self.rejected[(rpc, re.sub(r"\[\d+\]", "[i]", named))] += 1
            return
        if code not in (S.OK, S.INVALID_ARGUMENT):
            when = "tiny deadline/cancel" if case.hurried else f"{GENEROUS_S:g} s deadline"
            self.other[(rpc, f"{code.name} ({when})", normalize(details)[:90])] += 1
        if code == S.OK:
            frames = case.decoded()
            for problem in check_response(frames[0] if frames else None, frames, response):
                self.fail(rpc, "OK", problem, case.describe())
            for reason in getattr(response, "degraded_reasons", ()):
                self.degraded[(rpc, normalize(reason))] += 1

    def summary(self) -> str:
        lines = [f"{'rpc':<16}{'requests':>9}{'seconds':>9}  status counts"]
        for rpc, counts in self.codes.items():
            lines.append(f"{rpc:<16}{sum(counts.values()):>9}{self.seconds.get(rpc, 0):>9.1f}  "
                         + ", ".join(f"{k}={v}" for k, v in counts.most_common()))
        by_rpc: dict[str, list[str]] = {}
        for (rpc, name), n in self.rejected.most_common():
            by_rpc.setdefault(rpc, []).append(f"{name}={n}")
        lines.append("INVALID_ARGUMENT by field (top 8):")
        lines += [f"  {rpc}: {', '.join(names[:8])}" for rpc, names in by_rpc.items()]
        lines.append("other errors by message (top 10):")
        lines += [f"  {rpc} {code}: {message} x{n}" for (rpc, code, message), n in self.other.most_common(10)]
        if self.degraded:
            lines.append("degraded answers (OK, not failures):")
            lines += [f"  {rpc}: {reason} x{n}" for (rpc, reason), n in self.degraded.most_common(15)]
        return "\n".join(lines)

    def failure_list(self) -> str:
        return "\n".join(f"- [{f.rpc}] {f.code}: {f.problem}  (x{f.count}; e.g. {f.example})"
                         for f in sorted(self.failures.values(), key=lambda f: (f.rpc, f.code, -f.count)))


# --- the test ------------------------------------------------------------------------------------------

def mostly_empty(element: st.SearchStrategy) -> st.SearchStrategy[list]:
    return weighted((75, st.just([])), (25, st.lists(element, min_size=1, max_size=4)))


def _hints(vocab: Vocab) -> dict:
    """Values a generic strategy would almost never make meaningful."""
    parts = st.lists(st.floats(-1, 3), min_size=4, max_size=4)
    nasty_parts = st.lists(nasty_doubles(), min_size=4, max_size=4)
    now = int(time.time())
    # Served lists, impressions and clicks join on (request_id, item_id): a few pairs, often drawn,
    # so that the learner really updates from fuzzed parts and positions while the fuzz runs.
    joined_request = weighted((70, st.sampled_from(["req-fz-1", "req-fz-2"])), (30, vocab.id_strategy()))
    joined_item = weighted((70, st.sampled_from(list(vocab.ids[:3]))), (30, vocab.id_strategy()))
    joined_type = st.sampled_from([feedback_pb2.EVENT_TYPE_IMPRESSION] * 3 + [feedback_pb2.EVENT_TYPE_CLICK] * 2 +
                                  list(feedback_pb2.EventType.values()))
    return {
        "recsys.v1.ServedItem.parts": (parts, nasty_parts),  # BlendWeights.part_names: four parts
        "google.protobuf.Timestamp.seconds": (st.integers(now - 7 * 86400, now + 3600), None),
        "google.protobuf.Timestamp.nanos": (st.integers(0, 999_999_999), None),
        "recsys.v1.ServedList.request_id": (joined_request, None),
        "recsys.v1.ServedItem.item_id": (joined_item, None),
        "recsys.v1.Event.request_id": (joined_request, None),
        "recsys.v1.Event.item_id": (joined_item, None),
        "recsys.v1.Event.type": (joined_type, None),
        # Candidates skip retrieval and filters from the vocabulary leave next to nothing: mostly
        # none, or the retrieval, ranking and fusion path (and lists longer than the ranked head)
        # would hardly run.
        "recsys.v1.RecommendRequest.candidate_item_ids": (mostly_empty(vocab.id_strategy()), None),
        "recsys.v1.Filters.brands": (mostly_empty(vocab.text_strategy()), None),
        "recsys.v1.Filters.categories": (mostly_empty(vocab.text_strategy()), None),
        "recsys.v1.Filters.exclude_item_ids": (mostly_empty(vocab.id_strategy()), None),
        # The idempotency key: a pool id is a duplicate after its first use, and duplicates teach nothing.
        "recsys.v1.Event.event_id": (st.uuids().map(lambda u: f"ev-{u.hex}"), None),
    }


def fuzz_rpc(method: MethodDescriptor, n: int, ms: MessageStrategies, caller: Caller, report: Report) -> None:
    pending: list[Case] = []

    def flush() -> None:
        for case, (code, details, response) in zip(pending, caller.run(pending)):
            report.judge(case, code, details, response)
        pending.clear()

    @settings(max_examples=n, phases=[Phase.generate], derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(case_strategy(method, ms))
    def generate(case: Case) -> None:
        pending.append(case)
        if len(pending) >= BATCH:
            flush()

    t0 = time.perf_counter()
    generate()
    flush()
    report.seconds[method.name] = time.perf_counter() - t0


def _after_fuzz(services: Services, report: Report) -> None:
    """Both services still answer normally and report SERVING."""
    time.sleep(1.0)  # the learner's last batch, the gateway's weight poll (0.2 s), a breaker's cooldown
    gw = authed_channel(services.gateway.address, api_key=ADMIN_KEY)
    fb_channel = authed_channel(services.feedback.address, api_key=ADMIN_KEY)
    from recsys.v1 import feedback_pb2_grpc, recommend_pb2_grpc

    def check(what: str, fn) -> None:
        try:
            problem = fn()
        except grpc.RpcError as e:
            problem = f"{e.code().name}: {e.details()}"
        except Exception as e:  # noqa: BLE001
            problem = f"{type(e).__name__}: {e}"
        if problem:
            report.fail("after fuzz", "-", f"{what}: {problem}", "a normal request")

    for address, channel, service in ((services.gateway.address, gw, "recsys.v1.RecommendService"),
                                      (services.feedback.address, fb_channel, "recsys.v1.FeedbackService")):
        for name in ("", service):
            def health(channel=channel, name=name):
                request = health_pb2.HealthCheckRequest(service=name)
                status = health_pb2_grpc.HealthStub(channel).Check(request, timeout=5)
                return None if status.status == health_pb2.HealthCheckResponse.SERVING else f"health {status.status}"
            check(f"health of {name or address}", health)

    stub = recommend_pb2_grpc.RecommendServiceStub(gw)
    user = services.vocab.ids[6]

    def recommend():
        seen = []
        for _ in range(5):  # a breaker opened by the fuzz may take its cooldown (2 s) to probe again
            reply = stub.Recommend(recommend_pb2.RecommendRequest(query="running shoes", user_id=user, num_results=10,
                                                                  explain=True), timeout=15)
            problems = _check_ranked(reply.items, 10)
            problems += [] if len(reply.items) == 10 else [f"{len(reply.items)} items"]
            if not reply.degraded and not problems:
                return None
            seen.append(f"degraded={reply.degraded} {list(reply.degraded_reasons)} {problems}")
            time.sleep(1.0)
        return "; ".join(seen[:2])

    check("Recommend fully ranked", recommend)

    def rank():
        reply = stub.Rank(recommend_pb2.RankRequest(query="running shoes", item_ids=list(services.vocab.ids[:6])),
                          timeout=15)
        return None if not reply.degraded and not _check_ranked(reply.items, None) else \
            f"degraded={reply.degraded} {list(reply.degraded_reasons)}"

    check("Rank fully ranked", rank)
    fstub = feedback_pb2_grpc.FeedbackServiceStub(fb_channel)

    def log():
        event = feedback_pb2.Event(event_id=f"after-{time.time_ns()}", type=feedback_pb2.EVENT_TYPE_CLICK, user_id=user,
                                   session_id="sess-after", item_id=services.vocab.ids[0], request_id="req-after",
                                   position=1)
        reply = fstub.Log(feedback_pb2.LogRequest(events=[event]), timeout=15)
        return None if reply.accepted == 1 else f"accepted={reply.accepted} errors={list(reply.errors)}"

    check("Log accepts a normal event", log)

    def weights():
        w = fstub.GetBlendWeights(feedback_pb2.GetBlendWeightsRequest(), timeout=5)
        mean = [round(m, 3) for m in w.mean]
        print(f"\nblend weights after the fuzz: v{w.version}, {w.labelled} labelled, mean={mean}")
        return None if all(map(_finite, [*w.mean, *w.variance])) else f"mean={list(w.mean)} variance={list(w.variance)}"

    check("GetBlendWeights finite", weights)
    if services.feedback.process.poll() is not None:
        report.fail("after fuzz", "-", f"the feedback service exited with {services.feedback.process.returncode}", "")
    gw.close()
    fb_channel.close()


def test_fuzz_every_rpc(services):
    assert set(REQUESTS) == set(METHODS), f"RPCs without a request count: {set(METHODS) ^ set(REQUESTS)}"
    ms = MessageStrategies(services.vocab, hints=_hints(services.vocab))
    report, caller, logs = Report(), Caller(services), ErrorLogs()
    logging.getLogger().addHandler(logs)
    t0 = time.perf_counter()
    try:
        for name, n in REQUESTS.items():
            fuzz_rpc(METHODS[name], max(10, int(n * SCALE)), ms, caller, report)
    finally:
        caller.close()
        logging.getLogger().removeHandler(logs)
    _after_fuzz(services, report)
    elapsed = time.perf_counter() - t0

    print(f"\nfuzz: {elapsed:.1f} s\n{report.summary()}")
    notes = Counter(logs.records) + Counter(services.feedback.errors())
    if notes:
        print("error log lines (gateway in-process, feedback service):")
        for line, n in notes.most_common(20):
            print(f"  x{n} {line}")
    if report.failures:
        pytest.fail(f"{len(report.failures)} distinct failures:\n{report.failure_list()}", pytrace=False)
