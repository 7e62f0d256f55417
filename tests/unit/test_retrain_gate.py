"""The retrain loop's gates, one rule for all three models: a new version is published only if
its gain over what serves (the interest model: and over the untrained fallback), paired over the
same examples, exceeds the gain's standard error plus the margin, the rule `recsys train interest`
and `recsys train encoder` keep a candidate by (PairedGain); the reason says both. The ranker's
SNIPS veto still refuses a gain the position correction does not confirm."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from scorer.eval.encoder_validation import Judged
from scorer.eval.paired_gain import PairedGain
from scorer.eval.ranking_eval import logged_order, per_list_metrics, summarize_lists
from scorer.models.interest import InterestConfig, InterestModel
from scorer.retrain import Registry, _gate, interest_gain, ranker_gain, snips_veto
from scorer.train.encoder_train import ANCHOR_ITEM, EncoderTrainConfig, fit_encoder
from scorer.train.interest_data import VectorTable
from scorer.train.interest_train import FitResult, Selection, paired_gain, validation_rows
from scorer.train.ranker_data import RankerLists

DIM = 16
N_ITEMS = 40


def _cycle_shop(users: int = 60, seed: int = 0) -> tuple[pd.DataFrame, VectorTable, np.ndarray]:
    """Each user's next item is the successor of their newest one (the fallback, a mean of recent
    items, cannot express it); one validation example per user."""
    rng = np.random.default_rng(seed)
    items = rng.normal(size=(N_ITEMS, DIM)).astype(np.float32)
    items /= np.linalg.norm(items, axis=1, keepdims=True)
    ids = [f"i{j}" for j in range(N_ITEMS)]
    successor = rng.permutation(N_ITEMS)
    rows = []
    for u in range(users):
        walk = [int(rng.integers(N_ITEMS))]
        for _ in range(4):
            walk.append(int(successor[walk[-1]]))
        rows.append({"user_id": f"u{u}", "query": None, "item_id": ids[walk[-1]], "grade": 1,
                     "event_timestamp": pd.Timestamp("2026-01-01", tz="UTC") + pd.Timedelta(minutes=u),
                     "history": [ids[j] for j in reversed(walk[:-1])]})
    return pd.DataFrame(rows), VectorTable(ids, items, {}), successor


class Oracle(nn.Module):
    """Knows the successor of the newest history item: its interest vector is that item's, so the
    target ranks first on every example (a fake of our own model interface)."""

    def __init__(self, items: np.ndarray, successor: np.ndarray):
        super().__init__()
        self.config = InterestConfig(dim=DIM)
        self.items, self.successor = torch.from_numpy(items), torch.from_numpy(successor)

    def forward(self, q, has_query, history, mask):  # noqa: ARG002 - the model's signature
        newest = (history[:, 0] @ self.items.T).argmax(dim=1)
        return self.items[self.successor[newest]]


def _fallback() -> InterestModel:
    return InterestModel(InterestConfig(dim=DIM)).eval()


def test_the_rule_needs_the_gain_to_exceed_its_standard_error_plus_the_margin():
    assert PairedGain(0.107, 0.100, se=0.005).beyond_noise  # +0.007 > 0.005 + 0
    assert not PairedGain(0.107, 0.100, se=0.005, margin=0.005).beyond_noise  # 0.007 <= 0.005 + 0.005
    # The old fixed-margin gate (gain >= 0.005) published this one; on ~100 examples it is noise.
    noisy = PairedGain(0.107, 0.100, se=0.02, margin=0.005, examples=94, versus="serving")
    assert not noisy.beyond_noise
    assert noisy.says() == "gain +0.0070 over serving <= its standard error 0.0200 + margin 0.005 (94 examples)"
    assert not PairedGain(0.1, 0.1, se=0.0).beyond_noise  # a tie is no gain
    assert PairedGain(0.1, 0.1, se=0.0, margin=-1.0).beyond_noise  # a negative margin tolerates a loss
    assert not PairedGain(0.5, 0.1, se=float("inf")).beyond_noise  # one example: no estimate of the noise


def test_train_and_retrain_share_the_rule():
    fit = FitResult("attention", nn.Identity(), [], [(0, 0.10), (10, 0.107)], 10, 0.107, 10, 10, False)
    sel = Selection(fallback_val=0.10, fits={"attention": fit}, gain_se=0.005, min_gain=0.001, val_examples=94)
    assert sel.gain == PairedGain(0.107, 0.10, 0.005, 0.001, 94)
    assert sel.winner is not None
    sel.min_gain = 0.002  # 0.007 <= 0.005 + 0.002
    assert sel.winner is None


def test_the_paired_gain_is_measured_on_the_same_examples():
    rows, table, successor = _cycle_shop()
    val = validation_rows(rows, table, limit=1_000, seed=0)
    fallback = _fallback()
    same = paired_gain(fallback, fallback, val, table, margin=0.005)
    assert (same.gain, same.se, same.examples) == (0.0, 0.0, len(val)) and not same.beyond_noise
    oracle = paired_gain(Oracle(table.items, successor), fallback, val, table, margin=0.005)
    assert oracle.candidate == pytest.approx(1.0)  # every target first
    assert oracle.baseline < 1.0 and oracle.gain > oracle.se + 0.005 > 0 and oracle.beyond_noise


def test_the_binding_baseline_is_the_one_beaten_by_the_least():
    rows, table, successor = _cycle_shop()
    val = validation_rows(rows, table, limit=1_000, seed=0)
    oracle, fallback = Oracle(table.items, successor), _fallback()
    # What serves is as good as the candidate: the gain over it (0) binds, whatever the fallback's.
    g = interest_gain(oracle, {"serving": Oracle(table.items, successor), "fallback": fallback}, val, table, 0.005)
    assert g.versus == "serving" and g.gain == 0.0 and not g.beyond_noise
    g = interest_gain(oracle, {"serving (= the fallback)": fallback}, val, table, 0.005)
    assert g.versus == "serving (= the fallback)" and g.beyond_noise
    with pytest.raises(ValueError, match="no baseline"):
        interest_gain(oracle, {}, val, table, 0.005)


def _run_gate(tmp_path: Path, model: str, gain: PairedGain, veto: str | None = None):
    """`_gate` with serving v1 and a fake publisher that would make v2."""
    registry = Registry(tmp_path / "registry.json")
    registry.entry(model).serving = 1
    published, lines = [], []
    result = _gate(model, registry, gain, "metric", tmp_path / "report.md", tmp_path / "candidate",
                   lambda: published.append(2) or 2, lines.append, veto)
    return result, published, lines


@pytest.mark.parametrize("gain, promoted", [(PairedGain(0.107, 0.100, 0.02, 0.005, 94, "serving"), False),
                                            (PairedGain(0.140, 0.100, 0.01, 0.005, 94, "serving"), True)])
def test_the_gate_publishes_only_beyond_noise_and_says_the_gain_and_its_error(tmp_path, gain, promoted):
    result, published, lines = _run_gate(tmp_path, "interest", gain)
    assert result.promoted is promoted and published == ([2] if promoted else [])
    assert result.gain is gain and (result.serving_score, result.candidate_score) == (gain.baseline, gain.candidate)
    assert f"gain {gain.gain:+.4f} over serving" in result.reason and f"standard error {gain.se:.4f}" in result.reason
    assert result.reason in lines[0]
    assert Registry.load(tmp_path / "registry.json").entry("interest").serving == (2 if promoted else 1)


# --- the encoder: the fit's verdict (`recsys train encoder`'s keep rule) is the retrain gate's gain

START = np.full(8, 0.5)  # each validation example's NDCG@10 under the serving encoder
# The best fine-tuned validation beats it by +0.025 on average, which the old fixed margin (0.005)
# promoted, but half the examples gained and half lost: noise.
NOISY = START + np.array([0.3, -0.2, 0.25, -0.2, 0.3, -0.25, 0.2, -0.2])
STEADY = START + 0.1 + np.array([0.01, -0.01, 0.0, 0.01, -0.01, 0.0, 0.01, -0.01])  # every example gains


class _PerExample:
    """Per-example NDCG@10 of each validation in a fixed order (the start first), as
    NextItemValidation.judge / QueryValidation.judge give them: the gate's logic, not the metric."""

    def __init__(self, runs: list[np.ndarray]):
        self.runs = list(runs)

    def judge(self, model) -> Judged:  # noqa: ARG002 - the validator's signature
        values = self.runs.pop(0)
        return Judged({"NDCG@10": float(values.mean())}, values)

    def __call__(self, model) -> dict[str, float]:
        return self.judge(model).metrics


