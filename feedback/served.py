"""LogServed input: limits and validation, each error naming the field (`lists[3].items: at most 200
items, got 5000`), and the split form the learner stores (ids + a float32 parts array per list).

Limits and ids are all or nothing: the first invalid one refuses the whole call (INVALID_ARGUMENT)
and nothing of it is kept. They bound the work and memory one call can cost, and a client that
breaks them is misconfigured (e.g. a gateway with a larger max_num_results than this service).
A list with a malformed part vector (wrong length, NaN or infinity) is dropped alone, as the proto
documents (`LogServedResponse.accepted`): one bad score must not cost the learner 5,000 good lists.
A well-formed part outside contract/scores.py PART_BOUNDS (the range a gateway can produce, e.g.
relevance 3e38) refuses the call like a limit: no gateway sends it, so the client is forged or broken,
and such a value once made the learner's Newton step singular (tests/unit/test_learner_poisoning.py).
The logging-policy fields (positions, the blend weights and their log-density, docs/feedback.md
"What LogServed carries") refuse the call when out of range, like a part out of bounds: positions
0 (unset) or 1..max_items, weights empty or one finite number per part within
+-SERVED_MAX_ABS_WEIGHT, the log-density finite within +-SERVED_MAX_ABS_LOG_DENSITY.
The message size is bounded before any of this, by grpc (server.py: max_receive_message_length).
"""

from __future__ import annotations

import itertools
import logging
import re
from dataclasses import dataclass

import numpy as np

from feedback import metrics
from feedback.blend_learner import outside_bounds
from feedback.events import MAX_BATCH
from contract.rules import ID_PATTERN, MAX_NUM_RESULTS, id_error
from contract.scores import PART_BOUNDS, PART_NAMES, SERVED_MAX_ABS_LOG_DENSITY, SERVED_MAX_ABS_WEIGHT
from recsys.v1 import feedback_pb2

log = logging.getLogger(__name__)

N_PARTS = len(PART_NAMES)
# One regex over a whole list's ids ("i1\ni2\n...") instead of one per id: ~10x faster on 200 ids;
# the slow per-id path only runs to name the bad one.
_ID_LINES = re.compile(f"(?:{ID_PATTERN.pattern}\n)+")


