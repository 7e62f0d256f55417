"""Recommend under load: goodput, degraded and shed shares, latency, and memory over a soak.

    python -m bench.load_bench [--size demo] [--seconds 20] [--levels 1 4 8 16 32] [--soak-minutes 10]

Set-up (as bench/gateway_bench.py): the synthetic shop imported into a private feature repo (real
`feast apply/materialize`, SQLite), the int8 encoder, the int8 ranker (1 layer x 32 tokens) and the
interest model served by a real tritonserver on CPU, the feedback service (online learning on,
live session features on) and the gateway as their own processes, depth 20, the gateway's default
250 ms request budget. Requests: real (user, query) pairs from the shop's log, each sent once in a run (levels
walk through the pool in turn), so the query cache helps only where the log itself repeats.

Each level runs N closed-loop clients for `--seconds`; every call carries a 250 ms gRPC deadline.
An answer counts as **ranked** when it is not degraded; **goodput** is ranked answers per second.
A shed call (RESOURCE_EXHAUSTED) waits the server's `grpc-retry-pushback-ms` hint before that
client's next call, as a client with a retry policy does. p50/p99 are over answered calls.

Configurations, in the same run, each on a fresh gateway:
- `protected`: the defaults (admission control, windowed breakers, stage budgets, query cache);
- `no admission`: every request let in (max_in_flight 10,000): the naive way, version one's shape;
- `in-flight 4`: twice the default admission limit (1 per core = 2 here);
- `no query cache`: embedding_cache_size 0 (every request calls the encoder);
- `2 workers`: two gateway processes on one port (SO_REUSEPORT), each with half the in-flight limit;
- `2 Tritons`: a second tritonserver (same repository, supervised) and the gateway given both
  (`triton_urls`: least outstanding calls, failover); `2 workers + 2 Tritons`: both at once;
- `1 ranker instance x 2 threads`: Triton's ranker as version one ran it, instead of the
  repository's 2 instances x 1 thread;
- `2 encoder instances x 1 thread`: the encoder as two single-thread instances instead of the
  repository's one instance of two threads.
Then a soak: `protected` at 8 clients for `--soak-minutes`, each answer's impressions (and a click
on one in ten) sent to the feedback service; RSS of every process sampled every 10 s, slope by
least squares after the first minute.

Writes bench/results/load.json and bench/results/load.png and prints the tables kept in
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import random
import subprocess
import tempfile
import time
import uuid
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

import grpc
import numpy as np

from rpc.clients import aio_channel
from bench.common import auth_on, percentile, start_service, write_results
from bench.gateway_bench import GatewayProcess, build_feature_repo, build_models, log, sample_requests

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "load.json"
PLOT = ROOT / "bench" / "results" / "load.png"
LEVELS = (1, 4, 8, 16, 32)
DEADLINE_S = 0.25
DEPTH = 20
RETRY_METADATA = "grpc-retry-pushback-ms"
# One cursor through the request pool for the whole run: every level (and the soak) sends requests
# no earlier level sent, so a later level does not find its requests already in the gateway's
# query cache (each level used to restart at request 0: the 1-client level ran on a cold cache and
# every later one on a cache warmed by the levels before it).
REQUEST_CURSOR = itertools.count()
# The repository's own instance groups (triton_models/*/config.pbtxt): instances, threads each.
DEFAULT_SHAPES = {"ranker_onnx": (2, 1), "encoder_onnx": (1, 2)}


# --- processes ------------------------------------------------------------------------------------------

class FeedbackProcess:
    def __init__(self, repo: Path, workdir: Path):
        from localtriton.launcher import free_port

        self.port = free_port()
        self.env = {**os.environ, "RECSYS_FEEDBACK_PORT": str(self.port), "RECSYS_EVENT_LOG_DIR": str(workdir / "events"),
                    "RECSYS_FEEDBACK_FEATURE_REPO": str(repo), "RECSYS_LOG_LEVEL": "WARNING"}
        self.log_path = workdir / "feedback.log"
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> "FeedbackProcess":
        self.process = start_service("feedback", self.port, self.env, self.log_path, ROOT, "feedback service", 300)
        return self

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        self.process.wait(30)


def wait_all_serving(metrics_ports: list[int], timeout_s: float = 600.0) -> None:
    """Until every gateway worker reports Triton up on its /metrics (set once it is SERVING): with
    SO_REUSEPORT a health check lands on one worker, and a worker still loading answers UNAVAILABLE."""
    import urllib.request

    deadline = time.monotonic() + timeout_s
    pending = set(metrics_ports)
    while pending:
        for port in list(pending):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                    if 'recsys_downstream_up{downstream="triton"} 1.0' in r.read().decode():
                        pending.discard(port)
            except OSError:
                pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"gateway workers not serving after {timeout_s:.0f} s (metrics ports {sorted(pending)})")
        time.sleep(0.5)


def set_instances(models: Path, shapes: dict[str, tuple[int, int]]) -> None:
    """Rewrite the private repository's instance groups, {model: (instances, threads each)}
    (a restart of Triton applies them)."""
    import re

    for model, (count, threads) in shapes.items():
        path = models / model / "config.pbtxt"
        text = path.read_text()
        text = re.sub(r"instance_group \[ \{ count: \d+ \} \]", f"instance_group [ {{ count: {count} }} ]", text)
        text = re.sub(r'(key: "intra_op_thread_count" value: \{ string_value: )"\d+"', rf'\1"{threads}"', text)
        path.write_text(text)


# --- load ---------------------------------------------------------------------------------------------

def _reason_key(reason: str) -> str:
    """'ranker skipped: request deadline too close (...)' -> 'ranker: deadline' (part and cause)."""
    part = reason.split(" unavailable", 1)[0].split(" skipped", 1)[0]
    if "breaker open" in reason:
        cause = "breaker open"
    elif "deadline too close" in reason:
        cause = "deadline"
    elif "no answer within" in reason:
        cause = "timeout"
    elif "skipped" in reason:
        cause = "no input"
    else:
        cause = "error"
    return f"{part}: {cause}"


async def closed_loop(address: str, requests: list[tuple[str, str]], clients: int, seconds: float,
                      feedback_address: str = "", on_sample=None) -> dict:
    """`clients` closed-loop callers for `seconds`; returns the level's row."""
    from recsys.v1 import feedback_pb2, feedback_pb2_grpc, recommend_pb2, recommend_pb2_grpc

    channel = aio_channel(address)
    stub = recommend_pb2_grpc.RecommendServiceStub(channel)
    fb_channel = aio_channel(feedback_address) if feedback_address else None
    fb = feedback_pb2_grpc.FeedbackServiceStub(fb_channel) if fb_channel else None
    latencies: list[float] = []
    outcomes: Counter = Counter()
    reasons: Counter = Counter()
    stop_at = time.monotonic() + seconds
    counter = REQUEST_CURSOR
    rng = random.Random(0)

    async def send_feedback(user: str, response) -> None:
        events = [feedback_pb2.Event(event_id=uuid.uuid4().hex, type=feedback_pb2.EVENT_TYPE_IMPRESSION, user_id=user,
                                     request_id=response.request_id, item_id=i.item_id, position=i.rank)
                  for i in response.items]
        if response.items and rng.random() < 0.1:
            clicked = rng.choice(response.items[:5])
            events.append(feedback_pb2.Event(event_id=uuid.uuid4().hex, type=feedback_pb2.EVENT_TYPE_CLICK, user_id=user,
                                             request_id=response.request_id, item_id=clicked.item_id,
                                             position=clicked.rank))
        try:
            await fb.Log(feedback_pb2.LogRequest(events=events), timeout=2.0)
        except grpc.aio.AioRpcError:
            outcomes["feedback error"] += 1

    async def client() -> None:
        while time.monotonic() < stop_at:
            user, query = requests[next(counter) % len(requests)]
            t0 = time.perf_counter()
            call = stub.Recommend(recommend_pb2.RecommendRequest(user_id=user, query=query, num_results=20),
                                  timeout=DEADLINE_S)
            try:
                response = await call
            except grpc.aio.AioRpcError as e:
                outcomes[e.code().name] += 1
                if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    hint = dict(e.trailing_metadata() or ()).get(RETRY_METADATA, "10")
                    await asyncio.sleep(min(int(hint), 1000) / 1e3)
                continue
            latencies.append((time.perf_counter() - t0) * 1e3)
            if response.degraded:
                outcomes["degraded"] += 1
                reasons.update({_reason_key(r) for r in response.degraded_reasons})
            else:
                outcomes["ranked"] += 1
            if fb is not None:
                await send_feedback(user, response)

    async def sampler() -> None:
        while time.monotonic() < stop_at:
            on_sample()
            await asyncio.sleep(10)

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)), *([sampler()] if on_sample else []))
    wall = time.perf_counter() - t0
    await channel.close()
    if fb_channel is not None:
        await fb_channel.close()
    calls = sum(v for k, v in outcomes.items() if k != "feedback error")
    answered = outcomes["ranked"] + outcomes["degraded"]
    return {
        "clients": clients, "seconds": round(wall, 1), "calls": calls,
        "goodput_rps": round(outcomes["ranked"] / wall, 1), "answered_rps": round(answered / wall, 1),
        "ranked_share": round(outcomes["ranked"] / max(calls, 1), 4),
        "degraded_share": round(outcomes["degraded"] / max(calls, 1), 4),
        "shed_share": round(outcomes["RESOURCE_EXHAUSTED"] / max(calls, 1), 4),
        "deadline_share": round(outcomes["DEADLINE_EXCEEDED"] / max(calls, 1), 4),
        "other_errors": {k: v for k, v in outcomes.items() if k not in ("ranked", "degraded", "RESOURCE_EXHAUSTED",
                                                                          "DEADLINE_EXCEEDED")},
        "degraded_by_reason": {k: round(v / max(calls, 1), 4) for k, v in reasons.most_common()},
        "p50_ms": round(percentile(latencies, 50), 1) if latencies else None,
        "p99_ms": round(percentile(latencies, 99), 1) if latencies else None,
    }


