"""Training that converges by default: a step budget that scales with the data, early stopping on
a validation score with patience, and the best weights restored at the end."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch


def step_budget(examples: int, batch_size: int, epochs: float, min_steps: int, max_steps: int) -> int:
    """`epochs` passes over `examples` in batches of `batch_size`, within [min_steps, max_steps]."""
    if examples <= 0 or batch_size <= 0:
        raise ValueError(f"need examples > 0 and batch_size > 0, got {examples} and {batch_size}")
    return int(min(max(math.ceil(epochs * examples / batch_size), min_steps), max_steps))


def eval_interval(examples: int, batch_size: int, evals_per_epoch: float, lowest: int, highest: int) -> int:
    """Steps between validations: `evals_per_epoch` per pass over the data, within [lowest, highest]."""
    per_epoch = math.ceil(examples / max(batch_size, 1))
    return int(min(max(math.ceil(per_epoch / evals_per_epoch), lowest), highest))


@dataclass
class EarlyStopping:
    """Keeps the best-scoring weights; says stop after `patience` validations without a gain of
    more than `min_delta`. The first `update` (usually the starting weights) sets the bar."""

    patience: int
    min_delta: float = 0.0
    best_score: float = -math.inf
    best_step: int | None = None
    bad_evals: int = 0
    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, score) of every validation
    _best_state: dict[str, torch.Tensor] | None = None

    def __post_init__(self) -> None:
        if self.patience < 1:
            raise ValueError(f"patience must be >= 1, got {self.patience}")

    def update(self, step: int, score: float, model: torch.nn.Module) -> bool:
        """Record a validation; return True when training should stop."""
        self.curve.append((step, float(score)))
        if score > self.best_score + self.min_delta:
            self.best_score, self.best_step, self.bad_evals = float(score), step, 0
            self._best_state = copy.deepcopy(model.state_dict())
        else:
            self.bad_evals += 1
        return self.bad_evals >= self.patience

    def restore(self, model: torch.nn.Module) -> None:
        """Load the best weights seen into `model` (no-op before the first update)."""
        if self._best_state is not None:
            model.load_state_dict(self._best_state)
