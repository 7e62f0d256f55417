"""The generic import format: items, users, events (one file each, parquet or CSV).

Documented for users in docs/data_format.md; keep the two in step. Every row is validated by these
pydantic models, and cross-file rules (unique ids, events pointing at known items and users) are
checked by scorer/data/importer.py.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from enum import Enum
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PositiveInt,
    StringConstraints,
    model_validator,
)

from contract.rules import ID_PATTERN

# Ids travel through gRPC, Redis keys and file names: the same safe, printable alphabet the services accept.
Id = Annotated[str, StringConstraints(pattern=f"^{ID_PATTERN.pattern}$")]


def _empty_to_none(v: Any) -> Any:
    # CSV and pandas turn missing values into "", NaN or pd.NA; all mean "not given".
    if v is None or (isinstance(v, float) and math.isnan(v)) or v == "":
        return None
    if type(v).__name__ in ("NAType", "NaTType"):
        return None
    return v


def _utc(v: datetime) -> datetime:
    # Naive timestamps are taken as UTC (documented); aware ones are converted.
    return v.replace(tzinfo=timezone.utc) if v.tzinfo is None else v.astimezone(timezone.utc)


def _attributes(v: Any) -> dict[str, str]:
    if _empty_to_none(v) is None:
        return {}
    if isinstance(v, str):
        try:
            v = json.loads(v)
        except json.JSONDecodeError as e:
            raise ValueError(f"not valid JSON ({e.msg})") from None
    if not isinstance(v, dict) or not all(isinstance(k, str) and isinstance(x, str) for k, x in v.items()):
        raise ValueError("must be a JSON object of string keys to string values")
    return v


UtcDatetime = Annotated[datetime, AfterValidator(_utc)]
MaybeStr = Annotated[str | None, BeforeValidator(_empty_to_none)]
MaybeId = Annotated[Id | None, BeforeValidator(_empty_to_none)]
MaybeUtc = Annotated[UtcDatetime | None, BeforeValidator(_empty_to_none)]


CATEGORY_MAX_CHARS = 100  # what the feature tables keep (a Feast string, the query parser's vocabulary)
CATEGORY_INPUT_MAX_CHARS = 1000
CATEGORY_LEVEL_SEPARATOR = ">"


def shorten_category(category: str, max_chars: int = CATEGORY_MAX_CHARS) -> str:
    """A category path that fits `max_chars`, keeping its most specific (last) levels:
    'Home > Kitchen > ... > Mugs' -> 'Kitchen > ... > Mugs'. The leaf says what the item is, so the
    root levels are dropped first; a single level longer than the limit is cut at the limit."""
    if len(category) <= max_chars:
        return category
    levels = [level.strip() for level in category.split(CATEGORY_LEVEL_SEPARATOR) if level.strip()]
    if not levels:
        return category[:max_chars]
    kept: list[str] = []
    for level in reversed(levels):
        candidate = [level, *kept]
        if len(f" {CATEGORY_LEVEL_SEPARATOR} ".join(candidate)) > max_chars:
            break
        kept = candidate
    return f" {CATEGORY_LEVEL_SEPARATOR} ".join(kept) if kept else levels[-1][:max_chars].rstrip()


class EventType(str, Enum):
    IMPRESSION = "IMPRESSION"
    CLICK = "CLICK"
    ADD_TO_CART = "ADD_TO_CART"
    PURCHASE = "PURCHASE"
    QUERY = "QUERY"


class ItemRow(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    item_id: Id
    title: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=300)]
    description: Annotated[str, BeforeValidator(lambda v: _empty_to_none(v) or "")] = Field("", max_length=5000)
    # Longer paths are accepted and shortened to their last levels by the importer (shorten_category).
    category: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=CATEGORY_INPUT_MAX_CHARS)]
    brand: Annotated[str, BeforeValidator(lambda v: _empty_to_none(v) or "")] = Field("", max_length=100)
    # Unknown price: None (NaN in the tables). It gives no price term in the item text and neutral
    # price features (docs/data_format.md); 0 means "free", not "unknown".
    price: Annotated[float | None, BeforeValidator(_empty_to_none)] = Field(None, ge=0, allow_inf_nan=False)
    attributes: Annotated[dict[str, str], BeforeValidator(_attributes)] = {}  # JSON object in files
    created_at: MaybeUtc = None


class UserRow(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    user_id: Id
    created_at: MaybeUtc = None
    country: MaybeStr = None


class EventRow(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    event_id: Id
    timestamp: UtcDatetime
    user_id: Id
    session_id: Id
    event_type: EventType
    item_id: MaybeId = None
    query: Annotated[Annotated[str, StringConstraints(max_length=512)] | None, BeforeValidator(_empty_to_none)] = None
    request_id: MaybeId = None
    position: Annotated[PositiveInt | None, BeforeValidator(_empty_to_none)] = None  # 1-based rank shown
    quantity: Annotated[PositiveInt | None, BeforeValidator(_empty_to_none)] = None

    @model_validator(mode="after")
    def _type_rules(self) -> "EventRow":
        if self.event_type is EventType.QUERY:
            if not self.query:
                raise ValueError("query is required when event_type is QUERY")
        elif self.item_id is None:
            raise ValueError(f"item_id is required when event_type is {self.event_type.value}")
        return self


TABLES: dict[str, type[BaseModel]] = {"items": ItemRow, "users": UserRow, "events": EventRow}