async def warm(address: str, requests: list[tuple[str, str]]) -> None:
    from recsys.v1 import recommend_pb2, recommend_pb2_grpc

    async with aio_channel(address) as channel:
        stub = recommend_pb2_grpc.RecommendServiceStub(channel)
        for user, query in requests:
            try:
                await stub.Recommend(recommend_pb2.RecommendRequest(user_id=user, query=query, num_results=20), timeout=5)
            except grpc.aio.AioRpcError:
                pass


# --- memory ------------------------------------------------------------------------------------------

def rss_mb(pids: dict[str, list[int]]) -> dict[str, float]:
    """RSS per named process group (a process and its children, e.g. tritonserver + its stubs)."""
    import psutil

    out = {}
    for name, roots in pids.items():
        total = 0
        for pid in roots:
            try:
                p = psutil.Process(pid)
                total += p.memory_info().rss + sum(c.memory_info().rss for c in p.children(recursive=True))
            except psutil.NoSuchProcess:
                pass
        out[name] = total / 2**20
    return out


def slope_mb_per_min(samples: list[tuple[float, dict[str, float]]], name: str, skip_s: float = 60.0) -> float:
    t0 = samples[0][0]
    pts = [(t - t0, s[name]) for t, s in samples if t - t0 >= skip_s]
    if len(pts) < 3:
        return float("nan")
    x, y = np.array([p[0] for p in pts]) / 60, np.array([p[1] for p in pts])
    return float(np.polyfit(x, y, 1)[0])


