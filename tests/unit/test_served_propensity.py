"""The logging policy's record in LogServed: the gateway sends each item's position and the
log-density of the blend weights it drew; feedback validates both, refusing a bad one naming it."""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest

from contract.scores import PART_NAMES, SERVED_MAX_ABS_LOG_DENSITY
from feedback.served import ServedError, parse_served
from gateway.config import GatewaySettings
from gateway.online_blend import MIN_RELEVANCE_WEIGHT, OnlineBlend, WeightDraw, draw_log_density
from recsys.v1 import feedback_pb2 as fb


def served(n: int = 3, positions=None, **policy) -> fb.ServedList:
    pos = positions or [0] * n
    return fb.ServedList(request_id="r1", items=[fb.ServedItem(item_id=f"i{k}", parts=[0.5, 0.5, 0.25, 0.0],
                                                               position=pos[k]) for k in range(n)], **policy)


def test_positions_and_the_draws_log_density_come_through():
    got = parse_served(fb.LogServedRequest(lists=[
        served(positions=[1, 2, 3], weights_sampled=True, weights_log_density=-3.5, weights=[1, 1, 0.3, 0.2]),
        served()]))
    assert got[0].positions.tolist() == [1, 2, 3] and got[0].weights_log_density == -3.5
    assert got[1].positions is None and got[1].weights_log_density is None  # unset: list order, fixed weights


@pytest.mark.parametrize("policy,positions,field,message", [
    ({}, [1, 2, 201], "lists[0].items[2].position", "must be 0 (unset) or 1-200, got 201"),
    ({}, [1, -1, 3], "lists[0].items[1].position", "got -1"),
    ({"weights_sampled": True, "weights_log_density": float("nan")}, None, "lists[0].weights_log_density", "finite"),
    ({"weights_sampled": True, "weights_log_density": float("inf")}, None, "lists[0].weights_log_density", "finite"),
    ({"weights_sampled": True, "weights_log_density": 1e4}, None, "lists[0].weights_log_density", "+-1000"),
    ({"weights_log_density": -2.0}, None, "lists[0].weights_log_density", "weights_sampled is false"),
    ({"weights": [1.0, 1.0]}, None, "lists[0].weights", "empty or 4 numbers"),
    ({"weights": [1.0, 1.0, float("nan"), 0.2]}, None, "lists[0].weights[2]", "popularity must be a finite number"),
    ({"weights": [1.0, 1e6, 0.3, 0.2]}, None, "lists[0].weights[1]", "within +-100"),
], ids=lambda v: str(v)[:40])
def test_a_bad_policy_field_refuses_the_call_naming_it(policy, positions, field, message):
    with pytest.raises(ServedError) as err:
        parse_served(fb.LogServedRequest(lists=[served(positions=positions, **policy)]))
    assert err.value.field == field and message in str(err.value)


def test_the_log_density_is_the_diagonal_gaussians():
    mean, std = np.array([1.0, 1.0, 0.3, 0.2]), np.array([0.1, 0.2, 0.0, 0.05])
    w = np.array([1.1, 0.8, 0.3, 0.2])
    expect = sum(-0.5 * z * z - math.log(s) - 0.5 * math.log(2 * math.pi)
                 for z, s in [(1.0, 0.1), (-1.0, 0.2), (0.0, 0.05)])  # std 0: deterministic, no term
    assert draw_log_density(w, mean, std, MIN_RELEVANCE_WEIGHT) == pytest.approx(expect)
    # relevance clamped at its floor: the probability of a draw at or below it, a point mass
    clamped = np.array([MIN_RELEVANCE_WEIGHT, 1.0, 0.3, 0.2])
    z0 = (MIN_RELEVANCE_WEIGHT - 1.0) / 0.1
    expect0 = math.log(0.5 * math.erfc(-z0 / math.sqrt(2))) - math.log(0.2) - 0.5 * math.log(2 * math.pi) \
        - math.log(0.05) - 0.5 * math.log(2 * math.pi)
    assert draw_log_density(clamped, mean, std, MIN_RELEVANCE_WEIGHT) == pytest.approx(expect0, rel=1e-6)
    assert draw_log_density(mean, mean, np.full(4, 1e-200), 0.0) == SERVED_MAX_ABS_LOG_DENSITY  # clamped
    assert draw_log_density(w, mean, np.full(4, 1e-200), 0.0) == -SERVED_MAX_ABS_LOG_DENSITY


def test_the_gateway_logs_positions_and_its_draw():
    async def run() -> None:
        blend = OnlineBlend(GatewaySettings(feedback_url="127.0.0.1:1", online_weights_holdout=0.0), seed=0)
        await blend.feedback.close()
        blend.mean, blend.std = np.array([1.0, 1.0, 0.3, 0.2], np.float32), np.full(4, 0.1, np.float32)
        draw = blend.draw("u1")
        assert draw.sampled and draw.log_density == pytest.approx(
            draw_log_density(draw.weights, blend.mean, blend.std, MIN_RELEVANCE_WEIGHT))
        blend.record("r1", [("a", [0.5, 0.5, 0.2, 0.1]), ("b", [0.4, 0.5, 0.2, 0.1])], draw=draw)
        sent = blend.queue[-1]
        assert [i.position for i in sent.items] == [1, 2] and sent.weights_sampled
        np.testing.assert_allclose(sent.weights, draw.weights)
        got = parse_served(fb.LogServedRequest(lists=[sent]))[0]  # what the gateway sends, feedback accepts
        assert got.positions.tolist() == [1, 2] and got.weights_log_density == pytest.approx(draw.log_density)
        blend.explore = False
        fixed = blend.draw("u1")
        assert not fixed.sampled and fixed.log_density == 0.0
        blend.record("r2", [("a", [0.5, 0.5, 0.2, 0.1])], draw=fixed)
        assert parse_served(fb.LogServedRequest(lists=[blend.queue[-1]]))[0].weights_log_density is None

    asyncio.run(run())


def test_the_holdout_arm_is_fixed_weights():
    async def run() -> None:
        blend = OnlineBlend(GatewaySettings(feedback_url="127.0.0.1:1", online_weights_holdout=1.0), seed=0)
        await blend.feedback.close()
        draw = blend.draw("u1")
        assert draw == WeightDraw(blend.prior, "holdout", sampled=False) and len(PART_NAMES) == draw.weights.size

    asyncio.run(run())
