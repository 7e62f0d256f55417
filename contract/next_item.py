"""The next-item model's contract: what the gateway sends Triton's `next_item_onnx` and what it gets
back, as the exporter (scorer/export/next_item_export.py) builds it.

The model speaks item ids, not positions: its vocabulary (the items it was trained on) is baked into
the ONNX graph, so a version always answers in the ids it knows, whatever the gateway's catalog
looks like today (new items, removed items, another order), and no vocabulary file has to travel
with the model. An item the model never saw reads as padding; an item it returns that the catalog
no longer holds is simply not a candidate.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

NEXT_ITEM_HISTORY = 50  # the newest items the model reads (the SASRec recipe's max_len)
NEXT_ITEM_TOP_K = 100  # the next items it returns per request, best first (fewer when its vocabulary is smaller)
PAD_ITEM = ""  # an empty history slot (the model also reads an item it does not know as one)


def history_tensor(newest_first: Sequence[str]) -> np.ndarray:
    """The `history` input for one user: the newest NEXT_ITEM_HISTORY item ids, oldest first, left-padded
    with PAD_ITEM (the order the model was trained in: time runs left to right)."""
    recent = [str(i) for i in list(newest_first)[:NEXT_ITEM_HISTORY]][::-1]
    return np.array([PAD_ITEM] * (NEXT_ITEM_HISTORY - len(recent)) + recent, dtype=object)


def served_history(sequence: Sequence[str]) -> list[str]:
    """What the gateway holds of a time-ordered sequence (oldest first): its distinct items, newest
    first, each where it last occurred (the profile keeps recent distinct items, the request path
    deduplicates page, session and profile; gateway/retrieval.py history_positions)."""
    return list(dict.fromkeys(reversed(list(sequence))))
