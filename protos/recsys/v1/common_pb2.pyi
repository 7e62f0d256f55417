from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Surface(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SURFACE_UNSPECIFIED: _ClassVar[Surface]
    SURFACE_SEARCH: _ClassVar[Surface]
    SURFACE_HOME: _ClassVar[Surface]
    SURFACE_PRODUCT_PAGE: _ClassVar[Surface]
    SURFACE_CATEGORY: _ClassVar[Surface]
    SURFACE_CART: _ClassVar[Surface]

class Device(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DEVICE_UNSPECIFIED: _ClassVar[Device]
    DEVICE_DESKTOP: _ClassVar[Device]
    DEVICE_MOBILE: _ClassVar[Device]
    DEVICE_TABLET: _ClassVar[Device]
    DEVICE_APP: _ClassVar[Device]

class CandidateSource(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CANDIDATE_SOURCE_UNSPECIFIED: _ClassVar[CandidateSource]
    CANDIDATE_SOURCE_QUERY: _ClassVar[CandidateSource]
    CANDIDATE_SOURCE_INTEREST: _ClassVar[CandidateSource]
    CANDIDATE_SOURCE_SESSION: _ClassVar[CandidateSource]
    CANDIDATE_SOURCE_POPULAR: _ClassVar[CandidateSource]
    CANDIDATE_SOURCE_CALLER: _ClassVar[CandidateSource]
SURFACE_UNSPECIFIED: Surface
SURFACE_SEARCH: Surface
SURFACE_HOME: Surface
SURFACE_PRODUCT_PAGE: Surface
SURFACE_CATEGORY: Surface
SURFACE_CART: Surface
DEVICE_UNSPECIFIED: Device
DEVICE_DESKTOP: Device
DEVICE_MOBILE: Device
DEVICE_TABLET: Device
DEVICE_APP: Device
CANDIDATE_SOURCE_UNSPECIFIED: CandidateSource
CANDIDATE_SOURCE_QUERY: CandidateSource
CANDIDATE_SOURCE_INTEREST: CandidateSource
CANDIDATE_SOURCE_SESSION: CandidateSource
CANDIDATE_SOURCE_POPULAR: CandidateSource
CANDIDATE_SOURCE_CALLER: CandidateSource

class Context(_message.Message):
    __slots__ = ("surface", "device", "locale", "page_item_id", "page_category")
    SURFACE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    LOCALE_FIELD_NUMBER: _ClassVar[int]
    PAGE_ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_CATEGORY_FIELD_NUMBER: _ClassVar[int]
    surface: Surface
    device: Device
    locale: str
    page_item_id: str
    page_category: str
    def __init__(self, surface: _Optional[_Union[Surface, str]] = ..., device: _Optional[_Union[Device, str]] = ..., locale: _Optional[str] = ..., page_item_id: _Optional[str] = ..., page_category: _Optional[str] = ...) -> None: ...

class Filters(_message.Message):
    __slots__ = ("brands", "categories", "min_price", "max_price", "exclude_item_ids")
    BRANDS_FIELD_NUMBER: _ClassVar[int]
    CATEGORIES_FIELD_NUMBER: _ClassVar[int]
    MIN_PRICE_FIELD_NUMBER: _ClassVar[int]
    MAX_PRICE_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    brands: _containers.RepeatedScalarFieldContainer[str]
    categories: _containers.RepeatedScalarFieldContainer[str]
    min_price: float
    max_price: float
    exclude_item_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, brands: _Optional[_Iterable[str]] = ..., categories: _Optional[_Iterable[str]] = ..., min_price: _Optional[float] = ..., max_price: _Optional[float] = ..., exclude_item_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class ScoreBreakdown(_message.Message):
    __slots__ = ("relevance", "personalization", "popularity", "freshness")
    RELEVANCE_FIELD_NUMBER: _ClassVar[int]
    PERSONALIZATION_FIELD_NUMBER: _ClassVar[int]
    POPULARITY_FIELD_NUMBER: _ClassVar[int]
    FRESHNESS_FIELD_NUMBER: _ClassVar[int]
    relevance: float
    personalization: float
    popularity: float
    freshness: float
    def __init__(self, relevance: _Optional[float] = ..., personalization: _Optional[float] = ..., popularity: _Optional[float] = ..., freshness: _Optional[float] = ...) -> None: ...

class ScoredItem(_message.Message):
    __slots__ = ("item_id", "score", "rank", "breakdown", "reasons", "sources")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    BREAKDOWN_FIELD_NUMBER: _ClassVar[int]
    REASONS_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    score: float
    rank: int
    breakdown: ScoreBreakdown
    reasons: _containers.RepeatedScalarFieldContainer[str]
    sources: _containers.RepeatedScalarFieldContainer[CandidateSource]
    def __init__(self, item_id: _Optional[str] = ..., score: _Optional[float] = ..., rank: _Optional[int] = ..., breakdown: _Optional[_Union[ScoreBreakdown, _Mapping]] = ..., reasons: _Optional[_Iterable[str]] = ..., sources: _Optional[_Iterable[_Union[CandidateSource, str]]] = ...) -> None: ...
