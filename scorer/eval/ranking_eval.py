"""Second-stage evaluation: re-rank each holdout list that was shown, against its graded labels.

Methods are compared on the same lists (those with at least one click/cart/purchase): the logged
order (the shop's current ranking), popularity, the zero-shot encoder (cosine of query and item),
the untrained ranker (fresh head) and the fine-tuned ranker. NDCG@5 and MRR, overall and for
cold-start users: the naive holdout metrics, biased toward the logged order (what was shown high was
clicked more, whatever it was). Beside them the position-debiased judges of scorer/eval/ips.py:
`ips_dcg@5` and `snips_ndcg@5`, with the position propensities estimated from the same lists.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from scorer.eval import ips
from scorer.eval.metrics import mrr, ndcg_at_k
from scorer.models.ranker import CrossEncoderRanker, load_ranker_tokenizer
from scorer.train.ranker_data import RankerLists
from scorer.train.ranker_train import score_rows, trainable_lists

ListScorer = Callable[[RankerLists, np.ndarray], np.ndarray]  # (data, row indices of a list) -> scores


def logged_order(data: RankerLists, idx: np.ndarray) -> np.ndarray:
    return -data.rows["position"].to_numpy()[idx].astype(float)


def popularity(data: RankerLists, idx: np.ndarray) -> np.ndarray:
    from contract.ranker_inputs import NUMERIC_FEATURES

    return data.numeric[idx, NUMERIC_FEATURES.index("popularity_7d")]


def ranker_scorer(model: CrossEncoderRanker) -> ListScorer:
    tok = load_ranker_tokenizer(model.config)

    @torch.no_grad()
    def score(data: RankerLists, idx: np.ndarray) -> np.ndarray:
        return score_rows(model.eval(), tok, data, idx).numpy()

    return score


FAIR_METRIC = "snips_ndcg@5"


NO_SERVED_ORDER = ("the lists are sampled from interactions (nothing was shown), so their order is random, "
                   "not the blend's: there is no served order to beat")


def blend_verdict(table: pd.DataFrame, method: str, blend: str = "logged order", metric: str = "ndcg@5",
                  shown: bool = True) -> dict:
    """Whether `method` (a ranker) beat the blend's order on the same validation lists, as the
    record `export_ranker(validation=...)` stores and the gateway's ranker_mode auto obeys. The
    logged order is what the gateway served: the blend of retrieval and features.

    When the table has the position-debiased judge (`snips_ndcg@5`, evaluate_lists), the verdict
    is taken on it: the naive `metric` favours the logged order, so a ranker would have to beat
    the blend *and* the position bias. The naive numbers stay in the record (`naive_*`).

    `shown` False (RankerLists.shown: lists of one interaction + sampled negatives): the verdict is
    "does not beat the blend", with the reason, whatever the numbers. Beating a random order says
    nothing about the blend; on Online Retail such a ranker passed and cost the served path -84%
    NDCG@10 (docs/models.md)."""
    from contract.ranker_inputs import RANKER_VERDICT_PARAMETER

    overall = table[table["slice"] == "all"].set_index("method")
    naive_ranker, naive_base = float(overall.loc[method, metric]), float(overall.loc[blend, metric])
    judge = FAIR_METRIC if FAIR_METRIC in overall else metric
    ranker, base = float(overall.loc[method, judge]), float(overall.loc[blend, judge])
    record = {RANKER_VERDICT_PARAMETER: ranker > base, "metric": judge, "ranker": ranker, "blend": base,
              "lists": int(overall.loc[method, "lists"])}
    if judge != metric:
        record.update({f"naive_{metric}_ranker": naive_ranker, f"naive_{metric}_blend": naive_base})
    if not shown:
        record.update({RANKER_VERDICT_PARAMETER: False, "reason": NO_SERVED_ORDER})
    return record


METRICS = ["ndcg@5", "mrr", "ips_dcg@5", "snips_ndcg@5"]


def per_list_metrics(data: RankerLists, methods: dict[str, ListScorer], cold_users: set[str] = frozenset(),
                     theta: np.ndarray | None = None, clip: float = ips.DEFAULT_CLIP) -> dict[str, pd.DataFrame]:
    """Per method, one row per list (the same lists in the same order for every method, so two
    methods' values pair up): METRICS and whether the list's user is cold. `theta`: the position
    propensities (index 0 = position 1); None estimates them from these lists' own impressions
    (CTR curve + intervention harvesting). Weights are clipped at `clip`."""
    lists = trainable_lists(data)
    grades = data.rows["grade"].to_numpy()
    items = data.rows["item_id"].to_numpy()
    users = data.rows["user_id"].to_numpy()
    positions = data.rows["position"].fillna(1).to_numpy().astype(np.int64)
    if theta is None:
        theta = ips.position_propensities(positions, grades > 0, items)
    w = ips.weights(positions, theta, clip)
    gains = 2.0 ** grades - 1
    out = {}
    for name, scorer in methods.items():
        per = []
        for idx in lists:
            scores = scorer(data, idx)
            order = idx[np.argsort(-scores, kind="stable")]
            rel = {items[i]: int(grades[i]) for i in idx if grades[i] > 0}
            ranked = [items[i] for i in order]
            per.append((ndcg_at_k(ranked, rel, 5), mrr(ranked, rel), ips.ips_dcg(scores, gains[idx], w[idx], 5),
                        ips.snips_ndcg(scores, gains[idx], w[idx], 5), users[idx[0]] in cold_users))
        out[name] = pd.DataFrame(per, columns=[*METRICS, "cold"])
    return out


def summarize_lists(per_list: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """The table of `evaluate_lists` from `per_list_metrics`: per method, the means overall and on
    the lists of cold users."""
    out = []
    for name, frame in per_list.items():
        out.append({"method": name, "slice": "all", "lists": len(frame), **frame[METRICS].mean().round(4)})
        cold = frame[frame["cold"]]
        if len(cold):
            out.append({"method": name, "slice": "cold_users", "lists": len(cold), **cold[METRICS].mean().round(4)})
    return pd.DataFrame(out)


def evaluate_lists(data: RankerLists, methods: dict[str, ListScorer], cold_users: set[str] = frozenset(),
                   theta: np.ndarray | None = None, clip: float = ips.DEFAULT_CLIP) -> pd.DataFrame:
    """Per method: the naive NDCG@5 / MRR and the IPS / SNIPS judges (scorer/eval/ips.py), the
    means of `per_list_metrics` (same arguments)."""
    return summarize_lists(per_list_metrics(data, methods, cold_users, theta, clip))


def onnx_scorer(onnx_path: Path, config) -> ListScorer:
    """Scores from an exported ranker graph (fp32 or int8) through onnxruntime: what Triton serves,
    measured on the same lists, so quantization's cost is a number, not a guess."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    tok = load_ranker_tokenizer(config)

    def score(data: RankerLists, idx: np.ndarray) -> np.ndarray:
        rows = data.rows
        enc = tok(rows["context"].to_numpy()[idx].tolist(), rows["item_text"].to_numpy()[idx].tolist(),
                  padding=True, truncation=True, max_length=config.max_length, return_tensors="np")
        feeds = {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64),
                 "token_type_ids": enc["token_type_ids"].astype(np.int64), "numeric": data.numeric[idx]}
        return session.run(["score"], feeds)[0].reshape(-1)

    return score


def write_ranking_report(table: pd.DataFrame, out_dir: Path, title: str) -> Path:
    """report.md (table), metrics.json and comparison.png (NDCG@5 and MRR per method)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from scorer.eval.retrieval_eval import markdown_table

    out_dir.mkdir(parents=True, exist_ok=True)
    table.to_json(out_dir / "metrics.json", orient="records", indent=2)
    overall = table[table["slice"] == "all"]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    x = np.arange(len(overall))
    ax.bar(x - 0.2, overall["ndcg@5"], 0.4, label="NDCG@5")
    ax.bar(x + 0.2, overall["mrr"], 0.4, label="MRR")
    ax.set_xticks(x, overall["method"], rotation=20, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out_dir / "comparison.png", dpi=110)
    plt.close(fig)
    (out_dir / "report.md").write_text(f"# {title}\n\n{markdown_table(table)}\n\n![comparison](comparison.png)\n")
    return out_dir / "report.md"
