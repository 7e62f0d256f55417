"""Triton latency: encode 1 query, rank 20/50/100 pairs; fp32 vs int8; concurrency with and without
dynamic batching; against the naive way (in-process sentence-transformers CrossEncoder, fp32).

    python -m bench.triton_bench [--repeats 20]

Builds private model repositories (the zero-shot encoder and an untrained ranker: latency does not
depend on the weights' values), starts the real local tritonserver (CPU) for each precision, and
times the gateway's own async client. Writes bench/results/triton.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import percentile, write_results
from gateway.triton_client import TritonClient
from scorer.export.encoder_export import export_encoder
from scorer.export.ranker_export import export_ranker
from modelrepo.layout import copy_repository_configs
from scorer.models.encoder import TextEncoder
from scorer.models.ranker import CrossEncoderRanker
from contract.ranker_inputs import NUMERIC_FEATURES
from localtriton.launcher import TritonServer

RESULTS = Path(__file__).resolve().parent / "results" / "triton.json"
QUERY = "waterproof trail running shoes under 150"
CONTEXT = "waterproof trail running shoes under 150 | likes Running Shoes, Jackets | brands Nike | mid price"
ITEM = "Nike Glide 9 Lightweight Trail Running Shoes - Navy | brand Nike | Running Shoes | colour: navy, features: lightweight, type: trail running shoes | price 139.99"


def stats(ms: list[float]) -> dict[str, float]:
    return {"median_ms": statistics.median(ms), "p99_ms": percentile(ms, 99), "n": len(ms)}


async def timed(fn, repeats: int, warmup: int = 3) -> list[float]:
    for _ in range(warmup):
        await fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        await fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


async def concurrent(fn, clients: int, per_client: int) -> dict[str, float]:
    lat: list[float] = []

    async def worker():
        for _ in range(per_client):
            t0 = time.perf_counter()
            await fn()
            lat.append((time.perf_counter() - t0) * 1e3)

    await fn()
    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    wall = time.perf_counter() - t0
    return {**stats(lat), "requests_per_s": clients * per_client / wall}


def set_dynamic_batching(url: str, repo: Path, model: str, enabled: bool) -> None:
    from google.protobuf import json_format

    from modelrepo.admin import AdminClient
    from modelrepo.publish import read_config

    config = read_config(repo, model)
    if not enabled:
        config.ClearField("dynamic_batching")
    client = AdminClient(url)
    client.load_model(model, config=json_format.MessageToJson(config))
    client.close()


async def triton_rows(server: TritonServer, repo: Path, precision: str, repeats: int) -> list[dict]:
    client = TritonClient(server.grpc_url)
    features = np.zeros((100, len(NUMERIC_FEATURES)), np.float32)
    rows = []
    try:
        ms = await timed(lambda: client.embed([QUERY], timeout_s=10), repeats * 5)
        rows.append({"what": "encode 1 query", "path": f"Triton {precision}", **stats(ms)})
        for n in (20, 50, 100):
            ms = await timed(lambda n=n: client.rank(CONTEXT, [ITEM] * n, features[:n], timeout_s=60), repeats)
            rows.append({"what": f"rank {n} pairs", "path": f"Triton {precision}", **stats(ms)})
        for batching in (True, False):
            set_dynamic_batching(server.grpc_url, repo, "ranker_onnx", batching)
            r = await concurrent(lambda: client.rank(CONTEXT, [ITEM] * 20, features[:20], timeout_s=60), 4, max(3, repeats // 4))
            rows.append({"what": "rank 20 pairs, 4 concurrent clients",
                         "path": f"Triton {precision}, dynamic batching {'on' if batching else 'off'}", **r})
    finally:
        await client.close()
    return rows


def naive_rows(repeats: int) -> list[dict]:
    """The naive way: sentence-transformers CrossEncoder in-process, fp32, same weights, layers and lengths."""
    import torch
    from sentence_transformers import CrossEncoder

    from scorer.models.encoder import packaged_minilm_path
    from scorer.models.ranker import RankerConfig

    torch.set_num_threads(2)
    config = RankerConfig()
    model = CrossEncoder(str(packaged_minilm_path()), num_labels=1, max_length=config.max_length, device="cpu")
    bert = model.model.base_model
    if config.num_layers:  # the same layer-dropped transformer as the served ranker
        bert.encoder.layer = bert.encoder.layer[: config.num_layers]
    rows = []
    for n in (20, 50, 100):
        pairs = [(CONTEXT, ITEM)] * n
        model.predict(pairs, batch_size=n)
        ms = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model.predict(pairs, batch_size=n)
            ms.append((time.perf_counter() - t0) * 1e3)
        rows.append({"what": f"rank {n} pairs", "path": "naive: in-process CrossEncoder fp32", **stats(ms)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    rows: list[dict] = []
    encoder, ranker = TextEncoder(), CrossEncoderRanker()
    with tempfile.TemporaryDirectory(prefix="bench-triton-") as tmp:
        for precision in ("fp32", "int8"):
            repo = copy_repository_configs(Path(tmp) / precision)
            export_encoder(repo, encoder, int8=precision == "int8")
            export_ranker(repo, ranker, int8=precision == "int8")
            print(f"starting Triton with the {precision} models ...", flush=True)
            with TritonServer(model_repository=repo, workdir=Path(tmp) / f"run-{precision}") as server:
                rows += asyncio.run(triton_rows(server, repo, precision, args.repeats))
    rows += naive_rows(args.repeats)

    naive = {r["what"]: r for r in rows if r["path"].startswith("naive")}
    for r in rows:
        if r["what"] in naive and not r["path"].startswith("naive"):
            r["speedup_median_vs_naive"] = naive[r["what"]]["median_ms"] / r["median_ms"]
    write_results(RESULTS, "Triton encoder/ranker latency (CPU)", rows)
    print("| what | path | median ms | p99 ms | req/s | vs naive (median) |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        rps = f"{r['requests_per_s']:.1f}" if "requests_per_s" in r else ""
        ratio = f"{r['speedup_median_vs_naive']:.2f}x" if "speedup_median_vs_naive" in r else ""
        print(f"| {r['what']} | {r['path']} | {r['median_ms']:.1f} | {r['p99_ms']:.1f} | {rps} | {ratio} |")


if __name__ == "__main__":
    main()
