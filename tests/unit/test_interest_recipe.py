"""The interest models' recipe: step budget, early stopping, validation split, the choice between
candidates, and the sequential model (starts as the fallback; ONNX export equals torch)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from scorer.models.interest import InterestModel, checkpoint_kind, load_interest_model
from scorer.models.sequential import SequentialConfig, SequentialInterestModel
from scorer.train.early_stop import EarlyStopping, eval_interval, step_budget
from scorer.train.interest_data import VectorTable
from scorer.train.interest_train import FitResult, InterestTrainConfig, Selection, train_candidates, validation_split

DIM = 16


def test_step_budget_scales_with_the_data_within_bounds():
    assert step_budget(1_000, 100, epochs=5, min_steps=10, max_steps=1_000) == 50
    assert step_budget(10, 100, epochs=5, min_steps=10, max_steps=1_000) == 10  # floor
    assert step_budget(10**7, 100, epochs=5, min_steps=10, max_steps=1_000) == 1_000  # cap
    assert eval_interval(1_000, 100, evals_per_epoch=2, lowest=1, highest=100) == 5
    assert eval_interval(10, 100, evals_per_epoch=1, lowest=25, highest=100) == 25
    with pytest.raises(ValueError, match="examples > 0"):
        step_budget(0, 100, 5, 10, 100)


def test_early_stopping_waits_patience_then_restores_the_best_weights():
    model = torch.nn.Linear(1, 1, bias=False)
    stop = EarlyStopping(patience=2, min_delta=0.01)
    decisions = []
    for step, (w, score) in enumerate([(0.0, 0.10), (1.0, 0.20), (2.0, 0.205), (3.0, 0.15)]):
        model.weight.data.fill_(w)
        decisions.append(stop.update(step, score, model))
    # 0.205 is not a gain of more than min_delta over 0.20: the second miss in a row stops.
    assert decisions == [False, False, False, True]
    assert (stop.best_step, stop.best_score) == (1, 0.20)
    stop.restore(model)
    assert model.weight.item() == 1.0
    assert [s for _, s in stop.curve] == [0.10, 0.20, 0.205, 0.15]
    with pytest.raises(ValueError, match="patience"):
        EarlyStopping(patience=0)


def test_validation_split_is_the_end_of_the_period():
    rows = pd.DataFrame({"event_timestamp": pd.date_range("2026-01-01", periods=100, freq="h", tz="UTC")})
    fit, val = validation_split(rows, 0.1)
    assert fit["event_timestamp"].max() < val["event_timestamp"].min()
    assert len(fit) + len(val) == 100 and 8 <= len(val) <= 12
    with pytest.raises(ValueError, match="val_fraction"):
        validation_split(rows, 1.5)


def _fit(kind: str, best_val: float) -> FitResult:
    return FitResult(kind, torch.nn.Identity(), [], [(0, 0.1), (10, best_val)], 10, best_val, 10, 10, False)


def test_selection_keeps_the_validation_winner_only_if_it_beats_the_fallback():
    sel = Selection(fallback_val=0.10, fits={"attention": _fit("attention", 0.12), "sequential": _fit("sequential", 0.15)})
    assert sel.winner.kind == "sequential"
    assert "keep sequential: +50.0% vs the fallback, +25.0% vs attention" in sel.summary()
    sel = Selection(fallback_val=0.20, fits={"attention": _fit("attention", 0.12), "sequential": _fit("sequential", 0.15)})
    assert sel.winner is None and "no candidate beats the fallback" in sel.summary()
    sel = Selection(fallback_val=0.10, fits={"attention": _fit("attention", 0.105)}, min_gain=0.01)
    assert sel.winner is None  # a gain below min_gain does not count


def _toy_shop(seed: int = 0, users: int = 120, n_items: int = 40, length: int = 12):
    """Each user walks a fixed cycle of items; the next item is the successor of the last one, which
    the fallback (a mean of recent items) cannot express but a trained model can."""
    rng = np.random.default_rng(seed)
    items = rng.normal(size=(n_items, DIM)).astype(np.float32)
    items /= np.linalg.norm(items, axis=1, keepdims=True)
    ids = [f"i{j}" for j in range(n_items)]
    successor = rng.permutation(n_items)
    rows, t0 = [], pd.Timestamp("2026-01-01", tz="UTC")
    for u in range(users):
        walk = [int(rng.integers(n_items))]
        for _ in range(length):
            walk.append(int(successor[walk[-1]]))
        for n in range(1, len(walk)):
            rows.append({"user_id": f"u{u}", "query": None, "item_id": ids[walk[n]], "grade": 1,
                         "event_timestamp": t0 + pd.Timedelta(minutes=u * 100 + n),
                         "history": [ids[j] for j in reversed(walk[max(0, n - 10):n])]})
    return pd.DataFrame(rows), VectorTable(ids, items, {})


def test_training_beats_the_fallback_and_the_choice_is_deterministic():
    rows, table = _toy_shop()
    cfg = InterestTrainConfig(epochs=1, min_steps=40, max_steps=40, batch_size=64, eval_every_bounds=(20, 20), patience=3)
    a = train_candidates(rows, table, ("attention", "sequential"), cfg)
    b = train_candidates(rows, table, ("attention", "sequential"), cfg)
    assert a.summary() == b.summary()
    assert a.winner is not None and a.winner.best_val > a.fallback_val
    for fit in a.fits.values():
        assert fit.curve[0] == (0, pytest.approx(a.fallback_val))  # both start as the fallback
        assert fit.best_val == max(s for _, s in fit.curve)


def test_unknown_model_kind_is_refused():
    rows, table = _toy_shop(users=10)
    with pytest.raises(ValueError, match="model must be one of attention, sequential"):
        train_candidates(rows, table, ("transformer",))


def _inputs(rng, b: int, k: int, real: int):
    query = rng.normal(size=(b, DIM)).astype(np.float32)
    query /= np.linalg.norm(query, axis=1, keepdims=True)
    items = rng.normal(size=(b, k, DIM)).astype(np.float32)
    mask = np.zeros((b, k), np.float32)
    mask[:, :real] = 1
    items *= mask[..., None]
    has_query = (np.arange(b) % 2 == 0).astype(np.float32)[:, None]  # with and without a query
    query *= has_query
    return query, has_query, items, mask


def test_untrained_sequential_model_is_the_fallback():
    rng = np.random.default_rng(1)
    x = [torch.from_numpy(a) for a in _inputs(rng, 4, 10, 3)]
    cfg = SequentialConfig(dim=DIM, width=32, heads=4)
    from scorer.models.interest import InterestConfig

    with torch.no_grad():
        seq = SequentialInterestModel(cfg).eval()(*x)
        att = InterestModel(InterestConfig(dim=DIM, max_items=10)).eval()(*x)
    torch.testing.assert_close(seq, att, atol=1e-6, rtol=0)


def test_sequential_checkpoint_round_trip_and_onnx_equals_torch(tmp_path):
    import onnxruntime as ort

    from scorer.export.interest_export import export_interest_onnx

    torch.manual_seed(0)
    model = SequentialInterestModel(SequentialConfig(dim=DIM, width=32, heads=4))
    for p in model.parameters():  # away from the start, so the transformer's path matters
        p.data.add_(torch.randn_like(p) * 0.1)
    model.save(tmp_path / "ckpt")
    assert checkpoint_kind(tmp_path / "ckpt") == "sequential"
    loaded = load_interest_model(tmp_path / "ckpt")
    assert isinstance(loaded, SequentialInterestModel)
    export_interest_onnx(loaded, tmp_path / "model.onnx")
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(2)
    for b, k, real in ((1, 10, 10), (2, 10, 3), (4, 5, 1), (2, 14, 12)):  # batch, k and padding vary
        arrays = _inputs(rng, b, k, real)
        got = session.run(None, dict(zip(("query", "has_query", "items", "mask"), arrays)))[0]
        with torch.no_grad():
            want = loaded(*(torch.from_numpy(a) for a in arrays)).numpy()
        np.testing.assert_allclose(got, want, atol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)


def test_old_checkpoints_load_as_the_attention_model(tmp_path):
    import json

    InterestModel().save(tmp_path)
    config = json.loads((tmp_path / "interest_config.json").read_text())
    config.pop("kind")
    (tmp_path / "interest_config.json").write_text(json.dumps(config))
    assert isinstance(load_interest_model(tmp_path), InterestModel)
    (tmp_path / "interest_config.json").write_text(json.dumps({**config, "kind": "rnn"}))
    with pytest.raises(ValueError, match="unknown interest model kind 'rnn'"):
        load_interest_model(tmp_path)


def test_encoded_batches_equal_the_data_layers_tensors():
    from scorer.train.interest_data import batch_tensors
    from scorer.train.interest_train import EncodedExamples

    rows, table = _toy_shop(users=5)
    rows.at[0, "history"] = ["unknown", *rows.at[0, "history"]]  # unknown items are skipped
    table.queries["red shoes"] = table.items[3]
    rows.loc[1, "query"] = "red shoes"
    enc = EncodedExamples.of(rows, table, 10)
    idx = np.array([0, 1, 5, 2])
    want = batch_tensors(rows.iloc[idx], table, table.position(), 10)
    for got, w in zip(enc.batch(idx, table.items), want):
        np.testing.assert_array_equal(got.numpy(), w)


def test_a_gain_within_one_standard_error_is_noise_and_nothing_is_kept():
    fits = {"sequential": _fit("sequential", 0.107)}
    assert Selection(fallback_val=0.10, fits=fits, gain_se=0.005).winner is not None  # +0.007 > 0.005
    noisy = Selection(fallback_val=0.10, fits=fits, gain_se=0.02)  # +0.007 on ~100 examples
    assert noisy.winner is None and "beyond noise: nothing to keep" in noisy.summary()
    assert "standard error, 0.0200" in noisy.summary()


def test_the_simpler_candidate_is_kept_unless_the_other_beats_it_beyond_noise():
    """The highest of noisy validation curves is often the model that overfit (Online Retail's last 8
    purchases: sequential +0.0005 over attention on 201 examples, then below the fallback on the
    holdout): the simpler kind unless the other's paired gain over it is beyond noise."""
    from scorer.train.interest_train import prefer_simpler

    rng = np.random.default_rng(0)
    fallback = rng.uniform(0, 0.2, 400)
    attention = fallback + 0.05 + rng.normal(0, 0.01, 400)  # well beyond noise over the fallback
    noise = rng.normal(0, 0.05, 400)
    close = attention + noise - noise.mean() + 0.0005  # a hair ahead, within noise
    assert close.mean() > attention.mean()
    kind, says = prefer_simpler({"attention": attention, "sequential": close}, fallback)
    assert kind == "attention" and says.startswith("the simpler one: sequential's gain") and "<=" in says
    clear = attention + 0.03 + rng.normal(0, 0.01, 400)
    assert prefer_simpler({"attention": attention, "sequential": clear}, fallback) == ("sequential", "")
    # only the complex one beats the fallback: it is kept; neither: the highest, and nothing is kept
    assert prefer_simpler({"attention": fallback + rng.normal(0, 0.01, 400), "sequential": clear}, fallback)[0] == "sequential"
    assert prefer_simpler({"attention": fallback - 0.01, "sequential": fallback - 0.02}, fallback) == ("attention", "")
