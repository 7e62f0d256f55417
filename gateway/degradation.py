"""Why an answer is degraded, as data: which part was left out, why, and what was used instead.

Control flow and metrics read the typed fields (`part`, `cause`); the caller reads `message()`
(the response's `degraded_reasons`), e.g. "encoder unavailable (breaker open: ...): BM25 retrieval".
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Part(str, Enum):
    ONLINE_STORE = "online_store"
    ENCODER = "encoder"
    INTEREST = "interest"
    NEXT_ITEM = "next_item"
    RANKER = "ranker"


class Cause(str, Enum):
    BREAKER_OPEN = "breaker_open"  # the part failed across many requests: not called for a cool-down
    ERROR = "error"  # this call failed
    TIMEOUT = "timeout"  # this call used its whole stage timeout
    DEADLINE = "deadline"  # this request had too little time left for the part (its own budget, no one else's)
    NO_INPUT = "no_input"  # an earlier part this one needs was left out (e.g. no context vector for the ranker)


LABELS = {Part.ONLINE_STORE: "online store", Part.ENCODER: "encoder", Part.INTEREST: "interest model",
          Part.NEXT_ITEM: "next-item model", Part.RANKER: "ranker"}


@dataclass(frozen=True)
class Degradation:
    part: Part
    cause: Cause
    fallback: str  # what the answer used instead, e.g. "BM25 retrieval"
    detail: str = ""

    def message(self) -> str:
        label = LABELS[self.part]
        if self.cause is Cause.DEADLINE:
            return f"{label} skipped: request deadline too close ({self.detail}): {self.fallback}"
        if self.cause is Cause.NO_INPUT:
            return f"{label} skipped: {self.detail}: {self.fallback}"
        detail = f"breaker open after {self.detail}" if self.cause is Cause.BREAKER_OPEN else self.detail
        return f"{label} unavailable ({detail}): {self.fallback}" if detail else f"{label} unavailable: {self.fallback}"
