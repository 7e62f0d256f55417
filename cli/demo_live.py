"""Demo step: the models served by a real Triton, the gateway in front, and a shopper whose results
change after a few clicks (live session features pushed through Feast).

Serves what `recsys train all` exported into `triton_models/` (and its learned fusion, when kept): starts
tritonserver and the gateway (which embeds the catalog through Triton and builds its index), then plays a short script
over real gRPC: a search, three clicks on one brand sent to the feedback service (durable log +
live session features), the same search again. Then (step 10) simulated shoppers use the live system
through a taste shift, and the online-learned blend weights win back the click-through rate.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
from rich.console import Console

from cli.background import BackgroundFeedback, BackgroundGateway
from cli.tables import response_table
from rpc.clients import FeedbackClient, RecommendClient
from gateway.config import GatewaySettings
from feedback.server import FeedbackSettings
from recsys.v1 import feedback_pb2 as fb
from contract.tensors import RANKER_ONNX
from modelrepo.layout import MODEL_REPOSITORY, versions
from localtriton.launcher import TritonServer
from modelrepo.publish import publish_encoder

if TYPE_CHECKING:
    from cli.train_all import Trained

QUERY = "running shoes"
DEMO_KEYS = {"shop": ("recommend", "events"), "gateway": ("internal",)}  # name -> roles


def demo_keys(keys_file: Path) -> dict[str, str]:
    """The demo's raw keys (name -> key), from demo.keys next to `keys_file`; keys missing from either
    file are made and their hashed lines appended to `keys_file` (both files owner-only, 0600)."""
    import os

    from cli.app import append_key
    from rpc.auth import hash_key, new_key, parse_keys

    raw_file = keys_file.parent / "demo.keys"
    raw: dict[str, str] = {}
    if raw_file.exists():
        for line in raw_file.read_text().splitlines():
            if len(line.split()) == 2:
                name, key = line.split()
                raw[name] = key
    known = parse_keys(keys_file.read_text(), str(keys_file)) if keys_file.exists() else {}
    for name, roles in DEMO_KEYS.items():
        if name in raw and hash_key(raw[name]) in known:
            continue
        raw[name] = new_key()
        append_key(keys_file, name, list(roles), raw[name])
    fd = os.open(raw_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("# the demo's own raw API keys (their hashes are in keys); keep this file private\n")
        f.writelines(f"{name} {key}\n" for name, key in raw.items())
    return raw


def live_demo(trained: "Trained", repo: Path, console: Console, shop_dir: Path | None = None) -> None:
    """Serve what `recsys train all` kept (its exported versions, its learned fusion) from Triton and
    the gateway, and play the script."""
    from cli.app import AUTH_KEYS_FILE

    keys = demo_keys(AUTH_KEYS_FILE)
    console.print(f"auth on: API keys in {AUTH_KEYS_FILE} (hashed; the services re-read it on change), the demo's "
                  f"raw keys in {AUTH_KEYS_FILE.parent / 'demo.keys'}: 'shop' (recommend, events), 'gateway' (internal)")
    encoder_v = trained.exported["encoder"]
    ranker_v = versions(MODEL_REPOSITORY, RANKER_ONNX.name)[-1]
    fusion = trained.fusion
    console.rule("9. Triton + the gateway: a shopper's results change after a few clicks")
    with TritonServer() as triton:
        publish_encoder(triton.grpc_url, MODEL_REPOSITORY, encoder_v)
        console.print(f"Triton ready on {triton.grpc_url} (encoder v{encoder_v}, ranker v{ranker_v})")
        # Simulated shoppers click at once: a short click window labels their impressions quickly.
        events_dir = repo / "data" / "events"
        (events_dir / "blend_weights.json").unlink(missing_ok=True)  # each demo starts from the configured weights
        feedback_settings = FeedbackSettings(port=0, event_log_dir=events_dir, feature_repo=repo, label_delay_s=1.0,
                                             learner_min_batch=32, auth_keys_file=AUTH_KEYS_FILE)
        with BackgroundFeedback(feedback_settings) as fb_service:
            console.print(f"feedback service on {fb_service.address} (event log: {feedback_settings.event_log_dir})")
            # Half the shoppers get the online-learned blend weights, half the configured ones.
            settings = GatewaySettings(port=0, feature_repo=repo, triton_url=triton.grpc_url, request_timeout_ms=2000,
                                       embed_timeout_ms=1000, interest_timeout_ms=1000, next_item_timeout_ms=1000,
                                       rank_timeout_ms=1500,
                                       feedback_url=fb_service.address, feedback_api_key=keys["gateway"],
                                       auth_keys_file=AUTH_KEYS_FILE, learned_fusion=fusion,
                                       online_weights_holdout=0.5, online_weights_poll_s=0.5)
            t0 = time.perf_counter()
            with console.status("starting the gateway: embedding the catalog through Triton (cached for next time)"):
                gateway = BackgroundGateway(settings).start(ready_timeout_s=1800)
            try:
                console.print(f"gateway SERVING on {gateway.address} after {time.perf_counter() - t0:.0f}s; call it "
                              f"with the shop's key: RECSYS_API_KEY=$(awk '$1==\"shop\"{{print $2}}' "
                              f"{AUTH_KEYS_FILE.parent / 'demo.keys'}) recsys query 'rain jacket' --address {gateway.address}")
                with RecommendClient(gateway.address, timeout_s=10, api_key=keys["shop"]) as client, \
                        FeedbackClient(fb_service.address, timeout_s=10, api_key=keys["shop"]) as feedback:
                    play_script(client, feedback, repo, console)
                if shop_dir is not None:
                    simulate_loop(shop_dir, gateway.address, fb_service.address, console, keys)
            finally:
                gateway.stop()


def simulate_loop(shop_dir: Path, gateway: str, feedback: str, console: Console,
                  keys: dict[str, str] | None = None) -> None:
    """Synthetic shoppers on the live system; tastes shift; the online arm's CTR recovers (plot)."""
    from cli.app import run_simulation
    from cli.simulate import SimConfig, SimulatedShop

    console.rule("10. the closed loop: simulated shoppers, a taste shift, online-learned blend weights")
    keys = keys or {}
    config = SimConfig(requests=480, shift_at=120, window=40, seed=0, api_key=keys.get("shop"),
                       weights_api_key=keys.get("gateway"))  # the learned weights: an internal key reads them
    console.print(f"{config.requests} requests from the shop's synthetic users (hidden tastes); at request "
                  f"{config.shift_at} they start chasing new arrivals and ignoring what is popular. Half of them "
                  "(by user id) are served the configured weights (holdout), half the weights the feedback "
                  "service learns from their clicks (online).")
    run_simulation(SimulatedShop.from_dir(shop_dir), gateway, feedback, config,
                   Path(shop_dir).resolve().parents[0] / "reports" / "simulation")


