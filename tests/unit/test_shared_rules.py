"""One set of rules for ids and free text (contract/rules.py): the gateway's request validation and
the feedback service's event validation accept and refuse the same values, with the same reasons."""

from __future__ import annotations

import pytest

from gateway.config import GatewaySettings
from feedback.events import MAX_QUERY_CHARS, EventError, validate_event
from contract.rules import id_error, text_error
from gateway.validation import RequestError, validate_recommend
from recsys.v1 import feedback_pb2 as fb
from recsys.v1 import recommend_pb2

SETTINGS = GatewaySettings()

QUERIES = {
    "shoes\x00": "contains control characters",
    "\x00": "contains control characters",
    "rain\x1b[31mjacket": "contains control characters",  # an ANSI escape
    "a\rb": "contains control characters",
    "\x08": "contains control characters",
    " ": "is only whitespace",
    "\t\n": "is only whitespace",
    "q" * (MAX_QUERY_CHARS + 1): f"at most {MAX_QUERY_CHARS} characters, got {MAX_QUERY_CHARS + 1}",
    "rain jacket": None,
    "line one\nline two\tand a tab": None,  # tab and newline are allowed
    "q" * MAX_QUERY_CHARS: None,
    "Regenjacke größe M": None,
}


def gateway_verdict(query: str) -> str | None:
    try:
        validate_recommend(recommend_pb2.RecommendRequest(query=query), SETTINGS)
    except RequestError as e:
        assert e.field == "query"
        return str(e)
    return None


def feedback_verdict(query: str, kind: int = fb.EVENT_TYPE_QUERY) -> str | None:
    event = fb.Event(event_id="e1", type=kind, user_id="u1", item_id="" if kind == fb.EVENT_TYPE_QUERY else "i1",
                     query=query)
    try:
        validate_event(event)
    except EventError as e:
        return str(e)
    return None


def test_both_services_use_the_gateways_query_length():
    assert MAX_QUERY_CHARS == SETTINGS.max_query_chars


@pytest.mark.parametrize("query", list(QUERIES), ids=lambda q: repr(q)[:24])
def test_a_query_is_accepted_or_refused_by_both_services_for_the_same_reason(query):
    reason = QUERIES[query]
    assert text_error(query, MAX_QUERY_CHARS) == reason
    gateway, feedback = gateway_verdict(query), feedback_verdict(query)
    if reason is None:
        assert gateway is None and feedback is None
    else:
        assert gateway.startswith(f"query: {reason}") and feedback == f"query: {reason}"
        # the query a click came from is checked too: it reaches the same session features
        assert feedback_verdict(query, fb.EVENT_TYPE_CLICK) == f"query: {reason}"


def test_the_gateways_messages_are_unchanged():
    assert gateway_verdict(" ") == "query: is only whitespace (send an empty query for no query)"
    assert gateway_verdict("a\x00") == "query: contains control characters"
    assert gateway_verdict("x" * 513) == "query: at most 512 characters, got 513"
    with pytest.raises(RequestError) as err:
        validate_recommend(recommend_pb2.RecommendRequest(user_id="x" * 41 + "/"), SETTINGS)
    assert str(err.value) == ("user_id: 'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx...' is not a valid id "
                              "(1-128 characters of A-Z a-z 0-9 _ . : @ -)")


@pytest.mark.parametrize("value", ["u1", "a:b@c.d-e_f", "x" * 128, "x" * 129, "a b", "bad/user", "é", "a\n", "u\x00"],
                         ids=repr)
def test_an_id_is_accepted_or_refused_by_both_services_with_the_same_message(value):
    problem = id_error(value)
    try:
        validate_recommend(recommend_pb2.RecommendRequest(user_id=value), SETTINGS)
        gateway = None
    except RequestError as e:
        gateway = str(e)
    try:
        validate_event(fb.Event(event_id="e1", type=fb.EVENT_TYPE_CLICK, user_id=value, item_id="i1"))
        feedback = None
    except EventError as e:
        feedback = str(e)
    if problem is None:
        assert gateway is None and feedback is None
    else:
        assert gateway == feedback == f"user_id: {problem}"
