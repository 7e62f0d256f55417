"""`recsys serve --workers N`'s parent: shares of the admission limits, signals forwarded to every
worker, a dead worker stops the rest (fake workers: small Python processes; the real gateway
workers run in tests/integration/test_many_tritons.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from cli.gateway_workers import share, worker_env
from gateway.config import GatewaySettings


def test_shares_add_up_to_the_limit_and_never_fall_below_one():
    assert [share(5, 2, i) for i in range(2)] == [3, 2]
    assert sum(share(16, 3, i) for i in range(3)) == 16
    assert [share(1, 3, i) for i in range(3)] == [1, 1, 1]
    assert [share(0, 2, i, at_least=0) for i in range(2)] == [0, 0]


def test_worker_env_shares_the_limits_and_gives_each_its_metrics_port():
    s = GatewaySettings(port=50061, max_in_flight=4, max_queued=8, metrics_port=9100)
    envs = [worker_env(s, 2, i) for i in range(2)]
    assert [e["RECSYS_MAX_IN_FLIGHT"] for e in envs] == ["2", "2"]
    assert [e["RECSYS_MAX_QUEUED"] for e in envs] == ["4", "4"]
    assert [e["RECSYS_METRICS_PORT"] for e in envs] == ["9100", "9101"]
    assert all(e["RECSYS_REUSE_PORT"] == "true" for e in envs)
    assert worker_env(GatewaySettings(port=50061, metrics_port=0), 2, 1)["RECSYS_METRICS_PORT"] == "0"
    with pytest.raises(ValueError, match="fixed port"):
        worker_env(GatewaySettings(port=0), 2, 0)


# A parent running run_workers over fake workers that print their settings and wait for SIGTERM
# (worker 2 exits with 3 at once when FAKE_DIE is set).
PARENT = textwrap.dedent("""
    import os, sys
    from cli.gateway_workers import run_workers
    from gateway.config import GatewaySettings
    worker = ("import os, signal, sys, time\\n"
              "if os.environ.get('FAKE_DIE') and os.environ['RECSYS_MAX_IN_FLIGHT'] == '1': sys.exit(3)\\n"
              "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\\n"
              "print('worker', os.environ['RECSYS_MAX_IN_FLIGHT'], os.environ['RECSYS_REUSE_PORT'], flush=True)\\n"
              "time.sleep(60)\\n")
    code = run_workers(GatewaySettings(port=50061, max_in_flight=3), None, 2,
                       say=lambda m: print(m, flush=True), command=[sys.executable, "-c", worker])
    sys.exit(code)
""")


def _parent(env: dict[str, str] | None = None, out=subprocess.PIPE) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", PARENT], stdout=out, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, **(env or {})})


def test_sigterm_reaches_every_worker_and_all_exit(tmp_path):
    # The parent's and workers' output goes to a file the test re-reads: a reader thread on a pipe
    # once sat in read() with every line already written and none of the workers' handed back
    # (CI under load), so the wait below timed out on a healthy parent.
    log = tmp_path / "parent.out"
    with log.open("w") as sink:
        parent = _parent(out=sink)
    try:
        # Each fake worker prints once its SIGTERM handler is in place: wait for both lines, however
        # slow the box (a fixed sleep after "both children sleeping" lost the race under load).
        deadline = time.monotonic() + 60
        while sum(line.startswith("worker ") for line in log.read_text().splitlines()) < 2:
            assert parent.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        children = psutil.Process(parent.pid).children()
        parent.send_signal(signal.SIGTERM)
        parent.wait(timeout=30)
    finally:
        if parent.poll() is None:  # a failed wait: leave no fake worker behind either
            for child in psutil.Process(parent.pid).children():
                child.kill()
            parent.kill()
    out = log.read_text()
    assert parent.returncode == 0, out
    assert sorted(line for line in out.splitlines() if line.startswith("worker ")) == ["worker 1 true", "worker 2 true"]
    assert "SIGTERM: stopping 2 gateway workers" in out
    assert not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children)


def test_a_worker_that_dies_stops_the_others_and_the_parent_fails():
    parent = _parent({"FAKE_DIE": "1"})
    out, _ = parent.communicate(timeout=60)
    assert parent.returncode == 3, out
    assert "exited with 3: stopping the others" in out
