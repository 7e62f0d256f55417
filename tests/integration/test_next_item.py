"""The next-item model end to end: trained on the tiny shop's interactions by the command's own code,
exported, loaded into a real Triton (string tensors through the onnxruntime backend) and answering
the gateway's client exactly as torch does."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
from rich.console import Console

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def trained(tiny_shop):
    from cli.next_item_training import train_next_item
    from scorer.train.sasrec_train import SASRecTrainConfig

    return train_next_item(tiny_shop.events, SASRecTrainConfig(max_seconds=60), 0.0, Console(quiet=True))


def test_training_stops_on_validation_and_gates_against_popularity(trained):
    c = trained.curve
    assert len(c.loss) == len(c.valid_ndcg10) >= 1 and np.isfinite(c.loss).all()
    assert c.best_valid_ndcg10 == max(c.valid_ndcg10)
    assert trained.gain.baseline == pytest.approx(
        trained.table.set_index(["method", "split"]).loc[("popularity", "validation, confirm half"), "NDCG@10"])
    assert trained.kept == (trained.gain.gain > trained.gain.se)
    # The tiny shop's sequences follow tastes: the model must beat popularity on test as well.
    t = trained.table.set_index(["method", "split"])["NDCG@10"]
    assert t[("SASRec (next-item model)", "test")] > t[("popularity", "test")], trained.table


def test_served_by_triton_equals_torch(trained, encoder_repo, triton):
    from contract.next_item import NEXT_ITEM_TOP_K
    from gateway.triton_client import TritonClient
    from modelrepo.admin import AdminClient
    from scorer.export.next_item_export import export_next_item
    from scorer.train.sasrec_train import left_pad

    vocab = trained.vocabulary
    version = export_next_item(trained.model, vocab, encoder_repo[0])
    admin = AdminClient(triton.grpc_url, triton.admin_key)
    admin.load_model("next_item_onnx")
    histories = [[vocab[3], vocab[1], vocab[4]], [vocab[0]], ["not-in-the-catalog", vocab[2]]]  # newest first

    async def call():
        client = TritonClient(triton.grpc_url)
        try:
            return await asyncio.gather(*(client.next_items(h, timeout_s=10, version=str(version)) for h in histories))
        finally:
            await client.close()

    try:
        served = asyncio.run(call())
        position = {v: i for i, v in enumerate(vocab)}
        for newest_first, (ids, logp) in zip(histories, served):
            known = [position[i] for i in reversed(newest_first) if i in position]
            with torch.no_grad():
                want = torch.log_softmax(trained.model.next_scores(left_pad([known], trained.model.config.max_len)), -1)[0].numpy()
            rows = [position[i] for i in ids]  # a correct top-k of torch's scores (near-ties may swap)
            assert len(set(rows)) == len(rows) == min(NEXT_ITEM_TOP_K, len(vocab))
            np.testing.assert_allclose(logp, want[rows], atol=1e-5)
            assert np.delete(want, rows).max(initial=-np.inf) <= logp[-1] + 1e-5
    finally:
        admin.unload_model("next_item_onnx")
        admin.close()