# --- main ---------------------------------------------------------------------------------------------

CONFIGS = {
    "protected": {},
    "no admission": {"RECSYS_MAX_IN_FLIGHT": "10000", "RECSYS_MAX_QUEUED": "0"},
    "in-flight 4": {"RECSYS_MAX_IN_FLIGHT": "4", "RECSYS_MAX_QUEUED": "8"},
    "no query cache": {"RECSYS_EMBEDDING_CACHE_SIZE": "0"},
    "2 workers": {"workers": 2},
    "2 Tritons": {"tritons": 2},
    "2 workers + 2 Tritons": {"workers": 2, "tritons": 2},
    "1 ranker instance x 2 threads": {"instances": {"ranker_onnx": (1, 2)}},
    "2 encoder instances x 1 thread": {"instances": {"encoder_onnx": (2, 1)}},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="demo")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--levels", type=int, nargs="+", default=list(LEVELS))
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS))
    ap.add_argument("--soak-minutes", type=float, default=10.0, help="0: no soak")
    ap.add_argument("--results", type=Path, default=RESULTS, help="where the JSON goes (the plot beside it)")
    ap.add_argument("--requests", type=int, default=40000,
                    help="(user, query) pairs drawn from the shop's log; levels walk through them without repeating")
    args = ap.parse_args()
    auth_on()  # the services run with auth on, as deployed; the clients send the benchmark's key

    from localtriton.launcher import TritonServer, free_port
    from localtriton.supervisor import TritonSupervisor

    rows: list[dict] = []
    soak: dict = {}
    with tempfile.TemporaryDirectory(prefix="load_bench_") as tmp, ExitStack() as stack:
        workdir = Path(tmp)
        repo, env = build_feature_repo(workdir, args.size, "sqlite", stack)
        models = build_models(workdir)
        requests = sample_requests(repo, args.requests)
        feedback = stack.enter_context(FeedbackProcess(repo, workdir))
        base_env = {"RECSYS_REQUEST_TIMEOUT_MS": str(int(DEADLINE_S * 1e3)), "RECSYS_EMBED_TIMEOUT_MS": "100",
                    "RECSYS_FEEDBACK_URL": f"127.0.0.1:{feedback.port}"}
        triton: TritonServer | None = None
        supervisor = None
        triton_shape: object = "none started"
        for name in args.configs:
            config = dict(CONFIGS[name])
            shape = {**DEFAULT_SHAPES, **config.pop("instances", {})}
            workers = config.pop("workers", 1)
            tritons = config.pop("tritons", 1)
            if shape != triton_shape:
                if supervisor is not None:
                    supervisor.stop()
                set_instances(models, shape)
                log(f"starting tritonserver, supervised (instances x threads: {shape})")
                triton = TritonServer(model_repository=models, workdir=workdir / "triton")
                # Supervised as in production: tritonserver 2.51 can crash under load (FINDINGS.md);
                # a restart is counted in the row and shows up as degraded answers, not as a hang.
                supervisor = TritonSupervisor(triton).start()
                triton_shape = shape
            port = free_port()
            log(f"[{name}] starting {workers} gateway process(es) (the first start embeds the catalog)")
            with ExitStack() as gws:
                urls = [triton.grpc_url]
                for t in range(1, tritons):  # replicas for this configuration only
                    log(f"[{name}] starting tritonserver {t + 1}, supervised")
                    replica = TritonServer(model_repository=models, workdir=workdir / f"triton{t + 1}")
                    gws.callback(TritonSupervisor(replica).start().stop)
                    urls.append(replica.grpc_url)
                procs = []
                for w in range(workers):
                    gw = GatewayProcess(repo, triton.grpc_url, DEPTH, env, workdir, "feature_store.yaml", port=port,
                                        name=f"{name.replace(' ', '_')}-{w}")
                    gw.env.update(base_env)
                    gw.env.update(config)
                    if tritons > 1:
                        gw.env["RECSYS_TRITON_URLS"] = ",".join(urls)
                    if workers > 1:
                        gw.env["RECSYS_REUSE_PORT"] = "true"
                        gw.env["RECSYS_MAX_IN_FLIGHT"] = str(max(1, (os.cpu_count() or 1) // workers))
                        gw.env["RECSYS_METRICS_PORT"] = str(free_port())
                    procs.append(gws.enter_context(gw))
                if workers > 1:  # a health check reaches one worker: wait until every one serves
                    wait_all_serving([int(g.env["RECSYS_METRICS_PORT"]) for g in procs])
                address = f"127.0.0.1:{port}"
                asyncio.run(warm(address, requests[-30:]))  # the pool's end: the levels start at its head
                for clients in args.levels:
                    restarts = supervisor.restarts
                    r = asyncio.run(closed_loop(address, requests, clients, args.seconds))
                    rows.append({"config": name, **r, "triton_restarts": supervisor.restarts - restarts})
                    log(f"  {name} c={clients}: goodput {r['goodput_rps']}/s, ranked {r['ranked_share']:.1%}, "
                        f"degraded {r['degraded_share']:.1%}, shed {r['shed_share']:.1%}, "
                        f"p50 {r['p50_ms']} p99 {r['p99_ms']} ms {r['degraded_by_reason'] or ''}")
                if name == "protected" and args.soak_minutes > 0:
                    soak = run_soak(address, requests, procs, triton, feedback, args.soak_minutes, f"127.0.0.1:{feedback.port}")
        if supervisor is not None:
            supervisor.stop()
    result = write_results(args.results, f"Recommend under load ({args.size} shop, SQLite, depth {DEPTH}, "
                                    f"{DEADLINE_S * 1e3:.0f} ms deadline)", rows)
    if soak:
        result["soak"] = soak
        args.results.write_text(__import__("json").dumps(result, indent=2) + "\n")
    print_tables(result)
    plot(result, args.results.with_suffix(".png"))


def run_soak(address, requests, procs, triton, feedback, minutes: float, feedback_address: str) -> dict:
    pids = {"gateway": [p.process.pid for p in procs], "tritonserver (+ stubs)": [triton.process.pid],
            "feedback service": [feedback.process.pid]}
    samples: list[tuple[float, dict[str, float]]] = []

    def sample() -> None:
        samples.append((time.monotonic(), rss_mb(pids)))

    log(f"soak: 8 clients for {minutes:g} min with feedback events; RSS every 10 s")
    r = asyncio.run(closed_loop(address, requests, 8, minutes * 60, feedback_address, on_sample=sample))
    sample()
    out = {"clients": 8, "minutes": minutes, "load": r, "rss_mb": {
        name: {"start": round(samples[0][1][name], 1), "end": round(samples[-1][1][name], 1),
               "slope_mb_per_min_after_1_min": round(slope_mb_per_min(samples, name), 2),
               # The learner's bounded windows (served lists 180 s, impressions 120 s) are full after
               # ~3 min: the slope after that is the steady state the bounds promise.
               "slope_mb_per_min_after_5_min": round(slope_mb_per_min(samples, name, skip_s=300.0), 2),
               # The gateway's query-embedding cache (20,000 entries) fills for as long as requests
               # are new (~13 min at 25/s): the second half of a 20-minute soak is past it.
               "slope_mb_per_min_second_half": round(slope_mb_per_min(samples, name, skip_s=minutes * 30.0), 2)}
        for name in pids},
        "samples": [(round(t - samples[0][0], 1), {k: round(v, 1) for k, v in s.items()}) for t, s in samples]}
    for name, v in out["rss_mb"].items():
        log(f"  {name}: {v['start']} -> {v['end']} MB, slope {v['slope_mb_per_min_after_1_min']} MB/min")
    return out


def print_tables(result: dict) -> None:
    print("| config | clients | goodput (ranked/s) | ranked | degraded | shed | deadline exceeded | p50 ms | p99 ms | Triton restarts | degraded by reason |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in result["rows"]:
        reasons = ", ".join(f"{k} {v:.1%}" for k, v in r["degraded_by_reason"].items()) or "-"
        print(f"| {r['config']} | {r['clients']} | {r['goodput_rps']} | {r['ranked_share']:.1%} | {r['degraded_share']:.1%} "
              f"| {r['shed_share']:.1%} | {r['deadline_share']:.1%} | {r['p50_ms']} | {r['p99_ms']} | {r.get('triton_restarts', 0)} | {reasons} |")
    by = {(r["config"], r["clients"]): r for r in result["rows"]}
    if ("protected", 1) in by:
        base = by[("protected", 1)]["goodput_rps"]
        for (config, clients), r in by.items():
            if clients == 16:
                print(f"\n{config}: goodput at 16 clients = {r['goodput_rps'] / max(base, 1e-9):.2f}x protected at 1 client")
    if "soak" in result:
        print("\n| process | RSS start MB | RSS end MB | slope after 1 min (MB/min) | after 5 min | second half |"
              "\n|---|---:|---:|---:|---:|---:|")
        for name, v in result["soak"]["rss_mb"].items():
            print(f"| {name} | {v['start']} | {v['end']} | {v['slope_mb_per_min_after_1_min']} | "
                  f"{v.get('slope_mb_per_min_after_5_min', '-')} | {v.get('slope_mb_per_min_second_half', '-')} |")


def plot(result: dict, path: Path = PLOT) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = list(dict.fromkeys(r["config"] for r in result["rows"]))
    fig, axes = plt.subplots(1, 3 if "soak" in result else 2, figsize=(16 if "soak" in result else 11, 4.2))
    for config in configs:
        rows = [r for r in result["rows"] if r["config"] == config]
        xs = [r["clients"] for r in rows]
        axes[0].plot(xs, [r["goodput_rps"] for r in rows], marker="o", label=config)
        axes[1].plot(xs, [r["degraded_share"] * 100 for r in rows], marker="o", label=config)
    axes[0].set(xscale="log", xlabel="closed-loop clients", ylabel="fully ranked answers / s", title="goodput")
    axes[1].set(xscale="log", xlabel="closed-loop clients", ylabel="% of calls", title="degraded answers")
    for ax in axes[:2]:
        ax.set_xticks(LEVELS, [str(x) for x in LEVELS])
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if "soak" in result:
        samples = result["soak"]["samples"]
        for name in result["soak"]["rss_mb"]:
            axes[2].plot([t / 60 for t, _ in samples], [s[name] for _, s in samples], label=name)
        axes[2].set(xlabel="minutes", ylabel="RSS MB", title="soak, 8 clients + feedback")
        axes[2].legend(fontsize=8)
        axes[2].grid(alpha=0.3)
    fig.suptitle(f"{result['benchmark']} — {result['machine']}, {result['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    log(f"plot: {path}")


if __name__ == "__main__":
    main()