class ServedError(ValueError):
    """A LogServed field is invalid; `field` is its proto path, e.g. "lists[3].items[7].parts"."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class ServedLimits:
    max_lists: int = MAX_BATCH  # lists per call (the proto's 1-10000)
    # A gateway never serves more than its max_num_results; read from its defaults, not copied.
    max_items: int = MAX_NUM_RESULTS


@dataclass(frozen=True)
class ParsedList:
    request_id: str
    item_ids: list[str]
    parts: np.ndarray  # (items, N_PARTS) float32, within PART_BOUNDS
    positions: np.ndarray | None = None  # (items,) int16, 1-based as shown; None: the list order
    weights_log_density: float | None = None  # None: fixed weights (not sampled)


def parse_served(request: feedback_pb2.LogServedRequest, limits: ServedLimits = ServedLimits()) -> list[ParsedList]:
    """The call's lists with well-formed parts; ServedError naming the first field over a limit,
    with a bad id or with a part out of bounds. Lists with malformed parts are left out (counted,
    the first one logged)."""
    n = len(request.lists)
    if not 1 <= n <= limits.max_lists:
        raise ServedError("lists", f"1-{limits.max_lists} lists per call, got {n}")
    parsed, malformed = [], []
    for i, served in enumerate(request.lists):
        got = _parse_list(f"lists[{i}]", served, limits)
        if isinstance(got, ParsedList):
            parsed.append(got)
        else:
            malformed.append(got)
    if malformed:
        metrics.DROPPED.labels("served", "malformed").inc(len(malformed))
        log.warning("LogServed: %d of %d lists dropped for malformed parts, the first: %s", len(malformed), n,
                    malformed[0])
    return parsed


def _parse_list(at: str, served: feedback_pb2.ServedList, limits: ServedLimits) -> ParsedList | str:
    """The list, or why its parts are malformed; ServedError for a limit, an id or a part out of bounds."""
    if not served.request_id:
        raise ServedError(f"{at}.request_id", "is required")
    if (problem := id_error(served.request_id)) is not None:
        raise ServedError(f"{at}.request_id", problem)
    items = served.items
    m = len(items)
    if m == 0:
        raise ServedError(f"{at}.items", "must not be empty")
    if m > limits.max_items:
        raise ServedError(f"{at}.items", f"at most {limits.max_items} items, got {m}")
    ids = [item.item_id for item in items]
    if not _ID_LINES.fullmatch("\n".join(ids) + "\n"):
        for j, item_id in enumerate(ids):
            problem = "is required" if not item_id else id_error(item_id)
            if problem is not None:
                raise ServedError(f"{at}.items[{j}].item_id", problem)
    rows = [item.parts for item in items]
    for j, row in enumerate(rows):
        if len(row) != N_PARTS:
            return f"{at}.items[{j}].parts: {N_PARTS} numbers ({', '.join(PART_NAMES)}), got {len(row)}"
    parts = np.fromiter(itertools.chain.from_iterable(rows), np.float32, count=m * N_PARTS).reshape(m, N_PARTS)
    finite = np.isfinite(parts).all(axis=1)
    if not finite.all():
        j = int(np.flatnonzero(~finite)[0])
        return f"{at}.items[{j}].parts: must be finite numbers, got {parts[j].tolist()}"
    outside = outside_bounds(parts)
    if outside.any():
        j, k = (int(i) for i in np.argwhere(outside)[0])
        low, high = PART_BOUNDS[PART_NAMES[k]]
        raise ServedError(f"{at}.items[{j}].parts[{k}]",
                          f"{PART_NAMES[k]} must be within [{low:g}, {high:g}], got {float(parts[j, k]):g}")
    positions = _positions(at, items, limits)
    _check_policy(at, served)
    return ParsedList(served.request_id, ids, parts, positions,
                      served.weights_log_density if served.weights_sampled else None)


def _positions(at: str, items, limits: ServedLimits) -> np.ndarray | None:
    """The items' positions (None when the gateway left them unset: the list order is the position)."""
    pos = np.fromiter((item.position for item in items), np.int64, count=len(items))
    if not pos.any():
        return None
    bad = (pos < 0) | (pos > limits.max_items)
    if bad.any():
        j = int(np.flatnonzero(bad)[0])
        raise ServedError(f"{at}.items[{j}].position", f"must be 0 (unset) or 1-{limits.max_items}, got {int(pos[j])}")
    return pos.astype(np.int16)


def _check_policy(at: str, served: feedback_pb2.ServedList) -> None:
    """The logging policy's record: the blend weights and the log-density of their draw."""
    density = served.weights_log_density
    if not np.isfinite(density) or abs(density) > SERVED_MAX_ABS_LOG_DENSITY:
        raise ServedError(f"{at}.weights_log_density",
                          f"must be a finite number within +-{SERVED_MAX_ABS_LOG_DENSITY:g}, got {density:g}")
    if served.weights_sampled is False and density != 0:
        raise ServedError(f"{at}.weights_log_density", "is set but weights_sampled is false (fixed weights)")
    w = np.asarray(served.weights, np.float64)
    if w.size not in (0, N_PARTS):
        raise ServedError(f"{at}.weights", f"empty or {N_PARTS} numbers ({', '.join(PART_NAMES)}), got {w.size}")
    bad = ~np.isfinite(w) | (np.abs(w) > SERVED_MAX_ABS_WEIGHT)
    if bad.any():
        k = int(np.flatnonzero(bad)[0])
        raise ServedError(f"{at}.weights[{k}]",
                          f"{PART_NAMES[k]} must be a finite number within +-{SERVED_MAX_ABS_WEIGHT:g}, got {w[k]:g}")
