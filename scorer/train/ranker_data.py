"""Ranker training lists: every shown list (request) with graded labels, features joined by Feast.

Each impression becomes one row: (context text, item text, numeric features, grade), where the
features are the `ranker_training` feature service joined point-in-time at the impression's time
(what was known when the list was shown). Lists are split by time like the encoder's data.

Nothing shown (a log without impressions): each interaction becomes a list of its item (graded as
usual) and SAMPLED_NEGATIVES items drawn uniformly from the catalog present at that time, in a
random order (the "logged order" of such a list is random); item attributes are joined at the
interaction's time, everything else just before it (scorer/train/data.py `interaction_labels`).
At most `max_lists` interactions are used, drawn at random across the whole period.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from contract.item_text import item_text_from_features
from contract.ranker_inputs import context_text, numeric_features
from scorer.train.data import (INTERACTIONS, SAMPLED_NEGATIVES, SHOWN_LISTS, interaction_log, join_features, label_log,
                               require_source)


@dataclass
class RankerLists:
    rows: pd.DataFrame  # request_id, user_id, item_id, query, grade, position, event_timestamp, context, item_text
    numeric: np.ndarray  # [len(rows), n_numeric], aligned with rows
    cutoff: pd.Timestamp
    # SHOWN_LISTS: what the gateway served (its order is the blend's); INTERACTIONS: one interaction +
    # sampled negatives in random order, so "the logged order" there is no blend to beat.
    source: str = SHOWN_LISTS

    def split(self, holdout: bool) -> "RankerLists":
        mask = (self.rows["event_timestamp"] >= self.cutoff) == holdout
        return RankerLists(self.rows[mask].reset_index(drop=True), self.numeric[mask.to_numpy()], self.cutoff,
                           self.source)

    @property
    def shown(self) -> bool:
        """Whether these lists carry a served (blend) order a ranker can be judged against."""
        return self.source == SHOWN_LISTS


def text_similarities(contexts: list[str], items: list[str], encoder=None) -> np.ndarray:
    """cosine(encoder(context), encoder(item)) per row; each distinct text is embedded once."""
    from scorer.eval.retrieval_eval import embed_texts
    from scorer.models.encoder import TextEncoder

    encoder = encoder or TextEncoder()
    uc, ui = sorted(set(contexts)), sorted(set(items))
    ce = dict(zip(uc, embed_texts(encoder, uc, encoder.config.query_max_length)))
    ie = dict(zip(ui, embed_texts(encoder, ui, encoder.config.item_max_length)))
    return np.array([float(ce[c] @ ie[i]) for c, i in zip(contexts, items)], dtype=np.float32)


MAX_SAMPLED_LISTS = 2000  # the default 200 steps x 4 lists see 800; the holdout gets ~a fifth


def sampled_lists(labels: pd.DataFrame, items: pd.DataFrame, negatives: int = SAMPLED_NEGATIVES,
                  max_lists: int = MAX_SAMPLED_LISTS, seed: int = 0) -> pd.DataFrame:
    """Lists of one interaction (interaction_labels rows) + `negatives` catalog items each.

    Negatives are items created at or before the interaction and not interacted with by that user at
    that time (a basket's other items are not negatives). Rows of a list are shuffled and numbered
    1..n as `position`; negatives have grade 0.
    """
    rng = np.random.default_rng(seed)
    basket = labels.groupby(["user_id", "event_timestamp"])["item_id"].agg(set).to_dict()
    if len(labels) > max_lists:
        labels = labels.iloc[np.sort(rng.choice(len(labels), max_lists, replace=False))]
    # Creation times in ns; unknown (NaT) = always present.
    created = np.array([np.iinfo(np.int64).min if pd.isna(c) else c.value
                        for c in pd.to_datetime(items["created_at"], utc=True)], dtype=np.int64)
    order = np.argsort(created, kind="stable")
    catalog, created = items["item_id"].to_numpy()[order], created[order]
    rows = []
    for row in labels.to_dict("records"):
        ts = row["event_timestamp"]
        pool = catalog[: int(np.searchsorted(created, ts.value, side="right"))]
        taken = basket.get((row["user_id"], ts), {row["item_id"]})
        picks: list[str] = []
        for _ in range(4):  # rejection sampling; a pool of only the basket's items gives fewer negatives
            want = negatives - len(picks)
            if want <= 0 or len(pool) == 0:
                break
            for cand in rng.choice(pool, size=min(len(pool), want * 2), replace=False):
                if cand not in taken and cand not in picks and len(picks) < negatives:
                    picks.append(str(cand))
        group = [row] + [{**row, "item_id": item, "grade": 0} for item in picks]
        for position, k in enumerate(rng.permutation(len(group)), start=1):
            rows.append({**group[k], "position": position})
    out = pd.DataFrame(rows, columns=list(labels.columns))
    out["position"] = out["position"].astype("Int32")
    return out.sort_values(["request_id", "position"], kind="stable").reset_index(drop=True)


def _interaction_features(store, labels: pd.DataFrame) -> list[dict]:
    """ranker_training features: item attributes at the interaction, the rest just before it."""
    service = store.get_feature_service("ranker_training")
    refs = [f"{p.name}:{f.name}" for p in service.feature_view_projections for f in p.features]
    at_item = [r for r in refs if r.startswith("item_attributes:")]
    before = [r for r in refs if not r.startswith("item_attributes:")]
    items = join_features(store, labels, ["item_id"], at_item)
    others = join_features(store, labels, ["user_id", "item_id"], before, at="features_at")
    names = [r.split(":", 1)[1] for r in at_item]
    return [{**o, **{n: i[n] for n in names}} for o, i in zip(others.to_dict("records"), items.to_dict("records"))]


def load_ranker_lists(repo: Path, holdout_fraction: float = 0.2, store=None, encoder=None,
                      source: str | None = None, max_lists: int = MAX_SAMPLED_LISTS, seed: int = 0) -> RankerLists:
    """encoder: the (serving) bi-encoder for the text_similarity feature; default zero-shot.
    source: SHOWN_LISTS or INTERACTIONS (sampled negatives); default what the data holds."""
    from scorer.data.feast_ops import load_store

    source = source or require_source(repo, "ranker").source
    store = store or load_store(Path(repo))
    if source == INTERACTIONS:
        labels, cutoff = interaction_log(repo, holdout_fraction)
        items = pd.read_parquet(Path(repo) / "data" / "offline" / "items.parquet", columns=["item_id", "created_at"])
        labels = sampled_lists(labels, items, max_lists=max_lists, seed=seed)
        records = _interaction_features(store, labels)
    else:
        labels, cutoff = label_log(repo, holdout_fraction)
        feats = join_features(store, labels, ["user_id", "item_id"], store.get_feature_service("ranker_training"))
        records = feats.to_dict("records")
    labels["context"] = [context_text(q if isinstance(q, str) else None, r) for q, r in zip(labels["query"], records)]
    labels["item_text"] = [item_text_from_features(r) for r in records]
    sims = text_similarities(labels["context"].tolist(), labels["item_text"].tolist(), encoder)
    numeric = np.array([numeric_features(r, r, sim) for r, sim in zip(records, sims)], dtype=np.float32)
    return RankerLists(labels, numeric, cutoff, source)
