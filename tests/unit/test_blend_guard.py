"""The gateway's guard on the online learner's weights and on the parts it reports."""

from __future__ import annotations

import math

import numpy as np
import pytest

from contract.scores import BLEND_MAX_WEIGHT_SHIFT, PART_BOUNDS, PART_NAMES
from gateway.blend_guard import clip_parts, weights_problem

PRIOR = np.array([1.0, 1.0, 0.3, 0.2])


def test_sane_weights_pass() -> None:
    assert weights_problem([1.2, 0.8, 0.5, 0.1], [0.01] * 4, PRIOR) is None
    assert weights_problem(PRIOR + BLEND_MAX_WEIGHT_SHIFT, [0.0] * 4, PRIOR) is None  # the box edge


@pytest.mark.parametrize("mean, variance, why", [
    ([1.0, 1.0, 0.3], [0.0] * 3, "expected 4"),
    ([1.0, math.nan, 0.3, 0.2], [0.0] * 4, "not finite"),
    ([1.0, 1.0, 0.3, math.inf], [0.0] * 4, "not finite"),
    ([1.0, 1.0, 0.3, 0.2], [0.0, 0.0, math.inf, 0.0], "not finite"),
    ([1.0, 1.0, 0.3, 1e40], [0.0] * 4, "weight freshness"),
    ([1.0, -1.5, 0.3, 0.2], [0.0] * 4, "weight personalization"),
    ([1.0, 1.0, 0.3, 0.2], [0.0, -1e-3, 0.0, 0.0], "variances"),
    ([1.0, 1.0, 0.3, 0.2], [0.0, 0.0, 0.0, 100.0], "variances"),
])
def test_broken_or_hostile_weights_are_refused(mean, variance, why) -> None:
    problem = weights_problem(mean, variance, PRIOR)
    assert problem is not None and why in problem


def test_parts_are_clipped_into_the_bounds_the_learner_accepts() -> None:
    inside = [1.5, 0.5, 0.8, 0.3]
    assert clip_parts(inside) == (inside, False)
    clipped, moved = clip_parts([3e38, -1.0, math.inf, math.nan])
    assert moved
    assert clipped == [PART_BOUNDS["relevance"][1], PART_BOUNDS["personalization"][0],
                       PART_BOUNDS["popularity"][1], PART_BOUNDS["freshness"][0]]
    assert all(PART_BOUNDS[n][0] <= v <= PART_BOUNDS[n][1] for n, v in zip(PART_NAMES, clipped))


def test_the_gateway_keeps_its_last_good_weights_when_the_learner_sends_bad_ones() -> None:
    import asyncio

    from gateway.config import GatewaySettings
    from gateway.online_blend import OnlineBlend
    from recsys.v1 import feedback_pb2

    class FakeLearner:
        def __init__(self) -> None:
            self.replies: list[feedback_pb2.BlendWeights] = []

        async def get_blend_weights(self, timeout_s: float) -> feedback_pb2.BlendWeights:
            return self.replies.pop(0)

        async def close(self) -> None:
            pass

    async def run() -> None:
        blend = OnlineBlend(GatewaySettings(feedback_url="127.0.0.1:1"), seed=0)
        await blend.feedback.close()
        learner = blend.feedback = FakeLearner()  # type: ignore[assignment]
        good = feedback_pb2.BlendWeights(part_names=list(PART_NAMES), mean=[1.1, 0.9, 0.4, 0.25],
                                         variance=[0.01] * 4, version=3, labelled=640)
        bad = feedback_pb2.BlendWeights(part_names=list(PART_NAMES), mean=[1.0, 1.0, 0.3, 1e30],
                                        variance=[0.01] * 4, version=4, labelled=700)
        learner.replies = [good, bad]
        assert await blend.poll() and blend.version == 3 and blend.weights_ok
        assert not await blend.poll()
        assert blend.version == 3 and not blend.weights_ok
        np.testing.assert_allclose(blend.mean, [1.1, 0.9, 0.4, 0.25], rtol=1e-6)
        w, label = blend.weights_for("u1")
        assert np.isfinite(w).all() and label == "online-v3"
        # Reported parts are clipped: one runaway ranker score cannot get a batch refused.
        blend.record("r1", [("i1", [3e38, 0.5, 0.2, 0.1])])
        assert blend.queue[-1].items[0].parts[0] == PART_BOUNDS["relevance"][1]

    asyncio.run(run())
