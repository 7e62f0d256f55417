"""Many gateways, many Tritons: two real tritonservers serving one model repository, the gateway
as `recsys serve --workers 2` (two processes on one port) configured with both, closed-loop
Recommend traffic; one tritonserver SIGKILLed mid-traffic, then started again.

What must hold: answers keep coming and stay ranked (at most a few degraded, in the failover
moment), no call fails; after the kill every Triton call is answered by the survivor; once the
killed server is back, calls spread over both again; SIGTERM to `recsys serve` ends every worker.
Which server answered is read from the workers' own metrics (recsys_triton_server_calls_total).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from localtriton.launcher import TritonServer, free_port
from rpc.clients import GatewayClient

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
WORKERS = 2
CLIENTS = 3
WORDS = ("waterproof", "rain", "jacket", "light", "warm", "running", "shoes", "leather", "boots", "summer")
MAX_DEGRADED_AT_FAILOVER = 3
START_S = 240  # two tritonservers on 2 shared cores, started at once


def _two_free_ports() -> int:
    """A port p with p + 1 free too (worker i serves its metrics on metrics_port + i)."""
    while True:
        p = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", p + 1))
                return p
            except OSError:
                continue


def _metrics(port: int) -> dict[tuple[str, ...], float]:
    """{(sample name, label values...): value} of one worker's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, *(f"{k}={v}" for k, v in sorted(s.labels.items())))] = s.value
    return out


class Workers:
    """The gateway's workers' metrics, summed over the workers."""

    def __init__(self, metrics_port: int):
        self.ports = [metrics_port + i for i in range(WORKERS)]

    def ok_calls(self, url: str) -> float:
        key = ("recsys_triton_server_calls_total", "outcome=ok", f"server={url}")
        return sum(_metrics(p).get(key, 0.0) for p in self.ports)

    def all_calls(self, url: str) -> float:
        """Calls sent to `url`, whatever came of them."""
        return sum(v for p in self.ports for k, v in _metrics(p).items()
                   if k[0] == "recsys_triton_server_calls_total" and f"server={url}" in k)

    def failovers(self, url: str) -> float:
        return sum(_metrics(p).get(("recsys_triton_failovers_total", f"server={url}"), 0.0) for p in self.ports)

    def up(self, url: str) -> list[float]:
        return [_metrics(p).get(("recsys_triton_server_up", f"server={url}"), -1.0) for p in self.ports]

    def ready(self) -> bool:
        try:
            return all(_metrics(p).get(("recsys_downstream_up", "downstream=triton")) == 1.0 for p in self.ports)
        except OSError:
            return False


class Traffic:
    """CLIENTS closed-loop clients, each on its own channel (SO_REUSEPORT spreads connections),
    each call a query not sent before (the query cache would skip the encoder)."""

    def __init__(self, address: str):
        self.address = address
        self.answers: list[tuple[float, bool, tuple[str, ...]]] = []  # (time, degraded, reasons)
        self.errors: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._n = iter(range(10**9))
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(CLIENTS)]

    def _query(self) -> str:
        n = next(self._n)
        return f"{WORDS[n % 10]} {WORDS[(n // 10) % 10]} {WORDS[(n // 100) % 10]} {n}"

    def _run(self) -> None:
        with GatewayClient(self.address, timeout_s=10) as client:
            while not self._stop.is_set():
                try:
                    r = client.recommend(self._query(), num_results=5)
                    self.answers.append((time.monotonic(), r.degraded, tuple(r.degraded_reasons)))
                except grpc.RpcError as e:
                    self.errors.append((time.monotonic(), f"{e.code().name}: {e.details()}"))

    def since(self, t: float) -> list[tuple[float, bool, tuple[str, ...]]]:
        return [a for a in self.answers if a[0] >= t]

    def __enter__(self) -> "Traffic":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)


def _wait(what: str, cond, timeout_s: float, poll_s: float = 0.2) -> float:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout_s, f"{what}: not within {timeout_s:.0f} s"
        time.sleep(poll_s)
    return time.monotonic() - t0


@pytest.fixture(scope="module")
def tritons(models, tmp_path_factory):
    """Two tritonservers over the same model repository, started together."""
    base = tmp_path_factory.mktemp("many_tritons")
    servers = [TritonServer(model_repository=models, workdir=base / f"t{i}") for i in range(2)]
    try:
        for s in servers:
            s.launch()
        for s in servers:
            s.wait_ready(START_S)
        yield servers
    finally:
        for s in servers:
            s.stop()