def _fit_encoder(best: np.ndarray, margin: float):
    pairs = pd.DataFrame({"query": [f"red mug {i}" for i in range(12)], "item_text": [f"blue cup {i}" for i in range(12)],
                          "item_id": [f"i{i}" for i in range(12)], "grade": 3, "anchor": ANCHOR_ITEM})
    cfg = EncoderTrainConfig(max_steps=2, min_steps=2, batch_size=4, lr=1e-3, eval_every_bounds=(1, 1), patience=5,
                             min_gain=margin)
    # validations: the start, step 1 (the best), step 2 (worse)
    return fit_encoder(pairs, _PerExample([START, best, START - 0.1]), len(START), "NDCG@10", cfg, start_name="serving")


@pytest.mark.parametrize("best, promoted", [(NOISY, False), (STEADY, True)])
def test_the_encoder_gate_keeps_fine_tuning_only_beyond_noise(tmp_path, best, promoted):
    fit = _fit_encoder(best, margin=0.005)
    diff = best - START
    assert fit.verdict.se == pytest.approx(diff.std(ddof=1) / np.sqrt(len(diff)))
    assert np.array_equal(fit.start_values, START) and np.array_equal(fit.fine_tuned_values, best)
    gain = fit.verdict.gain
    assert gain == PairedGain(fit.verdict.fine_tuned, fit.verdict.start, fit.verdict.se, 0.005, 8, "serving")
    assert gain.gain == pytest.approx(diff.mean()) and gain.gain >= 0.005  # the old rule promoted both
    assert fit.verdict.kept is promoted and gain.beyond_noise is promoted
    assert gain.says() in fit.verdict.says and "standard error" in fit.verdict.says
    result, published, _ = _run_gate(tmp_path, "encoder", gain)
    assert result.promoted is promoted and published == ([2] if promoted else [])
    assert f"standard error {gain.se:.4f}" in result.reason