def play_script(client: RecommendClient, feedback: FeedbackClient, repo: Path, console: Console) -> None:
    items = pd.read_parquet(repo / "data" / "offline" / "item_features.parquet").set_index("item_id")
    titles = items["title"].to_dict()
    user, session = f"demo-shopper-{uuid.uuid4().hex[:6]}", "demo-session"

    console.print(response_table(client.recommend("nike running shoes under 150", num_results=5), titles,
                                 title="a cold-start shopper: 'nike running shoes under 150'"))
    before = client.recommend(QUERY, user_id=user, session_id=session, num_results=8)
    console.print(response_table(before, titles, title=f"{user}: {QUERY!r} (before any click)"))

    shown = items.loc[[i.item_id for i in before.items]]
    shoes = items[items["category"] == "Running Shoes"]
    brand = min(shoes["brand"].unique(), key=lambda b: ((shown["brand"] == b).sum(), -(shoes["brand"] == b).sum()))
    clicked = shoes[shoes["brand"] == brand].index[:3].tolist()
    events = [fb.Event(event_id=f"{user}-click-{n}", type=fb.EVENT_TYPE_CLICK, user_id=user, session_id=session,
                       item_id=item_id, request_id=before.request_id, position=n + 1) for n, item_id in enumerate(clicked)]
    t0 = time.perf_counter()
    reply = feedback.log(events)
    console.print(f"the shopper clicks 3 {brand} shoes ({', '.join(clicked)}); the feedback service stored "
                  f"{reply.accepted} events (fsync'd) and updated the live session in "
                  f"{(time.perf_counter() - t0) * 1e3:.0f} ms")

    after = client.recommend(QUERY, user_id=user, session_id=session, num_results=8)
    console.print(response_table(after, titles, title=f"{user}: {QUERY!r} (right after the clicks)"))
    share = lambda r: sum(items.at[i.item_id, "brand"] == brand for i in r.items)  # noqa: E731
    console.print(f"{brand} items in the top 8: {share(before)} before, [bold]{share(after)}[/] after")
