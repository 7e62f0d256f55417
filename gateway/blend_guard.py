"""What the gateway accepts from and sends to the online learner.

Received weights: the learner keeps its posterior inside a box around the configured weights, but
the gateway does not trust that (a bug, a restored bad state, an impostor on the channel): weights
that are not finite, have the wrong length, leave the configured weights +- BLEND_MAX_WEIGHT_SHIFT,
or come with a variance that is negative, not finite or wider than the box are refused; the
gateway keeps its last good weights and says so (metrics, `OnlineBlend.weights_ok`).

Sent parts: the feedback service refuses a whole LogServed call when one part leaves PART_BOUNDS,
so one runaway ranker score would drop a batch of thousands of lists; parts are clipped into the
bounds here (and counted) before they are queued.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from contract.scores import BLEND_MAX_WEIGHT_SHIFT, PART_BOUNDS, PART_NAMES

_LOW = np.array([PART_BOUNDS[name][0] for name in PART_NAMES], np.float64)
_HIGH = np.array([PART_BOUNDS[name][1] for name in PART_NAMES], np.float64)


def weights_problem(mean: Sequence[float], variance: Sequence[float], prior: np.ndarray,
                    max_shift: float = BLEND_MAX_WEIGHT_SHIFT) -> str | None:
    """Why received blend weights must not be used, or None when they may."""
    m, v = np.asarray(mean, np.float64), np.asarray(variance, np.float64)
    if m.shape != prior.shape or v.shape != prior.shape:
        return f"expected {len(prior)} weights and variances, got {m.size} and {v.size}"
    if not (np.isfinite(m).all() and np.isfinite(v).all()):
        return "weights or variances are not finite"
    if (np.abs(m - prior) > max_shift + 1e-6).any():
        worst = int(np.argmax(np.abs(m - prior)))
        return (f"weight {PART_NAMES[worst]} = {m[worst]:.3g} is more than {max_shift:g} from the configured "
                f"{prior[worst]:.3g}")
    if (v < 0).any() or (v > max_shift ** 2).any():
        return f"variances must be within [0, {max_shift ** 2:g}]"
    return None


def clip_parts(parts: Sequence[float]) -> tuple[list[float], bool]:
    """`parts` clipped into PART_BOUNDS (NaN becomes the part's lower bound); True when any moved."""
    p = np.asarray(parts, np.float64)
    clipped = np.clip(np.nan_to_num(p, nan=-np.inf), _LOW, _HIGH)
    return clipped.tolist(), bool((clipped != p).any())
