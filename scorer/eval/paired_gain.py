"""The one rule every model gate keeps a candidate by: its gain over a baseline, measured on the
same examples, must exceed the gain's standard error plus a margin.

The best checkpoint of a training run, or a retrained candidate, is judged on a few hundred
validation examples (or holdout lists); on ~100 of them a gain of +0.007 is noise (a CI run kept
an interest model +0.007 ahead on 94 examples that lost by 0.014 on the holdout). Pairing the
per-example values of both models on the same examples removes the examples' own spread from
the noise: the standard error is that of the mean per-example difference.

Used by `recsys train interest` / `recsys train encoder` (keep the candidate or the start) and by
the retrain loop's gates for the encoder, the ranker and the interest model (scorer/retrain.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["PairedGain", "paired_standard_error"]


def paired_standard_error(ours: np.ndarray, theirs: np.ndarray) -> float:
    """Standard error of mean(ours - theirs), paired over the examples (sample standard deviation
    of the differences / sqrt(n)); inf with fewer than 2 examples (no estimate of the noise)."""
    ours, theirs = _paired(ours, theirs)
    if len(ours) < 2:
        return math.inf
    diff = ours - theirs
    return float(diff.std(ddof=1) / np.sqrt(len(diff)))


def _paired(ours, theirs) -> tuple[np.ndarray, np.ndarray]:
    ours, theirs = np.asarray(ours, dtype=np.float64), np.asarray(theirs, dtype=np.float64)
    if ours.ndim != 1 or ours.shape != theirs.shape:
        raise ValueError(f"need one value per example of both models on the same examples, got shapes "
                         f"{ours.shape} and {theirs.shape}")
    return ours, theirs


@dataclass(frozen=True)
class PairedGain:
    """A candidate's mean metric against a baseline's on the same examples, and the rule: the gain
    must exceed its standard error (paired over the examples) plus `margin`."""

    candidate: float
    baseline: float
    se: float  # standard error of the mean per-example difference (inf with fewer than 2 examples)
    margin: float = 0.0  # how much more than the noise a gain must be (negative: a tolerance)
    examples: int = 0
    versus: str = "fallback"  # what the baseline is, for the messages
    unit: str = "examples"  # what an example is, for the messages (e.g. "lists")

    @classmethod
    def of(cls, ours, theirs, margin: float = 0.0, versus: str = "fallback", unit: str = "examples") -> "PairedGain":
        """From each example's metric under the candidate (`ours`) and the baseline (`theirs`), in
        the same order. No examples: no means (nan) and no gain beyond noise."""
        ours, theirs = _paired(ours, theirs)
        mean = lambda v: float(v.mean()) if len(v) else math.nan  # noqa: E731
        return cls(mean(ours), mean(theirs), paired_standard_error(ours, theirs), margin, len(ours), versus, unit)

    @property
    def gain(self) -> float:
        return self.candidate - self.baseline

    @property
    def beyond_noise(self) -> bool:
        return self.gain > self.se + self.margin

    def says(self) -> str:
        """e.g. 'gain +0.0070 over serving <= its standard error 0.0200 + margin 0.005 (94 examples)'."""
        op = ">" if self.beyond_noise else "<="
        n = f" ({self.examples:,} {self.unit})" if self.examples else ""
        return (f"gain {self.gain:+.4f} over {self.versus} {op} its standard error {self.se:.4f} "
                f"+ margin {self.margin:g}{n}")


def split_halves(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions 0..n-1 in two disjoint halves, drawn with `seed` (the same n and seed: the same
    halves): the choice half (the larger one when n is odd) and the confirm half, each sorted. A gate
    read on the examples that chose a setting (an epoch, weights) is optimistic by the best of the
    settings tried; the confirm half took no part in the choice."""
    order = np.random.default_rng(seed).permutation(n)
    cut = (n + 1) // 2
    return np.sort(order[:cut]), np.sort(order[cut:])
