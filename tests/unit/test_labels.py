"""Label attribution: windows, named requests, the most recent impression, other users."""

from __future__ import annotations

import pandas as pd

from eventlog.event_log import EventLog
from scorer.data.labels import attribute, read_event_log

T0 = pd.Timestamp("2026-11-01 12:00", tz="UTC")


def row(kind: str, minutes: float, item: str = "i1", user: str = "u1", request: str | None = None, **kw) -> dict:
    return {"event_id": f"{kind}{minutes}{item}{user}", "timestamp": T0 + pd.Timedelta(minutes=minutes), "user_id": user,
            "session_id": "s", "event_type": kind, "item_id": item, "query": None, "request_id": request,
            "position": kw.get("position", 1), "quantity": None}


def labels(*rows: dict) -> dict[tuple[str, str], int]:
    out = attribute(pd.DataFrame(rows))
    return {(r, i): g for r, i, g in zip(out["request_id"], out["item_id"], out["grade"])}


def test_a_click_naming_its_request_inside_the_window_is_a_label():
    assert labels(row("IMPRESSION", 0, request="r1"), row("CLICK", 10, request="r1")) == {("r1", "i1"): 1}


def test_interactions_outside_their_window_are_not_labels():
    got = labels(row("IMPRESSION", 0, request="r1"), row("CLICK", 40, request="r1"),  # click window 30 min
                 row("ADD_TO_CART", 180))  # cart window 2 h
    assert got == {("r1", "i1"): 0}


def test_an_unnamed_purchase_goes_to_the_latest_impression_before_it():
    got = labels(row("IMPRESSION", 0, request="r1"), row("IMPRESSION", 240, request="r2"), row("PURCHASE", 300))
    assert got == {("r1", "i1"): 0, ("r2", "i1"): 3}


def test_best_grade_wins_and_other_users_and_items_do_not_count():
    got = labels(row("IMPRESSION", 0, request="r1"), row("IMPRESSION", 0, item="i2", request="r1", position=2),
                 row("CLICK", 5, request="r1"), row("ADD_TO_CART", 20), row("PURCHASE", 30, user="u2"),
                 row("CLICK", -5, item="i2"))  # before the impression: not caused by it
    assert got == {("r1", "i1"): 2, ("r1", "i2"): 0}


def test_labels_are_stamped_at_the_impression():
    out = attribute(pd.DataFrame([row("IMPRESSION", 0, request="r1"), row("PURCHASE", 60)]))
    assert out.loc[0, "event_timestamp"] == T0 and out.loc[0, "attributed_at"] == T0 + pd.Timedelta(minutes=60)


def test_the_feedback_log_reads_back_as_offline_events(tmp_path):
    log = EventLog(tmp_path)
    log.append([{"event_id": "e1", "event_type": "IMPRESSION", "user_id": "u1", "session_id": "s", "item_id": "i1",
                 "request_id": "r1", "position": 1, "query": "q", "quantity": None,
                 "timestamp": "2026-11-01T12:00:00.000000+00:00", "received_at": "2026-11-01T12:00:00.100000+00:00"},
                {"event_id": "e2", "event_type": "CLICK", "user_id": "u1", "session_id": "s", "item_id": "i1",
                 "request_id": "r1", "position": 1, "query": None, "quantity": None,
                 "timestamp": "2026-11-01T12:01:00.000000+00:00", "received_at": "2026-11-01T12:01:00.100000+00:00"}])
    events = read_event_log(tmp_path)
    assert list(events["event_id"]) == ["e1", "e2"] and str(events["timestamp"].dt.tz) == "UTC"
    assert labels(*events.to_dict("records")) == {("r1", "i1"): 1}


# --- no impressions: labels from the interactions (issue 14) -------------------------------------

def _events(*rows: dict) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    df["timestamp"] = pd.to_datetime(df["timestamp"], utc=True).astype("datetime64[us, UTC]")
    return df


def test_a_log_without_impressions_has_zero_typed_labels_and_interaction_labels_instead():
    from scorer.train.data import FEATURES_BEFORE, interaction_labels

    ev = _events(row("PURCHASE", 0, request=None), row("PURCHASE", 0, request=None),  # the same line twice
                 row("ADD_TO_CART", 0, item="i2"), row("PURCHASE", 60, item="i2"), row("QUERY", 61, item=None))
    ev.loc[1, "event_id"] = "dup"
    assert len(attribute(ev)) == 0
    got = interaction_labels(ev)
    assert sorted(zip(got["item_id"], got["grade"])) == [("i1", 3), ("i2", 2), ("i2", 3)]
    assert got["event_timestamp"].is_monotonic_increasing
    assert (got["features_at"] == got["event_timestamp"] - FEATURES_BEFORE).all()
    assert got["request_id"].str.startswith("interaction:").all() and got["position"].isna().all()


