"""The served path on the real-data benchmark: the gateway itself answers every test user.

The whole stack as deployed, nothing re-implemented: the history (training + validation purchases
of the benchmark's customers; never a test purchase) is imported into a private feature repo with
the project's importer, `feast apply` + `feast materialize`, the zero-shot encoder (int8, the CPU
serving default), the untrained ranker (what a fresh install serves) and the interest model the
bench's `recsys train interest` recipe keeps (none when no candidate beats the fallback) exported into a private Triton repository served by a real tritonserver, and the
gateway as its own process (`python -m gateway`, default settings). Then one Recommend per test
user, no query, 50 results, one request at a time (no load: the answer, not the latency, is measured),
scored by where the test purchase lands in the list.

Each customer's history is shifted in time so that its last purchase is two minutes before the
import: the online features are then fresh for every customer, as they are for a shop that serves
while it logs (the shift keeps the order and the spacing of a customer's own purchases).
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from contextlib import ExitStack
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from scorer.eval.next_item import KS, Split, metrics_from_ranks, ordered_interactions, topk_ranks

NUM_RESULTS = 50


def history_events(events: pd.DataFrame, split: Split) -> pd.DataFrame:
    """The benchmark customers' purchase lines without their test purchase (the trailing run of the
    test item, which the split collapsed into one interaction); checked against the split."""
    test_item = dict(zip(split.test["user_id"], split.test["item_id"]))
    ev = events[events["user_id"].isin(test_item.keys())].copy()
    ev["_row"] = np.arange(len(ev))
    ev = ev.sort_values(["user_id", "timestamp", "_row"]).reset_index(drop=True)
    other = (ev["item_id"] != ev["user_id"].map(test_item)).astype(int)
    # Rows after which no other item follows within the customer: the test item's trailing run.
    after = other[::-1].groupby(ev["user_id"][::-1]).cumsum()[::-1]
    hist = ev[after > 0].drop(columns="_row").reset_index(drop=True)
    got = ordered_interactions(hist).groupby("user_id", sort=False)["item_id"].agg(list)
    want = split.test.set_index("user_id")["history"]
    if not got.reindex(want.index).equals(want):
        raise AssertionError("the imported history does not match the split's test histories")
    return hist


def shift_to_now(events: pd.DataFrame, now: pd.Timestamp, gap: pd.Timedelta = pd.Timedelta(minutes=2)) -> pd.DataFrame:
    """Each customer's events moved forward so the last one is `gap` before `now`."""
    last = events.groupby("user_id")["timestamp"].transform("max")
    return events.assign(timestamp=events["timestamp"] + ((now - gap) - last))


def import_history(generic: Path, split: Split, workdir: Path, log) -> Path:
    from scorer.data import feast_ops
    from scorer.data.importer import import_dataset

    now = pd.Timestamp(datetime.now(timezone.utc))
    raw = workdir / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    events = shift_to_now(history_events(pd.read_parquet(generic / "events.parquet"), split), now)
    events.to_parquet(raw / "events.parquet", index=False)
    users = pd.read_parquet(generic / "users.parquet")
    users[users["user_id"].isin(split.test["user_id"])].to_parquet(raw / "users.parquet", index=False)
    pd.read_parquet(generic / "items.parquet").to_parquet(raw / "items.parquet", index=False)
    repo = feast_ops.copy_feature_repo(workdir / "feature_repo")
    log(f"importing {len(events):,} history purchase lines (shifted to end {now:%H:%M} UTC)")
    import_dataset(raw, repo / "data" / "offline")
    log("feast apply + materialize")
    feast_ops.apply(repo, quiet=True)
    feast_ops.materialize_all(repo, quiet=True)
    return repo


def export_models(workdir: Path, interest_model, ranker=None, ranker_validation: dict | None = None) -> Path:
    """ranker: a fine-tuned CrossEncoderRanker to serve (default: the untrained one), with its
    validation record (`beats_blend`) beside it."""
    from transformers.utils import logging as hf_logging

    from modelrepo.layout import copy_repository_configs
    from scorer.export.encoder_export import export_encoder
    from scorer.export.interest_export import export_interest
    from scorer.export.ranker_export import export_ranker
    from scorer.models.encoder import TextEncoder

    hf_logging.disable_progress_bar()
    repo = copy_repository_configs(workdir / "models")
    export_encoder(repo, TextEncoder(), int8=True)
    export_ranker(repo, ranker, int8=True, validation=ranker_validation)
    if interest_model is not None:  # else nothing beat the fallback: the gateway computes it itself
        export_interest(repo, interest_model)
    return repo


async def recommend_all(address: str, users: list[str], on_done) -> tuple[list[list[str]], int, int]:
    """One Recommend per user, in order; (item lists, degraded answers, errors)."""
    import grpc

    from recsys.v1 import recommend_pb2, recommend_pb2_grpc
    from rpc.clients import aio_channel

    lists, degraded, errors = [], 0, 0
    async with aio_channel(address) as channel:
        stub = recommend_pb2_grpc.RecommendServiceStub(channel)
        for user in users:
            try:
                r = await stub.Recommend(recommend_pb2.RecommendRequest(user_id=user, num_results=NUM_RESULTS), timeout=10)
                lists.append([i.item_id for i in r.items])
                degraded += int(r.degraded)
            except grpc.RpcError:
                lists.append([])
                errors += 1
            on_done()
    return lists, degraded, errors


