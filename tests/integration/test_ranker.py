"""The cross-encoder ranker: training lists through Feast, fine-tuning, export, serving from Triton."""

from __future__ import annotations

import asyncio

import numpy as np
import pandas as pd
import pytest
import torch

from contract.ranker_inputs import NUMERIC_FEATURES

pytestmark = pytest.mark.integration

STEPS = 30
SHOE = "Nike Glide 9 Lightweight Trail Running Shoes - Navy | brand Nike | Running Shoes | price 139.99"
ESPRESSO = "DeLonghi Pulse 2 Milk Frother Espresso Machine - Grey | brand DeLonghi | Coffee Makers | price 169.99"


@pytest.fixture(scope="module")
def lists(feature_repo):
    from scorer.train.ranker_data import load_ranker_lists

    return load_ranker_lists(feature_repo.path)


@pytest.fixture(scope="module")
def trained(lists, tmp_path_factory):
    from scorer.models.ranker import CrossEncoderRanker
    from scorer.train.ranker_train import RankerTrainConfig, train_ranker

    ckpt = tmp_path_factory.mktemp("ranker") / "ckpt"
    model, losses = train_ranker(lists.split(holdout=False), ckpt, RankerTrainConfig(max_steps=STEPS))
    return CrossEncoderRanker.load(ckpt), losses


def test_every_impression_is_a_training_row(feature_repo, lists):
    events = pd.read_parquet(feature_repo.offline / "events.parquet")
    shown = events[events["event_type"] == "IMPRESSION"].groupby(["request_id", "item_id"]).ngroups
    assert len(lists.rows) == shown
    assert lists.numeric.shape == (shown, len(NUMERIC_FEATURES)) and np.isfinite(lists.numeric).all()
    assert (lists.rows["item_text"].str.len() > 10).all()
    # Features really arrived from Feast: popularity and user affinities are non-zero somewhere.
    assert (lists.numeric[:, NUMERIC_FEATURES.index("popularity_7d")] > 0).mean() > 0.3
    assert (lists.numeric[:, NUMERIC_FEATURES.index("user_category_affinity")] > 0).mean() > 0.1


def _scores(model, context: str, items: list[str]) -> list[float]:
    from scorer.models.ranker import load_ranker_tokenizer

    tok = load_ranker_tokenizer(model.config)
    enc = tok([context] * len(items), items, padding=True, return_tensors="pt")
    from scorer.train.ranker_data import text_similarities

    numeric = torch.zeros((len(items), len(NUMERIC_FEATURES)))
    numeric[:, 0] = torch.from_numpy(text_similarities([context] * len(items), items))  # as serving will
    with torch.no_grad():
        out = model(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"], numeric)
    return out.squeeze(-1).tolist()


def test_ranker_orders_an_obvious_case_before_and_after_training(trained):
    from scorer.models.ranker import CrossEncoderRanker

    model, losses = trained
    assert np.isfinite(losses).all() and len(losses) == STEPS
    for ranker in (CrossEncoderRanker().eval(), model):  # starts as the bi-encoder; training keeps it
        shoe, espresso = _scores(ranker, "nike trail running shoes", [SHOE, ESPRESSO])
        assert shoe > espresso + 1.0, (shoe, espresso)


def test_ranker_served_by_triton_equals_torch(trained, encoder_repo, triton):
    from modelrepo.admin import AdminClient

    from gateway.triton_client import TritonClient
    from scorer.export.ranker_export import export_ranker

    model, _ = trained
    repo = encoder_repo[0]
    version = export_ranker(repo, model)
    client = AdminClient(triton.grpc_url, triton.admin_key)
    for name in ("pair_tokenizer", "ranker_onnx", "ranker"):  # explicit model control: load while serving
        client.load_model(name)
    client.close()

    context = "nike trail running shoes | likes Running Shoes | mid price"
    items = [SHOE, ESPRESSO] * 3
    features = np.random.default_rng(0).random((len(items), len(NUMERIC_FEATURES)), dtype=np.float32)

    async def go():
        c = TritonClient(triton.grpc_url)
        try:
            return await c.rank(context, items, features, timeout_s=30), await c.ready_versions("ranker_onnx")
        finally:
            await c.close()

    got, versions = asyncio.run(go())
    from scorer.models.ranker import load_ranker_tokenizer

    tok = load_ranker_tokenizer(model.config)
    enc = tok([context] * len(items), items, padding=True, truncation=True, max_length=model.config.max_length,
              return_tensors="pt")
    with torch.no_grad():
        want = model(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"], torch.from_numpy(features)).squeeze(-1).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert versions == [str(version)]
    assert got[0] > got[1]  # the shoe beats the espresso machine through Triton too


def test_a_published_rankers_verdict_is_in_its_ensemble_config(trained, encoder_repo, triton):
    """What the gateway's ranker_mode auto reads: publishing a version with validation.json pins the
    `ranker` ensemble to it with `beats_blend` set; publishing one without (the untrained ranker)
    leaves the parameter out. Real tritonserver, explicit model control with the admin key."""
    from contract.ranker_inputs import RANKER_VERDICT_PARAMETER
    from gateway.triton_client import TritonClient
    from modelrepo.admin import AdminClient
    from modelrepo.publish import publish
    from scorer.export.ranker_export import export_ranker

    model, _ = trained
    repo = encoder_repo[0]
    proven = export_ranker(repo, model, validation={RANKER_VERDICT_PARAMETER: True, "metric": "ndcg@5",
                                                    "ranker": 0.61, "blend": 0.58, "lists": 40})
    # Loaded here, not left to an earlier test: explicit model control starts with the encoder only.
    client = AdminClient(triton.grpc_url, triton.admin_key)
    for name in ("pair_tokenizer", "ranker_onnx", "ranker"):
        client.load_model(name)
    client.close()
    publish(triton.grpc_url, repo, "ranker", proven)

    async def read() -> tuple[str, str | None]:
        c = TritonClient(triton.grpc_url)
        try:
            return (await c.serving_version("ranker", "ranker_onnx"),
                    await c.config_parameter("ranker", RANKER_VERDICT_PARAMETER))
        finally:
            await c.close()

    assert asyncio.run(read()) == (str(proven), "true")
    unproven = export_ranker(repo)  # the untrained ranker: no validation record
    publish(triton.grpc_url, repo, "ranker", unproven)
    assert asyncio.run(read()) == (str(unproven), None)
