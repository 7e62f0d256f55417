"""Online feature reads for 1 user + 100 items: the fast reader vs the Feast SDK, on SQLite, one
Redis node and a Redis Cluster (3 masters + 3 replicas).

Builds a private feature repo from the demo-size synthetic shop (5k items, 2k users), applies and
materializes it with the real `feast` CLI into SQLite, a throwaway redis-server and a throwaway
local Redis Cluster (scripts/local_redis_cluster.py), then times the same random requests through
every path in one run:

    python -m bench.online_reader_bench [--iterations 1000] [--items 100] [--stores redis,redis_cluster,sqlite] [--out FILE]

On the cluster it also times redis-py's own cluster pipeline (`RedisCluster.pipeline()`), the
alternative to the fast reader's per-master packed batches.

Writes bench/results/online_reader.json and prints a markdown table (docs/benchmarks.md keeps it).
The naive way is what most projects do: `FeatureStore.get_online_features` once for the user's
views and once for the items' views.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from bench.common import percentile, write_results
from scorer.data import feast_ops
from scorer.data.importer import import_dataset
from scorer.data.synthetic import generate_shop
from scripts.local_redis import local_redis
from scripts.local_redis_cluster import local_redis_cluster

RESULTS = Path(__file__).resolve().parent / "results" / "online_reader.json"
YAMLS = {"redis": "feature_store.redis.yaml", "redis_cluster": "feature_store.redis_cluster.yaml", "sqlite": None}


def timed(fn: Callable[[str, list[str]], object], requests: list[tuple[str, list[str]]], warmup: int = 50) -> list[float]:
    for user, items in requests[:warmup]:
        fn(user, items)
    out = []
    for user, items in requests:
        t0 = time.perf_counter()
        fn(user, items)
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def timed_async(reader, requests: list[tuple[str, list[str]]], warmup: int = 50) -> list[float]:
    async def go() -> list[float]:
        for user, items in requests[:warmup]:
            await reader.aread(user, items)
        out = []
        for user, items in requests:
            t0 = time.perf_counter()
            await reader.aread(user, items)
            out.append((time.perf_counter() - t0) * 1e3)
        return out

    return asyncio.run(go())


def timed_interleaved(paths: dict[str, Callable[[str, list[str]], object]], requests: list[tuple[str, list[str]]],
                      warmup: int = 50) -> dict[str, list[float]]:
    """Every request through every path in turn (the order rotating), timed separately."""
    names = list(paths)
    for user, items in requests[:warmup]:
        for name in names:
            paths[name](user, items)
    out: dict[str, list[float]] = {name: [] for name in names}
    for n, (user, items) in enumerate(requests):
        for name in names[n % len(names):] + names[:n % len(names)]:
            t0 = time.perf_counter()
            paths[name](user, items)
            out[name].append((time.perf_counter() - t0) * 1e3)
    return out


def _row(store: str, path: str, ms: list[float]) -> dict:
    return {"store": store, "path": path, "median_ms": statistics.median(ms), "p99_ms": percentile(ms, 99),
            "mean_ms": statistics.fmean(ms)}


def sdk_reader(store) -> Callable[[str, list[str]], object]:
    service = store.get_feature_service("recommend_serving")
    views = {p.name: store.get_feature_view(p.name).entities for p in service.feature_view_projections}
    user_refs = [f"{p.name}:{f.name}" for p in service.feature_view_projections for f in p.features if views[p.name] == ["user"]]
    item_refs = [f"{p.name}:{f.name}" for p in service.feature_view_projections for f in p.features if views[p.name] == ["item"]]

    def read(user: str, items: list[str]):
        u = store.get_online_features(features=user_refs, entity_rows=[{"user_id": user}]).to_dict()
        i = store.get_online_features(features=item_refs, entity_rows=[{"item_id": x} for x in items]).to_dict()
        return u, i

    return read


def redis_py_pipeline_reader(reader) -> Callable[[str, list[str]], object]:
    """The same read through redis-py's ClusterPipeline: it groups by node and follows MOVED/ASK
    itself, but encodes every HMGET's arguments per command."""
    reader.read("warm-up", [])  # creates the cluster client and its slot map

    def read(user: str, items: list[str]):
        pipe = reader._client.pipeline(transaction=False)
        pipe.hmget(reader._user_key(user), reader._user_fields)
        for i in items:
            pipe.hmget(reader._item_key(i), reader._item_fields)
        return reader._assemble(items, pipe.execute(), time.time())

    return read


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=1000)
    ap.add_argument("--items", type=int, default=100)
    ap.add_argument("--size", default="demo")
    ap.add_argument("--stores", default="redis,redis_cluster,sqlite", help="comma separated: redis, redis_cluster, sqlite")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results JSON (default: bench/results/online_reader.json)")
    args = ap.parse_args()
    stores = [s for s in args.stores.split(",") if s]
    unknown = set(stores) - set(YAMLS)
    if unknown:
        ap.error(f"--stores: unknown {sorted(unknown)} (known: {sorted(YAMLS)})")

    from gateway.features.layout import FeatureLayout
    from gateway.features.online_reader import open_reader

    with tempfile.TemporaryDirectory(prefix="bench-reader-") as tmp, local_redis() as redis_server, \
            local_redis_cluster() as cluster:
        root = Path(tmp)
        print(f"building the {args.size} shop and the online stores ({', '.join(stores)}) in {root} ...", flush=True)
        shop = generate_shop(args.size, seed=7, end=datetime.now(timezone.utc))
        shop.write(root / "raw")
        repo = feast_ops.copy_feature_repo(root / "feature_repo")
        import_dataset(root / "raw", repo / "data" / "offline")
        env = {"REDIS_CONNECTION_STRING": redis_server.connection_string,
               "REDIS_CLUSTER_CONNECTION_STRING": cluster.connection_string}
        os.environ.update(env)
        for backend in stores:
            feast_ops.apply(repo, yaml=YAMLS[backend], env=env, quiet=True)
            feast_ops.materialize_all(repo, yaml=YAMLS[backend], env=env, quiet=True)

        rng = random.Random(1)
        users = shop.users["user_id"].tolist()
        items = shop.items["item_id"].tolist()
        requests = [(rng.choice(users), rng.sample(items, args.items)) for _ in range(args.iterations)]

        rows = []
        fast: dict[str, Callable[[str, list[str]], object]] = {}
        opened = []
        for backend in stores:
            print(f"timing {backend} ...", flush=True)
            store = feast_ops.load_store(repo, YAMLS[backend])
            reader = open_reader(store.config, FeatureLayout.from_feature_store(store), repo)
            store.refresh_registry()  # so the SDK does not refresh inside a timed request
            paths = {
                "fast reader (sync)": timed(reader.read, requests),
                "fast reader (asyncio)": timed_async(reader, requests),
            }
            fast[f"{backend}: fast reader (sync)"] = reader.read
            if backend == "redis_cluster":
                pipeline = redis_py_pipeline_reader(reader)
                paths["redis-py ClusterPipeline (sync)"] = timed(pipeline, requests)
                fast["redis_cluster: redis-py ClusterPipeline (sync)"] = pipeline
            paths["Feast SDK get_online_features"] = timed(sdk_reader(store), requests)
            for name, ms in paths.items():
                rows.append(_row(backend, name, ms))
            opened.append(reader)
        if "redis" in stores and "redis_cluster" in stores:
            # Cluster vs single node on the same requests, alternating request by request, so a
            # shared machine's load changes hit both alike (the rows above run one after another).
            print("timing single node vs cluster, interleaved ...", flush=True)
            for name, ms in timed_interleaved({k: v for k, v in fast.items() if not k.startswith("sqlite")},
                                              requests).items():
                backend, path = name.split(": ", 1)
                rows.append(_row(backend, path.replace("(sync)", "(sync, interleaved)"), ms))
        for reader in opened:
            reader.close()

    for backend in stores:
        sdk = next(r for r in rows if r["store"] == backend and r["path"].startswith("Feast"))
        for r in rows:
            if r["store"] == backend:
                r["speedup_median_vs_sdk"] = sdk["median_ms"] / r["median_ms"]
                r["speedup_p99_vs_sdk"] = sdk["p99_ms"] / r["p99_ms"]
    write_results(args.out, f"online features, 1 user + {args.items} items, {args.iterations} requests", rows)
    print("| store | path | median ms | p99 ms | speed-up vs SDK (median / p99) |")
    print("|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['store']} | {r['path']} | {r['median_ms']:.2f} | {r['p99_ms']:.2f} | "
              f"{r['speedup_median_vs_sdk']:.1f}x / {r['speedup_p99_vs_sdk']:.1f}x |")


if __name__ == "__main__":
    main()
