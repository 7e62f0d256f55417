"""Online learning between retrains, end to end: simulated shoppers with hidden tastes use the real
gateway (real Triton, real Feast), their feedback goes to the real feedback service, whose learner
re-weights the final score; after a taste shift the online arm's CTR recovers, the holdout's does not."""

from __future__ import annotations

import shutil

import grpc
import pandas as pd
import pytest

from cli.background import BackgroundFeedback, BackgroundGateway
from gateway.config import GatewaySettings
from feedback.server import FeedbackSettings
from recsys.v1 import feedback_pb2, feedback_pb2_grpc
from cli.app import run_simulation
from cli.simulate import SimConfig, SimulatedShop
from rpc.clients import channel as authed_channel
from tests.keys import GATEWAY_KEY


def _gateway_settings(repo, triton, cache, **over) -> GatewaySettings:
    base = dict(port=0, feature_repo=repo, triton_url=triton.grpc_url, embedding_cache_dir=cache,
                request_timeout_ms=10_000, embed_timeout_ms=5_000, feature_timeout_ms=2_000,
                interest_timeout_ms=5_000, rank_timeout_ms=5_000)
    return GatewaySettings(**{**base, **over})


@pytest.fixture()
def private_repo(feature_repo, tmp_path):
    """A copy of the materialized feature repo: the simulation's sessions stay out of other tests' store."""
    return shutil.copytree(feature_repo.path, tmp_path / "repo")


def test_online_weights_recover_ctr_after_a_taste_shift(feature_repo, private_repo, triton_gw, tmp_path_factory,
                                                       tmp_path):
    fb_settings = FeedbackSettings(port=0, event_log_dir=tmp_path / "events", feature_repo=private_repo,
                                   label_delay_s=1.0, learner_min_batch=32)
    config = SimConfig(requests=480, shift_at=120, seed=3, window=40, weights_api_key=GATEWAY_KEY)
    with BackgroundFeedback(fb_settings) as feedback:
        settings = _gateway_settings(private_repo, triton_gw, tmp_path_factory.getbasetemp() / "embeddings",
                                     feedback_url=feedback.address, online_weights_holdout=0.5,
                                     online_weights_poll_s=0.2)
        with BackgroundGateway(settings) as gateway:
            result = run_simulation(SimulatedShop.from_shop(feature_repo.shop), gateway.address, feedback.address,
                                    config, tmp_path / "report")
    summary = result.summary().set_index("arm")
    print(summary.T.to_string())
    print(result.weights.to_string())
    assert result.failed == 0
    assert set(summary.index) == {"online", "holdout"}
    assert summary["requests"].min() > 150  # both arms got their share
    # After the shift the learned weights win. The holdout arm is the same in every run (fixed weights, fixed
    # seed); the online arm varies with Thompson sampling and the timing of updates. Six runs on 2026-12-02
    # (the holdout 0.111 after the shift, 0.122 in the last third): the online arm 1.21-1.42x (mean 1.33) the
    # holdout's CTR over all after-shift impressions (~1,400 per arm) and 1.29-1.59x (mean 1.45) in the last
    # third (~500 per arm). A single "last third > 1.3x" failed one CI run at 1.29x, so
    # the test asks for both a clear after-shift win, on the larger sample, and a last third still ahead.
    online, holdout = summary.loc["online"], summary.loc["holdout"]
    assert online["ctr after shift"] > 1.15 * holdout["ctr after shift"], summary.T
    assert online["ctr last third"] > 1.2 * holdout["ctr last third"], summary.T
    recovered = result.recovery_events("online")  # feedback events after the shift until back at its own pre-shift CTR
    assert recovered is not None and recovered < 2_500, recovered
    last = result.weights.iloc[-1]
    # New arrivals up, the crowd down. The final values wander with the sampled explorations (a CI run ended at
    # freshness 0.69 after peaking at 0.70), so the test asks for a clear move from the configured 0.2 / 0.3.
    assert last["freshness"] > 0.2 + 0.3 and last["popularity"] < 0.3 - 0.2, last
    assert last["labelled"] > 0.7 * config.requests * config.list_length  # impressions joined with what was served
    assert (tmp_path / "events" / "blend_weights.json").exists()
    assert (tmp_path / "report" / "simulation.png").stat().st_size > 10_000
    assert {"online", "holdout"} <= set(pd.read_csv(tmp_path / "report" / "windows.csv")["arm"])


def test_gateway_answers_with_the_feedback_service_down(feature_repo, triton_gw, tmp_path_factory):
    from rpc.clients import GatewayClient
    from scripts.local_redis import free_port

    settings = _gateway_settings(feature_repo.path, triton_gw, tmp_path_factory.getbasetemp() / "embeddings",
                                 feedback_url=f"127.0.0.1:{free_port()}", online_weights_poll_s=0.1)
    with BackgroundGateway(settings) as gateway, GatewayClient(gateway.address, timeout_s=30) as client:
        for _ in range(3):
            reply = client.recommend("running shoes", user_id="u00001", num_results=5)
            assert len(reply.items) == 5 and not reply.degraded
            assert reply.model_versions["blend"] == "online-v0"  # the configured weights: nothing learned yet
        blend = gateway.gateway.blend
        assert blend.version == 0 and list(blend.mean) == pytest.approx([1.0, 1.0, 0.3, 0.2])


def test_log_served_and_weights_over_grpc(tmp_path):
    with BackgroundFeedback(FeedbackSettings(port=0, event_log_dir=tmp_path / "on")) as on, \
            BackgroundFeedback(FeedbackSettings(port=0, event_log_dir=tmp_path / "off", online_learning=False)) as off:
        stub = feedback_pb2_grpc.FeedbackServiceStub(authed_channel(on.address, api_key=GATEWAY_KEY))
        good = feedback_pb2.ServedList(request_id="r1", items=[feedback_pb2.ServedItem(item_id="a", parts=[1, 0, 0, 0])])
        bad = feedback_pb2.ServedList(request_id="r2", items=[feedback_pb2.ServedItem(item_id="a", parts=[1, 0])])
        assert stub.LogServed(feedback_pb2.LogServedRequest(lists=[good, bad]), timeout=5).accepted == 1
        with pytest.raises(grpc.RpcError) as e:
            stub.LogServed(feedback_pb2.LogServedRequest(), timeout=5)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "lists" in e.value.details()
        weights = stub.GetBlendWeights(feedback_pb2.GetBlendWeightsRequest(), timeout=5)
        assert list(weights.part_names) == ["relevance", "personalization", "popularity", "freshness"]
        assert list(weights.mean) == pytest.approx([1.0, 1.0, 0.3, 0.2]) and weights.version == 0

        stub_off = feedback_pb2_grpc.FeedbackServiceStub(authed_channel(off.address, api_key=GATEWAY_KEY))
        with pytest.raises(grpc.RpcError) as e:
            stub_off.GetBlendWeights(feedback_pb2.GetBlendWeightsRequest(), timeout=5)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "online learning is off" in e.value.details()

