"""The SASRec baseline (scorer/models/sasrec.py, scorer/train/sasrec_train.py): causality, padding,
learning a sequence rule, early stopping keeping the best epoch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scorer.eval.next_item import rank_metrics
from scorer.models.sasrec import SASRec, SASRecConfig
from scorer.train.sasrec_train import SASRecTrainConfig, left_pad, next_item_scores, train_sasrec

SMALL = SASRecConfig(n_items=12, max_len=8, dim=16, n_layers=1, n_heads=2, dropout=0.0)


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models: a second intra-op thread only waits for the other (10-100x slower on a busy 2-core VM).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_left_pad_keeps_the_latest_items_as_ids_plus_one():
    assert left_pad([[0, 1, 2], [5]], 2).tolist() == [[2, 3], [0, 6]]
    assert left_pad([[]], 3).tolist() == [[0, 0, 0]]


def test_a_position_never_sees_later_items_nor_padding_content():
    torch.manual_seed(0)
    model = SASRec(SMALL).eval()
    a = torch.tensor([[0, 0, 3, 4, 5, 6, 7, 8]])
    b = a.clone()
    b[0, -1] = 11  # only the last item differs
    with torch.no_grad():
        ha, hb = model(a), model(b)
    assert torch.allclose(ha[0, :-1], hb[0, :-1], atol=1e-6)
    assert not torch.allclose(ha[0, -1], hb[0, -1])
    assert torch.isfinite(ha).all()  # padded rows attend to themselves: no NaN
    with pytest.raises(ValueError, match="max_len"):
        model(torch.ones(1, SMALL.max_len + 1, dtype=torch.long))


def test_it_learns_a_next_item_rule_and_keeps_its_best_epoch():
    # Every sequence walks the catalog in steps of one: the next item is always (last + 1) mod n.
    n = SMALL.n_items
    rng = np.random.default_rng(0)
    starts = rng.integers(0, n, size=60)
    seqs = [[(s + t) % n for t in range(10)] for s in starts]
    valid_hist, valid_target = [s[:-1] for s in seqs], [s[-1] for s in seqs]
    train = [s[:-1] for s in seqs]
    model, curve = train_sasrec(train, valid_hist, valid_target, SMALL,
                                SASRecTrainConfig(max_epochs=15, patience=15, batch_size=16, lr=1e-2))
    assert curve.best_valid_ndcg10 > 0.9
    assert len(curve.loss) == len(curve.valid_ndcg10) == 15 and curve.loss[-1] < curve.loss[0]
    # The returned weights are the best epoch's: evaluating them again gives its exact score.
    again = rank_metrics(next_item_scores(model, valid_hist), valid_target, ks=(10,))["NDCG@10"]
    assert again == pytest.approx(curve.best_valid_ndcg10, abs=1e-9)


def test_training_stops_after_patience_epochs_without_improvement():
    seqs = [[0, 1, 2, 3]] * 4
    _, curve = train_sasrec(seqs, [[0, 1, 2]], [3], SMALL, SASRecTrainConfig(max_epochs=50, patience=2, lr=0.0))
    # lr 0: nothing ever improves on the first epoch, so it stops after 1 + patience epochs.
    assert curve.best_epoch == 0 and len(curve.loss) == 3


def test_training_needs_sequences_and_a_validation_split():
    with pytest.raises(ValueError, match="two items"):
        train_sasrec([[1], []], [[1]], [2], SMALL)
    with pytest.raises(ValueError, match="validation"):
        train_sasrec([[1, 2]], [], [], SMALL)