def measure_served_path(generic: Path, split: Split, interest_model, log, progress,
                        variants: dict[str, dict[str, str]] | None = None, repo: Path | None = None,
                        ranker=None, ranker_validation: dict | None = None,
                        learned_fusion: str = "", next_item_seconds: float = 0.0,
                        next_item_refit: bool = False,
                        fusion_interest_model=None) -> dict[str, tuple[dict[str, float], str]]:
    """Metrics of the gateway's answers for every test user, and a note (settings, degraded share),
    per variant: label -> the gateway's environment overrides ({"": {}} : its defaults only;
    RECSYS_RERANK_DEPTH there sets the variant's depth). One import (none when `repo` is a feature
    repo `import_history` already wrote), one Triton serving `ranker` (default: the untrained one);
    a fresh gateway process per variant, one after the other. With `learned_fusion` (a label),
    `recsys train fusion` runs on the imported history (its own leave-one-out: never a test purchase)
    and, when its gate keeps the model, one more variant serves it (RECSYS_LEARNED_FUSION). With
    `next_item_seconds`, `recsys train next-item` runs on the imported history first (that budget) and
    exports what its gate keeps into the served repository: every variant then has the next-item
    source, and the learned fusion is fitted with it (`next_item_refit`: the model served is the
    refit on every interaction, the fusion fitted on its judged graph, as `recsys train next-item
    --refit` leaves them). `fusion_interest_model`: the interest model the fusion is fitted with
    (default: the served one), exported into a repository of its own: one that has not seen the
    fusion's validation targets (bench/real_data_bench.py judged_interest_model)."""
    from bench.common import auth_on
    from bench.gateway_bench import GatewayProcess
    from gateway.config import GatewaySettings
    from localtriton.launcher import TritonServer

    auth_on()
    variants = variants or {"": {}}
    default_depth = GatewaySettings.model_fields["rerank_depth"].default
    out: dict[str, tuple[dict[str, float], str]] = {}
    with tempfile.TemporaryDirectory(prefix="real_data_served_") as tmp, ExitStack() as stack:
        workdir = Path(tmp)
        repo = repo or import_history(generic, split, workdir, log)
        log(f"exporting the encoder (int8), the {'fine-tuned' if ranker is not None else 'untrained'} ranker (int8) and "
            + ("the trained interest model" if interest_model is not None else "no interest model (the gateway's fallback)"))
        models = export_models(workdir, interest_model, ranker, ranker_validation)
        served_models = "interest model " + ("trained" if interest_model is not None else "none (the formula)")
        if next_item_seconds:
            from rich.console import Console

            from cli.next_item_training import run as train_next_item

            log(f"recsys train next-item on the imported history ({next_item_seconds:.0f} s budget)")
            kept = train_next_item(repo, models, workdir / "next_item_report", next_item_seconds, 200, 0, 0.0,
                                   Console(stderr=True), refit=next_item_refit)
            log(f"next-item model: {'v' + str(kept) + ' exported' if kept else 'not kept by its gate (no such source)'}")
            how = "`recsys train next-item --refit`" if next_item_refit else "`recsys train next-item`"
            served_models += ", next-item model " + (f"served ({how} on the history)" if kept
                                                     else "not kept by its gate")
        if learned_fusion:
            from cli.fusion_learning import served_interest_model, served_next_item_model, train_fusion

            log("recsys train fusion on the imported history (validation users of the history's own split)")
            model_file = workdir / "learned_fusion.json"
            fit_with = models
            if fusion_interest_model is not None:
                from modelrepo.layout import copy_repository_configs
                from scorer.export.interest_export import export_interest

                fit_with = copy_repository_configs(workdir / "fusion_models")
                export_interest(fit_with, fusion_interest_model)
            fit = train_fusion(repo, model_file, max_users=10**6, interest_model=served_interest_model(fit_with),
                               next_item_model=served_next_item_model(models))
            if fit.keeps:
                variants = {**variants, learned_fusion: {"RECSYS_LEARNED_FUSION": str(model_file)}}
            else:
                log(f"the learned fusion was not kept by its gate: no '{learned_fusion}' row")
        log("starting tritonserver and the gateway (it embeds the catalog through Triton)")
        triton = stack.enter_context(TritonServer(model_repository=models, workdir=workdir / "triton"))
        users = split.test["user_id"].tolist()
        for n, (label, env) in enumerate(variants.items()):
            t0 = time.perf_counter()
            depth = int(env.get("RECSYS_RERANK_DEPTH", default_depth))
            # The served path is measured as deployed: the default ranker mode (auto, in which the
            # untrained ranker is not applied), not GatewayProcess's "always" of the load bench.
            # Before, the untrained ranker re-sorted the head.
            mode = env.get("RECSYS_RANKER_MODE", GatewaySettings.model_fields["ranker_mode"].default)
            gw = GatewayProcess(repo, triton.grpc_url, depth, {**env, "RECSYS_RANKER_MODE": mode}, workdir,
                                "feature_store.yaml", name=f"bench{n}")
            with gw:
                task = progress.add_task(f"served path{' (' + label + ')' if label else ''}: Recommend per test user",
                                         total=len(users))
                lists, degraded, errors = asyncio.run(recommend_all(f"127.0.0.1:{gw.port}", users,
                                                                    lambda: progress.advance(task)))
            ranks = topk_ranks(lists, split.test["item_id"].tolist())
            settings = ", ".join(f"{k.removeprefix('RECSYS_').lower()}={Path(v).name if k == 'RECSYS_LEARNED_FUSION' else v}"
                                 for k, v in env.items()) or "gateway defaults"
            note = (f"{settings} (ranker mode {gw.env['RECSYS_RANKER_MODE']}, rerank depth {depth}), no query, {NUM_RESULTS} results; "
                    f"{degraded} degraded, {errors} errors; {served_models}; {time.perf_counter() - t0:.0f} s")
            out[label] = (metrics_from_ranks(ranks, KS), note)
    return out
