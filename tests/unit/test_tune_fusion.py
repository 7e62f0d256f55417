"""bench/tune_fusion.py's histories follow the benchmark's protocol (scorer/eval/next_item.py): each
user's history is everything before the target in sequence order, the earlier lines of the
target's own invoice included (one timestamp), never the target or what follows it."""

from __future__ import annotations

import pandas as pd
import pytest

from bench.tune_fusion import history_events
from scorer.eval.next_item import leave_one_out

T = pd.Timestamp("2011-01-01", tz="UTC")
H = pd.Timedelta(hours=1)


def _events() -> pd.DataFrame:
    # a: invoice 1 = x, y, y (a repeat: one interaction); invoice 2 = z, w, v. b: one invoice x, y, z.
    # c: two interactions only (not in the split). A later impression of a's must not count.
    rows = [("a", "x", T), ("a", "y", T), ("a", "y", T), ("a", "z", T + H), ("a", "w", T + H), ("a", "v", T + H),
            ("b", "x", T), ("b", "y", T), ("b", "z", T), ("c", "x", T), ("c", "y", T)]
    ev = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]).assign(event_type="PURCHASE", session_id="s")
    late = pd.DataFrame([("a", "q", T + 2 * H, "IMPRESSION", "s"), ("a", "p", T, "IMPRESSION", "s")],
                        columns=["user_id", "item_id", "timestamp", "event_type", "session_id"])
    return pd.concat([ev, late], ignore_index=True)


def test_the_history_holds_the_targets_own_invoice_before_it_and_nothing_after():
    ev = _events()
    split = leave_one_out(ev[ev["event_type"] == "PURCHASE"])
    test = history_events(ev, split, "test")
    by_user = test.groupby("user_id")["item_id"].agg(list).to_dict()
    assert by_user == {"a": ["x", "y", "y", "p", "z", "w"], "b": ["x", "y"]}  # same-invoice lines kept, v / z not
    valid = history_events(ev, split, "valid")
    assert valid.groupby("user_id")["item_id"].agg(list).to_dict() == {"a": ["x", "y", "y", "p", "z"], "b": ["x"]}


def test_a_mismatch_with_the_split_is_refused():
    ev = _events()
    split = leave_one_out(ev[ev["event_type"] == "PURCHASE"])
    with pytest.raises(AssertionError, match="histories do not match"):
        history_events(ev.assign(item_id=ev["item_id"].replace({"x": "k"})), split, "test")