def test_the_encoder_judges_per_example_values_average_to_their_metrics():
    from scorer.eval.encoder_validation import NextItemValidation, QueryValidation
    from scorer.eval.retrieval_eval import EvalSet, evaluate

    vectors = np.eye(4, dtype=np.float32)
    judged = NextItemValidation(["a", "b", "c", "d"], [[0], [3, 2]], np.array([1, 3]), recent=1).judge_vectors(vectors)
    # example 1: the target ties with the two other items the newest one is orthogonal to (ties count
    # against it): rank 3; example 2: the newest item is the target: rank 0
    assert judged.per_example.tolist() == pytest.approx([1 / np.log2(5), 1.0])
    assert judged.per_example.mean() == pytest.approx(judged.metrics["NDCG@10"])

    # QueryValidation ranks as `recsys eval retrieval` does (items created after the request are out)
    t = pd.Timestamp("2026-01-02", tz="UTC")
    created = pd.to_datetime(["2026-01-01", "2026-01-01", "2026-01-03", "2026-01-01"], utc=True).tz_convert(None).to_numpy()
    queries = pd.DataFrame({"request_id": ["q0", "q1", "q2"], "query": ["x", "y", "z"], "event_timestamp": [t] * 3,
                            "relevant": [{"b": 1}, {"d": 2, "a": 1}, {"c": 1}], "cold_user": False, "new_item": False})
    ev = EvalSet(["a", "b", "c", "d"], ["a", "b", "c", "d"], created, queries, np.zeros(4))
    scores = np.array([[0.9, 0.8, 0.1, 0.0], [0.1, 0.2, 0.3, 0.4], [0.0, 0.0, 1.0, 0.0]])
    per = QueryValidation(ev).per_query(scores)
    assert per["NDCG@10"].iloc[0] == pytest.approx(1 / np.log2(3))
    assert per["NDCG@10"].iloc[2] == pytest.approx(1 / np.log2(5))  # c scored highest but was not listed yet: last
    got = evaluate(ev, {"m": lambda _: scores}).metrics["m"]["all"]
    for ours, theirs in (("NDCG@10", "ndcg@10"), ("Recall@10", "recall@10"), ("Recall@50", "recall@50")):
        assert per[ours].mean() == pytest.approx(got[theirs], abs=5e-5)  # evaluate rounds to 4 digits


# --- the ranker: NDCG@5 per holdout list, serving vs candidate on the same lists

LISTS = 12


