"""The learned fusion's contract (features, model file, forward pass), its trainer, and how the
gateway loads a model file: exact values on hand-made inputs, hostile files refused with a message
that names what is wrong, the numpy forward pass equal to the trained torch network."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings, strategies as st

from contract.fusion import (FUSION_FEATURES, LOGPROB_SPAN, MAX_SCALE, MISSING_RANK, FusionInputs, FusionModel, feature_matrix,
                             log_rank)
from contract.fusion import repeat_share
from gateway.learned_fusion import (FusionFileWatch, LearnedFusion, LearnedFusionError, model_relevance,
                                    user_repeat_share)
from gateway.scoring import UserView
from contract.scores import RANKER_PRIOR
from scorer.train.fusion_train import MISS, FusionNet, fit_fusion, list_ranks

F = len(FUSION_FEATURES)


def inputs(n: int = 3, **over) -> FusionInputs:
    base = dict(covisit_newest=np.zeros(n), covisit_seeds=np.zeros(n), covisit_rank=np.full(n, MISSING_RANK),
                interest_rank=np.full(n, MISSING_RANK), interest_cosine=np.zeros(n),
                popular_rank=np.full(n, MISSING_RANK), popularity=np.zeros(n), bought_ago=np.full(n, MISSING_RANK),
                in_session=np.zeros(n, bool), personalization=np.zeros(n), freshness=np.zeros(n))
    return FusionInputs(**{**base, **over})


def col(x: np.ndarray, name: str) -> np.ndarray:
    return x[:, FUSION_FEATURES.index(name)]


def model(hidden: int = 4, seed: int = 0, scale: float = 1.0) -> FusionModel:
    rng = np.random.default_rng(seed)
    return FusionModel(rng.standard_normal((F, hidden)).astype(np.float32), rng.standard_normal(hidden).astype(np.float32),
                       rng.standard_normal(hidden).astype(np.float32), 0.5, scale)


def test_features_come_in_the_contracts_order_and_scales():
    x = feature_matrix(inputs(3, covisit_newest=np.array([1.0, 0.5, 0.0]), covisit_seeds=np.array([2.0, 1.0, 0.0]),
                              covisit_rank=np.array([0, 9, MISSING_RANK]), bought_ago=np.array([0, MISSING_RANK, 3]),
                              in_session=np.array([False, True, False]), popularity=np.array([0.2, 0.4, 0.6])))
    assert x.shape == (3, F) and x.dtype == np.float32
    assert col(x, "covisit_seeds").tolist() == [1.0, 0.5, 0.0]  # relative to the best candidate's
    assert col(x, "covisited").tolist() == [1.0, 1.0, 0.0]
    assert col(x, "covisit_rank") == pytest.approx([0.0, math.log1p(9) / math.log1p(MISSING_RANK), 1.0])
    assert col(x, "interest_rank").tolist() == [1.0, 1.0, 1.0]  # missing everywhere
    assert col(x, "bought").tolist() == [1.0, 0.0, 1.0]
    assert col(x, "bought_ago") == pytest.approx([0.0, 1.0, math.log1p(3) / math.log1p(MISSING_RANK)])
    assert col(x, "in_session").tolist() == [0.0, 1.0, 0.0]
    assert col(x, "popularity") == pytest.approx([0.2, 0.4, 0.6])


def test_next_item_features_read_its_rank_and_log_probability_and_missing_reads_as_absent():
    x = feature_matrix(inputs(4, next_item_rank=np.array([0, 9, MISSING_RANK, MISSING_RANK]),
                              next_item_logprob=np.array([0.0, -LOGPROB_SPAN / 2, np.nan, -np.inf])))
    assert col(x, "next_item_rank") == pytest.approx([0.0, math.log1p(9) / math.log1p(MISSING_RANK), 1.0, 1.0])
    assert col(x, "next_item_logprob") == pytest.approx([1.0, 0.5, 0.0, 0.0])
    none = feature_matrix(inputs(2))  # no model served
    assert col(none, "next_item_rank").tolist() == [1.0, 1.0] and col(none, "next_item_logprob").tolist() == [0.0, 0.0]
    far = feature_matrix(inputs(1, next_item_rank=np.array([0]), next_item_logprob=np.array([-1e30])))
    assert col(far, "next_item_logprob").tolist() == [0.0]


def test_repeat_share_is_the_users_share_of_repeat_interactions_for_every_candidate():
    x = feature_matrix(inputs(3, repeat_share=0.25))
    assert col(x, "repeat_share").tolist() == [0.25, 0.25, 0.25]
    assert col(feature_matrix(inputs(2)), "repeat_share").tolist() == [0.0, 0.0]  # unknown: 0
    assert repeat_share(10, 4) == pytest.approx(0.6)
    assert repeat_share(3, 5) == 0.0  # never below 0 (counts and list read at different times)


@pytest.mark.parametrize("n, d", [(0, 0), (-5, 1), (float("nan"), 1), (float("inf"), 1), (None, 1), ("x", 1), (5, -1), (10**400, 1)])
def test_repeat_share_of_counts_that_are_not_counts_is_zero(n, d):
    assert repeat_share(n, d) == 0.0


def test_the_gateway_reads_repeat_share_from_the_profiles_counts_and_recent_items():
    values = {"n_clicks": 2, "n_carts": 0, "n_purchases": 8, "recent_item_ids": ["a", "b", "c", "d"]}
    assert user_repeat_share(UserView(values=values)) == pytest.approx(0.6)
    assert user_repeat_share(UserView(values={**values, "n_purchases": None})) == 0.0  # 2 events, 4 items
    assert user_repeat_share(UserView(values={**values, "n_clicks": "many"})) == 0.0  # a hostile store value
    assert user_repeat_share(UserView(values={**values, "n_clicks": 10**400})) == 0.0
    assert user_repeat_share(UserView()) == 0.0  # anonymous


def test_features_of_no_candidates_and_of_non_finite_inputs_are_finite():
    assert feature_matrix(inputs(0)).shape == (0, F)
    x = feature_matrix(inputs(2, interest_cosine=np.array([np.nan, np.inf]), popularity=np.array([-np.inf, 1.0])))
    assert np.isfinite(x).all()
    assert log_rank(np.array([0, MISSING_RANK, 10 * MISSING_RANK])).tolist() == [0.0, 1.0, 1.0]


def test_relevance_is_the_softmax_share_relative_to_the_best_and_keeps_the_logits_order():
    m = model()
    x = np.random.default_rng(1).random((7, F)).astype(np.float32)
    z = m.logits(x)
    r = m.relevance(x)
    assert r.max() == pytest.approx(1.0) and (r > 0).all() and (r <= 1).all()
    assert np.argsort(-r, kind="stable").tolist() == np.argsort(-z, kind="stable").tolist()
    assert np.allclose(r, np.exp(z - z.max()), rtol=1e-5)
    assert model_relevance(model(scale=3.0), x) == pytest.approx(RANKER_PRIOR * 3.0 * r, rel=1e-5)
    assert len(m.relevance(np.zeros((0, F), np.float32))) == 0


def test_a_model_file_round_trips_exactly():
    m = FusionModel(model().w1, model().b1, model().w2, 0.25, 9.0, {"data": "shop"})
    back = FusionModel.from_json(m.to_json())
    assert np.array_equal(back.w1, m.w1) and np.array_equal(back.b1, m.b1) and np.array_equal(back.w2, m.w2)
    assert (back.b2, back.scale, back.about) == (0.25, 9.0, {"data": "shop"})


def _file(**over) -> str:
    d = json.loads(model().to_json())
    d.update(over)
    return json.dumps(d)


@pytest.mark.parametrize("text, says", [
    ("{not json", "not JSON"),
    ("[]", "format"),
    (_file(format="recsys-learned-fusion/0"), "format"),
    (_file(features=list(FUSION_FEATURES)[::-1]), "FUSION_FEATURES"),
    (_file(features=list(FUSION_FEATURES)[:-1]), "FUSION_FEATURES"),
    (_file(w1=[[0.0] * 4] * (F - 1)), "shapes"),
    (_file(w2=[1.0, 2.0]), "shapes"),
    (_file(b1=[], w1=[[]] * F, w2=[]), "shapes"),
    (_file(b2="x"), "not numbers"),
    (_file(w1="weights"), "not numbers"),
    (_file(b2=float("nan")), "NaN"),
    (_file(w2=[1.0, float("inf"), 0.0, 0.0]), "NaN"),
    (_file(scale=0.0), "scale"),
    (_file(scale=MAX_SCALE + 1), "scale"),
    # An integer past float range: OverflowError inside, a named ValueError outside.
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    (_file(b2=10 ** 400), "not numbers"),
    (_file(scale=10 ** 400), "not numbers"),
    (_file(w2=[10 ** 400, 0.0, 0.0, 0.0]), "not numbers"),
    (_file(w2=[1e39, 0.0, 0.0, 0.0]), "NaN or infinity"),  # past float32's range: infinity once cast
])
def test_a_bad_model_file_is_refused_with_what_is_wrong(text, says):
    with pytest.raises(ValueError, match=says):
        FusionModel.from_json(text)


@settings(max_examples=200, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=5),
                    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=6)))
def test_any_json_is_a_model_or_a_value_error(value):
    d = json.loads(model().to_json())
    for text in (json.dumps(value), json.dumps({**d, "w1": value}), json.dumps({**d, "b1": value}),
                 json.dumps({**d, "scale": value}), json.dumps({**d, "about": value}),
                 json.dumps({**d, "w2": value}), json.dumps({**d, "b2": value})):
        try:
            FusionModel.from_json(text)
        except ValueError:
            pass


def test_the_gateway_names_the_file_it_cannot_serve(tmp_path):
    with pytest.raises(LearnedFusionError, match=r"missing\.json: cannot read"):
        LearnedFusion.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_bytes(b"\xff\xfe")
    with pytest.raises(LearnedFusionError, match=r"bad\.json"):
        LearnedFusion.load(bad)
    good = tmp_path / "good.json"
    good.write_text(model().to_json())
    loaded = LearnedFusion.load(good)
    assert len(loaded.version) == 12 and loaded.version == LearnedFusion.load(good).version
    good.write_text(model(seed=1).to_json())
    assert LearnedFusion.load(good).version != loaded.version  # another model, another version


def _publish(path, text: str) -> None:
    """As `recsys train fusion` writes its file: a finished file renamed into place."""
    partial = path.with_suffix(".partial")
    partial.write_text(text)
    partial.replace(path)


def test_a_new_file_is_served_a_bad_one_leaves_the_old_one_serving(tmp_path):
    path = tmp_path / "fusion.json"
    path.write_text(model().to_json())
    first = LearnedFusion.load(path)
    watch = FusionFileWatch(path, first)
    assert watch.check() == (None, "")  # unchanged: not even read
    _publish(path, model(seed=1).to_json())
    new, why = watch.check()
    assert new is not None and new.version != first.version and why == ""
    assert watch.current is new and watch.check() == (None, "")
    _publish(path, model(seed=1).to_json())  # the same model written again: nothing to swap
    assert watch.check() == (None, "")

    for bad, says in (('{"format": "x"}', "not a learned-fusion file"), ("{not json", "not JSON"),
                      ("[" * 100_000 + "]" * 100_000, "nested too deeply")):
        _publish(path, bad)
        new, why = watch.check()
        assert new is None and says in why and str(path) in why and f"still serving {watch.current.version}" in why
        assert watch.check() == (None, "")  # said once per version of the file, not every interval
    path.unlink()
    new, why = watch.check()
    assert new is None and "gone" in why
    _publish(path, model(seed=2).to_json())  # back with a servable file: served
    new, _ = watch.check()
    assert new is not None and new.version == LearnedFusion.load(path).version


def test_a_file_rewritten_in_place_is_noticed(tmp_path):
    path = tmp_path / "fusion.json"
    path.write_text(model().to_json())
    watch = FusionFileWatch(path, LearnedFusion.load(path))
    path.write_text(model(hidden=8).to_json())  # same inode; other size
    new, _ = watch.check()
    assert new is not None and new.model.w1.shape == (F, 8)


def test_the_exported_network_is_the_trained_one():
    torch.manual_seed(0)
    net = FusionNet(8)
    x = np.random.default_rng(2).random((11, F)).astype(np.float32)
    with torch.no_grad():
        want = net(torch.from_numpy(x)).numpy()
    assert np.allclose(net.export().logits(x), want, atol=1e-5)


def test_list_ranks_is_the_targets_place_in_score_order():
    assert list_ranks([np.array([0.1, 0.9, 0.5]), np.array([1.0, 1.0]), np.array([0.3])], [2, 1, -1]).tolist() == \
        [1, 1, MISS]  # ties: the earlier candidate first


def planted(n_lists: int, seed: int) -> tuple[list[np.ndarray], list[int]]:
    """Lists whose target is where a product of two features peaks: rank fusion of single features
    cannot find it, a network can."""
    rng = np.random.default_rng(seed)
    lists, targets = [], []
    for _ in range(n_lists):
        x = rng.random((int(rng.integers(10, 60)), F)).astype(np.float32)
        s = 3 * x[:, 8] * x[:, 1] + x[:, 0] + 0.1 * rng.standard_normal(len(x))
        lists.append(x)
        targets.append(int(np.argmax(s)) if rng.random() < 0.9 else -1)
    return lists, targets


def test_the_fit_learns_a_planted_rule_beyond_the_untrained_network_and_records_its_curve():
    from scorer.eval.interest_eval import ndcg_per_example

    lists, targets = planted(400, 0)
    seen = []
    fit = fit_fusion(lists, targets, seed=0, on_epoch=lambda e, v: seen.append(e))
    assert fit.curve[0][0] == 0 and seen[0] == 0 and fit.best_epoch > 0
    assert [e for e, _ in fit.loss_curve] == [e for e, _ in fit.curve] == seen
    losses = dict(fit.loss_curve)
    assert losses[fit.best_epoch] == min(losses.values()) < losses[0] - 0.5  # kept: the lowest held-out loss
    assert dict(fit.curve)[fit.best_epoch] > fit.curve[0][1] + 0.2  # and it ranks the held-out lists far better
    assert fit.stop_lists == 80 and fit.fit_lists < 320  # the missed targets teach nothing
    test, test_targets = planted(200, 1)
    got = ndcg_per_example(list_ranks([fit.model.logits(x) for x in test], test_targets)).mean()
    by_one_feature = ndcg_per_example(list_ranks([x[:, 0] for x in test], test_targets)).mean()
    assert got > by_one_feature + 0.2


def test_the_fit_is_reproducible_and_refuses_what_it_cannot_use():
    lists, targets = planted(60, 3)
    a, b = fit_fusion(lists, targets, seed=4, max_epochs=3), fit_fusion(lists, targets, seed=4, max_epochs=3)
    assert np.array_equal(a.model.w1, b.model.w1) and a.curve == b.curve
    with pytest.raises(ValueError, match="2 lists"):
        fit_fusion(lists[:1], targets[:1])
    with pytest.raises(ValueError, match="targets"):
        fit_fusion(lists, targets[:-1])
    none_found = fit_fusion(lists[:5], [-1] * 5)  # nothing to learn from: the untrained network, no crash
    assert none_found.best_epoch == 0 and none_found.fit_lists == 0


def test_the_fusion_is_fitted_on_the_interest_vectors_the_gateway_serves(tmp_path):
    """`recsys train fusion --model-repo`: the newest interest_onnx version, run as the gateway calls
    it; the untrained model exported there is the gateway's formula, so both must agree."""
    from types import SimpleNamespace

    from cli.fusion_learning import onnx_interest, served_interest_model
    from gateway.retrieval import fallback_interest
    from scorer.export.interest_export import export_interest

    assert served_interest_model(tmp_path) is None  # none served: the formula
    export_interest(tmp_path, version=1)
    export_interest(tmp_path, version=3)
    (tmp_path / "interest_onnx" / "7").mkdir()  # a version folder without a model file is not served
    assert served_interest_model(tmp_path) == tmp_path / "interest_onnx" / "3" / "model.onnx"
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((30, 384)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    snap = SimpleNamespace(index=SimpleNamespace(dim=384, embeddings=emb))
    interest = onnx_interest(served_interest_model(tmp_path), recent_items=10)
    for history in ([4], [3, 9, 27], list(range(12))):
        want = fallback_interest(snap, history[:10], None)
        assert np.allclose(interest(snap, history), want, atol=1e-4)


def test_the_interest_models_training_window_travels_with_its_exported_version(tmp_path):
    """`recsys export interest` copies the checkpoint's record beside the version; train_fusion reads
    it there: the untrained model has seen nothing; a version without a record is said to be unknown."""
    from cli.fusion_learning import interest_window
    from modelrepo.layout import TRAINED_BEFORE, UNTRAINED, read_validation
    from scorer.export.interest_export import export_interest
    from scorer.models.interest import InterestModel

    untrained = export_interest(tmp_path)
    assert read_validation(tmp_path / "interest_onnx" / str(untrained)) == {UNTRAINED: True}
    assert interest_window(tmp_path / "interest_onnx" / str(untrained) / "model.onnx")[0] is None
    trained = export_interest(tmp_path, InterestModel(), validation={TRAINED_BEFORE: "2026-03-01T12:00:00+00:00"})
    since, says = interest_window(tmp_path / "interest_onnx" / str(trained) / "model.onnx")
    assert since == pd.Timestamp("2026-03-01 12:00", tz="UTC") and "2026-03-01 12:00 UTC" in says
    unknown = export_interest(tmp_path, InterestModel())
    since, says = interest_window(tmp_path / "interest_onnx" / str(unknown) / "model.onnx")
    assert since is None and "unknown" in says
    assert interest_window(None) == (None, "")
