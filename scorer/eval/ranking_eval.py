"""Second-stage evaluation: re-rank each holdout list that was shown, against its graded labels.

Methods are compared on the same lists (those with at least one click/cart/purchase): the logged
order (the shop's current ranking), popularity, the zero-shot encoder (cosine of query and item),
the untrained ranker (fresh head) and the fine-tuned ranker. NDCG@5 and MRR, overall and for
cold-start users.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
import torch

from scorer.eval.metrics import mrr, ndcg_at_k
from scorer.models.ranker import CrossEncoderRanker, load_ranker_tokenizer
from scorer.train.ranker_data import RankerLists
from scorer.train.ranker_train import score_rows, trainable_lists

ListScorer = Callable[[RankerLists, np.ndarray], np.ndarray]  # (data, row indices of a list) -> scores


def logged_order(data: RankerLists, idx: np.ndarray) -> np.ndarray:
    return -data.rows["position"].to_numpy()[idx].astype(float)


def popularity(data: RankerLists, idx: np.ndarray) -> np.ndarray:
    from scorer.ranker_inputs import NUMERIC_FEATURES

    return data.numeric[idx, NUMERIC_FEATURES.index("popularity_7d")]


def ranker_scorer(model: CrossEncoderRanker) -> ListScorer:
    tok = load_ranker_tokenizer(model.config)

    @torch.no_grad()
    def score(data: RankerLists, idx: np.ndarray) -> np.ndarray:
        return score_rows(model.eval(), tok, data, idx).numpy()

    return score


def evaluate_lists(data: RankerLists, methods: dict[str, ListScorer], cold_users: set[str] = frozenset()) -> pd.DataFrame:
    lists = trainable_lists(data)
    grades = data.rows["grade"].to_numpy()
    items = data.rows["item_id"].to_numpy()
    users = data.rows["user_id"].to_numpy()
    out = []
    for name, scorer in methods.items():
        per = []
        for idx in lists:
            order = idx[np.argsort(-scorer(data, idx), kind="stable")]
            rel = {items[i]: int(grades[i]) for i in idx if grades[i] > 0}
            ranked = [items[i] for i in order]
            per.append((ndcg_at_k(ranked, rel, 5), mrr(ranked, rel), users[idx[0]] in cold_users))
        frame = pd.DataFrame(per, columns=["ndcg@5", "mrr", "cold"])
        out.append({"method": name, "slice": "all", "lists": len(frame), **frame[["ndcg@5", "mrr"]].mean().round(4)})
        cold = frame[frame["cold"]]
        if len(cold):
            out.append({"method": name, "slice": "cold_users", "lists": len(cold), **cold[["ndcg@5", "mrr"]].mean().round(4)})
    return pd.DataFrame(out)
