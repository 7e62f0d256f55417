"""The encoder's recipe: item -> item pairs, the held-out shoppers' validation split, next-item
retrieval metrics, and the gate that keeps the zero-shot encoder unless fine-tuning beats it."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from scorer.eval.encoder_validation import NextItemValidation
from scorer.train.data import CannotTrain
from scorer.train.encoder_data import shopper_validation_split, transition_pairs
from scorer.train.encoder_train import ANCHOR_ITEM, EncoderTrainConfig, fit_encoder, gate

T = pd.Timestamp("2026-01-01", tz="UTC")


def _log(rows: list[tuple[str, str, int]]) -> pd.DataFrame:
    """(user, item, minute) rows, in time order as the interaction log is."""
    df = pd.DataFrame(rows, columns=["user_id", "item_id", "minute"])
    df["event_timestamp"] = T + pd.to_timedelta(df["minute"], unit="min")
    return df.sort_values("event_timestamp", kind="stable").drop(columns="minute").assign(grade=3).reset_index(drop=True)


def test_pairs_follow_baskets_and_carry_the_recent_history():
    log = _log([("u", "a", 0), ("v", "x", 0), ("u", "b", 1), ("u", "c", 1),  # u's basket {b, c} follows {a}
                ("u", "d", 2), ("v", "y", 3), ("u", "d", 4), ("u", "a", 5)])
    pairs = transition_pairs(log, history_len=3)
    got = [(r.user_id, r.anchor_id, r.item_id, r.history) for r in pairs.itertuples()]
    assert got == [
        ("u", "a", "b", ["a"]),  # a basket's items pair with the previous basket's last item
        ("u", "a", "c", ["a"]),  # ... not with each other (bought together, not one after the other)
        ("u", "c", "d", ["c", "b", "a"]),  # the latest basket's last item; history newest first
        ("v", "x", "y", ["x"]),
        # ("u", "d", "d") is no pair: an item after itself teaches nothing
        ("u", "d", "a", ["d", "c", "b"]),  # distinct, newest first, at most 3
    ]
    assert (pairs["event_timestamp"].diff().dropna() >= pd.Timedelta(0)).all()


def test_first_interactions_make_no_pair():
    assert transition_pairs(_log([("u", "a", 0), ("v", "b", 0), ("u", "c", 0)])).empty


def _pairs(users: int, per_user: int) -> pd.DataFrame:
    rows = [(f"u{u}", f"i{(u + k) % 7}", k) for u in range(users) for k in range(per_user)]
    return transition_pairs(_log(rows))


def test_held_out_shoppers_are_not_trained_on_and_give_their_last_transition():
    pairs = _pairs(users=60, per_user=5)
    fit, val = shopper_validation_split(pairs, fraction=0.25, min_users=5, max_users=100, seed=3)
    assert len(val) == 15 and val["user_id"].is_unique  # 25% of 60 shoppers, one example each
    assert not set(val["user_id"]) & set(fit["user_id"])
    assert len(fit) + 15 * 4 == len(pairs)  # every pair of a held-out shopper left the training set
    last = pairs.sort_values("event_timestamp").groupby("user_id").tail(1).set_index("user_id")
    for row in val.itertuples():
        assert row.event_timestamp == last.at[row.user_id, "event_timestamp"] and row.item_id == last.at[row.user_id, "item_id"]
    again, _ = shopper_validation_split(pairs, fraction=0.25, min_users=5, max_users=100, seed=3)
    assert again.equals(fit)  # a fixed sample: the same seed, the same split


def test_the_validation_sample_is_bounded_and_never_more_than_half_the_shoppers():
    pairs = _pairs(users=10, per_user=3)
    _, val = shopper_validation_split(pairs, fraction=0.1, min_users=20, max_users=100)
    assert len(val) == 5  # min 20 asked for, but at most half of 10 shoppers
    _, val = shopper_validation_split(_pairs(users=60, per_user=3), fraction=0.5, min_users=1, max_users=7)
    assert len(val) == 7
    with pytest.raises(CannotTrain, match="too few shoppers"):
        shopper_validation_split(_pairs(users=1, per_user=3))


def test_next_item_metrics_rank_the_whole_catalog_exactly():
    # Items on a circle: 0 and 1 are close, 2 is opposite 0, 3 is orthogonal.
    vectors = np.array([[1.0, 0.0], [0.9, 0.1], [-1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    val = NextItemValidation(["a", "b", "c", "d"], histories=[[0], [3, 2]], targets=np.array([1, 3]), recent=1)
    got = val.metrics_of_vectors(vectors)
    # Example 1: history [0] -> 0 itself ranks first, target 1 second: NDCG 1/log2(3).
    # Example 2: recent=1 reads only item 3 -> the target 3 first: NDCG 1.
    assert got["NDCG@10"] == pytest.approx((1 / math.log2(3) + 1.0) / 2)
    assert got["item NDCG@10"] == pytest.approx((1 / math.log2(3) + 1.0) / 2)  # previous item = the newest one
    whole = NextItemValidation(["a", "b", "c", "d"], [[0], [3, 2]], np.array([1, 3]), recent=None).metrics_of_vectors(vectors)
    assert whole["Recall@10"] == 1.0 and whole["NDCG@10"] < got["NDCG@10"]  # the mean of 3 and 2 points elsewhere
    with pytest.raises(ValueError, match="at least one history item"):
        NextItemValidation(["a"], [[]], np.array([0]))


def test_the_gate_keeps_fine_tuning_only_when_it_beats_the_start():
    kept = gate(0.20, 0.25, "NDCG@10 of next-item retrieval", 300)
    assert kept.kept and "zero-shot 0.2000" in kept.says and "fine-tuned 0.2500 (+25.0%)" in kept.says
    assert "fine-tuned encoder kept" in kept.says
    refused = gate(0.20, 0.15, "NDCG@10 of next-item retrieval", 300)
    assert not refused.kept and "the zero-shot encoder is kept" in refused.says and "(-25.0%)" in refused.says
    assert not gate(0.20, 0.20, "m", 1).kept  # a tie is no gain
    assert not gate(0.20, 0.21, "m", 1, min_gain=0.02).kept and gate(0.20, 0.23, "m", 1, min_gain=0.02).kept
    assert "serving 0.2000" in gate(0.2, 0.1, "m", 1, start_name="serving").says
    with pytest.raises(ValueError, match="numbers"):
        gate(math.nan, 0.1, "m", 1)


def _item_pairs(n: int = 12) -> pd.DataFrame:
    return pd.DataFrame({"query": [f"red mug {i}" for i in range(n)], "item_text": [f"blue cup {i}" for i in range(n)],
                         "item_id": [f"i{i}" for i in range(n)], "grade": 3, "anchor": ANCHOR_ITEM})


class _Scripted:
    """Validation scores in a fixed order (the start first): the gate's logic, not the metric, is tested."""

    def __init__(self, scores: list[float]):
        self.scores, self.calls = list(scores), 0

    def __call__(self, model) -> dict[str, float]:
        self.calls += 1
        return {"NDCG@10": self.scores.pop(0)}


