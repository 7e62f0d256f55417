"""Recommend without a query: latency with the ranker applied (encoder + ranker calls) against
ranker_mode auto with the demo's untrained ranker (no verdict: neither the ranker nor the encoder
is called) and against mode auto with a learned fusion (`recsys train fusion` on the same shop), through
the real gateway process and a real tritonserver on CPU.

    .venv/bin/python -m bench.no_query_latency [--size small] [--seconds 20]

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


def learned_fusion_file(repo: Path, models: Path, workdir: Path) -> Path:
    """A learned fusion fitted on the bench's shop (`recsys train fusion` with the served interest
    model), written whatever its gate says: this bench measures what serving one costs."""
    from cli.fusion_learning import served_interest_model, train_fusion

    out = workdir / "learned_fusion.json"
    log("recsys train fusion on the bench's shop (written whatever the gate says: the cost is measured)")
    train_fusion(repo, out, interest_model=served_interest_model(models), margin=-1e9)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="small")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--users", type=int, default=500)
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
        for name, mode in {**MODES, LEARNED: "auto"}.items():
            gw = GatewayProcess(repo, triton.grpc_url, 20, env, workdir, "feature_store.yaml", name=f"{mode}{len(rows)}")
            gw.env.update({"RECSYS_RANKER_MODE": mode, "RECSYS_EMBEDDING_CACHE_SIZE": "0"})
            if name == LEARNED:
                gw.env["RECSYS_LEARNED_FUSION"] = str(fusion)
            with gw:
                r = run_gateway(f"127.0.0.1:{gw.port}", requests, 1, args.seconds)
            rows.append((name, r))
            log(f"  {name}: p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, {r['rps']} rps")
    print("\n| no query, 1 client | p50 ms | p99 ms | rps | scored by the learned fusion | stage p50s (ms) |\n"
          "|---|---|---|---|---|---|")
    for name, r in rows:
        stages = ", ".join(f"{k} {v}" for k, v in sorted((r.get("stage_p50_ms") or {}).items()))
        print(f"| {name} | {r['p50_ms']} | {r['p99_ms']} | {r['rps']} | {r.get('learned_fusion_share', 0):.0%} | {stages} |")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
