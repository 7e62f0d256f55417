"""Gateway settings: environment variables (`RECSYS_*`) over an optional TOML file over defaults.

    RECSYS_TRITON_URL=10.0.0.5:8001 RECSYS_RERANK_DEPTH=50 recsys serve
    recsys serve --config gateway.toml        # same keys, lower case: triton_url = "10.0.0.5:8001"
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict,
                               TomlConfigSettingsSource)

from contract.rules import MAX_NUM_RESULTS, MAX_QUERY_CHARS
from contract.scores import ScoreWeights
from contract.tensors import ENCODER_MODEL, RANKER_MODEL
from gateway.breaker import BreakerSettings


class Breakers(BaseModel):
    """One circuit breaker per downstream part, each with its own settings (gateway/breaker.py)."""

    online_store: BreakerSettings = BreakerSettings()
    encoder: BreakerSettings = BreakerSettings()
    interest: BreakerSettings = BreakerSettings()
    next_item: BreakerSettings = BreakerSettings()
    ranker: BreakerSettings = BreakerSettings()


class SourceFusion(BaseModel):
    """Weighted reciprocal-rank fusion of the candidate sources (gateway/scoring.py `source_fusion`):
    an item's relevance without a query is sum_s w_s / (k + rank_s), scaled into the ranker's range
    (with a query, relevance stays the query's cosine: the query source is not fused).
    Defaults chosen on validation (bench/tune_fusion.py, docs/gateway.md#ranking-and-fusion)."""

    k: float = Field(10.0, gt=0, description="rank offset: larger flattens the difference between ranks")
    interest: float = Field(1.0, ge=0)
    next_item: float = Field(1.0, ge=0, description="the next-item model's list (Triton's next_item_onnx, when loaded)")
    session: float = Field(10.0, ge=0, description="co-visitation of the page, session and profile items")
    popular: float = Field(0.3, ge=0)
    # The fused relevance's weight against the feature terms (personalization, popularity, freshness)
    # of the final score. 1 on validation: with co-visitation at 10 and k 10 the fused ranks are far
    # enough apart that the feature terms only break near-ties (docs/models.md, real data).
    # At most 9: RANKER_PRIOR x 9 + the query boost stays inside contract.scores.PART_BOUNDS.
    scale: float = Field(1.0, gt=0, le=9, description="weight of the fused relevance against the feature terms")


def _default_max_in_flight() -> int:
    # The models, not the gateway, are the bottleneck: one request per core keeps Triton's calls
    # fast; at two per core the stage caps were hit under load (docs/benchmarks.md, the load table).
    return os.cpu_count() or 1


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RECSYS_", env_nested_delimiter="__", extra="forbid")

    # Where things are.
    host: str = "127.0.0.1"
    port: int = Field(50051, ge=0, le=65535, description="gRPC port; 0 picks a free one")
    metrics_port: int = Field(0, ge=0, le=65535, description="Prometheus /metrics port; 0 disables")
    reuse_port: bool = Field(False, description="SO_REUSEPORT: several gateway processes share one port (the kernel spreads connections)")
    feature_repo: Path = Path("feature_repo")
    feature_store_yaml: str = "feature_store.yaml"  # or feature_store.redis.yaml
    triton_url: str = Field("127.0.0.1:8001", description="the one Triton server (used when triton_urls is empty)")
    # NoDecode: RECSYS_TRITON_URLS=a:8001,b:8001 is split below instead of being parsed as JSON.
    triton_urls: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="several Triton servers (replicas of one model repository): "
        "least outstanding requests over those in rotation, failover (gateway/triton_pool.py)")
    triton_server_breaker: BreakerSettings = Field(
        BreakerSettings(), description="one per Triton server: errors and the server's own timeouts across "
        "many calls take it out of rotation for cooldown_s (a refused connection takes it out at once)")
    triton_failover_min_ms: int = Field(
        10, ge=0, description="a call that failed on an unreachable server is retried on another only "
        "while the request has at least this much time left")
    encoder_model: str = ENCODER_MODEL.name
    ranker_model: str = RANKER_MODEL.name
    embedding_cache_dir: Path | None = None  # item embeddings per encoder version; None: <feature_repo>/data/embeddings

    # Who may call (rpc/auth.py, docs/security.md). Keys: this file and/or RECSYS_AUTH_KEYS; neither: auth off.
    auth_keys_file: Path | None = Field(None, description="API key file (name, roles, SHA-256 of the key; re-read on change)")
    reflection: bool = Field(True, description="serve gRPC reflection (with auth on it needs an admin key unless reflection_open)")
    reflection_open: bool = Field(False, description="reflection answered without a key")
    tls_cert_file: Path | None = Field(None, description="TLS certificate (PEM); with tls_key_file the port is TLS")
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = Field(None, description="CA of client certificates: mutual TLS")

    # Deadlines (milliseconds). A request's budget is its gRPC deadline, capped at request_timeout_ms.
    request_timeout_ms: int = Field(250, gt=0)
    embed_timeout_ms: int = Field(100, gt=0)
    feature_timeout_ms: int = Field(50, gt=0)
    reserve_ms: int = Field(8, ge=0, description="kept back from the ranker's budget for fusion and the reply")
    interest_timeout_ms: int = Field(50, gt=0)
    next_item_timeout_ms: int = Field(50, gt=0)
    rank_timeout_ms: int = Field(200, gt=0, description="a ranker call that gets this long and does not answer counts against Triton")
    breakers: Breakers = Breakers()

    # Admission control (gateway/admission.py): beyond these, Recommend/Rank answer RESOURCE_EXHAUSTED.
    max_in_flight: int = Field(default_factory=_default_max_in_flight, gt=0,
                               description="requests in the pipeline at once (default: 1 per CPU core)")
    max_queued: int = Field(default_factory=lambda: 2 * _default_max_in_flight(), ge=0,
                            description="requests waiting for a slot; each waits only while it can still make its deadline")

    # Query/context embeddings kept per (encoder version, text): shops repeat their head queries.
    embedding_cache_size: int = Field(20_000, ge=0, description="entries; 0 disables the cache")

    # Retrieval and ranking.
    candidates_per_source: int = Field(100, gt=0)
    rerank_depth: int = Field(20, ge=0, description="top-K candidates the Triton ranker re-scores; 0: no ranker")
    brand_cap: int = Field(0, ge=0, description="at most this many items per brand in a response; 0: no cap")
    interest_recent_items: int = Field(10, gt=0)
    covisit_recent_items: int = Field(10, ge=0, description="profile items (newest first) whose co-visits are candidates")
    covisit_seed_decay: float = Field(0.2, gt=0, le=1, description="weight of the r-th newest co-visitation seed: decay^r")
    fusion: SourceFusion = SourceFusion()
    learned_fusion: Path | None = Field(
        None, description="model file of `recsys train fusion`: scores no-query candidates instead of the rank "
        "fusion (read at start; a file that cannot be served stops the start)")
    ranker_mode: Literal["auto", "always", "never"] = Field(
        "auto", description="auto: the ranker only when its served version beat the blend on validation")
    weights: ScoreWeights = ScoreWeights()

    # Request limits (validation).
    default_num_results: int = Field(20, gt=0)
    max_num_results: int = Field(MAX_NUM_RESULTS, gt=0)
    max_query_chars: int = Field(MAX_QUERY_CHARS, gt=0)
    max_candidate_ids: int = Field(1000, gt=0)

    # Online learning of the blend weights (the learner runs in the feedback service).
    feedback_url: str = Field("", description="FeedbackService address; empty: the configured weights, no online learning")
    online_weights_holdout: float = Field(0.0, ge=0, le=1, description="share of users kept on the configured weights (control group)")
    online_weights_explore: bool = Field(True, description="sample weights from the posterior per request (Thompson sampling)")
    online_weights_poll_s: float = Field(1.0, gt=0, description="how often to fetch the learned weights")
    feedback_api_key: SecretStr = Field(SecretStr(""), description="the gateway's own key (role internal) for LogServed / GetBlendWeights")
    feedback_tls_ca_file: Path | None = Field(None, description="CA of the feedback service's TLS certificate; None: plaintext")
    # A feedback service with mutual TLS (its tls_client_ca_file) refuses the gateway without these.
    feedback_tls_cert_file: Path | None = Field(None, description="the gateway's client certificate (PEM) for mutual TLS")
    feedback_tls_key_file: Path | None = Field(None, description="the key of feedback_tls_cert_file")

    # Background work.
    refresh_interval_s: float = Field(10.0, gt=0, description="how often to look for a new encoder version or new items")

    @field_validator("triton_urls", mode="before")
    @classmethod
    def _split_urls(cls, value: object) -> object:
        if isinstance(value, str):  # from the environment: comma-separated (JSON lists work too)
            value = value.strip()
            if value.startswith("["):
                import json

                return json.loads(value)
            return [u.strip() for u in value.split(",") if u.strip()]
        return value

    @model_validator(mode="after")
    def _check(self) -> "GatewaySettings":
        if self.default_num_results > self.max_num_results:
            raise ValueError("default_num_results must be <= max_num_results")
        if len(set(self.triton_urls)) != len(self.triton_urls):
            raise ValueError(f"triton_urls lists a server twice: {self.triton_urls}")
        if any(not u for u in self.triton_urls):
            raise ValueError("triton_urls has an empty entry")
        return self

    @property
    def triton_servers(self) -> list[str]:
        """The Triton servers to use: triton_urls, or the one triton_url."""
        return list(self.triton_urls) or [self.triton_url]

    @property
    def cache_dir(self) -> Path:
        return self.embedding_cache_dir or self.feature_repo / "data" / "embeddings"

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if _config_file:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=_config_file))
        return tuple(sources)


_config_file: Path | None = None


def load_settings(config_file: Path | None = None, **overrides) -> GatewaySettings:
    """Settings from `overrides` > RECSYS_* environment > `config_file` (TOML) > defaults."""
    global _config_file
    if config_file is not None and not config_file.is_file():
        raise FileNotFoundError(f"gateway config file not found: {config_file}")
    _config_file = config_file
    try:
        return GatewaySettings(**overrides)
    finally:
        _config_file = None