def test_one_of_two_tritons_killed_mid_traffic(feature_repo, tritons, tmp_path_factory):
    victim, survivor = tritons
    port, metrics_port = free_port(), _two_free_ports()
    env = {**os.environ, "RECSYS_PORT": str(port), "RECSYS_METRICS_PORT": str(metrics_port),
           "RECSYS_FEATURE_REPO": str(feature_repo.path),
           "RECSYS_TRITON_URLS": f"{victim.grpc_url},{survivor.grpc_url}",
           "RECSYS_EMBEDDING_CACHE_DIR": str(tmp_path_factory.getbasetemp() / "embeddings"),
           # Generous stage caps: 2 shared cores, two tritonservers and two gateways on them. The
           # failover is under test, not the latency.
           "RECSYS_REQUEST_TIMEOUT_MS": "8000", "RECSYS_EMBED_TIMEOUT_MS": "3000", "RECSYS_RANK_TIMEOUT_MS": "5000",
           "RECSYS_INTEREST_TIMEOUT_MS": "2000", "RECSYS_FEATURE_TIMEOUT_MS": "2000",
           "RECSYS_MAX_IN_FLIGHT": "4", "RECSYS_RANKER_MODE": "always", "RECSYS_LOG_LEVEL": "WARNING"}
    # Output to a file the test re-reads, not a reader thread on a pipe (one such thread sat in read()
    # with every line written and none handed back: tests/unit/test_gateway_workers.py).
    output = tmp_path_factory.mktemp("gateway_output") / "gateway.out"
    with output.open("w") as sink:
        gateway = subprocess.Popen([sys.executable, "-m", "cli.app", "serve", "--workers", str(WORKERS)], cwd=ROOT,
                                   env=env, stdout=sink, stderr=subprocess.STDOUT, text=True)

    def lines() -> list[str]:
        return output.read_text().splitlines(keepends=True)

    workers = Workers(metrics_port)
    try:
        _wait("both gateway workers serving", lambda: gateway.poll() is None and workers.ready(), 300, 0.5)
        assert sum("max_in_flight 2" in line for line in lines()) == WORKERS, lines()  # 4 shared by 2 workers
        with Traffic(f"127.0.0.1:{port}") as traffic:
            # Before: both servers answer.
            before = {s.grpc_url: workers.ok_calls(s.grpc_url) for s in tritons}
            _wait("ranked answers from both servers",
                  lambda: all(workers.ok_calls(s.grpc_url) > before[s.grpc_url] + 5 for s in tritons), 60)

            os.kill(victim.process.pid, signal.SIGKILL)  # the server, as a crash or an OOM kill would
            killed = time.monotonic()
            victim.process.wait(10)
            cleaned = victim.cleanup()  # its orphaned stubs (what the supervisor does)
            _wait("victim out of rotation in every worker", lambda: workers.up(victim.grpc_url) == [0.0] * WORKERS, 10)
            out = time.monotonic()
            print(f"\nSIGKILL -> out of rotation in every worker: {out - killed:.2f} s")
            time.sleep(1.0)  # calls that started before it left rotation finish (failed over)
            victim_calls, survivor_ok = workers.all_calls(victim.grpc_url), workers.ok_calls(survivor.grpc_url)
            n_then = len(traffic.answers)
            time.sleep(6.0)
            after_kill = traffic.since(killed)
            assert len(traffic.answers) - n_then >= 5, "answers stopped after the kill"
            # Out of rotation: not even tried any more (a refused connection would count as a call).
            assert workers.all_calls(victim.grpc_url) == victim_calls, "calls still sent to the dead server"
            assert workers.ok_calls(survivor.grpc_url) > survivor_ok + 5, "the survivor does not answer"
            degraded = [a for a in after_kill if a[1]]
            assert len(degraded) <= MAX_DEGRADED_AT_FAILOVER, degraded
            assert not traffic.errors, traffic.errors[:5]

            # Back: started again on its ports (the workers' clients reconnect), calls spread again.
            victim.start(timeout_s=START_S)
            ready = time.monotonic()
            took = _wait("victim back in rotation in every worker", lambda: workers.up(victim.grpc_url) == [1.0] * WORKERS, 15)
            back = {s.grpc_url: workers.ok_calls(s.grpc_url) for s in tritons}
            _wait("calls spread over both servers again",
                  lambda: all(workers.ok_calls(s.grpc_url) > back[s.grpc_url] + 5 for s in tritons), 60)
            print(f"killed server ready -> in rotation: {took:.2f} s (stubs cleaned: {cleaned}); calls failed over "
                  f"from it: {workers.failovers(victim.grpc_url):.0f}; answers "
                  f"{len(traffic.answers)}, degraded after the kill {len(degraded)}: {[r for _, _, r in degraded]}")
            recovered = traffic.since(ready)
            assert recovered and sum(a[1] for a in recovered) <= MAX_DEGRADED_AT_FAILOVER
            assert not traffic.errors, traffic.errors[:5]

        # SIGTERM to `recsys serve`: every worker drains and exits, the parent exits 0.
        children = psutil.Process(gateway.pid).children()
        assert len(children) == WORKERS
        gateway.send_signal(signal.SIGTERM)
        assert gateway.wait(40) == 0, "".join(lines()[-30:])
        assert not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children)
    finally:
        if gateway.poll() is None:
            for c in psutil.Process(gateway.pid).children():
                c.kill()
            gateway.kill()
            gateway.wait()
    print("gateway output (tail):\n" + "".join(lines()[-12:]))
