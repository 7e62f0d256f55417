"""Feedback ingest on the Redis Streams event log vs the embedded SQLite log, 1 and 2 replicas, same run.

    python -m bench.event_stream_bench [--seconds 8] [--batch 100] [--rounds 3]

Starts a local Redis Cluster (3 masters + 3 replicas, AOF appendfsync always: scripts/
local_redis_cluster.py) and feedback services as their own processes (`python -m feedback`, auth
on, online learning and live sessions off: this measures the durable write path only). Rows:
- SQLite log, 1 replica (fsync per call; the default for one machine);
- stream, 1 replica and 2 replicas (clients spread over both), with `WAIT 1` before every
  acknowledgement (a replica of each master confirmed) and without it (master's fsync only).
4 client threads per replica in a closed loop, `Log` with `--batch` click events per call, fresh
event ids; every reply must acknowledge its whole batch. The rows run interleaved, `--rounds` times
(a shared machine's load drifts between rows); each row reports its median round and the range.

Writes bench/results/event_stream.json and prints the markdown table kept in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from bench.common import auth_on, ingest_closed_loop, write_results
from recsys.v1 import feedback_pb2 as fb
from recsys.v1 import feedback_pb2_grpc
from rpc.clients import channel as key_channel
from scripts.local_redis import free_port

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "event_stream.json"
THREADS_PER_REPLICA = 4


def event(n: int, tag: str) -> fb.Event:
    return fb.Event(event_id=f"{tag}-{n}", type=fb.EVENT_TYPE_CLICK, user_id=f"u{n % 1000}", session_id=f"s{n % 3000}",
                    item_id=f"i{n % 5000}")


def start_feedback(env: dict[str, str], log_dir: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    full = {**os.environ, "RECSYS_FEEDBACK_PORT": str(port), "RECSYS_EVENT_LOG_DIR": str(log_dir),
            "RECSYS_LOG_LEVEL": "WARNING", "RECSYS_FEEDBACK_ONLINE_LEARNING": "false", **env}
    proc = subprocess.Popen([sys.executable, "-m", "feedback"], cwd=ROOT, env=full, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if "feedback service on" not in line:
        raise RuntimeError(f"feedback service did not start: {line}")
    threading.Thread(target=proc.stdout.read, daemon=True).start()
    return proc, port


def measure(ports: list[int], batch: int, seconds: float) -> dict:
    latencies: list[float] = []
    total = [0]
    lock = threading.Lock()
    ids = itertools.count()
    tag = uuid.uuid4().hex[:8]
    stop_at = time.monotonic() + seconds

    def worker(port: int) -> None:
        stub = feedback_pb2_grpc.FeedbackServiceStub(key_channel(f"127.0.0.1:{port}"))
        while time.monotonic() < stop_at:
            with lock:
                events = [event(next(ids), tag) for _ in range(batch)]
            t0 = time.perf_counter()
            reply = stub.Log(fb.LogRequest(events=events), timeout=60)
            ms = (time.perf_counter() - t0) * 1e3
            assert reply.accepted == batch, reply
            with lock:
                latencies.append(ms)
                total[0] += batch

    return ingest_closed_loop([(worker, (p,)) for p in ports for _ in range(THREADS_PER_REPLICA)], total, latencies)


def main() -> None:
    from scripts.local_redis_cluster import local_redis_cluster

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    auth_on()
    rows = []
    with tempfile.TemporaryDirectory(prefix="event_stream_bench_") as tmp, local_redis_cluster() as cluster:
        deadline = time.monotonic() + 60  # replicas finish their first (diskless, delayed) sync
        while any("state=online" not in cluster.cli(p, "info", "replication") for p in cluster.masters()):
            assert time.monotonic() < deadline, "replicas not online"
            time.sleep(0.2)
        configs = [("SQLite log (fsync per call)", 1, {}),
                   ("stream, WAIT 1 replica", 1, {"RECSYS_FEEDBACK_EVENT_STREAM_WAIT_REPLICAS": "1"}),
                   ("stream, WAIT 1 replica", 2, {"RECSYS_FEEDBACK_EVENT_STREAM_WAIT_REPLICAS": "1"}),
                   ("stream, no WAIT (master fsync only)", 1, {}),
                   ("stream, no WAIT (master fsync only)", 2, {})]
        runs: dict[int, list[dict]] = {n: [] for n in range(len(configs))}
        for round_no in range(args.rounds):
            for n, (label, replicas, extra) in enumerate(configs):
                env = dict(extra)
                if label.startswith("stream"):
                    env.update({"RECSYS_FEEDBACK_EVENT_STORE": "redis_streams",
                                "RECSYS_FEEDBACK_EVENT_STREAM_URL": cluster.connection_string,
                                "RECSYS_FEEDBACK_EVENT_STREAM_CLUSTER": "true",
                                "RECSYS_FEEDBACK_EVENT_STREAM_PREFIX": f"bench{n}"})
                procs = [start_feedback(env, Path(tmp) / f"{round_no}-{n}-{i}") for i in range(replicas)]
                try:
                    run = measure([p for _, p in procs], args.batch, args.seconds)
                finally:
                    for proc, _ in procs:
                        proc.terminate()
                        proc.wait(10)
                runs[n].append(run)
                print(round_no, label, replicas, run, flush=True)
        for n, (label, replicas, _) in enumerate(configs):
            ordered = sorted(runs[n], key=lambda r: r["events_per_s"])
            median = ordered[len(ordered) // 2]
            rows.append({"store": label, "replicas": replicas, "batch": args.batch, **median,
                         "events_per_s_range": [ordered[0]["events_per_s"], ordered[-1]["events_per_s"]],
                         "rounds": runs[n]})
    write_results(RESULTS, f"feedback ingest, Log with {args.batch} events per call, {THREADS_PER_REPLICA} client "
                           f"threads per replica; Redis Cluster 3+3 on loopback, AOF appendfsync always; "
                           f"{args.rounds} interleaved rounds, median", rows)
    print("| event store | replicas | events/s (median round) | range over rounds | call p50 / p99 ms |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        low, high = r["events_per_s_range"]
        print(f"| {r['store']} | {r['replicas']} | {r['events_per_s']:,} | {low:,}-{high:,} | "
              f"{r['call_p50_ms']} / {r['call_p99_ms']} |")


if __name__ == "__main__":
    main()
