"""Ranker training lists: every shown list (request) with graded labels, features joined by Feast.

Each impression becomes one row: (context text, item text, numeric features, grade), where the
features are the `ranker_training` feature service joined point-in-time at the impression's time
(what was known when the list was shown). Lists are split by time like the encoder's data.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from contract.item_text import item_text_from_features
from contract.ranker_inputs import context_text, numeric_features
from scorer.train.data import join_features, label_log


@dataclass
class RankerLists:
    rows: pd.DataFrame  # request_id, user_id, item_id, query, grade, position, event_timestamp, context, item_text
    numeric: np.ndarray  # [len(rows), n_numeric], aligned with rows
    cutoff: pd.Timestamp

    def split(self, holdout: bool) -> "RankerLists":
        mask = (self.rows["event_timestamp"] >= self.cutoff) == holdout
        return RankerLists(self.rows[mask].reset_index(drop=True), self.numeric[mask.to_numpy()], self.cutoff)


def text_similarities(contexts: list[str], items: list[str], encoder=None) -> np.ndarray:
    """cosine(encoder(context), encoder(item)) per row; each distinct text is embedded once."""
    from scorer.eval.retrieval_eval import embed_texts
    from scorer.models.encoder import TextEncoder

    encoder = encoder or TextEncoder()
    uc, ui = sorted(set(contexts)), sorted(set(items))
    ce = dict(zip(uc, embed_texts(encoder, uc, encoder.config.query_max_length)))
    ie = dict(zip(ui, embed_texts(encoder, ui, encoder.config.item_max_length)))
    return np.array([float(ce[c] @ ie[i]) for c, i in zip(contexts, items)], dtype=np.float32)


def load_ranker_lists(repo: Path, holdout_fraction: float = 0.2, store=None, encoder=None) -> RankerLists:
    """encoder: the (serving) bi-encoder for the text_similarity feature; default zero-shot."""
    from scorer.data.feast_ops import load_store

    labels, cutoff = label_log(repo, holdout_fraction)
    store = store or load_store(Path(repo))
    feats = join_features(store, labels, ["user_id", "item_id"], store.get_feature_service("ranker_training"))
    records = feats.to_dict("records")
    labels["context"] = [context_text(q if isinstance(q, str) else None, r) for q, r in zip(labels["query"], records)]
    labels["item_text"] = [item_text_from_features(r) for r in records]
    sims = text_similarities(labels["context"].tolist(), labels["item_text"].tolist(), encoder)
    numeric = np.array([numeric_features(r, r, sim) for r, sim in zip(records, sims)], dtype=np.float32)
    return RankerLists(labels, numeric, cutoff)
