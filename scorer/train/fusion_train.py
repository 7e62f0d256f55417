"""Fit the learned source fusion (contract/fusion.py) on lists of candidates with a known target.

One list per validation user: the candidates the gateway retrieved for them (rows of
FUSION_FEATURES) and where the item they interacted with next sits among them (-1: the sources
missed it). The loss is listwise: softmax cross-entropy of the target over its list (what
`FusionModel.relevance` serves: the softmax share). Adam, mini-batches of padded lists.

Converges by default: a seeded share of the lists is held out for early stopping on their loss
(patience, best weights restored; the first validation is the untrained network); their NDCG@10
within the list is recorded as the curve. The
caller's gate (cli/fusion_learning.py) then judges the result against the rank fusion on users that
took no part in fitting or stopping.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from contract.fusion import FUSION_FEATURES, FusionModel
from scorer.eval.interest_eval import ndcg_per_example
from scorer.train.early_stop import EarlyStopping

MISS = 10**6  # the rank of a target its list does not hold


@dataclass
class FusionFit:
    model: FusionModel
    curve: list[tuple[int, float]] = field(default_factory=list)  # (epoch, early-stopping NDCG@10); epoch 0: untrained
    best_epoch: int = 0
    fit_lists: int = 0
    stop_lists: int = 0
    loss_curve: list[tuple[int, float]] = field(default_factory=list)  # (epoch, early-stopping loss): what decides


def _padded(lists: Sequence[np.ndarray], index: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, L, F] features (zeros past each list's end) and the [B, L] mask of real rows."""
    longest = max((len(lists[i]) for i in index), default=1)
    x = np.zeros((len(index), max(longest, 1), len(FUSION_FEATURES)), np.float32)
    mask = np.zeros((len(index), max(longest, 1)), bool)
    for row, i in enumerate(index):
        x[row, : len(lists[i])] = lists[i]
        mask[row, : len(lists[i])] = True
    return torch.from_numpy(x), torch.from_numpy(mask)


def list_ranks(scores: Sequence[np.ndarray], targets: Sequence[int]) -> np.ndarray:
    """The target's 0-based place when each list is sorted by its scores (stable; MISS: not in the list)."""
    out = np.full(len(targets), MISS, dtype=np.int64)
    for i, (s, t) in enumerate(zip(scores, targets)):
        if t >= 0:
            out[i] = int(np.flatnonzero(np.argsort(-np.asarray(s), kind="stable") == t)[0])
    return out


class FusionNet(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.hidden = nn.Linear(len(FUSION_FEATURES), hidden)
        self.out = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.hidden(x))).squeeze(-1)

    def export(self, scale: float = 1.0) -> FusionModel:
        """The same network as contract.fusion.FusionModel (numpy), which the gateway runs."""
        with torch.no_grad():
            return FusionModel(self.hidden.weight.T.numpy().copy(), self.hidden.bias.numpy().copy(),
                               self.out.weight[0].numpy().copy(), float(self.out.bias[0]), scale)


# Defaults from Online Retail's validation users (the fit half and its early-stopping lists): batches
# of 8 at 1e-3, patience 10 on the held-out loss stopped at epochs 40-92 and scored within +-0.001
# NDCG@10 of each other across seeds; stopping on NDCG@10 stopped at epochs 13-28 (on a 468-user
# sample at the untrained network), batches of 32 at 3e-3 (or of 1) after a handful of epochs.
# 64 hidden units scored as 32 did; an average of 3-5 seeds' networks as one seed.
def fit_fusion(lists: Sequence[np.ndarray], targets: Sequence[int], seed: int = 0, hidden: int = 32,
               lr: float = 1e-3, weight_decay: float = 1e-4, batch_size: int = 8, stop_share: float = 0.2,
               patience: int = 10, max_epochs: int = 100,
               on_epoch: Callable[[int, float], None] | None = None) -> FusionFit:
    """Fit on the lists outside a seeded `stop_share`, early-stop on NDCG@10 within those held out."""
    if len(lists) != len(targets):
        raise ValueError(f"{len(lists)} lists but {len(targets)} targets")
    if len(lists) < 2:
        raise ValueError(f"need at least 2 lists (one to fit, one to stop on), got {len(lists)}")
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    order = rng.permutation(len(lists))
    n_stop = min(max(1, int(round(stop_share * len(lists)))), len(lists) - 1)
    stop, fit = order[:n_stop], order[n_stop:]
    fit = np.array([i for i in fit if targets[i] >= 0], dtype=np.int64)  # a missed target teaches nothing
    net = FusionNet(hidden)
    opt = torch.optim.Adam(net.parameters(), lr, weight_decay=weight_decay)
    stopper = EarlyStopping(patience, min_delta=1e-4)  # on minus the held-out loss
    stop_x, stop_mask = _padded(lists, stop)
    stop_targets = [targets[i] for i in stop]

    stop_held = torch.tensor([t >= 0 for t in stop_targets])
    stop_t = torch.tensor([max(t, 0) for t in stop_targets])
    ndcg_curve: list[tuple[int, float]] = []
    loss_curve: list[tuple[int, float]] = []

    def validate(epoch: int) -> bool:
        """Score the held-out lists; True: stop. The decision is on their loss (smooth: NDCG@10 of a few
        hundred lists moves by whole points between epochs and once kept a random network), the
        NDCG@10 is recorded for the curve."""
        net.eval()
        with torch.no_grad():
            z = net(stop_x).masked_fill(~stop_mask, -torch.inf)
            nll = nn.functional.cross_entropy(z, stop_t, reduction="none")[stop_held]
            loss = float(nll.mean()) if len(nll) else 0.0
        scores = [z[row, : len(lists[i])].numpy() for row, i in enumerate(stop)]
        ndcg_curve.append((epoch, float(ndcg_per_example(list_ranks(scores, stop_targets)).mean())))
        loss_curve.append((epoch, loss))
        if on_epoch:
            on_epoch(epoch, ndcg_curve[-1][1])
        return stopper.update(epoch, -loss, net)

    validate(0)
    for epoch in range(1, max_epochs + 1):
        if not len(fit):
            break
        net.train()
        shuffled = fit[rng.permutation(len(fit))]
        for start in range(0, len(shuffled), batch_size):
            index = shuffled[start:start + batch_size]
            x, mask = _padded(lists, index)
            z = net(x).masked_fill(~mask, -torch.inf)
            t = torch.tensor([targets[i] for i in index])
            loss = nn.functional.cross_entropy(z, t)
            opt.zero_grad()
            loss.backward()
            opt.step()
        if validate(epoch):
            break
    stopper.restore(net)
    return FusionFit(net.export(), ndcg_curve, int(stopper.best_step or 0), len(fit), len(stop), loss_curve)
