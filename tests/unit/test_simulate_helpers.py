"""The simulator's pure helpers: model switches, per-arm summaries, recovery."""

from __future__ import annotations

import pandas as pd

from cli.simulate import SimConfig, SimResult, model_switches


def outcomes(rows: list[tuple]) -> pd.DataFrame:
    cols = ["step", "arm", "search", "shown", "clicks", "carts", "purchases", "shifted", "latency_ms", "models"]
    return pd.DataFrame(rows, columns=cols)


def test_model_switches_mark_each_new_version_once():
    df = outcomes([(0, "online", True, 8, 0, 0, 0, False, 50.0, "encoder=1 ranker=1"),
                   (1, "online", True, 8, 0, 0, 0, False, 50.0, "encoder=1 ranker=1"),
                   (2, "online", True, 8, 0, 0, 0, False, 50.0, "encoder=1 ranker=2"),
                   (3, "online", True, 8, 0, 0, 0, False, 50.0, "encoder=2 ranker=2 interest=1")])
    assert model_switches(df) == [(2, "ranker v2"), (3, "encoder v2")]  # a model appearing is not a switch


def test_summary_and_recovery():
    rows = []
    for step in range(40):
        shifted = step >= 20
        for arm in ("online", "holdout"):
            clicks = 2 if not shifted else (1 if arm == "holdout" or step < 30 else 3)
            rows.append((step, arm, True, 10, clicks, 0, clicks // 2, shifted, 50.0, "encoder=1"))
    result = SimResult(outcomes(rows), pd.DataFrame(), SimConfig(requests=40, shift_at=20, window=4))
    s = result.summary().set_index("arm")
    assert s.loc["online", "ctr before shift"] == s.loc["holdout", "ctr before shift"] == 0.2
    assert s.loc["online", "ctr last third"] == 0.3 and s.loc["holdout", "ctr last third"] == 0.1
    # online: 0.1 until step 30, then 0.3; a 2-request window is back at 0.2 once one step of 0.3 is in it
    assert result.recovery_events("online") == 10 * (10 + 1) + (10 + 3 + 1)  # steps 20-29, then step 30
    assert result.recovery_events("holdout") is None
    windows = result.windows()
    assert set(windows["arm"]) == {"online", "holdout"} and windows["ctr"].between(0, 1).all()
