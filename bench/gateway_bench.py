"""Closed-loop latency and throughput of Recommend, end to end, against a naive pipeline.

    python -m bench.gateway_bench [--size small] [--seconds 15] [--store sqlite|redis]

Set-up: a synthetic shop imported into a private feature repo (real `feast apply/materialize`),
the encoder (int8), the ranker (int8, its default 1 layer / 32 tokens) and the interest model exported into
a private Triton repository served by a real tritonserver on CPU, and the gateway as its own process (`python -m gateway`).
Requests: real (user, query) pairs from the shop's event log, sent over gRPC by N concurrent
workers in a closed loop; every answer carries its per-stage timings (trailing metadata).

The naive pipeline answers the same requests the way one assembles it by hand: Feast SDK
`get_online_features` for the user, the query embedded in-process (torch), exact search over the
same item embeddings, Feast SDK reads for the top-K items, and a cross-encoder in-process in torch
fp32. Its concurrency is N threads. Two naive rankers, each measured:
- "same weights": the served ranker itself (1 layer, 32 tokens): the serving path alone compared;
- "stock": the 6-layer MiniLM cross-encoder at 48 tokens that one takes off the shelf; fine-tuned
  the same way it scores the same holdout NDCG@5 as the served one (docs/models.md), so it is the
  naive pipeline at the same model quality.

Writes bench/results/gateway.json and prints the markdown table kept in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from datetime import datetime, timezone
from pathlib import Path

import grpc
import numpy as np

from rpc.clients import aio_channel
from bench.common import auth_on, percentile, start_service, write_results

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "gateway.json"
CONCURRENCY = (1, 4, 16)
DEPTHS = (20, 50)
# The naive pipeline's cross-encoder: the served ranker's own shape, and the stock one (module doc).
NAIVE_RANKERS = {"same weights": {}, "stock": {"num_layers": 0, "max_length": 48}}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- set-up ---------------------------------------------------------------------------------------------

def build_feature_repo(workdir: Path, size: str, store: str, stack: ExitStack) -> tuple[Path, dict[str, str]]:
    from scorer.data import feast_ops
    from scorer.data.importer import import_dataset
    from scorer.data.synthetic import generate_shop

    log(f"generating the {size} shop and importing it")
    shop = generate_shop(size, seed=7, end=datetime.now(timezone.utc))
    shop.write(workdir / "raw")
    repo = feast_ops.copy_feature_repo(workdir / "feature_repo")
    import_dataset(workdir / "raw", repo / "data" / "offline")
    env: dict[str, str] = {}
    yaml = None
    if store == "redis":
        from scripts.local_redis import local_redis

        redis = stack.enter_context(local_redis())
        env = {"REDIS_CONNECTION_STRING": redis.connection_string}
        yaml = "feature_store.redis.yaml"
    elif store == "redis_cluster":  # a real local 3+3 cluster (scripts/local_redis_cluster.py)
        from scripts.local_redis_cluster import local_redis_cluster

        cluster = stack.enter_context(local_redis_cluster())
        env = {"REDIS_CLUSTER_CONNECTION_STRING": cluster.connection_string}
        yaml = "feature_store.redis_cluster.yaml"
    log("feast apply + materialize")
    feast_ops.apply(repo, yaml=yaml, env=env, quiet=True)
    feast_ops.materialize_all(repo, yaml=yaml, env=env, quiet=True)
    return repo, env


def build_models(workdir: Path) -> Path:
    from scorer.export.encoder_export import export_encoder
    from scorer.export.interest_export import export_interest
    from scorer.export.ranker_export import export_ranker
    from modelrepo.layout import copy_repository_configs
    from scorer.models.encoder import TextEncoder

    log("exporting the encoder (int8), the ranker (int8) and the interest model to ONNX")
    repo = copy_repository_configs(workdir / "models")
    export_encoder(repo, TextEncoder(), int8=True)
    export_ranker(repo, int8=True)
    export_interest(repo)  # untrained: latency does not depend on the weights
    return repo


def sample_requests(repo: Path, n: int, seed: int = 0) -> list[tuple[str, str]]:
    import pandas as pd

    events = pd.read_parquet(repo / "data" / "offline" / "events.parquet", columns=["user_id", "event_type", "query"])
    q = events[(events["event_type"] == "QUERY") & events["query"].notna()]
    rows = q.sample(min(n, len(q)), random_state=seed)
    return list(zip(rows["user_id"], rows["query"]))


class GatewayProcess:
    def __init__(self, repo: Path, triton_url: str, depth: int, env: dict[str, str], workdir: Path, yaml: str,
                 port: int = 0, name: str = "", config: Path | None = None):
        from localtriton.launcher import free_port

        self.port = port or free_port()
        self.env = {**os.environ, **env, "RECSYS_PORT": str(self.port), "RECSYS_FEATURE_REPO": str(repo),
                    "RECSYS_FEATURE_STORE_YAML": yaml, "RECSYS_TRITON_URL": triton_url,
                    "RECSYS_RERANK_DEPTH": str(depth),
                    # The load bench measures the ranker's cost: applied at any depth > 0, unless the
                    # caller names the mode (a served-quality bench serves the configured one).
                    "RECSYS_RANKER_MODE": env.get("RECSYS_RANKER_MODE", "always" if depth else "never"),
                    "RECSYS_REQUEST_TIMEOUT_MS": "2000",
                    "RECSYS_EMBED_TIMEOUT_MS": "1000", "RECSYS_EMBEDDING_CACHE_DIR": str(workdir / "embeddings"),
                    "RECSYS_LOG_LEVEL": "WARNING"}
        self.log_path = workdir / f"gateway-{name or depth}.log"
        self.process: subprocess.Popen | None = None
        self.config = config  # a settings file (`python -m gateway FILE`); the environment above overrides it

    def __enter__(self) -> "GatewayProcess":
        self.process = start_service("gateway", self.port, self.env, self.log_path, ROOT, "gateway",
                                     args=(str(self.config),) if self.config else ())
        return self

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


# --- the two pipelines ----------------------------------------------------------------------------------

def run_gateway(address: str, requests: list[tuple[str, str]], concurrency: int, seconds: float) -> dict:
    from recsys.v1 import recommend_pb2, recommend_pb2_grpc

    async def go() -> tuple[list[float], list[dict], int, float]:
        channel = aio_channel(address)
        stub = recommend_pb2_grpc.RecommendServiceStub(channel)
        latencies, stages, errors = [], [], 0
        stop_at = time.monotonic() + seconds
        counter = iter(range(10**9))

        async def worker() -> None:
            nonlocal errors
            while time.monotonic() < stop_at:
                user, query = requests[next(counter) % len(requests)]
                t0 = time.perf_counter()
                call = stub.Recommend(recommend_pb2.RecommendRequest(user_id=user, query=query, num_results=20), timeout=5)
                try:
                    response = await call
                except grpc.RpcError:
                    errors += 1
                    continue
                latencies.append((time.perf_counter() - t0) * 1e3)
                stages.append({**await _aio_stages(call), "degraded": float(response.degraded),
                               "learned_fusion": float("fusion" in response.model_versions),
                               "next_item_used": float("next_item" in response.model_versions)})

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
        await channel.close()
        return latencies, stages, errors, wall

    # Warm-up: caches and the first ORT runs.
    asyncio.run(_warm(address, requests[:20]))
    latencies, stages, errors, wall = asyncio.run(go())
    return summarise(latencies, wall, errors, stages)


async def _aio_stages(call) -> dict[str, float]:
    for key, value in await call.trailing_metadata() or ():
        if key == "x-recsys-stages-ms" and value:
            return {k: float(v) for k, v in (kv.split("=") for kv in value.split(","))}
    return {}


async def _warm(address: str, requests: list[tuple[str, str]]) -> None:
    from recsys.v1 import recommend_pb2, recommend_pb2_grpc

    async with aio_channel(address) as channel:
        stub = recommend_pb2_grpc.RecommendServiceStub(channel)
        for user, query in requests:
            await stub.Recommend(recommend_pb2.RecommendRequest(user_id=user, query=query, num_results=20), timeout=10)


class NaivePipeline:
    """Feast SDK reads + in-process torch encoder and ranker + exact search (the hand-assembled way)."""

    def __init__(self, repo: Path, yaml: str | None, item_vectors: np.ndarray, item_ids: list[str], texts: list[str],
                 ranker_config=None):
        import torch

        from scorer.data.feast_ops import load_store
        from scorer.models.encoder import TextEncoder, load_tokenizer
        from scorer.models.ranker import CrossEncoderRanker, load_ranker_tokenizer

        torch.set_num_threads(2)
        self.store = load_store(repo, yaml)
        service = self.store.get_feature_service("recommend_serving")
        views = {p.name: self.store.get_feature_view(p.name).entities for p in service.feature_view_projections}
        self.user_refs = [f"{p.name}:{f.name}" for p in service.feature_view_projections for f in p.features
                          if views[p.name] == ["user"]]
        self.item_refs = [f"{p.name}:{f.name}" for p in service.feature_view_projections for f in p.features
                          if views[p.name] == ["item"]]
        self.encoder = TextEncoder().eval()
        self.enc_tok = load_tokenizer(self.encoder.config)
        self.ranker = (CrossEncoderRanker(ranker_config) if ranker_config else CrossEncoderRanker()).eval()
        self.rank_tok = load_ranker_tokenizer(self.ranker.config)
        self.vectors, self.item_ids, self.texts = item_vectors, item_ids, texts
        self.lock = threading.Lock()  # torch modules shared by the threads: one forward at a time

    def recommend(self, user: str, query: str, depth: int, n: int = 20) -> list[str]:
        import torch

        from contract.ranker_inputs import context_text, numeric_features

        u = {k: v[0] for k, v in self.store.get_online_features(features=self.user_refs,
                                                                 entity_rows=[{"user_id": user}]).to_dict().items()}
        ctx = context_text(query, u)
        with self.lock, torch.no_grad():
            enc = self.enc_tok([query, ctx], padding=True, truncation=True, max_length=64, return_tensors="pt")
            qv, cv = self.encoder(enc["input_ids"], enc["attention_mask"]).numpy()
        top = np.argsort(-(self.vectors @ qv))[: max(depth, n)]
        ids = [self.item_ids[i] for i in top]
        feats = self.store.get_online_features(features=self.item_refs,
                                               entity_rows=[{"item_id": i} for i in ids[:depth]]).to_dict()
        rows = [{k: feats[k][j] for k in feats} for j in range(depth)]
        numeric = torch.tensor([numeric_features(r, u, float(self.vectors[i] @ cv)) for r, i in zip(rows, top)],
                               dtype=torch.float32)
        with self.lock, torch.no_grad():
            pairs = self.rank_tok([ctx] * depth, [self.texts[i] for i in top[:depth]], padding=True, truncation=True,
                                  max_length=self.ranker.config.max_length, return_tensors="pt")
            scores = self.ranker(pairs["input_ids"], pairs["attention_mask"], pairs["token_type_ids"], numeric)
        order = np.argsort(-scores.squeeze(-1).numpy())
        return [ids[i] for i in order] + ids[depth:n]


def run_naive(pipeline: NaivePipeline, requests: list[tuple[str, str]], concurrency: int, seconds: float,
              depth: int) -> dict:
    for user, query in requests[:5]:
        pipeline.recommend(user, query, depth)
    latencies: list[float] = []
    stop_at = time.monotonic() + seconds
    counter = iter(range(10**9))
    lock = threading.Lock()

    def worker() -> None:
        while time.monotonic() < stop_at:
            with lock:
                user, query = requests[next(counter) % len(requests)]
            t0 = time.perf_counter()
            pipeline.recommend(user, query, depth)
            latencies.append((time.perf_counter() - t0) * 1e3)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for f in [pool.submit(worker) for _ in range(concurrency)]:
            f.result()
    return summarise(latencies, time.perf_counter() - t0, 0, [])


# Per-answer flags counted as shares, not timed as stages: degraded answers, and answers scored
# by the learned fusion or with the next-item model's list (their versions in model_versions: proof
# that such a row measured them; the stage `next_item` is timed under its own name).
SHARES = ("degraded", "learned_fusion", "next_item_used")


def summarise(latencies: list[float], wall: float, errors: int, stages: list[dict]) -> dict:
    out = {"requests": len(latencies), "errors": errors, "rps": round(len(latencies) / wall, 1),
           "p50_ms": round(percentile(latencies, 50), 1), "p99_ms": round(percentile(latencies, 99), 1)}
    if stages:
        names = sorted({k for s in stages for k in s if k not in SHARES})
        out["stage_p50_ms"] = {k: round(percentile([s.get(k, 0.0) for s in stages], 50), 2) for k in names}
        out["stage_p99_ms"] = {k: round(percentile([s.get(k, 0.0) for s in stages], 99), 2) for k in names}
        for k in SHARES:
            out[f"{k}_share"] = round(sum(s.get(k, 0.0) for s in stages) / len(stages), 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="small")
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--store", choices=("sqlite", "redis"), default="sqlite")
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--depths", type=int, nargs="+", default=list(DEPTHS))
    ap.add_argument("--concurrency", type=int, nargs="+", default=list(CONCURRENCY))
    ap.add_argument("--skip-naive", action="store_true", help="gateway only (quick iterations; no ratio)")
    args = ap.parse_args()
    auth_on()  # the services run with auth on, as deployed; the clients send the benchmark's key

    with tempfile.TemporaryDirectory(prefix="gateway_bench_") as tmp, ExitStack() as stack:
        workdir = Path(tmp)
        repo, env = build_feature_repo(workdir, args.size, args.store, stack)
        yaml = "feature_store.redis.yaml" if args.store == "redis" else "feature_store.yaml"
        os.environ.update(env)
        models = build_models(workdir)
        from localtriton.launcher import TritonServer

        log("starting tritonserver")
        triton = stack.enter_context(TritonServer(model_repository=models, workdir=workdir / "triton"))
        requests = sample_requests(repo, args.requests)
        rows = []
        item_vectors = item_ids = texts = None
        for depth in args.depths:
            log(f"gateway, rerank depth {depth} (the first start embeds the catalog through Triton)")
            with GatewayProcess(repo, triton.grpc_url, depth, env, workdir, yaml) as gw:
                for c in args.concurrency:
                    r = run_gateway(f"127.0.0.1:{gw.port}", requests, c, args.seconds)
                    rows.append({"pipeline": "gateway", "depth": depth, "concurrency": c, **r})
                    log(f"  gateway depth={depth} c={c}: p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, {r['rps']} rps"
                        f" (degraded {r.get('degraded_share')})")
            if item_vectors is None:
                item_vectors, item_ids, texts = _cached_item_vectors(repo, workdir)
        if args.skip_naive:
            for row in rows:
                print(row)
            return
        from scorer.models.ranker import RankerConfig

        for name, config in NAIVE_RANKERS.items():
            log(f"naive pipeline (Feast SDK + in-process torch), {name} ranker")
            naive = NaivePipeline(repo, None if args.store == "sqlite" else yaml, item_vectors, item_ids, texts,
                                  RankerConfig(**config))
            for depth in args.depths:
                for c in args.concurrency:
                    r = run_naive(naive, requests, c, args.seconds, depth)
                    rows.append({"pipeline": f"naive, {name}", "depth": depth, "concurrency": c, **r})
                    log(f"  naive ({name}) depth={depth} c={c}: p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, {r['rps']} rps")
    for row in rows:
        if row["pipeline"] == "gateway":
            for name in NAIVE_RANKERS:
                ref = _naive_row(rows, name, row)
                row[f"p50_speedup_vs_naive_{name.replace(' ', '_')}"] = round(ref["p50_ms"] / row["p50_ms"], 2)
    result = write_results(RESULTS, f"gateway Recommend end to end ({args.size} shop, {args.store})", rows)
    print_table(result["rows"])


def _cached_item_vectors(repo: Path, workdir: Path) -> tuple[np.ndarray, list[str], list[str]]:
    """The naive pipeline searches the same item vectors (from the gateway's embedding cache)."""
    from gateway.catalog import CatalogSources, load_catalog
    from gateway.catalog_embeddings import EmbeddingCache
    from scorer.data.feast_ops import load_store

    catalog = load_catalog(CatalogSources.from_feature_store(load_store(repo)))
    cache = EmbeddingCache(workdir / "embeddings", "1")
    vectors = np.stack([cache.get(t) for t in catalog.texts]).astype(np.float32)
    return vectors, list(catalog.item_ids), list(catalog.texts)


def _naive_row(rows: list[dict], name: str, like: dict) -> dict:
    return next(r for r in rows if r["pipeline"] == f"naive, {name}" and r["depth"] == like["depth"]
                and r["concurrency"] == like["concurrency"])


def print_table(rows: list[dict]) -> None:
    print("| depth | concurrency | gateway p50 / p99 ms | gateway req/s | naive, same weights p50 / p99 ms | speed-up "
          "| naive, stock p50 / p99 ms | speed-up |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        if row["pipeline"] != "gateway":
            continue
        same, stock = _naive_row(rows, "same weights", row), _naive_row(rows, "stock", row)
        print(f"| {row['depth']} | {row['concurrency']} | {row['p50_ms']} / {row['p99_ms']} | {row['rps']} | "
              f"{same['p50_ms']} / {same['p99_ms']} | {row['p50_speedup_vs_naive_same_weights']}x | "
              f"{stock['p50_ms']} / {stock['p99_ms']} | {row['p50_speedup_vs_naive_stock']}x |")
    print("\nGateway stage medians (ms), concurrency 1:")
    for row in rows:
        if row["pipeline"] == "gateway" and row["concurrency"] == 1:
            print(f"  depth {row['depth']}: " + ", ".join(f"{k} {v}" for k, v in row["stage_p50_ms"].items()))


if __name__ == "__main__":
    main()
