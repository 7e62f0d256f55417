"""Shared fixtures: a tiny synthetic shop imported into a private copy of the feature repo, applied
and materialized with the real `feast` CLI into a real SQLite store and a real Redis server."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pytest

from scorer.data import feast_ops
from scorer.data.importer import import_dataset
from scorer.data.synthetic import Shop, generate_shop
from scripts.local_redis import RedisServer, local_redis

REDIS_YAML = "feature_store.redis.yaml"


@pytest.fixture(scope="session")
def redis_server() -> RedisServer:
    """A real redis-server on a free loopback port, owned by the test session."""
    with local_redis() as server:
        yield server


@pytest.fixture(scope="session")
def tiny_shop() -> Shop:
    # Ends now, so the newest session and popularity rows are inside their TTLs.
    return generate_shop("tiny", seed=11, end=datetime.now(timezone.utc))


@dataclass
class Repo:
    path: Path
    shop: Shop
    redis: RedisServer

    @property
    def offline(self) -> Path:
        return self.path / "data" / "offline"

    @property
    def redis_env(self) -> dict[str, str]:
        return {"REDIS_CONNECTION_STRING": self.redis.connection_string}

    def store(self, backend: str = "sqlite"):
        if backend == "redis":
            os.environ["REDIS_CONNECTION_STRING"] = self.redis.connection_string
            return feast_ops.load_store(self.path, REDIS_YAML)
        return feast_ops.load_store(self.path)


@pytest.fixture(scope="session")
def feature_repo(tmp_path_factory, tiny_shop, redis_server) -> Repo:
    """tiny shop -> import -> `feast apply` + `feast materialize` on SQLite and on Redis."""
    root = tmp_path_factory.mktemp("shop")
    tiny_shop.write(root / "raw")
    repo = Repo(feast_ops.copy_feature_repo(root / "feature_repo"), tiny_shop, redis_server)
    import_dataset(root / "raw", repo.offline)
    end = datetime.now(timezone.utc)
    feast_ops.apply(repo.path, quiet=True)
    feast_ops.materialize_all(repo.path, end=end, quiet=True)
    feast_ops.apply(repo.path, yaml=REDIS_YAML, env=repo.redis_env, quiet=True)
    feast_ops.materialize_all(repo.path, end=end, yaml=REDIS_YAML, env=repo.redis_env, quiet=True)
    return repo


@pytest.fixture(scope="session")
def encoder_repo(tmp_path_factory):
    """A Triton model repository (committed configs) with the zero-shot encoder exported as v1."""
    from scorer.export.encoder_export import export_encoder
    from modelrepo.layout import copy_repository_configs
    from scorer.models.encoder import TextEncoder

    repo = copy_repository_configs(tmp_path_factory.mktemp("triton") / "models")
    encoder = TextEncoder()
    version = export_encoder(repo, encoder)
    return repo, encoder, version


def start_triton(repo: Path, workdir: Path):
    from localtriton.launcher import TritonServer

    server = TritonServer(model_repository=repo, workdir=workdir)
    server.start(timeout_s=180)
    return server


@pytest.fixture(scope="session")
def triton(encoder_repo, tmp_path_factory):
    """A real tritonserver (nvidia-pytriton, CPU) serving `encoder_repo`."""
    server = start_triton(encoder_repo[0], tmp_path_factory.mktemp("triton_run"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """A model repository with the zero-shot encoder, the untrained ranker and interest model (v1 each)."""
    from scorer.export.encoder_export import export_encoder
    from scorer.export.interest_export import export_interest
    from scorer.export.ranker_export import export_ranker
    from modelrepo.layout import copy_repository_configs
    from scorer.models.encoder import TextEncoder

    repo = copy_repository_configs(tmp_path_factory.mktemp("gw_models") / "models")
    export_encoder(repo, TextEncoder())
    export_ranker(repo)
    export_interest(repo)
    return repo


@pytest.fixture(scope="session")
def triton_gw(models, tmp_path_factory):
    server = start_triton(models, tmp_path_factory.mktemp("gw_triton"))
    yield server
    server.stop()
