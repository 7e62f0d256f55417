"""Demo step: the models served by a real Triton, the gateway in front, and a shopper whose results
change after a few clicks (live session features pushed through Feast).

Exports the fine-tuned encoder, the ranker and the interest model into `triton_models/`, starts tritonserver and the
gateway (which embeds the catalog through Triton and builds its index), then plays a short script
over real gRPC: a search, three clicks on one brand sent to the feedback service (durable log +
live session features), the same search again. Then (step 11) simulated shoppers use the live system
through a taste shift, and the online-learned blend weights win back the click-through rate.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pandas as pd
from rich.console import Console

from cli.background import BackgroundFeedback, BackgroundGateway
from cli.tables import response_table
from rpc.clients import FeedbackClient, RecommendClient
from gateway.config import GatewaySettings
from feedback.server import FeedbackSettings
from recsys.v1 import feedback_pb2 as fb
from scorer.export.encoder_export import export_encoder
from scorer.export.interest_export import export_interest
from scorer.export.ranker_export import export_ranker
from modelrepo.layout import MODEL_REPOSITORY
from scorer.models.encoder import EncoderConfig, TextEncoder
from scorer.models.interest import InterestModel
from localtriton.launcher import TritonServer
from modelrepo.publish import publish_encoder

QUERY = "running shoes"


def live_demo(checkpoint: Path, interest: Path, repo: Path, console: Console, shop_dir: Path | None = None) -> None:
    with console.status("exporting the fine-tuned encoder (int8), the ranker (1 layer, int8) and the interest model"):
        encoder_v = export_encoder(MODEL_REPOSITORY, TextEncoder(EncoderConfig(model_path=str(checkpoint))), int8=True)
        ranker_v = export_ranker(MODEL_REPOSITORY, int8=True)
        interest_v = export_interest(MODEL_REPOSITORY, InterestModel.load(interest))
    console.print(f"exported encoder v{encoder_v}, ranker v{ranker_v}, interest v{interest_v} into {MODEL_REPOSITORY}")
    with TritonServer() as triton:
        publish_encoder(triton.grpc_url, MODEL_REPOSITORY, encoder_v)
        console.print(f"Triton ready on {triton.grpc_url} (encoder v{encoder_v}, ranker v{ranker_v})")
        # Simulated shoppers click at once: a short click window labels their impressions quickly.
        events_dir = repo / "data" / "events"
        (events_dir / "blend_weights.json").unlink(missing_ok=True)  # each demo starts from the configured weights
        feedback_settings = FeedbackSettings(port=0, event_log_dir=events_dir, feature_repo=repo, label_delay_s=1.0,
                                             learner_min_batch=32)
        with BackgroundFeedback(feedback_settings) as fb_service:
            console.print(f"feedback service on {fb_service.address} (event log: {feedback_settings.event_log_dir})")
            # Half the shoppers get the online-learned blend weights, half the configured ones.
            settings = GatewaySettings(port=0, feature_repo=repo, triton_url=triton.grpc_url, request_timeout_ms=2000,
                                       embed_timeout_ms=1000, interest_timeout_ms=1000, rank_timeout_ms=1500,
                                       feedback_url=fb_service.address,
                                       online_weights_holdout=0.5, online_weights_poll_s=0.5)
            t0 = time.perf_counter()
            with console.status("starting the gateway: embedding the catalog through Triton (cached for next time)"):
                gateway = BackgroundGateway(settings).start(ready_timeout_s=1800)
            try:
                console.print(f"gateway SERVING on {gateway.address} after {time.perf_counter() - t0:.0f}s")
                with RecommendClient(gateway.address, timeout_s=10) as client, \
                        FeedbackClient(fb_service.address, timeout_s=10) as feedback:
                    play_script(client, feedback, repo, console)
                if shop_dir is not None:
                    simulate_loop(shop_dir, gateway.address, fb_service.address, console)
            finally:
                gateway.stop()


def simulate_loop(shop_dir: Path, gateway: str, feedback: str, console: Console) -> None:
    """Synthetic shoppers on the live system; tastes shift; the online arm's CTR recovers (plot)."""
    from cli.app import run_simulation
    from cli.simulate import SimConfig, SimulatedShop

    console.rule("11. the closed loop: simulated shoppers, a taste shift, online-learned blend weights")
    config = SimConfig(requests=480, shift_at=120, window=40, seed=0)
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
