"""Online feature reads for 1 user + 100 items: the fast reader vs the Feast SDK, SQLite and Redis.

Builds a private feature repo from the demo-size synthetic shop (5k items, 2k users), applies and
materializes it with the real `feast` CLI into SQLite and into a throwaway redis-server, then times
the same random requests through every path in one run:

    python -m bench.online_reader_bench [--iterations 1000] [--items 100]

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

RESULTS = Path(__file__).resolve().parent / "results" / "online_reader.json"
REDIS_YAML = "feature_store.redis.yaml"


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=1000)
    ap.add_argument("--items", type=int, default=100)
    ap.add_argument("--size", default="demo")
    args = ap.parse_args()

    from gateway.features.layout import FeatureLayout
    from gateway.features.online_reader import open_reader

    with tempfile.TemporaryDirectory(prefix="bench-reader-") as tmp, local_redis() as redis_server:
        root = Path(tmp)
        print(f"building the {args.size} shop and both online stores in {root} ...", flush=True)
        shop = generate_shop(args.size, seed=7, end=datetime.now(timezone.utc))
        shop.write(root / "raw")
        repo = feast_ops.copy_feature_repo(root / "feature_repo")
        import_dataset(root / "raw", repo / "data" / "offline")
        env = {"REDIS_CONNECTION_STRING": redis_server.connection_string}
        os.environ.update(env)
        feast_ops.apply(repo, quiet=True)
        feast_ops.materialize_all(repo, quiet=True)
        feast_ops.apply(repo, yaml=REDIS_YAML, env=env, quiet=True)
        feast_ops.materialize_all(repo, yaml=REDIS_YAML, env=env, quiet=True)

        rng = random.Random(1)
        users = shop.users["user_id"].tolist()
        items = shop.items["item_id"].tolist()
        requests = [(rng.choice(users), rng.sample(items, args.items)) for _ in range(args.iterations)]

        rows = []
        for backend, yaml in (("redis", REDIS_YAML), ("sqlite", None)):
            store = feast_ops.load_store(repo, yaml)
            reader = open_reader(store.config, FeatureLayout.from_feature_store(store), repo)
            store.refresh_registry()  # so the SDK does not refresh inside a timed request
            paths = {
                "fast reader (sync)": timed(reader.read, requests),
                "fast reader (asyncio)": timed_async(reader, requests),
                "Feast SDK get_online_features": timed(sdk_reader(store), requests),
            }
            for name, ms in paths.items():
                rows.append({"store": backend, "path": name, "median_ms": statistics.median(ms),
                             "p99_ms": percentile(ms, 99), "mean_ms": statistics.fmean(ms)})
            reader.close()

    for backend in ("redis", "sqlite"):
        sdk = next(r for r in rows if r["store"] == backend and r["path"].startswith("Feast"))
        for r in rows:
            if r["store"] == backend:
                r["speedup_median_vs_sdk"] = sdk["median_ms"] / r["median_ms"]
                r["speedup_p99_vs_sdk"] = sdk["p99_ms"] / r["p99_ms"]
    write_results(RESULTS, f"online features, 1 user + {args.items} items, {args.iterations} requests", rows)
    print("| store | path | median ms | p99 ms | speed-up vs SDK (median / p99) |")
    print("|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['store']} | {r['path']} | {r['median_ms']:.2f} | {r['p99_ms']:.2f} | "
              f"{r['speedup_median_vs_sdk']:.1f}x / {r['speedup_p99_vs_sdk']:.1f}x |")


if __name__ == "__main__":
    main()
