"""TritonPool's picking, failover and return to rotation, with fake servers (the real two-server
run with a SIGKILL is tests/integration/test_many_tritons.py)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from gateway.breaker import BreakerSettings
from gateway.budget import REQUEST_DEADLINE, Deadline
from gateway.triton_client import TritonDeadlineExceeded, TritonError, TritonUnavailable
from gateway.triton_pool import TritonPool


class FakeServer:
    """A TritonClient stand-in: `mode` "up" answers (after `gate` when set), "down" refuses the
    connection, "slow" misses its own deadline, "broken" answers with an error."""

    def __init__(self, url: str, encoder_model: str = "encoder", ranker_model: str = "ranker"):
        self.url, self.encoder_model, self.ranker_model = url, encoder_model, ranker_model
        self.mode = "up"
        self.live = self.ready = True
        self.calls = 0
        self.version = "1"
        self.gate: asyncio.Event | None = None

    async def _answer(self):
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.mode == "down":
            raise TritonUnavailable(f"{self.url}: failed to connect to all addresses", "StatusCode.UNAVAILABLE")
        if self.mode == "slow":
            raise TritonDeadlineExceeded(f"{self.url}: no answer within 2000 ms")
        if self.mode == "broken":
            raise TritonError(f"{self.url}: internal", "StatusCode.INTERNAL")
        return self.url

    async def embed_versioned(self, texts, timeout_s, version=""):
        return np.zeros((len(texts), 2)), await self._answer()

    async def embed(self, texts, timeout_s, version=""):
        return (await self.embed_versioned(texts, timeout_s, version))[0]

    async def rank(self, context, item_texts, features, timeout_s, version=""):
        await self._answer()
        return np.zeros(len(item_texts))

    async def serving_version(self, ensemble, component, timeout_s=2.0):
        await self._answer()
        return self.version

    async def ready_versions(self, model, timeout_s=1.0):
        await self._answer()
        return [self.version]

    async def config_parameter(self, model, key, timeout_s=2.0):
        return await self._answer()

    async def is_live(self, timeout_s=1.0):
        return self.live

    async def is_ready(self, timeout_s=1.0):
        return self.ready

    async def close(self):
        pass


def _pool(n: int = 2, **kw) -> tuple[TritonPool, list[FakeServer]]:
    made: list[FakeServer] = []

    def factory(url, **kwargs):
        made.append(FakeServer(url, **kwargs))
        return made[-1]

    pool = TritonPool([f"t{i}:8001" for i in range(n)], client_factory=factory, **kw)
    return pool, made


async def _served_by(pool: TritonPool) -> str:
    _, url = await pool.embed_versioned(["q"], timeout_s=1)
    return url


def test_sequential_calls_alternate_and_concurrent_ones_go_to_the_least_busy():
    async def main():
        pool, (a, b) = _pool()
        assert [await _served_by(pool) for _ in range(4)] == ["t0:8001", "t1:8001", "t0:8001", "t1:8001"]
        a.gate = asyncio.Event()  # a holds its calls: the next ones all go to b
        held = [asyncio.ensure_future(pool.embed_versioned(["q"], timeout_s=1)) for _ in range(2)]
        await asyncio.sleep(0)
        assert a.calls - 2 == 1 and b.calls - 2 == 1  # one each: least outstanding
        assert [await _served_by(pool) for _ in range(3)] == ["t1:8001"] * 3
        a.gate.set()
        await asyncio.gather(*held)

    asyncio.run(main())


def test_an_unreachable_server_fails_over_once_and_leaves_rotation_until_ready_again():
    async def main():
        pool, (a, b) = _pool()
        a.mode, a.live, a.ready = "down", False, False
        assert await _served_by(pool) == "t1:8001"  # tried a first (round robin), retried on b
        assert a.calls == 1 and not pool.servers[0].in_rotation
        assert [await _served_by(pool) for _ in range(5)] == ["t1:8001"] * 5
        assert a.calls == 1  # out of rotation: not tried again
        probe = await pool.probe(timeout_s=0.5)
        assert probe.up == ["t1:8001"] and not probe.back
        a.mode, a.live, a.ready = "up", True, True
        probe = await pool.probe(timeout_s=0.5)
        assert probe.back == ["t0:8001"] and probe.up == ["t0:8001", "t1:8001"]
        assert {await _served_by(pool) for _ in range(4)} == {"t0:8001", "t1:8001"}

    asyncio.run(main())


def test_no_failover_when_the_request_has_no_time_left():
    async def main():
        pool, (a, b) = _pool(failover_min_s=0.05)
        a.mode = "down"
        REQUEST_DEADLINE.set(Deadline(0.01))
        with pytest.raises(TritonUnavailable):
            await pool.embed_versioned(["q"], timeout_s=1)
        assert (a.calls, b.calls) == (1, 0)
        REQUEST_DEADLINE.set(Deadline(1.0))
        assert await _served_by(pool) == "t1:8001"

    asyncio.run(main())


def test_a_timeout_is_not_retried_and_one_is_no_evidence_but_many_take_the_server_out():
    async def main():
        pool, (a, b) = _pool(breaker=BreakerSettings(window_s=60, min_calls=4, failure_ratio=0.5, cooldown_s=60))
        a.mode = "slow"
        with pytest.raises(TritonDeadlineExceeded):
            await pool.embed_versioned(["q"], timeout_s=1)
        assert b.calls == 0 and pool.servers[0].in_rotation  # one timeout: still in rotation
        for _ in range(8):  # alternating: a times out on each of its turns
            try:
                await pool.embed_versioned(["q"], timeout_s=1)
            except TritonDeadlineExceeded:
                pass
        assert not pool.servers[0].in_rotation
        assert [await _served_by(pool) for _ in range(3)] == ["t1:8001"] * 3
        # Live and ready, but taken out by its breaker: it waits out the cool-down, not the next probe.
        assert not (await pool.probe(timeout_s=0.5)).back

    asyncio.run(main())


def test_a_probe_takes_a_dead_server_out_before_any_call_finds_it():
    async def main():
        pool, (a, b) = _pool()
        a.live = False
        assert (await pool.probe(timeout_s=0.5)).left == ["t0:8001"]
        assert [await _served_by(pool) for _ in range(3)] == ["t1:8001"] * 3
        assert a.calls == 0

    asyncio.run(main())


def test_with_every_server_down_calls_still_try_the_one_out_longest_and_fail_fast():
    async def main():
        pool, servers = _pool()
        for s in servers:
            s.mode, s.live = "down", False
        await pool.probe(timeout_s=0.5)
        with pytest.raises(TritonUnavailable):
            await pool.embed_versioned(["q"], timeout_s=1)
        assert sum(s.calls for s in servers) == 2  # one try and one failover, nothing more
        servers[1].mode = "up"  # a pool of one / all down: the next call still reaches a server
        assert await _served_by(pool) == "t1:8001"

    asyncio.run(main())


def test_a_pool_of_one_behaves_as_the_single_client():
    async def main():
        pool, (only,) = _pool(1)
        only.mode = "down"
        for _ in range(3):
            with pytest.raises(TritonUnavailable):
                await pool.embed_versioned(["q"], timeout_s=1)
        assert only.calls == 3  # every call tries it (no retry on itself)
        only.mode = "up"
        assert await _served_by(pool) == "t0:8001"

    asyncio.run(main())


def test_version_lookups_ask_the_first_server_in_rotation_and_mismatches_are_visible():
    async def main():
        pool, (a, b) = _pool()
        b.version = "2"
        assert {await pool.serving_version("encoder", "encoder_onnx") for _ in range(4)} == {"1"}
        assert await pool.serving_versions("encoder", "encoder_onnx") == {"t0:8001": "1", "t1:8001": "2"}
        a.live = False
        await pool.probe(timeout_s=0.5)
        assert await pool.ready_versions("encoder_onnx") == ["2"]  # the first one in rotation now
        a.mode = "down"
        pool.servers[0].reachable = True  # a call finds it unreachable: the look-up fails over
        assert await pool.config_parameter("ranker", "k") == "t1:8001"

    asyncio.run(main())


def test_other_errors_are_not_retried():
    async def main():
        pool, (a, b) = _pool()
        a.mode = "broken"
        with pytest.raises(TritonError):
            await pool.rank("c", ["x"], np.zeros((1, 3)), timeout_s=1)
        assert b.calls == 0

    asyncio.run(main())


def test_settings_take_a_list_or_the_one_url(monkeypatch):
    from gateway.config import GatewaySettings

    assert GatewaySettings().triton_servers == ["127.0.0.1:8001"]
    assert GatewaySettings(triton_url="h:1").triton_servers == ["h:1"]
    monkeypatch.setenv("RECSYS_TRITON_URLS", "a:8001, b:8001")
    assert GatewaySettings().triton_servers == ["a:8001", "b:8001"]
    monkeypatch.setenv("RECSYS_TRITON_URLS", '["c:8001"]')
    assert GatewaySettings().triton_servers == ["c:8001"]
    monkeypatch.setenv("RECSYS_TRITON_URLS", "a:8001,a:8001")
    with pytest.raises(ValueError, match="twice"):
        GatewaySettings()


def test_a_server_out_of_rotation_that_answers_a_last_resort_call_is_back():
    async def main():
        pool, servers = _pool()
        for s in servers:
            s.live = False
        await pool.probe(timeout_s=0.5)  # e.g. probes too slow under load: both out
        assert not any(s.in_rotation for s in pool.servers)
        assert await _served_by(pool) == "t0:8001"  # the one out longest answers
        assert pool.servers[0].in_rotation and not pool.servers[1].in_rotation

    asyncio.run(main())
