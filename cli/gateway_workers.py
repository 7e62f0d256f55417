"""`recsys serve --workers N`: N gateway processes on one port (SO_REUSEPORT), one parent.

One asyncio process uses one core; N processes bound to the same port with SO_REUSEPORT let the
kernel spread the clients' connections over them (per connection, not per call: one client
channel stays on one worker). Each worker gets its share of the admission limits (max_in_flight,
max_queued), so N workers admit what one would, and its own metrics port (metrics_port + i) when
metrics are on. The parent forwards SIGTERM/SIGINT to every worker and waits for them (each drains
its calls); when a worker dies on its own the parent stops the others and exits non-zero, so a
service manager restarts the whole set (a half-sized gateway would silently hold less load).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from gateway.config import GatewaySettings

STOP_TIMEOUT_S = 30.0  # a worker drains in ~2 s (gateway.server grace); then it is killed
POLL_S = 0.2


def share(total: int, workers: int, index: int, at_least: int = 1) -> int:
    """Worker `index`'s part of `total` (the remainder to the first ones), never below `at_least`."""
    return max(at_least, total // workers + (1 if index < total % workers else 0))


def worker_env(settings: GatewaySettings, workers: int, index: int) -> dict[str, str]:
    """The settings worker `index` of `workers` gets on top of the parent's (environment wins over
    the TOML file, so these override both)."""
    if settings.port == 0:
        raise ValueError("--workers needs a fixed port (port 0 would give every worker its own)")
    return {
        "RECSYS_REUSE_PORT": "true",
        "RECSYS_MAX_IN_FLIGHT": str(share(settings.max_in_flight, workers, index)),
        "RECSYS_MAX_QUEUED": str(share(settings.max_queued, workers, index, at_least=0)),
        "RECSYS_METRICS_PORT": str(settings.metrics_port + index if settings.metrics_port else 0),
    }


def run_workers(settings: GatewaySettings, config: Path | None, workers: int, say=print,
                command: list[str] | None = None) -> int:
    """Start `workers` gateway processes (`command`: `python -m gateway [config]`) and supervise
    them until a signal; the exit code."""
    command = command or [sys.executable, "-m", "gateway"] + ([str(config)] if config else [])
    procs: list[subprocess.Popen] = []
    stopping: list[int] = []

    def stop(signum: int, _frame) -> None:
        stopping.append(signum)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for i in range(workers):
            env = {**os.environ, **worker_env(settings, workers, i)}
            procs.append(subprocess.Popen(command, env=env))
            say(f"gateway worker {i + 1}/{workers}: pid {procs[-1].pid}, max_in_flight {env['RECSYS_MAX_IN_FLIGHT']}, "
                f"max_queued {env['RECSYS_MAX_QUEUED']}"
                + (f", metrics on :{env['RECSYS_METRICS_PORT']}" if settings.metrics_port else ""))
        code = 0
        while not stopping:
            dead = [(i, p.returncode) for i, p in enumerate(procs) if p.poll() is not None]
            if dead:
                i, rc = dead[0]
                say(f"gateway worker {i + 1} (pid {procs[i].pid}) exited with {rc}: stopping the others")
                code = rc or 1
                break
            time.sleep(POLL_S)
        if stopping:
            say(f"{signal.Signals(stopping[0]).name}: stopping {workers} gateway workers")
        _stop_all(procs)
        return code
    finally:
        _stop_all(procs)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _stop_all(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    until = time.monotonic() + STOP_TIMEOUT_S
    for p in procs:
        try:
            p.wait(max(0.0, until - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
