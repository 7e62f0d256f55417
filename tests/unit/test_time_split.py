"""The time splits every trainer uses hold out a share of the *events*, however they spread in time."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scorer.train.data import CannotTrain, time_cut, time_cutoff
from scorer.train.interest_train import validation_split

T0 = pd.Timestamp("2026-01-01", tz="UTC")


def _times(offsets_s) -> pd.Series:
    return pd.Series(T0 + pd.to_timedelta(np.asarray(offsets_s, dtype=np.int64), unit="s"))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 10**9), min_size=1, max_size=300), st.floats(0.05, 0.95))
def test_the_cut_orders_the_events_and_holds_out_the_share_asked_for_up_to_ties(offsets, fraction):
    ts = _times(offsets)
    cut = time_cut(ts, fraction)
    before, after = ts[ts < cut], ts[ts >= cut]
    assert len(after) >= 1 and (before.empty or before.max() < after.min())
    # Without ties at the cut the share held out is `fraction` to within one event; ties only move
    # events after the cut (a time split cannot separate events of the same moment).
    n, held = len(ts), len(after)
    assert held >= n - int(n * (1 - fraction))
    assert held - int((ts == cut).sum()) < n - int(n * (1 - fraction))


def test_a_growing_log_or_a_stray_old_event_does_not_move_the_cut_into_the_bulk():
    # 1,000 events in the last month of a year, 10 spread over the eleven months before it, and one
    # a decade old: a cut at 80% of the period would hold out almost everything; by events it is 20%.
    recent = np.linspace(335 * 86400, 365 * 86400, 1000)
    early = np.linspace(0, 330 * 86400, 10)
    ts = _times(np.concatenate([[-10 * 365 * 86400], early, recent]))
    held = int((ts >= time_cut(ts, 0.2)).sum())
    assert held == len(ts) - int(len(ts) * 0.8)


def test_time_cutoff_refuses_an_empty_log_and_a_fraction_outside_zero_one():
    with pytest.raises(CannotTrain, match="no examples"):
        time_cutoff(pd.DataFrame({"timestamp": pd.Series([], dtype="datetime64[ns, UTC]")}), 0.2)
    with pytest.raises(ValueError, match="fraction"):
        time_cut(_times([1, 2, 3]), 1.0)


def test_the_interest_validation_split_is_the_last_share_of_examples_of_a_skewed_period():
    rows = pd.DataFrame({"event_timestamp": _times([0, 1, 2] + list(range(10**6, 10**6 + 97)))})
    fit, val = validation_split(rows, 0.1)
    assert fit["event_timestamp"].max() < val["event_timestamp"].min()
    assert len(val) == 10 and len(fit) == 90
    with pytest.raises(ValueError, match="too few"):
        validation_split(rows.head(2), 0.1)