def _weights(model) -> torch.Tensor:
    return model.transformer.embeddings.word_embeddings.weight.detach().clone()


def _packaged_weights() -> torch.Tensor:
    from safetensors import safe_open

    from scorer.models.encoder import packaged_minilm_path

    with safe_open(str(packaged_minilm_path() / "model.safetensors"), "pt") as f:
        return f.get_tensor("embeddings.word_embeddings.weight")


CFG = EncoderTrainConfig(max_steps=2, min_steps=2, batch_size=4, lr=1e-3, eval_every_bounds=(1, 1), patience=5)


def test_a_refused_fine_tune_keeps_the_zero_shot_weights():
    refused = fit_encoder(_item_pairs(), _Scripted([0.5, 0.4, 0.3]), 7, "NDCG@10", CFG)
    assert not refused.verdict.kept and refused.verdict.start == 0.5 and refused.verdict.fine_tuned == 0.4
    assert torch.equal(_weights(refused.model), _packaged_weights())  # the zero-shot weights are what is kept
    assert refused.fine_tuned_state is not None and [s for s, _ in refused.curve] == [0, 1, 2]
    assert refused.manifest()["verdict"] == "zero-shot" and refused.manifest()["examples"] == 7


def test_a_kept_fine_tune_holds_its_best_validated_weights():
    kept = fit_encoder(_item_pairs(), _Scripted([0.5, 0.7, 0.6]), 7, "NDCG@10", CFG)
    assert kept.verdict.kept and kept.verdict.fine_tuned == 0.7 and kept.best_step == 1
    assert not torch.equal(_weights(kept.model), _packaged_weights())
    assert torch.equal(_weights(kept.model), kept.fine_tuned_state["transformer.embeddings.word_embeddings.weight"])
    assert kept.manifest()["verdict"] == "fine-tuned"


def test_early_stopping_ends_the_run_after_patience_validations_without_a_gain():
    cfg = EncoderTrainConfig(max_steps=20, min_steps=20, batch_size=4, eval_every_bounds=(1, 1), patience=2)
    fit = fit_encoder(_item_pairs(), _Scripted([0.5, 0.6, 0.55, 0.58] + [0.1] * 20), 3, "NDCG@10", cfg)
    assert fit.stopped_early and fit.steps_run == 3 and fit.budget == 20 and fit.best_step == 1
