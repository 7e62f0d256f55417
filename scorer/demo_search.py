"""Demo step: the fine-tuned encoder exported and served by a real Triton server, used to search.

Embeds the whole catalog through Triton (the way the gateway will build its ANN index), then
answers a few shopper queries by cosine similarity. Exact search over a few thousand vectors is a
single matrix product here; the gateway's ANN index replaces it at scale.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Console
from rich.progress import track
from rich.table import Table

from scorer.export.encoder_export import export_encoder
from scorer.export.triton_repo import MODEL_REPOSITORY
from scorer.item_text import catalog_texts
from scorer.models.encoder import EncoderConfig, TextEncoder
from scorer.triton.launcher import TritonServer
from scorer.triton.publish import publish_encoder

QUERIES = ("waterproof hiking backpack", "cheap wireless earbuds", "nike trail running shoes under 150",
           "espresso machine with milk frother")


def search_through_triton(checkpoint: Path, repo: Path, console: Console) -> None:
    from gateway.triton_client import TritonClient

    with console.status("exporting the fine-tuned encoder to ONNX"):
        version = export_encoder(MODEL_REPOSITORY, TextEncoder(EncoderConfig(model_path=str(checkpoint))))
    console.print(f"exported encoder_onnx/{version} + text_tokenizer/{version} into {MODEL_REPOSITORY}")
    server = TritonServer()
    with console.status("starting tritonserver (nvidia-pytriton, CPU)"):
        server.start()
    try:
        publish_encoder(server.grpc_url, MODEL_REPOSITORY, version)
        console.print(f"Triton ready on {server.grpc_url}, serving encoder v{version}")
        items = pd.read_parquet(repo / "data" / "offline" / "items.parquet")
        texts = catalog_texts(items)

        async def embed_all() -> tuple[np.ndarray, np.ndarray, float]:
            client = TritonClient(server.grpc_url)
            try:
                t0 = time.perf_counter()
                chunks = [texts[i : i + 256] for i in range(0, len(texts), 256)]
                parts = [await client.embed(c, timeout_s=120) for c in track(chunks, description="embedding the catalog via Triton")]
                seconds = time.perf_counter() - t0
                return np.concatenate(parts), await client.embed(list(QUERIES), timeout_s=10), seconds
            finally:
                await client.close()

        item_vecs, query_vecs, seconds = asyncio.run(embed_all())
        console.print(f"embedded {len(texts):,} items through Triton in {seconds:.1f}s ({len(texts) / seconds:.0f} items/s)")
        for q, qv in zip(QUERIES, query_vecs):
            top = np.argsort(-(item_vecs @ qv))[:5]
            table = Table("score", "item", "title", "price", title=f"query: {q!r}")
            for i in top:
                table.add_row(f"{item_vecs[i] @ qv:.3f}", items.at[i, "item_id"], items.at[i, "title"], f"{items.at[i, 'price']:.2f}")
            console.print(table)
    finally:
        server.stop()
