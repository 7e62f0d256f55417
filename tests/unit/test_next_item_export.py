"""The next-item model's contract and its ONNX export: item ids in, item ids out, equal to torch."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from contract.next_item import NEXT_ITEM_HISTORY, PAD_ITEM, NEXT_ITEM_TOP_K, history_tensor, served_history
from scorer.export.next_item_export import build_next_item_onnx, export_next_item
from scorer.models.sasrec import SASRec, SASRecConfig
from scorer.train.sasrec_train import left_pad

N_ITEMS = 130
VOCAB = [f"sku-{i}" for i in range(N_ITEMS)]


@pytest.fixture(scope="module")
def model() -> SASRec:
    torch.manual_seed(0)
    return SASRec(SASRecConfig(n_items=N_ITEMS, max_len=NEXT_ITEM_HISTORY, dim=16, n_layers=1, n_heads=2, dropout=0.0)).eval()


@pytest.fixture(scope="module")
def session(model) -> ort.InferenceSession:
    return ort.InferenceSession(build_next_item_onnx(model, VOCAB).SerializeToString(), providers=["CPUExecutionProvider"])


def torch_logp(model: SASRec, history: list[int]) -> np.ndarray:
    """SASRec's log-softmax over the vocabulary for a history of positions (oldest first)."""
    with torch.no_grad():
        return torch.log_softmax(model.next_scores(left_pad([history], NEXT_ITEM_HISTORY)), -1)[0].numpy()


def assert_is_top_k(ids, logp, want: np.ndarray) -> None:
    """`ids`/`logp` are a correct top NEXT_ITEM_TOP_K of `want` (torch's log-probabilities): each
    returned score is torch's for that id, best first, distinct, and nothing left out scores higher
    (near-ties may order differently between ORT and torch, so the order is not compared by id)."""
    rows = [VOCAB.index(i) for i in ids]
    assert len(rows) == len(set(rows)) == min(NEXT_ITEM_TOP_K, len(want))
    np.testing.assert_allclose(logp, want[rows], atol=1e-5)
    assert np.all(np.diff(logp) <= 1e-6)
    rest = np.delete(want, rows)
    assert rest.max(initial=-np.inf) <= logp[-1] + 1e-5


def test_history_tensor_is_oldest_first_left_padded_and_capped():
    assert list(history_tensor(["c", "b", "a"])[-3:]) == ["a", "b", "c"]
    assert list(history_tensor(["c"])[:-1]) == [PAD_ITEM] * (NEXT_ITEM_HISTORY - 1)
    long = [str(i) for i in range(NEXT_ITEM_HISTORY + 10)]  # newest first
    assert list(history_tensor(long)) == long[:NEXT_ITEM_HISTORY][::-1]
    assert history_tensor([]).shape == (NEXT_ITEM_HISTORY,)


def test_served_history_is_distinct_newest_first_where_last_seen():
    assert served_history(["a", "b", "a", "c", "b"]) == ["b", "c", "a"]


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, N_ITEMS - 1), min_size=1, max_size=NEXT_ITEM_HISTORY))
def test_served_graph_equals_torch(model, session, oldest_first):
    newest_first = [VOCAB[i] for i in reversed(oldest_first)]
    ids, logp = session.run(None, {"history": history_tensor(newest_first)[None]})
    assert_is_top_k(list(ids[0]), logp[0], torch_logp(model, oldest_first))


def test_unknown_items_read_as_absent_not_as_the_newest(model, session):
    """An id the vocabulary lacks is dropped: the newest *known* item stays the last one read."""
    with_unknown = history_tensor(["no-such-item", VOCAB[7], "also-unknown", VOCAB[3]])
    known_only = history_tensor([VOCAB[7], VOCAB[3]])
    a, b = (session.run(None, {"history": h[None]}) for h in (with_unknown, known_only))
    assert list(a[0][0]) == list(b[0][0])
    assert_is_top_k(list(a[0][0]), a[1][0], torch_logp(model, [3, 7]))
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
    small = SASRec(SASRecConfig(n_items=5, max_len=NEXT_ITEM_HISTORY, dim=8, n_layers=1, n_heads=2, dropout=0.0)).eval()
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
