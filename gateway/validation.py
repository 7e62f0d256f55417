"""Request validation: every bad request becomes INVALID_ARGUMENT with a message naming the field.

Unknown user ids are not errors (cold start); unknown *item* ids in Rank are reported back, not
rejected. What is rejected is what cannot be answered meaningfully or would cost unbounded work.
The id and free-text rules are shared with the feedback service (contract/rules.py).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper

from gateway.config import GatewaySettings
from contract.rules import ID_PATTERN, ONLY_WHITESPACE, id_error, text_error
from recsys.v1 import common_pb2, recommend_pb2

__all__ = ["ID_PATTERN", "RequestError", "validate_rank", "validate_recommend"]
MAX_FILTER_VALUES = 100
MAX_LOCALE_CHARS = 35


class RequestError(ValueError):
    """A request field is invalid; `field` is its proto path, e.g. "filters.min_price"."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


def _check_id(field: str, value: str, allow_empty: bool = True) -> None:
    if not value:
        if not allow_empty:
            raise RequestError(field, "must not be empty")
        return
    if (problem := id_error(value)) is not None:
        raise RequestError(field, problem)


def _check_ids(field: str, ids: Iterable[str], limit: int, distinct: bool = False) -> None:
    ids = list(ids)
    if len(ids) > limit:
        raise RequestError(field, f"at most {limit} ids, got {len(ids)}")
    for i, item_id in enumerate(ids):
        _check_id(f"{field}[{i}]", item_id, allow_empty=False)
    if distinct and len(set(ids)) != len(ids):
        dup = next(x for i, x in enumerate(ids) if x in ids[:i])
        raise RequestError(field, f"ids must be distinct ({dup!r} appears more than once)")


def _check_enum(field: str, enum: EnumTypeWrapper, value: int) -> None:
    # proto3 enums are open: an unknown number parses fine and must be rejected here.
    if value not in enum.values():
        raise RequestError(field, f"unknown value {value} (known: {', '.join(enum.keys())})")


def _check_query(field: str, query: str, settings: GatewaySettings, required: bool = False) -> None:
    # The shared text rule (contract/rules.py; the feedback service applies it to logged queries).
    if (problem := text_error(query, settings.max_query_chars)) is not None:
        if problem == ONLY_WHITESPACE:  # the gateway's hint: "" is how a client sends no query
            problem += " (send an empty query for no query)"
        raise RequestError(field, problem)
    if required and not query:
        raise RequestError(field, "must not be empty for this surface")


def _check_price(field: str, value: float) -> None:
    if math.isnan(value) or math.isinf(value):
        raise RequestError(field, f"must be a finite number, got {value}")
    if value < 0:
        raise RequestError(field, f"must be >= 0, got {value}")


def _check_context(ctx: common_pb2.Context) -> None:
    _check_enum("context.surface", common_pb2.Surface, ctx.surface)
    _check_enum("context.device", common_pb2.Device, ctx.device)
    if len(ctx.locale) > MAX_LOCALE_CHARS or (ctx.locale and not re.fullmatch(r"[A-Za-z0-9-]+", ctx.locale)):
        raise RequestError("context.locale", f"{ctx.locale[:40]!r} is not a BCP 47 language tag")
    _check_id("context.page_item_id", ctx.page_item_id)
    if len(ctx.page_category) > 128:
        raise RequestError("context.page_category", "at most 128 characters")


def _check_filters(f: common_pb2.Filters, settings: GatewaySettings) -> None:
    for name in ("brands", "categories"):
        values = list(getattr(f, name))
        if len(values) > MAX_FILTER_VALUES:
            raise RequestError(f"filters.{name}", f"at most {MAX_FILTER_VALUES} values, got {len(values)}")
        for i, v in enumerate(values):
            if not v.strip() or len(v) > 128:
                raise RequestError(f"filters.{name}[{i}]", "must be 1-128 non-blank characters")
    if f.HasField("min_price"):
        _check_price("filters.min_price", f.min_price)
    if f.HasField("max_price"):
        _check_price("filters.max_price", f.max_price)
    if f.HasField("min_price") and f.HasField("max_price") and f.min_price > f.max_price:
        raise RequestError("filters.max_price", f"must be >= filters.min_price ({f.max_price} < {f.min_price})")
    _check_ids("filters.exclude_item_ids", f.exclude_item_ids, settings.max_candidate_ids)


def validate_recommend(req: recommend_pb2.RecommendRequest, settings: GatewaySettings) -> None:
    _check_id("user_id", req.user_id)
    _check_id("session_id", req.session_id)
    _check_id("request_id", req.request_id)
    _check_query("query", req.query, settings)
    _check_context(req.context)
    if req.context.surface == common_pb2.SURFACE_SEARCH and not req.query and not req.candidate_item_ids:
        raise RequestError("query", "must not be empty when context.surface is SURFACE_SEARCH")
    if req.context.surface == common_pb2.SURFACE_PRODUCT_PAGE and not req.context.page_item_id:
        raise RequestError("context.page_item_id", "is required when context.surface is SURFACE_PRODUCT_PAGE")
    _check_filters(req.filters, settings)
    _check_ids("candidate_item_ids", req.candidate_item_ids, settings.max_candidate_ids)
    if req.num_results < 0 or req.num_results > settings.max_num_results:
        raise RequestError("num_results", f"must be between 1 and {settings.max_num_results} (0 = default "
                                          f"{settings.default_num_results}), got {req.num_results}")


def validate_rank(req: recommend_pb2.RankRequest, settings: GatewaySettings) -> None:
    _check_id("user_id", req.user_id)
    _check_id("session_id", req.session_id)
    _check_id("request_id", req.request_id)
    _check_query("query", req.query, settings)
    _check_context(req.context)
    if not req.item_ids:
        raise RequestError("item_ids", "must not be empty (1 to %d ids)" % settings.max_candidate_ids)
    _check_ids("item_ids", req.item_ids, settings.max_candidate_ids, distinct=True)