def _lists() -> RankerLists:
    """LISTS shown lists of three items; the clicked one was shown second."""
    rows = [{"request_id": f"r{r}", "user_id": f"u{r}", "item_id": f"r{r}-{p}", "grade": int(p == 2), "position": p}
            for r in range(LISTS) for p in (1, 2, 3)]
    frame = pd.DataFrame(rows)
    return RankerLists(frame, np.zeros((len(frame), 1), np.float32), pd.Timestamp("2026-01-01", tz="UTC"))


def _clicked_first_on(good: set[int]):
    """A fake ranker: the clicked item first on the lists of `good`, last on the others."""

    def score(data: RankerLists, idx: np.ndarray) -> np.ndarray:
        rows = data.rows.iloc[idx]
        on = int(rows["request_id"].iloc[0][1:]) in good
        return np.where(rows["grade"].to_numpy() > 0, 1.0 if on else -1.0, 0.0)

    return score


@pytest.mark.parametrize("good, promoted", [({0, 1, 2, 3}, False), (set(range(LISTS)), True)])
def test_the_ranker_gate_pairs_the_lists_and_promotes_only_beyond_noise(tmp_path, good, promoted):
    per_list = per_list_metrics(_lists(), {"serving": logged_order, "candidate": _clicked_first_on(good)})
    gain = ranker_gain(per_list, margin=0.005)
    # per list: the clicked item second under the serving order (1/log2 3), first (1) or last (1/2) under the candidate
    diff = np.array([1.0 if r in good else 0.5 for r in range(LISTS)]) - 1 / np.log2(3)
    assert (gain.examples, gain.versus, gain.unit) == (LISTS, "serving", "lists")
    assert gain.gain == pytest.approx(diff.mean()) and gain.gain >= 0.005  # the old rule promoted both
    assert gain.se == pytest.approx(diff.std(ddof=1) / np.sqrt(LISTS), abs=1e-12)
    assert gain.beyond_noise is promoted
    table = summarize_lists(per_list)
    overall = table[table["slice"] == "all"].set_index("method")
    assert overall.loc["candidate", "ndcg@5"] == pytest.approx(gain.candidate, abs=5e-5)  # the table's means
    result, published, _ = _run_gate(tmp_path, "ranker", gain)
    assert result.promoted is promoted and published == ([2] if promoted else [])
    assert f"({LISTS} lists)" in result.reason


def test_the_snips_veto_still_refuses_a_gain_beyond_noise(tmp_path):
    gain = PairedGain(0.60, 0.50, 0.01, 0.005, 100, "serving", "lists")
    overall = pd.DataFrame({"snips_ndcg@5": [0.40, 0.45]}, index=pd.Index(["serving", "candidate"], name="method"))
    assert snips_veto(overall, gain, 0.005) is None  # the position correction confirms it
    overall.loc["candidate", "snips_ndcg@5"] = 0.39  # a drop beyond |margin|
    veto = snips_veto(overall, gain, 0.005)
    assert "SNIPS-NDCG@5 0.3900 vs serving 0.4000" in veto and "does not survive the position correction" in veto
    assert snips_veto(overall, gain, -0.05) is None  # a negative margin tolerates as much
    result, published, _ = _run_gate(tmp_path, "ranker", gain, veto)
    assert gain.beyond_noise and not result.promoted and published == [] and result.reason == f"not promoted: {veto}"


def test_a_log_that_cannot_train_the_next_item_model_skips_its_round(tmp_path):
    import pandas as pd

    from scorer.retrain import Registry, retrain_next_item

    registry = Registry(tmp_path / "registry.json")
    done = retrain_next_item(tmp_path, tmp_path / "models", None, registry, tmp_path / "work", log=lambda _: None)
    assert not done.promoted and done.reason.startswith("skipped: no imported data") and done.version is None
    offline = tmp_path / "data" / "offline"
    offline.mkdir(parents=True)
    pd.DataFrame({"user_id": ["u1", "u1"], "item_id": ["a", "b"], "event_type": ["PURCHASE"] * 2,
                  "timestamp": pd.to_datetime(["2026-01-01", "2026-01-02"], utc=True)}).to_parquet(offline / "events.parquet")
    done = retrain_next_item(tmp_path, tmp_path / "models", None, registry, tmp_path / "work", log=lambda _: None)
    assert not done.promoted and "three interactions" in done.reason
    assert registry.entry("next_item").serving is None
