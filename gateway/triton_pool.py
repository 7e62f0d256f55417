"""Several Triton servers behind one client: health-aware picking and failover.

`TritonPool` has `TritonClient`'s interface (embed, rank, interest, version look-ups, probes), so
the request path does not know how many servers there are; one server is a pool of one.

Picking: least outstanding requests among the servers in rotation (ties: round robin). A server
leaves rotation
- at once when a call finds it unreachable (UNAVAILABLE: connection refused or reset, a killed
  server) or the health watcher (`probe`) finds it not live; it comes back when a probe finds it
  ready again (every TRITON_PROBE_S in the server, so within half a second of its restart);
- when its own windowed breaker opens (settings `triton_server_breaker`): errors and timeouts of
  its own (long) deadline across many calls, never one request's deadline (issue 11's rule). It
  is then tried again after the breaker's cool-down, one call at a time.
A call that failed because its server was unreachable is retried once on another server while
the request it serves still has `triton_failover_min_ms` left (the request's deadline comes from
gateway/budget.py REQUEST_DEADLINE). No other error is retried: a timeout already spent the
request's time, and a refused request (bad input, unknown version) would be refused again.
When no server is in rotation the call still goes to the one out longest (a refused connection
answers in microseconds), so a pool of one behaves as the single client always did and the parts'
breakers (pipeline/guarded.py) and the watcher degrade the answers as before.

Model versions: the version look-ups (serving_version, ready_versions, config_parameter) ask the
first server of the configured list that is in rotation, not the least loaded one, so the
gateway's idea of "the serving version" does not alternate between servers. The replicas are meant
to serve one model repository; while they differ (a rollout reaching one server first) answers stay
consistent because the gateway embeds queries with the version its index was built from, pinned
when an answer shows another (pipeline/embed.py), which works on every server that has it loaded.
`serving_versions` lets the watcher report a mismatch (log + metric).

Why not gRPC's own load balancing: a channel can spread calls over several addresses
(`ipv4:a:8001,b:8001` with lb policy `round_robin`), but tritonclient makes one channel per url
and hides it; round_robin's health checking needs the standard grpc.health.v1 service, which
Triton does not serve (it has its own ServerLive/ServerReady); it cannot pin the version look-ups
to one server, retry on another, or report per server. So: one TritonClient per server, picked
here.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

from contract.tensors import INTEREST_MODEL, NEXT_ITEM_MODEL
from gateway import metrics
from gateway.breaker import Breaker, BreakerSettings, State
from gateway.budget import REQUEST_DEADLINE
from gateway.triton_client import TritonClient, TritonDeadlineExceeded, TritonError, TritonUnavailable

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(eq=False)
class Server:
    """One Triton server: its client, whether it is reachable, its breaker, its outstanding calls."""

    url: str
    client: TritonClient
    breaker: Breaker
    reachable: bool = True
    out_since: float = 0.0  # when it last left rotation (monotonic)
    why_out: str = ""
    outstanding: int = 0

    @property
    def in_rotation(self) -> bool:
        return self.reachable and self.breaker.state is State.CLOSED


@dataclass
class ProbeResult:
    """What one watcher round found: servers in rotation, and those that changed."""

    up: list[str] = field(default_factory=list)
    left: list[str] = field(default_factory=list)  # taken out by this probe
    back: list[str] = field(default_factory=list)  # back in rotation by this probe


class TritonPool:
    def __init__(self, urls: Sequence[str], encoder_model: str | None = None, ranker_model: str | None = None,
                 breaker: BreakerSettings | None = None, failover_min_s: float = 0.01,
                 client_factory: Callable[..., TritonClient] = TritonClient, clock: Callable[[], float] = time.monotonic):
        if not urls:
            raise ValueError("TritonPool needs at least one server url")
        kwargs = {k: v for k, v in (("encoder_model", encoder_model), ("ranker_model", ranker_model)) if v}
        self.clock = clock
        self.failover_min_s = failover_min_s
        self.servers = [Server(u, client_factory(u, **kwargs), self._breaker(u, breaker or BreakerSettings()))
                        for u in urls]
        first = self.servers[0].client
        self.encoder_model, self.ranker_model = first.encoder_model, first.ranker_model
        self._turn = itertools.count()
        for s in self.servers:
            self._gauges(s)

    def _breaker(self, url: str, settings: BreakerSettings) -> Breaker:
        def on_change(state: State) -> None:
            server = next(s for s in self.servers if s.url == url)
            if state is State.OPEN:
                self._left(server, f"breaker open: {server.breaker.last_error}")
            self._gauges(server)
        return Breaker(settings, clock=self.clock, on_change=on_change)

    @property
    def url(self) -> str:
        return ",".join(s.url for s in self.servers)

    # --- picking --------------------------------------------------------------------------------------
    def pick(self, exclude: Sequence[Server] = ()) -> Server | None:
        """The server for the next call: least outstanding among those in rotation (round robin on
        ties); else the one out longest (last resort); None when every server is excluded."""
        candidates = [s for s in self.servers if s not in exclude]
        if not candidates:
            return None
        turn = next(self._turn)
        n = len(self.servers)
        order = sorted(candidates, key=lambda s: (s.outstanding, (self.servers.index(s) - turn) % n))
        for server in order:
            if server.reachable and server.breaker.allow():  # allow(): a half-open breaker's one trial call
                return server
        return min(candidates, key=lambda s: s.out_since)

    def primary(self) -> Server:
        """The server version look-ups ask: the first configured one in rotation (else the out longest)."""
        for server in self.servers:
            if server.in_rotation:
                return server
        return min(self.servers, key=lambda s: s.out_since)

    async def _call(self, what: str, call: Callable[[TritonClient], Awaitable[T]], first: Server | None = None) -> T:
        """`call` on a picked server; once more on another if that one was unreachable and the
        request still has time."""
        tried: list[Server] = []
        server = first or self.pick()
        while True:
            tried.append(server)
            try:
                return await self._on(server, what, call)
            except TritonUnavailable as e:
                deadline = REQUEST_DEADLINE.get()
                enough_time = deadline is None or deadline.left() >= self.failover_min_s
                nxt = self.pick(exclude=tried) if len(tried) == 1 and enough_time else None
                if nxt is None:
                    raise
                metrics.TRITON_FAILOVERS.labels(server.url).inc()
                log.debug("%s failed on %s (%s): retrying on %s", what, server.url, e, nxt.url)
                server = nxt

    async def _on(self, server: Server, what: str, call: Callable[[TritonClient], Awaitable[T]]) -> T:
        server.outstanding += 1
        metrics.TRITON_SERVER_IN_FLIGHT.labels(server.url).set(server.outstanding)
        outcome = "error"
        try:
            result = await call(server.client)
            outcome = "ok"
            server.breaker.success()
            if not server.reachable:  # a last-resort call answered: proof enough to return
                self.mark_ready(server)
            return result
        except TritonUnavailable as e:
            outcome = "unavailable"
            self.mark_unreachable(server, f"{what}: {e}")
            raise
        except TritonDeadlineExceeded as e:
            # The server's own deadline (the guard gives it the request's budget plus a grace), so
            # evidence, but only across many calls: the windowed breaker decides.
            outcome = "timeout"
            server.breaker.failure(f"timeout: {e}")
            raise
        except TritonError as e:
            server.breaker.failure(str(e))
            raise
        except asyncio.CancelledError:
            outcome = "cancelled"
            server.breaker.neutral()
            raise
        finally:
            server.outstanding -= 1
            metrics.TRITON_SERVER_IN_FLIGHT.labels(server.url).set(server.outstanding)
            metrics.TRITON_SERVER_CALLS.labels(server.url, outcome).inc()

    # --- rotation -------------------------------------------------------------------------------------
    def mark_unreachable(self, server: Server, why: str) -> None:
        if server.reachable:
            server.reachable = False
            self._left(server, why)
            self._gauges(server)

    def _left(self, server: Server, why: str) -> None:
        server.out_since, server.why_out = self.clock(), why
        up = sum(s.in_rotation for s in self.servers)
        log.warning("Triton at %s out of rotation (%s); %d of %d in rotation", server.url, why, up, len(self.servers))

    def mark_ready(self, server: Server) -> bool:
        """A probe found `server` ready: back in rotation (True if it was out)."""
        was_out = not server.in_rotation
        server.reachable = True
        server.breaker.force_close()
        if was_out:
            server.why_out = ""
            log.warning("Triton at %s back in rotation", server.url)
        self._gauges(server)
        return was_out

    def _gauges(self, server: Server) -> None:
        metrics.TRITON_SERVER_UP.labels(server.url).set(1 if server.in_rotation else 0)

    async def probe(self, timeout_s: float) -> ProbeResult:
        """One watcher round: servers in rotation must be live, servers out must be ready to return."""
        async def one(server: Server) -> tuple[Server, bool, bool]:
            was_in = server.in_rotation
            if was_in:
                return server, was_in, await server.client.is_live(timeout_s=timeout_s)
            return server, was_in, await server.client.is_ready(timeout_s=timeout_s)

        result = ProbeResult()
        for server, was_in, ok in await asyncio.gather(*(one(s) for s in self.servers)):
            if was_in and not ok:
                self.mark_unreachable(server, "not live")
                result.left.append(server.url)
            elif not was_in and ok and (not server.reachable or server.breaker.state is not State.OPEN):
                # Unreachable servers come back on a ready probe; a server its breaker took out
                # (slow or erroring while live) waits out the cool-down and a trial call instead.
                if self.mark_ready(server):
                    result.back.append(server.url)
            if server.in_rotation:
                result.up.append(server.url)
        return result

    # --- TritonClient's interface -------------------------------------------------------------------------
    async def embed(self, texts: Sequence[str], timeout_s: float, version: str = "") -> np.ndarray:
        return await self._call("embed", lambda c: c.embed(texts, timeout_s, version))

    async def embed_versioned(self, texts: Sequence[str], timeout_s: float, version: str = "") -> tuple[np.ndarray, str]:
        return await self._call("embed", lambda c: c.embed_versioned(texts, timeout_s, version))

    async def rank(self, context: str, item_texts: Sequence[str], features: np.ndarray, timeout_s: float,
                   version: str = "") -> np.ndarray:
        return await self._call("rank", lambda c: c.rank(context, item_texts, features, timeout_s, version))

    async def interest(self, query: np.ndarray, has_query: bool, items: np.ndarray, mask: np.ndarray,
                       timeout_s: float, model: str = INTEREST_MODEL.name) -> np.ndarray:
        return await self._call("interest", lambda c: c.interest(query, has_query, items, mask, timeout_s, model))

    async def next_items(self, newest_first: Sequence[str], timeout_s: float, version: str = "",
                         model: str = NEXT_ITEM_MODEL.name) -> tuple[list[str], np.ndarray]:
        return await self._call("next_items", lambda c: c.next_items(newest_first, timeout_s, version, model))

    async def ready_versions(self, model: str, timeout_s: float = 1.0) -> list[str]:
        return await self._call("ready_versions", lambda c: c.ready_versions(model, timeout_s), self.primary())

    async def serving_version(self, ensemble: str, component: str, timeout_s: float = 2.0) -> str:
        return await self._call("serving_version", lambda c: c.serving_version(ensemble, component, timeout_s),
                                self.primary())

    async def config_parameter(self, model: str, key: str, timeout_s: float = 2.0) -> str | None:
        return await self._call("config_parameter", lambda c: c.config_parameter(model, key, timeout_s), self.primary())

    async def serving_versions(self, ensemble: str, component: str, timeout_s: float = 2.0) -> dict[str, str]:
        """{url: serving version of `component`} of every server in rotation (those that answer)."""
        async def one(server: Server) -> tuple[str, str | None]:
            try:
                return server.url, await server.client.serving_version(ensemble, component, timeout_s)
            except TritonError:
                return server.url, None

        found = await asyncio.gather(*(one(s) for s in self.servers if s.in_rotation))
        return {url: v for url, v in found if v is not None}

    async def is_live(self, timeout_s: float = 1.0) -> bool:
        """Any server live."""
        return any(await asyncio.gather(*(s.client.is_live(timeout_s) for s in self.servers)))

    async def is_ready(self, timeout_s: float = 1.0) -> bool:
        """Any server ready; every server's rotation follows its answer (start-up: a listed server
        that is not ready yet stays out until a probe finds it ready)."""
        ready = await asyncio.gather(*(s.client.is_ready(timeout_s) for s in self.servers))
        for server, ok in zip(self.servers, ready):
            if ok:
                self.mark_ready(server)
            else:
                self.mark_unreachable(server, "not ready")
        return any(ready)

    async def close(self) -> None:
        await asyncio.gather(*(s.client.close() for s in self.servers), return_exceptions=True)
