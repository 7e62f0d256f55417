"""Recommend without a query: latency with the ranker applied (encoder + ranker calls) against
ranker_mode auto with the demo's untrained ranker (no verdict: neither the ranker nor the encoder
is called) and against mode auto with a learned fusion (`recsys train fusion` on the same shop), through
the real gateway process and a real tritonserver on CPU.

    .venv/bin/python -m bench.no_query_latency [--size small] [--seconds 20] [--next-item]

With `--next-item`, then also with a next-item model (`recsys train next-item` on the same shop,
exported whatever its gate says, loaded into the running Triton): ranker_mode auto with it as a
source, and with a learned fusion fitted with it (the `next_item` stage runs concurrently with
`interest`).

Requests: users of the shop with a history, no query, 20 results, 1 client in a closed loop; the
query-embedding cache is off (every request that embeds does call the encoder: the worst case,
since a user's context text repeats and would mostly be cached). Prints p50/p99 of the request
and of its `embed` / `rank` stages (x-recsys-stages-ms).
"""

from __future__ import annotations

import argparse
import tempfile
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from bench.common import auth_on
from bench.gateway_bench import GatewayProcess, build_feature_repo, build_models, log, run_gateway

MODES = {"ranker applied (ranker_mode always)": "always", "ranker_mode auto, untrained ranker (no verdict)": "auto"}


def users_with_history(repo: Path, n: int, seed: int = 0) -> list[tuple[str, str]]:
    import pandas as pd

    events = pd.read_parquet(repo / "data" / "offline" / "events.parquet", columns=["user_id", "event_type"])
    users = events.loc[events["event_type"].isin(["CLICK", "ADD_TO_CART", "PURCHASE"]), "user_id"].drop_duplicates()
    return [(u, "") for u in users.sample(min(n, len(users)), random_state=seed)]


LEARNED = "ranker_mode auto + the learned fusion (recsys train fusion)"


def learned_fusion_file(repo: Path, models: Path, workdir: Path, name: str = "learned_fusion.json") -> Path:
    """A learned fusion fitted on the bench's shop (`recsys train fusion` with the served interest
    model and next-item model, if any), written whatever its gate says: this bench measures what
    serving one costs."""
    from cli.fusion_learning import served_interest_model, served_next_item_model, train_fusion

    out = workdir / name
    log("recsys train fusion on the bench's shop (written whatever the gate says: the cost is measured)")
    train_fusion(repo, out, interest_model=served_interest_model(models), margin=-1e9,
                 next_item_model=served_next_item_model(models))
    return out


NEXT_ITEM = "ranker_mode auto + the next-item model as a source"
NEXT_ITEM_LEARNED = "ranker_mode auto + the next-item model + a learned fusion fitted with it"


def load_next_item_model(repo: Path, models: Path, workdir: Path, triton) -> None:
    """`recsys train next-item` on the bench's shop (60 s), exported whatever its gate says, and
    loaded into the running Triton."""
    from rich.console import Console

    from cli.next_item_training import run
    from modelrepo.admin import AdminClient

    log("recsys train next-item on the bench's shop (exported whatever the gate says: the cost is measured)")
    run(repo, models, workdir / "next_item_report", 60.0, 200, 0, -1e9, Console(stderr=True, quiet=True))
    admin = AdminClient(triton.grpc_url, triton.admin_key)
    try:
        admin.load_model("next_item_onnx")
    finally:
        admin.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="small")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--users", type=int, default=500)
    ap.add_argument("--next-item", action="store_true", help="also with a next-item model served as a source")
    args = ap.parse_args()
    auth_on()
    with tempfile.TemporaryDirectory(prefix="no_query_latency_") as tmp, ExitStack() as stack:
        workdir = Path(tmp)
        repo, env = build_feature_repo(workdir, args.size, "sqlite", stack)
        models = build_models(workdir)
        from localtriton.launcher import TritonServer

        log("starting tritonserver")
        triton = stack.enter_context(TritonServer(model_repository=models, workdir=workdir / "triton"))
        requests = users_with_history(repo, args.users)
        fusion = learned_fusion_file(repo, models, workdir)
        rows = []

        def measure(name: str, mode: str, fusion_file: Path | None) -> None:
            gw = GatewayProcess(repo, triton.grpc_url, 20, env, workdir, "feature_store.yaml", name=f"{mode}{len(rows)}")
            gw.env.update({"RECSYS_RANKER_MODE": mode, "RECSYS_EMBEDDING_CACHE_SIZE": "0"})
            if fusion_file is not None:
                gw.env["RECSYS_LEARNED_FUSION"] = str(fusion_file)
            with gw:
                r = run_gateway(f"127.0.0.1:{gw.port}", requests, 1, args.seconds)
            rows.append((name, r))
            log(f"  {name}: p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, {r['rps']} rps")

        for name, mode in MODES.items():
            measure(name, mode, None)
        measure(LEARNED, "auto", fusion)
        if args.next_item:
            load_next_item_model(repo, models, workdir, triton)
            measure(NEXT_ITEM, "auto", None)
            measure(NEXT_ITEM_LEARNED, "auto", learned_fusion_file(repo, models, workdir, "learned_fusion_next_item.json"))
    print("\n| no query, 1 client | p50 ms | p99 ms | rps | degraded | scored by the learned fusion | with the next-item list | stage p50s (ms) |\n"
          "|---|---|---|---|---|---|---|---|")
    for name, r in rows:
        stages = ", ".join(f"{k} {v}" for k, v in sorted((r.get("stage_p50_ms") or {}).items()))
        print(f"| {name} | {r['p50_ms']} | {r['p99_ms']} | {r['rps']} | {r.get('degraded_share', 0):.1%} | "
              f"{r.get('learned_fusion_share', 0):.0%} | {r.get('next_item_used_share', 0):.0%} | {stages} |")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
