"""LogServed limits: over a limit, with a bad id or a part out of bounds the call answers
INVALID_ARGUMENT naming the field; a list with malformed parts is dropped alone (the proto's contract)."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest

from gateway.config import GatewaySettings
from feedback.blend_learner import BlendLearner
from feedback.served import ServedError, ServedLimits, parse_served
from feedback.service import FeedbackServicer
from contract.scores import PART_BOUNDS, PART_NAMES
from recsys.v1 import feedback_pb2 as fb


def lst(rid: str = "r1", n: int = 3, item=lambda k: f"i{k}", parts=lambda k: [k % 50, 0.5, 0.25, 0.0]) -> fb.ServedList:
    return fb.ServedList(request_id=rid, items=[fb.ServedItem(item_id=item(k), parts=parts(k)) for k in range(n)])


def test_valid_lists_come_out_as_ids_and_float32_parts():
    got = parse_served(fb.LogServedRequest(lists=[lst("r1"), lst("r2", n=1)]))
    assert [p.request_id for p in got] == ["r1", "r2"] and got[0].item_ids == ["i0", "i1", "i2"]
    assert got[0].parts.dtype == np.float32 and got[0].parts.shape == (3, 4)
    np.testing.assert_array_equal(got[0].parts[:, 0], [0, 1, 2])


def test_the_item_limit_is_the_gateways_max_num_results():
    assert ServedLimits().max_items == GatewaySettings.model_fields["max_num_results"].default == 200
    parse_served(fb.LogServedRequest(lists=[lst(n=200)]))


@pytest.mark.parametrize("lists,field,message", [
    ([], "lists", "1-10000 lists per call, got 0"),
    ([lst(f"r{k}", n=1) for k in range(10_001)], "lists", "1-10000 lists per call, got 10001"),
    ([lst("r0"), lst("r1"), lst("r2"), lst("r3", n=5000)], "lists[3].items", "at most 200 items, got 5000"),
    ([lst(n=0)], "lists[0].items", "must not be empty"),
    ([lst("")], "lists[0].request_id", "is required"),
    ([lst("r" * 129)], "lists[0].request_id", "is not a valid id"),
    ([lst(), lst("bad id")], "lists[1].request_id", "is not a valid id"),
    ([lst(item=lambda k: "ok" if k < 2 else "bad\x00id")], "lists[0].items[2].item_id", "is not a valid id"),
    ([lst(item=lambda k: "" if k == 1 else "ok")], "lists[0].items[1].item_id", "is required"),
    ([lst(item=lambda k: "x" * 200)], "lists[0].items[0].item_id", "is not a valid id"),
], ids=lambda v: str(v)[:30])
def test_over_a_limit_or_a_bad_id_the_call_is_refused_naming_the_field(lists, field, message):
    with pytest.raises(ServedError) as err:
        parse_served(fb.LogServedRequest(lists=lists))
    assert err.value.field == field and str(err.value).startswith(f"{field}: ") and message in str(err.value)


@pytest.mark.parametrize("parts", [
    lambda k: [1.0, 2.0],  # too short
    lambda k: [0.0] * 5,  # too long
    lambda k: [0.0] * 100_000 if k == 2 else [0.0] * 4,  # one huge vector
    lambda k: [0.0, float("nan"), 0.0, 0.0],
    lambda k: [0.0, 0.0, float("-inf") if k else 0.0, 0.0],
    lambda k: [3.5e38 * 10, 0, 0, 0],  # overflows float32: inf on the wire
], ids=["short", "long", "huge", "nan", "inf", "overflow"])
def test_a_list_with_malformed_parts_is_dropped_alone(parts):
    got = parse_served(fb.LogServedRequest(lists=[lst("good"), lst("bad", parts=parts), lst("good2")]))
    assert [p.request_id for p in got] == ["good", "good2"]


@pytest.mark.parametrize("k,name", list(enumerate(PART_NAMES)))
def test_a_part_out_of_bounds_refuses_the_call_naming_it(k, name):
    low, high = PART_BOUNDS[name]
    edges = [[low if i == k else PART_BOUNDS[n][0] for i, n in enumerate(PART_NAMES)],
             [high if i == k else PART_BOUNDS[n][1] for i, n in enumerate(PART_NAMES)]]
    got = parse_served(fb.LogServedRequest(lists=[lst(n=2, parts=lambda j: edges[j])]))  # the bounds are in
    np.testing.assert_array_equal(got[0].parts, np.array(edges, np.float32))
    for beyond in (low - 0.5, high + 0.5, 3e38, -3e38):
        bad = lambda j: [beyond if (i == k and j == 2) else 0.5 for i in range(4)]  # noqa: E731
        with pytest.raises(ServedError) as err:
            parse_served(fb.LogServedRequest(lists=[lst("r0"), lst("r1", parts=bad)]))
        assert err.value.field == f"lists[1].items[2].parts[{k}]"
        assert str(err.value) == f"lists[1].items[2].parts[{k}]: {name} must be within [{low:g}, {high:g}], " \
                                 f"got {float(np.float32(beyond)):g}"


class Aborted(Exception):
    pass


class Context:
    """The part of grpc.aio.ServicerContext the servicer uses."""

    async def abort(self, code: grpc.StatusCode, details: str):
        raise Aborted(code, details)


def log_served(servicer: FeedbackServicer, *lists: fb.ServedList) -> fb.LogServedResponse:
    return asyncio.run(servicer.LogServed(fb.LogServedRequest(lists=list(lists)), Context()))


def test_the_servicer_answers_invalid_argument_and_keeps_nothing_of_a_refused_call(tmp_path):
    learner = BlendLearner((1.0, 1.0, 0.3, 0.2))
    servicer = FeedbackServicer(event_log=None, learner=learner, served_limits=ServedLimits(max_items=10))
    assert log_served(servicer, lst("r1"), lst("r2", parts=lambda k: [1.0])).accepted == 1
    with pytest.raises(Aborted) as err:
        log_served(servicer, lst("r3"), lst("r4", n=11))
    assert err.value.args == (grpc.StatusCode.INVALID_ARGUMENT, "lists[1].items: at most 10 items, got 11")
    assert list(learner.served) == ["r1"]  # r3 was valid, but the call was refused as a whole


def test_the_bounds_hold_what_the_gateways_formulas_produce():
    """contract/scores.py PART_BOUNDS is derived from the gateway's code; if its lifts grow past the
    bounds, every served list would be refused: this fails first."""
    from gateway.scoring import SESSION_BRAND, SESSION_CATEGORY
    from contract.scores import POPULARITY_SCALE, RANKER_PRIOR

    assert 0.5 + 0.5 + SESSION_BRAND + SESSION_CATEGORY <= PART_BOUNDS["personalization"][1]  # affinities + lifts
    low, high = PART_BOUNDS["relevance"]
    assert low <= -RANKER_PRIOR and RANKER_PRIOR + 2 * 0.5 <= high  # prior x cosine + BOOST x a brand and a category
    assert np.log1p(np.finfo(np.float32).max) / POPULARITY_SCALE <= PART_BOUNDS["popularity"][1]
    assert PART_BOUNDS["freshness"] == (0.0, 1.0) and tuple(PART_BOUNDS) == PART_NAMES
