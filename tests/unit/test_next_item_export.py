"""The next-item model's contract and its ONNX export: item ids in, item ids out, equal to torch."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from contract.next_item import HISTORY_LEN, PAD_ITEM, TOP_K, history_tensor, served_history
from scorer.export.next_item_export import build_next_item_onnx, export_next_item
from scorer.models.sasrec import SASRec, SASRecConfig
from scorer.train.sasrec_train import left_pad

N_ITEMS = 130
VOCAB = [f"sku-{i}" for i in range(N_ITEMS)]


@pytest.fixture(scope="module")
def model() -> SASRec:
    torch.manual_seed(0)
    return SASRec(SASRecConfig(n_items=N_ITEMS, max_len=HISTORY_LEN, dim=16, n_layers=1, n_heads=2, dropout=0.0)).eval()


@pytest.fixture(scope="module")
def session(model) -> ort.InferenceSession:
    return ort.InferenceSession(build_next_item_onnx(model, VOCAB).SerializeToString(), providers=["CPUExecutionProvider"])


def torch_top(model: SASRec, history: list[int]) -> tuple[list[str], np.ndarray]:
    """What the served graph must answer: SASRec's log-softmax over the known history, top TOP_K."""
    with torch.no_grad():
        logp = torch.log_softmax(model.next_scores(left_pad([history], HISTORY_LEN)), -1)[0].numpy()
    top = np.argsort(-logp, kind="stable")[:TOP_K]
    return [VOCAB[i] for i in top], logp[top]


def test_history_tensor_is_oldest_first_left_padded_and_capped():
    assert list(history_tensor(["c", "b", "a"])[-3:]) == ["a", "b", "c"]
    assert list(history_tensor(["c"])[:-1]) == [PAD_ITEM] * (HISTORY_LEN - 1)
    long = [str(i) for i in range(HISTORY_LEN + 10)]  # newest first
    assert list(history_tensor(long)) == long[:HISTORY_LEN][::-1]
    assert history_tensor([]).shape == (HISTORY_LEN,)


def test_served_history_is_distinct_newest_first_where_last_seen():
    assert served_history(["a", "b", "a", "c", "b"]) == ["b", "c", "a"]


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, N_ITEMS - 1), min_size=1, max_size=HISTORY_LEN))
def test_served_graph_equals_torch(model, session, oldest_first):
    newest_first = [VOCAB[i] for i in reversed(oldest_first)]
    ids, logp = session.run(None, {"history": history_tensor(newest_first)[None]})
    want_ids, want_logp = torch_top(model, oldest_first)
    assert list(ids[0]) == want_ids
    np.testing.assert_allclose(logp[0], want_logp, atol=1e-5)
    assert np.all(np.diff(logp[0]) <= 1e-7)  # best first


def test_unknown_items_read_as_absent_not_as_the_newest(model, session):
    """An id the vocabulary lacks is dropped: the newest *known* item stays the last one read."""
    with_unknown = history_tensor(["no-such-item", VOCAB[7], "also-unknown", VOCAB[3]])
    known_only = history_tensor([VOCAB[7], VOCAB[3]])
    a, b = (session.run(None, {"history": h[None]}) for h in (with_unknown, known_only))
    assert list(a[0][0]) == list(b[0][0]) == torch_top(model, [3, 7])[0]
    np.testing.assert_allclose(a[1], b[1], atol=1e-6)


def test_a_batch_answers_each_row_as_alone(model, session):
    rows = [history_tensor([VOCAB[i] for i in h]) for h in ([1, 2, 3], [5], [9, 9, 9, 4])]
    batched = session.run(None, {"history": np.stack(rows)})
    for r, row in enumerate(rows):
        alone = session.run(None, {"history": row[None]})
        assert list(batched[0][r]) == list(alone[0][0])
        np.testing.assert_allclose(batched[1][r], alone[1][0], atol=1e-6)


def test_small_vocabulary_returns_all_of_it():
    torch.manual_seed(1)
    small = SASRec(SASRecConfig(n_items=5, max_len=HISTORY_LEN, dim=8, n_layers=1, n_heads=2, dropout=0.0)).eval()
    s = ort.InferenceSession(build_next_item_onnx(small, list("abcde")).SerializeToString(), providers=["CPUExecutionProvider"])
    ids, logp = s.run(None, {"history": history_tensor(["a"])[None]})
    assert sorted(ids[0]) == list("abcde") and abs(np.exp(logp[0]).sum() - 1) < 1e-5


@pytest.mark.parametrize("vocab, message", [(VOCAB[:-1], "vocabulary has"), (VOCAB[:-1] + [VOCAB[0]], "distinct"),
                                            (VOCAB[:-1] + [""], "non-empty")])
def test_bad_vocabulary_is_refused(model, vocab, message):
    with pytest.raises(ValueError, match=message):
        build_next_item_onnx(model, vocab)


def test_export_writes_a_new_version_and_nothing_on_failure(model, tmp_path):
    assert export_next_item(model, VOCAB, tmp_path) == 1
    assert export_next_item(model, VOCAB, tmp_path) == 2
    assert (tmp_path / "next_item_onnx" / "2" / "model.onnx").is_file()
    with pytest.raises(ValueError):
        export_next_item(model, VOCAB[:3], tmp_path)
    assert sorted(p.name for p in (tmp_path / "next_item_onnx").iterdir()) == ["1", "2"]
