"""The next-item recipe's data (scorer/train/next_item_train.py, `recsys train next-item` and the retrain
loop): the leave-one-out split in the form the gateway serves, and the gate."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from scorer.train.data import CannotTrain
from scorer.train.next_item_train import evaluate, halves, prepare, train_next_item
from scorer.models.sasrec import SASRec, SASRecConfig
from scorer.train.sasrec_train import SASRecCurve


def log(rows: list[tuple[str, str, str]]) -> pd.DataFrame:
    """(user, item, event type) rows, one minute apart in the given order."""
    t = pd.Timestamp("2026-01-01", tz="UTC")
    return pd.DataFrame([{"user_id": u, "item_id": i, "event_type": e, "timestamp": t + pd.Timedelta(minutes=n)}
                         for n, (u, i, e) in enumerate(rows)])


EVENTS = log([("u1", "a", "PURCHASE"), ("u1", "b", "PURCHASE"), ("u1", "a", "PURCHASE"), ("u1", "c", "CLICK"),
              ("u1", "x", "IMPRESSION"), ("u1", "d", "PURCHASE"), ("u1", "e", "PURCHASE"),
              ("u2", "b", "ADD_TO_CART"), ("u2", "c", "PURCHASE"), ("u2", "new", "PURCHASE"), ("u2", "a", "PURCHASE"),
              ("u3", "a", "PURCHASE")])


def test_histories_are_what_the_gateway_holds_and_unknown_targets_are_misses():
    data = prepare(EVENTS)
    assert data.vocabulary == ["a", "b", "c"]  # the training items only (impressions are not interactions)
    pos = {v: i for i, v in enumerate(data.vocabulary)}
    # u1: train a b a c, valid d, test e. Served history: distinct, newest last: b a c.
    assert data.train_seqs[0] == [pos["a"], pos["b"], pos["a"], pos["c"]]
    assert data.valid_hist[0] == [pos["b"], pos["a"], pos["c"]]
    assert data.valid_target[0] == -1  # "d" is not in the vocabulary: a miss for every method
    # u2: train b c, valid new (unknown), test a; the test history drops the unknown item.
    assert data.test_hist[1] == [pos["b"], pos["c"]] and data.test_target[1] == pos["a"]
    assert data.popularity.tolist() == [2, 2, 2]
    # The targets as ids too (a served version with another vocabulary is judged on them).
    assert data.valid_target_id[:2] == ["d", "new"] and data.test_target_id[1] == "a"
    assert data.newest_first_ids(data.valid_hist[0]) == ["c", "a", "b"]


def test_a_log_without_three_interactions_per_user_cannot_train():
    with pytest.raises(CannotTrain, match="three interactions"):
        prepare(log([("u1", "a", "PURCHASE"), ("u1", "b", "PURCHASE")]))


def test_the_gate_reads_the_confirm_half_and_compares_with_popularity_on_the_same_users():
    many = log([(f"u{u}", item, "PURCHASE") for u in range(9) for item in ("a", "b", "c", "a", "b")])
    data = prepare(many)
    choice, confirm = halves(data, 0)
    assert len(choice) == 5 and len(confirm) == 4 and not set(choice) & set(confirm)
    assert (halves(data, 0)[1] == confirm).all()  # seeded: the same halves again
    model = SASRec(SASRecConfig(n_items=len(data.vocabulary), max_len=50, dim=8, n_layers=1, n_heads=2, dropout=0.0))
    curve = SASRecCurve(loss=[1.0], valid_ndcg10=[0.0], best_epoch=0)
    result = evaluate(model, data, 0.0, curve)
    t = result.table.set_index(["method", "split"])
    assert result.gain.examples == len(confirm) == t.loc[("popularity", "validation, confirm half"), "users"]
    assert result.gain.baseline == pytest.approx(t.loc[("popularity", "validation, confirm half"), "NDCG@10"])
    assert result.kept == (result.gain.gain > result.gain.se) and np.isfinite(result.gain.se)


def test_too_few_users_to_split_cannot_train():
    from scorer.train.sasrec_train import SASRecTrainConfig

    with pytest.raises(CannotTrain, match="need 4"):
        train_next_item(EVENTS, SASRecTrainConfig(max_epochs=1), 0.0, log=lambda _: None)


def _shop(users: int = 12, items: int = 15, length: int = 7, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return log([(f"u{u}", f"i{rng.integers(items)}", "PURCHASE") for u in range(users) for _ in range(length)])


def _result(events: pd.DataFrame, seed: int = 0):
    import torch

    data = prepare(events)
    torch.manual_seed(seed)
    model = SASRec(SASRecConfig(n_items=len(data.vocabulary), max_len=50, dim=8, n_layers=1, n_heads=2,
                                dropout=0.0)).eval()
    return evaluate(model, data, 0.0, SASRecCurve(loss=[1.0], valid_ndcg10=[0.0], best_epoch=0))


def test_a_served_version_is_judged_as_the_gateway_calls_it_on_the_same_users(tmp_path):
    from modelrepo.layout import read_validation
    from scorer.train.next_item_train import DECIDES, MODEL_NAME, export_kept, served_version_gain

    result = _result(_shop())
    version = export_kept(result, tmp_path)
    validation = read_validation(tmp_path / "next_item_onnx" / str(version))
    assert validation is not None and validation["popularity"] == result.gain.baseline
    # The candidate against its own export: the ONNX file, called with item ids newest first, ranks
    # every user's target as torch does (NDCG@10 needs only its top 10), so the gain is exactly 0.
    gain, rows = served_version_gain(result, tmp_path / "next_item_onnx" / str(version) / "model.onnx", "serving", 0.0)
    assert gain.gain == pytest.approx(0.0, abs=1e-9) and gain.examples == result.gain.examples and not gain.beyond_noise
    mine = result.table[result.table["method"] == MODEL_NAME].set_index("split")
    served = rows.set_index("split")
    for split in mine.index:
        assert served.loc[split, "NDCG@10"] == pytest.approx(mine.loc[split, "NDCG@10"], abs=1e-9), split
    # Another model on the same users: a paired gain with a real standard error.
    other = _result(_shop(), seed=1)
    gain, _ = served_version_gain(other, tmp_path / "next_item_onnx" / str(version) / "model.onnx", "serving", 0.0)
    assert gain.examples == other.ndcg[(DECIDES, MODEL_NAME)].size and np.isfinite(gain.se)


def test_a_saved_candidate_loads_with_its_vocabulary(tmp_path):
    import torch

    from scorer.train.next_item_train import load_next_item, save_next_item

    result = _result(_shop())
    model, vocabulary = load_next_item(save_next_item(result, tmp_path / "ckpt"))
    assert vocabulary == result.vocabulary
    ids = torch.tensor([[0, 0, 1, 2, 3]])
    assert torch.equal(model.next_scores(ids), result.model.next_scores(ids))


def test_the_refit_trains_on_every_interaction_for_the_chosen_epochs(tmp_path):
    from modelrepo.layout import read_validation
    from scorer.train.next_item_train import export_kept, refit
    from scorer.train.sasrec_train import SASRecTrainConfig

    events = EVENTS
    result = _result(_shop())
    result.curve.best_epoch = 2  # validation chose 3 epochs
    done = []
    r = refit(result, events, SASRecTrainConfig(), on_epoch=lambda e, c: done.append(e), log=lambda _: None)
    assert done == [0, 1, 2] and r.epochs == 3
    # The last two interactions are in: "d", "e" (u1's) and "new" (u2's validation target) are known now.
    assert {"d", "e", "new"} <= set(r.vocabulary) and r.model.config.n_items == len(r.vocabulary)
    assert r.users == 2  # u3 has one interaction: nothing to learn a next item from
    assert r.trained_through == "2026-01-01T00:11:00+00:00" and r.model.config.dim == result.model.config.dim
    version = export_kept(result, tmp_path, refitted=r)
    record = read_validation(tmp_path / "next_item_onnx" / str(version))
    assert record["refit"] == {"epochs": 3, "users": 2, "items": len(r.vocabulary),
                               "trained_through": r.trained_through}
    assert record["model"] == result.gain.candidate  # the verdict is the judged model's
    # Triton serves the refit; a fusion is fitted on the judged graph beside it (not on the refit,
    # which has seen the validation targets the fusion learns from).
    from cli.fusion_learning import served_next_item_model
    from scorer.train.next_item_train import served_top_k

    assert served_next_item_model(tmp_path) == tmp_path / "next_item_onnx" / str(version) / "judged.onnx"
    history = [["a", "b"]]
    served = served_top_k(tmp_path / "next_item_onnx" / str(version) / "model.onnx")(history)[0]
    judged = served_top_k(served_next_item_model(tmp_path))(history)[0]
    assert set(served) == set(r.vocabulary) and set(judged) == set(result.vocabulary)
    assert export_kept(result, tmp_path) == version + 1  # no refit: nothing beside it
    assert served_next_item_model(tmp_path).name == "model.onnx"


def test_a_refit_serving_version_is_judged_only_on_users_it_has_not_seen(tmp_path):
    from scorer.train.next_item_train import DECIDES, MODEL_NAME, export_kept, halves, served_version_gain

    result = _result(_shop())
    version = export_kept(result, tmp_path)
    model_file = tmp_path / "next_item_onnx" / str(version) / "model.onnx"
    _, confirm = halves(result.data, result.seed)
    times = np.sort(result.data.valid_time[confirm])
    everyone, _ = served_version_gain(result, model_file, "serving", 0.0)
    newer, _ = served_version_gain(result, model_file, "serving", 0.0, after=times[-4])
    assert everyone.examples == len(confirm) and newer.examples == 3  # the three newer than that time
    assert newer.candidate == pytest.approx(
        result.ndcg[(DECIDES, MODEL_NAME)][result.data.valid_time[confirm] > times[-4]].mean())
    none, rows = served_version_gain(result, model_file, "serving", 0.0, after=times[-1])
    assert none is None and len(rows) == 3  # nobody newer: no gain; the rows are still reported


def test_without_validation_every_epoch_runs_and_the_last_weights_are_kept():
    from scorer.train.sasrec_train import SASRecTrainConfig, train_sasrec

    seqs = [[0, 1, 2, 3], [1, 2, 3, 0], [2, 3, 0, 1]]
    cfg = SASRecConfig(n_items=4, max_len=50, dim=8, n_layers=1, n_heads=2, dropout=0.0)
    model, curve = train_sasrec(seqs, None, None, cfg, SASRecTrainConfig(max_epochs=5, patience=1))
    assert len(curve.loss) == 5 and curve.valid_ndcg10 == [] and curve.best_epoch == 4
