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
