from recsys.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RecommendRequest(_message.Message):
    __slots__ = ("user_id", "session_id", "query", "context", "filters", "candidate_item_ids", "num_results", "explain", "request_id")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    QUERY_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    FILTERS_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    NUM_RESULTS_FIELD_NUMBER: _ClassVar[int]
    EXPLAIN_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    session_id: str
    query: str
    context: _common_pb2.Context
    filters: _common_pb2.Filters
    candidate_item_ids: _containers.RepeatedScalarFieldContainer[str]
    num_results: int
    explain: bool
    request_id: str
    def __init__(self, user_id: _Optional[str] = ..., session_id: _Optional[str] = ..., query: _Optional[str] = ..., context: _Optional[_Union[_common_pb2.Context, _Mapping]] = ..., filters: _Optional[_Union[_common_pb2.Filters, _Mapping]] = ..., candidate_item_ids: _Optional[_Iterable[str]] = ..., num_results: _Optional[int] = ..., explain: _Optional[bool] = ..., request_id: _Optional[str] = ...) -> None: ...

class ParsedQuery(_message.Message):
    __slots__ = ("text", "brands", "categories", "min_price", "max_price")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    BRANDS_FIELD_NUMBER: _ClassVar[int]
    CATEGORIES_FIELD_NUMBER: _ClassVar[int]
    MIN_PRICE_FIELD_NUMBER: _ClassVar[int]
    MAX_PRICE_FIELD_NUMBER: _ClassVar[int]
    text: str
    brands: _containers.RepeatedScalarFieldContainer[str]
    categories: _containers.RepeatedScalarFieldContainer[str]
    min_price: float
    max_price: float
    def __init__(self, text: _Optional[str] = ..., brands: _Optional[_Iterable[str]] = ..., categories: _Optional[_Iterable[str]] = ..., min_price: _Optional[float] = ..., max_price: _Optional[float] = ...) -> None: ...

class RecommendResponse(_message.Message):
    __slots__ = ("items", "request_id", "model_versions", "degraded", "degraded_reasons", "parsed_query")
    class ModelVersionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_REASONS_FIELD_NUMBER: _ClassVar[int]
    PARSED_QUERY_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[_common_pb2.ScoredItem]
    request_id: str
    model_versions: _containers.ScalarMap[str, str]
    degraded: bool
    degraded_reasons: _containers.RepeatedScalarFieldContainer[str]
    parsed_query: ParsedQuery
    def __init__(self, items: _Optional[_Iterable[_Union[_common_pb2.ScoredItem, _Mapping]]] = ..., request_id: _Optional[str] = ..., model_versions: _Optional[_Mapping[str, str]] = ..., degraded: _Optional[bool] = ..., degraded_reasons: _Optional[_Iterable[str]] = ..., parsed_query: _Optional[_Union[ParsedQuery, _Mapping]] = ...) -> None: ...

class RankRequest(_message.Message):
    __slots__ = ("query", "user_id", "session_id", "item_ids", "context", "explain", "request_id")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    EXPLAIN_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    query: str
    user_id: str
    session_id: str
    item_ids: _containers.RepeatedScalarFieldContainer[str]
    context: _common_pb2.Context
    explain: bool
    request_id: str
    def __init__(self, query: _Optional[str] = ..., user_id: _Optional[str] = ..., session_id: _Optional[str] = ..., item_ids: _Optional[_Iterable[str]] = ..., context: _Optional[_Union[_common_pb2.Context, _Mapping]] = ..., explain: _Optional[bool] = ..., request_id: _Optional[str] = ...) -> None: ...

class RankResponse(_message.Message):
    __slots__ = ("items", "request_id", "model_versions", "degraded", "degraded_reasons", "unknown_item_ids")
    class ModelVersionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_REASONS_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[_common_pb2.ScoredItem]
    request_id: str
    model_versions: _containers.ScalarMap[str, str]
    degraded: bool
    degraded_reasons: _containers.RepeatedScalarFieldContainer[str]
    unknown_item_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, items: _Optional[_Iterable[_Union[_common_pb2.ScoredItem, _Mapping]]] = ..., request_id: _Optional[str] = ..., model_versions: _Optional[_Mapping[str, str]] = ..., degraded: _Optional[bool] = ..., degraded_reasons: _Optional[_Iterable[str]] = ..., unknown_item_ids: _Optional[_Iterable[str]] = ...) -> None: ...
