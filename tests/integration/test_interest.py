"""The interest model: next-interaction examples through Feast, training, evaluation, ONNX, Triton."""

from __future__ import annotations

import asyncio

import numpy as np
import pandas as pd
import pytest
import torch

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def examples(feature_repo):
    from scorer.train.interest_data import load_interest_examples

    return load_interest_examples(feature_repo.path)


@pytest.fixture(scope="module")
def table(feature_repo, examples):
    from scorer.train.interest_data import embed_catalog_and_queries

    return embed_catalog_and_queries(feature_repo.path, examples.rows["query"].dropna().tolist())


@pytest.fixture(scope="module")
def selection(examples, table):
    """The default recipe of `recsys train interest` (validation split, early stopping, both kinds)."""
    from scorer.train.interest_train import train_candidates

    return train_candidates(examples.train, table)


def test_history_is_point_in_time_correct(feature_repo, examples):
    """Every history item was touched by that user before the list was shown (no leak from the future)."""
    events = feature_repo.shop.events
    acts = events[events["event_type"].isin(["CLICK", "ADD_TO_CART", "PURCHASE"])]
    first_touch = acts.groupby(["user_id", "item_id"])["timestamp"].min()
    rows = examples.rows[examples.rows["history"].map(len) > 0]
    assert len(rows) > 100
    for user, hist, ts in zip(rows["user_id"], rows["history"], rows["event_timestamp"]):
        for item in hist:
            assert first_touch[(user, item)] < ts, (user, item, ts)
    assert (examples.rows["grade"] > 0).all()


def test_default_recipe_keeps_a_model_only_when_it_beats_the_fallback_beyond_noise(examples, table, selection):
    """The default recipe keeps a model only if it beats the fallback on validation (the end of
    the training period) by more than the gain's standard error, and what it keeps does not lose to
    the fallback on the holdout beyond noise (the holdout follows the training period and took no
    part in training, stopping or choosing). On this tiny shop (~100 validation examples) the gain
    is often within noise: a CI run kept a model +0.007 ahead on validation that lost by 0.014 on the holdout before
    the gate asked for more than one standard error. Then nothing is kept and the fallback serves."""
    from scorer.eval.interest_eval import evaluate_interest
    from scorer.models.interest import InterestModel

    for fit in selection.fits.values():
        assert np.isfinite(fit.losses).all() and fit.curve[0][0] == 0 and fit.best_val >= fit.curve[0][1]
        assert fit.steps_run <= fit.budget and (fit.stopped_early or fit.steps_run == fit.budget)
    gain = selection.best.best_val - selection.fallback_val
    assert 0 < selection.gain_se < 0.2, selection.summary()  # ~100 paired examples: a few hundredths
    winner = selection.winner
    assert (winner is not None) == (gain > selection.gain_se + selection.min_gain), selection.summary()  # PairedGain's rule
    if winner is None:
        assert "beyond noise: nothing to keep" in selection.summary()
        return
    result = evaluate_interest(examples.holdout, examples.train, table,
                               {"untrained": InterestModel().eval(), "kept": winner.model}).set_index(["method", "slice"])
    untrained, kept = result.loc[("untrained", "all")], result.loc[("kept", "all")]
    # What it keeps does not lose on the holdout beyond noise (paired over the same examples). A
    # strict "higher" failed in CI: kept +0.021 on validation (beyond its error), then -0.0014 on
    # the holdout, far inside that holdout's noise; a model that really loses still fails here.
    from scorer.train.interest_train import paired_gain

    held = paired_gain(winner.model, InterestModel().eval(), examples.holdout, table, versus="untrained")
    assert held.gain > -2 * held.se, (held.says(), selection.summary(), result)
    print(selection.summary(), result.round(4).to_string(), sep="\n")  # the numbers docs/models.md quotes (-s)
    # Recall@50 is a guard, not the target: on the tiny shop (260 holdout examples) it moves by ~0.015.
    assert kept["Recall@50"] >= untrained["Recall@50"] - 0.03, result
    # Both are far above popularity: history and query carry the signal.
    assert untrained["NDCG@10"] > 3 * result.loc[("popularity", "all"), "NDCG@10"]


def test_untrained_model_is_the_gateway_fallback(table):
    from gateway.retrieval import fallback_interest
    from scorer.models.interest import InterestModel

    class Snap:  # what fallback_interest reads
        class index:
            embeddings = table.items

    rng = np.random.default_rng(0)
    history = rng.choice(len(table.item_ids), 4, replace=False).tolist()
    query = table.items[history[0]] * 0.5 + table.items[7] * 0.5
    query /= np.linalg.norm(query)
    items = np.zeros((1, 10, table.items.shape[1]), np.float32)
    items[0, :4] = table.items[history]
    mask = np.zeros((1, 10), np.float32)
    mask[0, :4] = 1
    for q, has in ((query, 1.0), (np.zeros_like(query), 0.0)):
        with torch.no_grad():
            got = InterestModel()(torch.from_numpy(q[None].astype(np.float32)), torch.tensor([[has]]),
                                  torch.from_numpy(items), torch.from_numpy(mask))[0].numpy()
        want = fallback_interest(Snap, history, q if has else None)
        np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("kind", ["attention", "sequential"])
def test_served_by_triton_equals_torch(kind, selection, encoder_repo, triton, table):
    from modelrepo.admin import AdminClient

    from gateway.triton_client import TritonClient
    from scorer.export.interest_export import export_interest

    model = selection.fits[kind].model
    repo = encoder_repo[0]
    version = export_interest(repo, model)
    admin = AdminClient(triton.grpc_url, triton.admin_key)
    admin.load_model("interest_onnx")
    try:
        items = np.zeros((10, table.items.shape[1]), np.float32)
        items[:3] = table.items[:3]
        mask = np.array([1, 1, 1] + [0] * 7, np.float32)
        query = table.items[5]

        async def call():
            client = TritonClient(triton.grpc_url)
            try:
                return await client.interest(query, True, items, mask, timeout_s=10)
            finally:
                await client.close()

        served = asyncio.run(call())
        with torch.no_grad():
            want = model(torch.from_numpy(query[None]), torch.ones(1, 1), torch.from_numpy(items[None]),
                         torch.from_numpy(mask[None]))[0].numpy()
        np.testing.assert_allclose(served, want, atol=1e-5)
        assert abs(np.linalg.norm(served) - 1) < 1e-5
        assert str(version) in [m["version"] for m in admin.get_model_repository_index(as_json=True)["models"]
                                if m["name"] == "interest_onnx" and m.get("state") == "READY"]
    finally:
        admin.unload_model("interest_onnx")
        admin.close()


def test_report_is_written(examples, table, selection, tmp_path):
    from scorer.eval.interest_eval import evaluate_interest, write_interest_report

    fits = selection.fits.values()
    result = evaluate_interest(examples.holdout, examples.train, table, {f"{f.kind}, trained": f.model for f in fits})
    report = write_interest_report(result, tmp_path, {f.kind: f.losses for f in fits}, {f.kind: f.curve for f in fits},
                                   selection.fallback_val, selection.summary())
    text = report.read_text()
    assert "| attention, trained | all |" in text and "| sequential, trained | all |" in text
    assert selection.summary() in text and (tmp_path / "comparison.png").stat().st_size > 1000
    assert isinstance(pd.read_json(tmp_path / "metrics.json"), pd.DataFrame)
    curves = pd.read_json(tmp_path / "validation.json", typ="series")["curves"]
    assert set(curves) == {"attention", "sequential"} and curves["attention"][0][0] == 0
