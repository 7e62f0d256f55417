"""Feedback ingest throughput: durable (fsync'd) events per second over gRPC, by batch size.

    python -m bench.feedback_bench [--seconds 10]

Starts the feedback service as its own process (`python -m feedback`, a fresh event log
in a temp folder) and sends click events from 4 client threads in a closed loop: `Log` with 1
event per call (the naive way: one RPC and one fsync per event), 100 and 1,000 per call, and the
client-streaming `Stream`. Every acknowledged event was fsync'd before its reply.

Then event -> visible: with live session features on (the tiny shop in a private feature repo,
SQLite and Redis), one click is logged and the online store is polled through the gateway's fast
reader until the user's session shows it; 200 clicks per store.

Writes bench/results/feedback.json and prints the markdown tables kept in docs/benchmarks.md.
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
from pathlib import Path

import grpc

from rpc.clients import channel as key_channel
from bench.common import auth_on, ingest_closed_loop, percentile, write_results
from recsys.v1 import feedback_pb2 as fb
from recsys.v1 import feedback_pb2_grpc
from scripts.local_redis import free_port

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "feedback.json"
THREADS = 4


def event(n: int) -> fb.Event:
    return fb.Event(event_id=f"e{n}", type=fb.EVENT_TYPE_CLICK, user_id=f"u{n % 1000}", session_id=f"s{n % 3000}",
                    item_id=f"i{n % 5000}", request_id=f"r{n // 10}", position=1 + n % 10)


def run(stub, batch: int, seconds: float, ids: itertools.count, stream: bool) -> dict:
    latencies: list[float] = []
    total = [0]
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def worker() -> None:
        while time.monotonic() < stop_at:
            with lock:
                events = [event(next(ids)) for _ in range(batch)]
            t0 = time.perf_counter()
            reply = stub.Stream(iter(events), timeout=60) if stream else stub.Log(fb.LogRequest(events=events), timeout=60)
            latencies.append((time.perf_counter() - t0) * 1e3)
            assert reply.accepted == batch, reply
            with lock:
                total[0] += batch

    return ingest_closed_loop([(worker, ())] * THREADS, total, latencies)


def visible(reader, user: str, item: str) -> bool:
    """Whether the user's session shows the click first. A read past the reader's 50 ms timeout (the
    gateway's; a loaded box) is not-yet-visible, as the gateway would serve it: poll again."""
    import redis

    try:
        return item in (reader.read(user, []).user.values.get("recent_clicked_item_ids") or ())[:1]
    except redis.RedisError:
        return False


FEATURE_YAMLS = {"sqlite": "feature_store.yaml", "redis": "feature_store.redis.yaml",
                 "redis_cluster": "feature_store.redis_cluster.yaml"}


def visibility(store: str, n: int = 200, event_store: str = "sqlite", replicas: int = 1) -> dict:
    """Log one click, poll the online store until the session shows it; n times.

    event_store "redis_streams" (Redis or Redis Cluster online store): the events go to Redis Streams
    on the same Redis and the session is pushed by a service's stream consumer
    (feedback/stream_consumers.py), not before the reply: the path N feedback replicas take
    (docs/production.md). With `replicas` > 1 the clicks go to the replicas in turn, and whichever
    holds the user's shard pushes the session; on the stream the learner's state is in the same Redis."""
    from contextlib import ExitStack

    from bench.gateway_bench import build_feature_repo
    from gateway.features.layout import FeatureLayout
    from gateway.features.online_reader import open_reader
    from scorer.data.feast_ops import load_store

    with tempfile.TemporaryDirectory(prefix="feedback_vis_") as tmp, ExitStack() as stack:
        repo, env = build_feature_repo(Path(tmp), "tiny", store, stack)
        os.environ.update(env)
        yaml = FEATURE_YAMLS[store]
        fs = load_store(repo, None if store == "sqlite" else yaml)
        reader = open_reader(fs.config, FeatureLayout.from_feature_store(fs), repo)
        if event_store == "redis_streams":
            if store == "redis_cluster":
                url, cluster = env["REDIS_CLUSTER_CONNECTION_STRING"], "true"
            else:
                url, cluster = f"redis://{env['REDIS_CONNECTION_STRING'].split(',')[0]}/0", "false"
            env = {**env, "RECSYS_FEEDBACK_EVENT_STORE": "redis_streams", "RECSYS_FEEDBACK_EVENT_STREAM_URL": url,
                   "RECSYS_FEEDBACK_EVENT_STREAM_CLUSTER": cluster}
            # One learner for all replicas, in the same Redis (docs/production.md#shared-learner-state).
            env |= {"RECSYS_FEEDBACK_LEARNER_REDIS_URL": url, "RECSYS_FEEDBACK_LEARNER_REDIS_CLUSTER": cluster}
        procs, stubs = [], []
        try:
            for r in range(replicas):
                port = free_port()
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "feedback"], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                    env={**os.environ, **env, "RECSYS_FEEDBACK_PORT": str(port), "RECSYS_EVENT_LOG_DIR": f"{tmp}/events{r}",
                         "RECSYS_LOG_LEVEL": "WARNING", "RECSYS_FEEDBACK_FEATURE_REPO": str(repo),
                         "RECSYS_FEEDBACK_FEATURE_STORE_YAML": yaml}))
                stubs.append(feedback_pb2_grpc.FeedbackServiceStub(key_channel(f"127.0.0.1:{port}")))
            for proc in procs:
                assert "feedback service on" in proc.stdout.readline()
            time.sleep(3.0 if replicas > 1 else 0.0)  # the replicas settle their shard leases first
            lat, acks = [], []
            for k in range(n):
                user, item = f"vis-{k % 20}", f"i{(k % 300) + 1:05d}"
                t0 = time.perf_counter()
                stubs[k % replicas].Log(fb.LogRequest(events=[fb.Event(
                    event_id=f"v{k}", type=fb.EVENT_TYPE_CLICK, user_id=user, session_id="s", item_id=item)]), timeout=10)
                acks.append((time.perf_counter() - t0) * 1e3)
                while not visible(reader, user, item):
                    if time.perf_counter() - t0 > 30:
                        raise RuntimeError(f"click {k} ({user}, {item}) not visible after 30 s")
                    time.sleep(0.0005)
                lat.append((time.perf_counter() - t0) * 1e3)
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait(10)
            reader.close()
        label = store if event_store == "sqlite" else f"{store}, events on Redis Streams, {replicas} replica(s)"
        return {"store": label, "clicks": n, "ack_p50_ms": round(percentile(acks, 50), 1),
                "visible_p50_ms": round(percentile(lat, 50), 1), "visible_p99_ms": round(percentile(lat, 99), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--visibility-only", action="store_true", help="only event -> visible (prints, writes nothing)")
    args = ap.parse_args()
    if args.visibility_only:
        auth_on()
        runs = [("sqlite", "sqlite", 1), ("redis", "sqlite", 1), ("redis", "redis_streams", 1),
                ("redis_cluster", "redis_streams", 1), ("redis_cluster", "redis_streams", 2)]
        for store, events, replicas in runs:
            print(visibility(store, event_store=events, replicas=replicas), flush=True)
        return
    auth_on()  # the services run with auth on, as deployed; the clients send the benchmark's key
    with tempfile.TemporaryDirectory(prefix="feedback_bench_") as tmp:
        port = free_port()
        env = {**os.environ, "RECSYS_FEEDBACK_PORT": str(port), "RECSYS_EVENT_LOG_DIR": tmp, "RECSYS_LOG_LEVEL": "WARNING"}
        proc = subprocess.Popen([sys.executable, "-m", "feedback"], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, text=True)
        try:
            assert "feedback service on" in proc.stdout.readline()
            stub = feedback_pb2_grpc.FeedbackServiceStub(key_channel(f"127.0.0.1:{port}"))
            ids = itertools.count()
            rows = []
            for label, batch, stream in (("Log, 1 event per call (naive)", 1, False), ("Log, 100 per call", 100, False),
                                         ("Log, 1,000 per call", 1000, False), ("Stream, 1,000 per stream", 1000, True)):
                row = {"mode": label, "batch": batch, **run(stub, batch, args.seconds, ids, stream)}
                rows.append(row)
                print(row, flush=True)
        finally:
            proc.terminate()
            proc.wait(10)
    base = rows[0]["events_per_s"]
    for row in rows:
        row["vs_naive"] = round(row["events_per_s"] / base, 1)
    vis = [visibility(store) for store in ("sqlite", "redis")] + [visibility("redis", event_store="redis_streams")]
    write_results(RESULTS, f"feedback ingest, durable (fsync per call), {THREADS} client threads; event -> visible",
                  rows + vis)
    print("| mode | events/s | call p50 / p99 ms | vs naive |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['mode']} | {r['events_per_s']:,} | {r['call_p50_ms']} / {r['call_p99_ms']} | {r['vs_naive']}x |")
    print("\n| online store | Log reply p50 ms | event -> visible p50 / p99 ms |")
    print("|---|---:|---:|")
    for v in vis:
        print(f"| {v['store']} | {v['ack_p50_ms']} | {v['visible_p50_ms']} / {v['visible_p99_ms']} |")


if __name__ == "__main__":
    main()
