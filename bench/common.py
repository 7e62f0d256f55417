"""What every benchmark here shares: the machine's name, percentiles, and writing its results."""

from __future__ import annotations

import json
import os
import platform
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path


def machine() -> str:
    model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                  if ln.startswith("model name")), platform.processor())
    return f"{model}, {os.cpu_count()} cores, Python {platform.python_version()}"


def percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


def ingest_closed_loop(workers: Sequence[tuple[Callable[..., None], tuple]], total: list[int],
                       latencies: list[float]) -> dict:
    """Run each (target, args) as a thread until it returns; `total[0]` (events) and `latencies`
    (ms per call) are what the targets filled in. Events/s over the wall time, call p50/p99."""
    threads = [threading.Thread(target=target, args=args) for target, args in workers]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"events_per_s": round(total[0] / wall), "call_p50_ms": round(percentile(latencies, 50), 2),
            "call_p99_ms": round(percentile(latencies, 99), 2), "events": total[0]}


def write_results(path: Path, benchmark: str, rows: list[dict]) -> dict:
    """Save rows with the machine and date (bench/results/*.json), print the heading; return it all."""
    result = {"benchmark": benchmark, "machine": machine(),
              "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "rows": rows}
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{benchmark} — {result['machine']}, {result['date']}\n")
    return result


def start_service(module: str, port: int, env: dict[str, str], log_path: Path, cwd: Path, what: str,
                  timeout_s: float = 900.0, args: tuple[str, ...] = ()):
    """`python -m module *args` as its own process; returns it once its grpc health says SERVING."""
    import subprocess
    import sys
    import time

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    process = subprocess.Popen([sys.executable, "-m", module, *args], cwd=cwd, env=env, stdout=log_path.open("w"),
                               stderr=subprocess.STDOUT)
    stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited: {log_path.read_text()[-2000:]}")
        try:
            if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                return process
        except grpc.RpcError:
            pass
        time.sleep(0.5)
    process.kill()
    raise TimeoutError(f"{what} not SERVING after {timeout_s:.0f} s")


def auth_on() -> dict[str, str]:
    """Turn auth on for the services a benchmark starts (they inherit os.environ) and its clients:
    fresh keys in RECSYS_AUTH_KEYS, the benchmark's own (recommend, events) in RECSYS_API_KEY (what
    rpc.clients.channel / aio_channel send), the gateway's (internal) in RECSYS_FEEDBACK_API_KEY.
    Benchmarks measure the service as deployed: the key check (~1 us a call) included."""
    from rpc.auth import EVENTS, INTERNAL, KEYS_ENV, RECOMMEND, key_line, new_key
    from rpc.clients import API_KEY_ENV

    client, gateway = new_key(), new_key()
    env = {KEYS_ENV: ";".join((key_line("bench", (RECOMMEND, EVENTS), client), key_line("bench-gateway", (INTERNAL,), gateway))),
           API_KEY_ENV: client, "RECSYS_FEEDBACK_API_KEY": gateway}
    os.environ.update(env)
    return env
