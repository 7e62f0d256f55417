"""Model compute on a GPU: the ranker and encoder forward passes in torch (fp32 / fp16), CUDA.

    python bench/gpu_model_bench.py --out results.json     # on a machine with a CUDA GPU

What it answers: how much of the CPU latency budget disappears on a GPU, and how deep the ranker
can go there. It builds MiniLM-L6 (the packaged model's architecture, from
`bench/minilm_config.json`; weight values do not change latency) with all 6 layers and with the
2 the CPU ranker keeps, and times one forward for 20 / 50 / 100 / 1000 (context, item) pairs, plus
catalog embedding throughput (batches of 256 item texts). Inputs are token ids of the same
lengths as the serving path (pairs: 48 and 96 tokens; items: 64).

This is model compute only, not the Triton path: the lent GPU machine has no tritonserver (the
NGC container is the production route, docs/triton.md). Runs standalone (torch + transformers
only), so it needs nothing from this repo's environments.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from transformers import BertConfig, BertModel

CONFIG = Path(__file__).with_name("minilm_config.json")


def timed(fn, repeats: int = 30) -> tuple[float, float]:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2], times[min(len(times) - 1, int(0.99 * len(times)))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    device = torch.device("cuda")
    base = json.loads(CONFIG.read_text())
    rows = []
    for layers in (6, 2):
        model = BertModel(BertConfig(**{**base, "num_hidden_layers": layers})).to(device).eval()
        for dtype in (torch.float32, torch.float16):
            m = model.to(dtype)
            for seq in (48, 96):
                for pairs in (20, 50, 100, 1000):
                    ids = torch.randint(1000, 30000, (pairs, seq), device=device)
                    mask = torch.ones_like(ids)
                    with torch.inference_mode():
                        p50, p99 = timed(lambda: m(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids)))
                    rows.append({"what": "rank", "layers": layers, "dtype": str(dtype).split(".")[-1], "seq": seq,
                                 "pairs": pairs, "p50_ms": round(p50, 2), "p99_ms": round(p99, 2)})
                    print(rows[-1], flush=True)
            ids = torch.randint(1000, 30000, (256, 64), device=device)
            with torch.inference_mode():
                p50, _ = timed(lambda: m(input_ids=ids, attention_mask=torch.ones_like(ids)))
            rows.append({"what": "embed catalog", "layers": layers, "dtype": str(dtype).split(".")[-1], "seq": 64,
                         "batch": 256, "items_per_s": round(256 / (p50 / 1e3)), "p50_ms": round(p50, 2)})
            print(rows[-1], flush=True)
    result = {"benchmark": "model compute on GPU (torch, no Triton)", "gpu": torch.cuda.get_device_name(0),
              "torch": torch.__version__, "python": platform.python_version(),
              "date": time.strftime("%Y-%m-%d"), "rows": rows}
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
