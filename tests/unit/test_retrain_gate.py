"""The retrain loop's interest gate: a new version is published only if its validation gain over
what serves (and over the untrained fallback) exceeds the gain's paired standard error plus the
margin, the rule `recsys train interest` keeps a candidate by (PairedGain); the reason says both."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from scorer.models.interest import InterestConfig, InterestModel
from scorer.retrain import Registry, _gate, interest_gain
from scorer.train.interest_data import VectorTable
from scorer.train.interest_train import FitResult, PairedGain, Selection, paired_gain, validation_rows

DIM = 16
N_ITEMS = 40


def _cycle_shop(users: int = 60, seed: int = 0) -> tuple[pd.DataFrame, VectorTable, np.ndarray]:
    """Each user's next item is the successor of their newest one (the fallback, a mean of recent
    items, cannot express it); one validation example per user."""
    rng = np.random.default_rng(seed)
    items = rng.normal(size=(N_ITEMS, DIM)).astype(np.float32)
    items /= np.linalg.norm(items, axis=1, keepdims=True)
    ids = [f"i{j}" for j in range(N_ITEMS)]
    successor = rng.permutation(N_ITEMS)
    rows = []
    for u in range(users):
        walk = [int(rng.integers(N_ITEMS))]
        for _ in range(4):
            walk.append(int(successor[walk[-1]]))
        rows.append({"user_id": f"u{u}", "query": None, "item_id": ids[walk[-1]], "grade": 1,
                     "event_timestamp": pd.Timestamp("2026-01-01", tz="UTC") + pd.Timedelta(minutes=u),
                     "history": [ids[j] for j in reversed(walk[:-1])]})
    return pd.DataFrame(rows), VectorTable(ids, items, {}), successor


class Oracle(nn.Module):
    """Knows the successor of the newest history item: its interest vector is that item's, so the
    target ranks first on every example (a fake of our own model interface)."""

    def __init__(self, items: np.ndarray, successor: np.ndarray):
        super().__init__()
        self.config = InterestConfig(dim=DIM)
        self.items, self.successor = torch.from_numpy(items), torch.from_numpy(successor)

    def forward(self, q, has_query, history, mask):  # noqa: ARG002 - the model's signature
        newest = (history[:, 0] @ self.items.T).argmax(dim=1)
        return self.items[self.successor[newest]]


def _fallback() -> InterestModel:
    return InterestModel(InterestConfig(dim=DIM)).eval()


def test_the_rule_needs_the_gain_to_exceed_its_standard_error_plus_the_margin():
    assert PairedGain(0.107, 0.100, se=0.005).beyond_noise  # +0.007 > 0.005 + 0
    assert not PairedGain(0.107, 0.100, se=0.005, margin=0.005).beyond_noise  # 0.007 <= 0.005 + 0.005
    # The old fixed-margin gate (gain >= 0.005) published this one; on ~100 examples it is noise.
    noisy = PairedGain(0.107, 0.100, se=0.02, margin=0.005, examples=94, versus="serving")
    assert not noisy.beyond_noise
    assert noisy.says() == "gain +0.0070 over serving <= its standard error 0.0200 + margin 0.005 (94 examples)"
    assert not PairedGain(0.1, 0.1, se=0.0).beyond_noise  # a tie is no gain
    assert PairedGain(0.1, 0.1, se=0.0, margin=-1.0).beyond_noise  # a negative margin tolerates a loss
    assert not PairedGain(0.5, 0.1, se=float("inf")).beyond_noise  # one example: no estimate of the noise


def test_train_and_retrain_share_the_rule():
    fit = FitResult("attention", nn.Identity(), [], [(0, 0.10), (10, 0.107)], 10, 0.107, 10, 10, False)
    sel = Selection(fallback_val=0.10, fits={"attention": fit}, gain_se=0.005, min_gain=0.001, val_examples=94)
    assert sel.gain == PairedGain(0.107, 0.10, 0.005, 0.001, 94)
    assert sel.winner is not None
    sel.min_gain = 0.002  # 0.007 <= 0.005 + 0.002
    assert sel.winner is None


def test_the_paired_gain_is_measured_on_the_same_examples():
    rows, table, successor = _cycle_shop()
    val = validation_rows(rows, table, limit=1_000, seed=0)
    fallback = _fallback()
    same = paired_gain(fallback, fallback, val, table, margin=0.005)
    assert (same.gain, same.se, same.examples) == (0.0, 0.0, len(val)) and not same.beyond_noise
    oracle = paired_gain(Oracle(table.items, successor), fallback, val, table, margin=0.005)
    assert oracle.candidate == pytest.approx(1.0)  # every target first
    assert oracle.baseline < 1.0 and oracle.gain > oracle.se + 0.005 > 0 and oracle.beyond_noise


def test_the_binding_baseline_is_the_one_beaten_by_the_least():
    rows, table, successor = _cycle_shop()
    val = validation_rows(rows, table, limit=1_000, seed=0)
    oracle, fallback = Oracle(table.items, successor), _fallback()
    # What serves is as good as the candidate: the gain over it (0) binds, whatever the fallback's.
    g = interest_gain(oracle, {"serving": Oracle(table.items, successor), "fallback": fallback}, val, table, 0.005)
    assert g.versus == "serving" and g.gain == 0.0 and not g.beyond_noise
    g = interest_gain(oracle, {"serving (= the fallback)": fallback}, val, table, 0.005)
    assert g.versus == "serving (= the fallback)" and g.beyond_noise
    with pytest.raises(ValueError, match="no baseline"):
        interest_gain(oracle, {}, val, table, 0.005)


@pytest.mark.parametrize("gain, promoted", [(PairedGain(0.107, 0.100, 0.02, 0.005, 94, "serving"), False),
                                            (PairedGain(0.140, 0.100, 0.01, 0.005, 94, "serving"), True)])
def test_the_gate_publishes_only_beyond_noise_and_says_the_gain_and_its_error(tmp_path, gain, promoted):
    registry = Registry(tmp_path / "registry.json")
    registry.entry("interest").serving = 1
    published, lines = [], []
    result = _gate("interest", registry, gain.baseline, gain.candidate, 0.005, "validation NDCG@10",
                   tmp_path / "report.md", tmp_path / "candidate", lambda: published.append(2) or 2, lines.append,
                   gain=gain)
    assert result.promoted is promoted and published == ([2] if promoted else [])
    assert result.gain is gain
    assert f"gain {gain.gain:+.4f} over serving" in result.reason and f"standard error {gain.se:.4f}" in result.reason
    assert result.reason in lines[0]
    assert Registry.load(registry.path).entry("interest").serving == (2 if promoted else 1)
