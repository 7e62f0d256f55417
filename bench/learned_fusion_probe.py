"""Would a learned fusion of co-visitation and an ID sequence model reach issue 14's +10%? A probe.

    python -m bench.learned_fusion_probe [--limit 20000] [--sasrec-seconds 300] [--no-sasrec]

On the real-data benchmark's leave-one-out split of Online Retail (bench/real_data_bench.py
`load_data`): candidates are the union of the top 50 of co-visitation (window 10, the last item:
the benchmark's best) and the top 50 of our SASRec (scorer/train/sasrec_train.py), both fitted on
training sequences only. Each candidate gets 9 features (co-visitation score of the last item and
of the last 3, relative to the user's best; whether co-visited; log rank in each list; SASRec
log-probability; log popularity; whether and how recently the user bought it). A 9-32-1 MLP is
trained listwise (softmax cross-entropy over the user's candidates, the target as the label) on
the **validation** targets of 80% of the users, early-stopped on the other 20% (patience 5), and
**test is read once**. Nothing here is served: this says whether the signal is there, not how to
serve it (the gateway has neither an ID model nor a learned fusion). docs/models.md has the result.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from rich.progress import Progress

from bench.real_data_bench import (DEFAULT_SOURCE, Data, console, covisitation_matrix, load_data, recent_weights,
                                   train_popularity, train_sasrec_baseline)
from scorer.eval.interest_eval import ndcg_per_example
from scorer.eval.next_item import metrics_from_ranks
from scorer.eval.paired_gain import PairedGain

CANDIDATES = 50  # from each source
MISSING = 10**6  # the rank of a target that is not among a user's candidates


class Lists:
    """Per user: candidate positions, their features [n, 9], and the target."""

    def __init__(self) -> None:
        self.cands: list[np.ndarray] = []
        self.feats: list[np.ndarray] = []
        self.targets: list[int] = []


def build_lists(data: Data, hists: Sequence[Sequence[int]], targets: np.ndarray, covis: Callable,
                seq_scores: Callable, pop: np.ndarray) -> Lists:
    c1, c3, s = covis(hists, 1), covis(hists, 3), seq_scores(hists)
    out = Lists()
    for i, h in enumerate(hists):
        by_covis = np.argsort(-(c1[i] + 1e-6 * pop / pop.max()), kind="stable")[:CANDIDATES]
        by_seq = np.argsort(-s[i], kind="stable")[:CANDIDATES]
        cand = np.array(list(dict.fromkeys(by_covis.tolist() + by_seq.tolist())))
        rank_covis = np.full(data.n_items, 2.0 * CANDIDATES)
        rank_covis[by_covis] = np.arange(len(by_covis))  # fewer than CANDIDATES in a small catalog
        rank_seq = np.full(data.n_items, 2.0 * CANDIDATES)
        rank_seq[by_seq] = np.arange(len(by_seq))
        ago = {x: k for k, x in enumerate(reversed(h))}  # 0: the last purchase
        logp = s[i] - s[i].max() - np.log(np.exp(s[i] - s[i].max()).sum())
        f = np.stack([c1[i, cand] / max(c1[i].max(), 1e-9), c3[i, cand] / max(c3[i].max(), 1e-9),
                      (c1[i, cand] > 0).astype(float), np.log1p(rank_covis[cand]), np.log1p(rank_seq[cand]),
                      logp[cand] / 10.0, np.log1p(pop[cand]) / 10.0,
                      np.array([float(x in ago) for x in cand]),
                      np.array([np.log1p(ago[x]) / 5.0 if x in ago else 1.0 for x in cand])], 1)
        out.cands.append(cand)
        out.feats.append(f.astype(np.float32))
        out.targets.append(int(targets[i]))
    return out


def ranks(lists: Lists, scores: list[np.ndarray], users: Sequence[int] | None = None) -> np.ndarray:
    users = range(len(lists.cands)) if users is None else users
    out = []
    for u in users:
        order = lists.cands[u][np.argsort(-scores[u], kind="stable")]
        hit = np.flatnonzero(order == lists.targets[u])
        out.append(hit[0] if len(hit) else MISSING)
    return np.array(out)


def rrf_scores(lists: Lists, k: float, w: float) -> list[np.ndarray]:
    """Reciprocal-rank fusion of the two lists (a candidate missing from one ranks 2 x CANDIDATES there)."""
    return [1.0 / (k + 1 + np.expm1(f[:, 3])) + w / (k + 1 + np.expm1(f[:, 4])) - 1e-9 * np.arange(len(f))
            for f in lists.feats]


def best_rrf(lists: Lists) -> tuple[float, float]:
    grid = [(k, w) for k in (5, 10, 60) for w in (0.3, 0.5, 1.0)]
    return max(grid, key=lambda kw: float(ndcg_per_example(ranks(lists, rrf_scores(lists, *kw))).mean()))


def train_fusion(lists: Lists, seed: int = 0, patience: int = 5, max_epochs: int = 60):
    import torch

    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    users = rng.permutation(len(lists.cands))
    cut = int(0.8 * len(users))
    fit, stop = users[:cut], users[cut:]
    net = torch.nn.Sequential(torch.nn.Linear(lists.feats[0].shape[1], 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    opt = torch.optim.Adam(net.parameters(), 3e-3, weight_decay=1e-4)

    def score(ls: Lists) -> list[np.ndarray]:
        with torch.no_grad():
            return [net(torch.from_numpy(f)).squeeze(1).numpy() for f in ls.feats]

    best, best_state, bad = -1.0, None, 0
    for epoch in range(max_epochs):
        net.train()
        for u in rng.permutation(fit):
            hit = np.flatnonzero(lists.cands[u] == lists.targets[u])
            if not len(hit):
                continue
            loss = -torch.log_softmax(net(torch.from_numpy(lists.feats[u])).squeeze(1), 0)[hit[0]]
            opt.zero_grad()
            loss.backward()
            opt.step()
        net.eval()
        v = float(ndcg_per_example(ranks(lists, score(lists), stop)).mean())
        console.print(f"epoch {epoch}: NDCG@10 on the early-stopping users {v:.4f}")
        if v > best + 1e-4:
            best, best_state, bad = v, {k: x.clone() for k, x in net.state_dict().items()}, 0
        else:
            bad += 1
            if bad >= patience:
                break
    net.load_state_dict(best_state)
    return score


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    ap.add_argument("--limit", type=int, default=None, help="only the first N source rows (CI's sample: 20000)")
    ap.add_argument("--sasrec-seconds", type=float, default=300.0)
    ap.add_argument("--no-sasrec", action="store_true", help="co-visitation, history and popularity features only")
    ap.add_argument("--workdir", type=Path, default=Path("var/reports/learned_fusion_probe"))
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)  # ~4x faster than 2 on a busy 2-core VM (docs/models.md)
    start = time.time()
    data = load_data(args.source, args.workdir / "data", args.limit)
    pop = train_popularity(data)
    cv = covisitation_matrix(data.train_seqs, data.n_items, 10)

    def covis(hists, depth):
        return np.asarray((recent_weights(hists, data.n_items, depth) @ cv).todense())

    if args.no_sasrec:
        def seq(hists):  # no sequence model: its features carry popularity only
            return np.tile(1e-9 * pop, (len(hists), 1))
    else:
        with Progress(console=console, transient=True) as progress:
            _, _, seq = train_sasrec_baseline(data, args.sasrec_seconds, None, progress)
    valid = build_lists(data, data.valid_hist, data.valid_target, covis, seq, pop)
    test = build_lists(data, data.test_hist, data.test_target, covis, seq, pop)
    covis_rank = ranks(test, [f[:, 0] - 1e-9 * np.arange(len(f)) for f in test.feats])  # ties: co-visitation's order
    seq_rank = ranks(test, [f[:, 5] - 1e-9 * np.arange(len(f)) for f in test.feats])
    score = train_fusion(valid)
    fused_rank = ranks(test, score(test))
    rows = {"co-visitation (window 10, last item)": covis_rank, "learned fusion": fused_rank}
    if not args.no_sasrec:
        rows["SASRec"] = seq_rank
        k, w = best_rrf(valid)
        rows[f"RRF co-visitation + SASRec (k {k:g}, SASRec weight {w:g}, chosen on validation)"] = \
            ranks(test, rrf_scores(test, k, w))
    for name, r in rows.items():
        m = metrics_from_ranks(r)
        console.print(f"test {name}: " + ", ".join(f"{k} {v:.4f}" for k, v in m.items()))
    gain = PairedGain.of(ndcg_per_example(fused_rank), ndcg_per_example(covis_rank), versus="co-visitation")
    console.print(f"test NDCG@10 of the learned fusion: {gain.says()}; "
                  f"{gain.gain / max(gain.baseline, 1e-9):+.1%}; {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    from rpc.process_exit import exit_without_teardown

    exit_without_teardown(main())  # no duckdb nanobind teardown report after the results