def _holds(**events):
    from scorer.train.data import DataHolds

    kinds = {k: events.get(k, 0) for k in ("IMPRESSION", "CLICK", "ADD_TO_CART", "PURCHASE", "QUERY")}
    return DataHolds(events=kinds, users=2, items=3, items_without_price=0, labels=events.get("labels", 0),
                     positive_labels=events.get("positive", 0), positive_query_labels=events.get("query_pos", 0),
                     next_item_examples=events.get("next", 0), start=None, end=None)


def test_each_model_trains_on_what_the_data_holds_or_says_what_is_missing():
    from scorer.train.data import INTERACTIONS, QUERIES, SHOWN_LISTS, training_plan

    shop = {p.model: p.source for p in training_plan(_holds(IMPRESSION=50, CLICK=9, QUERY=5, labels=50, positive=9,
                                                            query_pos=4, next=8))}
    assert shop == {"interest": SHOWN_LISTS, "encoder": QUERIES, "ranker": SHOWN_LISTS}
    orders = training_plan(_holds(PURCHASE=40, next=30))
    assert {p.model: p.source for p in orders} == {"interest": INTERACTIONS, "encoder": INTERACTIONS, "ranker": INTERACTIONS}
    assert "no impressions" in orders[0].says and "item-to-item" in orders[1].says and "sampled negatives" in orders[2].says
    one_each = {p.model: p for p in training_plan(_holds(PURCHASE=2, next=0))}
    assert one_each["interest"].source is None and one_each["encoder"].source is None
    assert "no IMPRESSION, CLICK, ADD_TO_CART, QUERY events" in one_each["interest"].says
    assert "at least two" in one_each["interest"].says
    assert one_each["ranker"].source == INTERACTIONS
    assert all(p.source is None for p in training_plan(_holds()))


def test_sampled_lists_hold_the_interaction_and_negatives_from_the_catalog_of_its_time():
    from scorer.train.data import interaction_labels
    from scorer.train.ranker_data import sampled_lists

    items = pd.DataFrame({"item_id": [f"i{k}" for k in range(1, 21)],
                          "created_at": [None] * 10 + [T0 + pd.Timedelta(days=1)] * 10})  # i11..i20 come later
    ev = _events(row("PURCHASE", 0), row("PURCHASE", 0, item="i2"), row("CLICK", 5, item="i3", user="u2"))
    lists = sampled_lists(interaction_labels(ev), items, negatives=4, seed=1)
    for _, g in lists.groupby("request_id"):
        assert len(g) == 5 and (g["grade"] > 0).sum() == 1
        assert sorted(g["position"]) == [1, 2, 3, 4, 5]
        negatives = set(g.loc[g["grade"] == 0, "item_id"])
        assert negatives <= {f"i{k}" for k in range(1, 11)}  # only items that existed then
    u1 = lists[lists["user_id"] == "u1"]
    assert not (set(u1.loc[u1["grade"] == 0, "item_id"]) & {"i1", "i2"})  # a basket's items are not its negatives
    assert len(sampled_lists(interaction_labels(ev), items, negatives=4, max_lists=1)) == 5


def test_an_orders_earlier_lines_lead_the_history_of_each_line_newest_first():
    """An order export stamps all of an order's lines with one time: the join just before a line
    sees none of them, the gateway a moment later sees them all (the live session). So each line's
    history starts with the lines before it in the log (scorer/train/interest_data.py basket_before)."""
    from scorer.train.data import interaction_labels
    from scorer.train.interest_data import basket_before

    order = [row("PURCHASE", 0, item=i) for i in ("i3", "i1", "i2", "i9")]  # the log's order, not the ids'
    ev = _events(*order, row("PURCHASE", 0, item="i5", user="u2"), row("PURCHASE", 90, item="i4"),
                 row("PURCHASE", 90, item="i6"))
    for n, r in enumerate(order):
        ev.loc[n, "event_id"] = f"z{9 - n}"  # ids that sort against the log: the log's order wins
    got = interaction_labels(ev)
    assert list(got["item_id"]) == ["i3", "i1", "i2", "i9", "i5", "i4", "i6"]
    baskets = dict(zip(zip(got["user_id"], got["item_id"]), basket_before(got, max_items=2)))
    assert baskets[("u1", "i3")] == [] and baskets[("u1", "i1")] == ["i3"] and baskets[("u1", "i2")] == ["i1", "i3"]
    assert baskets[("u1", "i9")] == ["i2", "i1"]  # at most max_items, the newest
    assert baskets[("u2", "i5")] == []  # another user's line at the same time is not this user's basket
    assert baskets[("u1", "i4")] == [] and baskets[("u1", "i6")] == ["i4"]  # a later order starts again
