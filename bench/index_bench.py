"""Exact scan vs faiss HNSW for the gateway's vector search: where does the graph start paying off?

    python -m bench.index_bench [--queries 300]

Vectors: unit vectors of dimension 384 in clusters with a low intrinsic dimension (32), like
sentence embeddings of a catalog: items of a type lie close together and vary along few
directions. Isotropic 384-d noise would be a far harder (and unrealistic) case for any graph index. For each catalog size it times top-100 search for one query, the
way the gateway calls it (gateway/index.py `ItemIndex.search`, forced to one path), and the
HNSW recall@100 against the exact answer. Writes bench/results/index.json; the table is in
docs/benchmarks.md and sets `EXACT_MAX` in gateway/index.py.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from bench.common import percentile, write_results
from gateway.index import ItemIndex

RESULTS = Path(__file__).resolve().parent / "results" / "index.json"
SIZES = (5_000, 20_000, 50_000, 200_000)
DIM, K = 384, 100


def clustered(n: int, rng: np.random.Generator, clusters: int = 256, intrinsic: int = 32) -> np.ndarray:
    basis = np.random.default_rng(1).standard_normal((intrinsic, DIM)).astype(np.float32)  # shared subspace
    centres = np.random.default_rng(2).standard_normal((clusters, DIM)).astype(np.float32)
    local = rng.standard_normal((n, intrinsic)).astype(np.float32) @ basis * 0.35
    x = centres[rng.integers(clusters, size=n)] + local
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def time_search(index: ItemIndex, queries: np.ndarray) -> tuple[list[float], list[np.ndarray]]:
    times, results = [], []
    for q in queries[:20]:
        index.search(q, K)
    for q in queries:
        t0 = time.perf_counter()
        ids, _ = index.search(q, K)
        times.append((time.perf_counter() - t0) * 1e3)
        results.append(ids)
    return times, results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queries", type=int, default=300)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    for n in SIZES:
        vectors = clustered(n, rng)
        queries = clustered(args.queries, rng)
        t0 = time.perf_counter()
        hnsw = ItemIndex(vectors, "1", exact_max=0)  # always the graph
        build_s = time.perf_counter() - t0
        exact = ItemIndex.__new__(ItemIndex)
        exact.__dict__.update(hnsw.__dict__)
        exact.exact_max = n  # always the scan
        t_exact, r_exact = time_search(exact, queries)
        t_hnsw, r_hnsw = time_search(hnsw, queries)
        recall = float(np.mean([len(set(a) & set(b)) / K for a, b in zip(r_exact, r_hnsw)]))
        row = {"items": n, "exact_p50_ms": round(percentile(t_exact, 50), 3), "exact_p99_ms": round(percentile(t_exact, 99), 3),
               "hnsw_p50_ms": round(percentile(t_hnsw, 50), 3), "hnsw_p99_ms": round(percentile(t_hnsw, 99), 3),
               "hnsw_recall_at_100": round(recall, 4), "hnsw_build_s": round(build_s, 2)}
        rows.append(row)
        print(row, flush=True)
    write_results(RESULTS, "vector search top-100: exact scan vs faiss HNSW (M=32, efConstruction=128, efSearch=256)", rows)
    print("| items | exact p50 / p99 ms | HNSW p50 / p99 ms | HNSW recall@100 | HNSW build s |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['items']:,} | {r['exact_p50_ms']} / {r['exact_p99_ms']} | {r['hnsw_p50_ms']} / {r['hnsw_p99_ms']} | "
              f"{r['hnsw_recall_at_100']} | {r['hnsw_build_s']} |")


if __name__ == "__main__":
    main()
