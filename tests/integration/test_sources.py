"""FeastCatalogSource on a real feature repo (the tiny shop, `feast apply`-ed): it returns what the
offline files hold, through Feast's offline store API, on the duckdb and the file (dask) offline
store alike, and its version() moves when a source changes, by file stat or by newest timestamp."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from feedback.sessions import load_categories
from gateway.catalog import CatalogSources, load_catalog
from scorer.data import feast_ops
from sources.feast_source import FeastCatalogSource
from sources.interface import CatalogSource
from sources.memory import InMemoryCatalogSource

pytestmark = pytest.mark.integration

TABLES = ("item_features", "item_popularity", "events")


@pytest.fixture(scope="module")
def store(feature_repo):
    return feature_repo.store()


@pytest.fixture(scope="module")
def files(feature_repo) -> InMemoryCatalogSource:
    """The same rows, read straight from the repo's parquet files: what Feast must return."""
    offline = feature_repo.offline
    return InMemoryCatalogSource(pd.read_parquet(offline / "item_features.parquet"),
                                 pd.read_parquet(offline / "item_popularity.parquet"),
                                 pd.read_parquet(offline / "events.parquet"))


def _same_rows(got: pd.DataFrame, want: pd.DataFrame, key: list[str]) -> None:
    assert list(got.columns) == list(want.columns)
    got = got.sort_values(key).reset_index(drop=True)
    want = want.sort_values(key).reset_index(drop=True)
    for c in want.columns:
        if c in ("event_timestamp", "timestamp"):
            assert (pd.to_datetime(got[c], utc=True) == pd.to_datetime(want[c], utc=True)).all(), c
        elif pd.api.types.is_float_dtype(want[c]):
            assert np.allclose(got[c].astype("float64"), want[c].astype("float64"), equal_nan=True), c
        else:
            assert got[c].tolist() == want[c].tolist(), c


def _same_catalog(a, b) -> None:
    assert a.item_ids == b.item_ids and a.texts == b.texts
    assert np.array_equal(a.popularity, b.popularity) and np.allclose(a.created, b.created)
    assert {p: set(v.tolist()) for p, v in a.covisit.items()} == {p: set(v.tolist()) for p, v in b.covisit.items()}


def test_the_gateway_gets_the_feast_source_from_the_feature_store(store):
    source = CatalogSources.from_feature_store(store)
    assert isinstance(source, FeastCatalogSource) and isinstance(source, CatalogSource)


def test_feast_returns_each_items_newest_rows_and_the_events_the_files_hold(store, files):
    source = FeastCatalogSource.from_feature_store(store)
    _same_rows(source.latest_items(), files.latest_items(), ["item_id"])
    _same_rows(source.latest_items(["category"]), files.latest_items(["category"]), ["item_id"])
    _same_rows(source.latest_popularity(), files.latest_popularity(), ["item_id"])
    keys = ["session_id", "timestamp", "item_id", "event_type"]
    _same_rows(source.events(), files.events(), keys)
    since = pd.to_datetime(files.events()["timestamp"], utc=True).quantile(0.8).to_pydatetime()
    recent = source.events(since)
    assert 0 < len(recent) < len(files.events())
    _same_rows(recent, files.events(since), keys)


def test_catalog_and_categories_through_feast_equal_those_from_the_files(store, files):
    source = FeastCatalogSource.from_feature_store(store)
    catalog = load_catalog(source)
    _same_catalog(catalog, load_catalog(files))
    assert len(catalog.covisit) > 0.3 * len(catalog)  # the events really were read
    assert load_categories(source) == load_categories(files)


def test_another_offline_store_reads_the_same_rows(feature_repo, store, tmp_path):
    """The file (dask) offline store instead of duckdb: same registry, same sources, same catalog."""
    yaml = tmp_path / "feature_store.file.yaml"
    yaml.write_text("project: recsys\nprovider: local\n"
                    f"registry: {feature_repo.path / 'data' / 'registry.db'}\n"
                    f"online_store:\n  type: sqlite\n  path: {feature_repo.path / 'data' / 'online_store.db'}\n"
                    "offline_store:\n  type: file\nentity_key_serialization_version: 3\n")
    from feast import FeatureStore

    dask = FeastCatalogSource.from_feature_store(FeatureStore(repo_path=str(feature_repo.path), fs_yaml_file=yaml),
                                                 stat_files=False)
    duckdb = FeastCatalogSource.from_feature_store(store, stat_files=False)
    assert type(dask._offline).__name__ == "DaskOfflineStore"
    _same_catalog(load_catalog(dask), load_catalog(duckdb))
    assert dask.version() == duckdb.version()  # the newest timestamps, whichever store answers


@pytest.fixture(scope="module")
def applied_repo(feature_repo, tmp_path_factory) -> Path:
    """A feature repo of its own (applied, not materialized): the writes below must not reach
    other tests' sources."""
    repo = feast_ops.copy_feature_repo(tmp_path_factory.mktemp("sources") / "repo")
    (repo / "data" / "offline").mkdir(parents=True)
    feast_ops.apply(repo, quiet=True)
    return repo


@pytest.fixture()
def private_repo(feature_repo, applied_repo) -> Path:
    """applied_repo with fresh copies of the shop's offline tables."""
    for t in TABLES:
        shutil.copy(feature_repo.offline / f"{t}.parquet", applied_repo / "data" / "offline" / f"{t}.parquet")
    return applied_repo


def _add_item(repo: Path, item_id: str) -> None:
    path = repo / "data" / "offline" / "item_features.parquet"
    items = pd.read_parquet(path)
    new = items.iloc[[0]].copy()
    new["item_id"], new["title"], new["category"] = item_id, "Zephyr Ultralight Trekking Poles", "Poles"
    new["event_timestamp"] = pd.Timestamp.now(tz="UTC").floor("us")
    pd.concat([items, new]).to_parquet(path)


@pytest.mark.parametrize("stat_files", [True, False], ids=["file-stat", "newest-timestamp"])
def test_the_version_moves_when_an_item_is_added_and_only_then(private_repo, stat_files):
    source = FeastCatalogSource.from_feature_store(feast_ops.load_store(private_repo), stat_files=stat_files)
    before = source.version()
    catalog = load_catalog(source)
    assert source.version() == before == catalog.source_version  # reading changes nothing
    _add_item(private_repo, "zz-new-1")
    assert source.version() != before
    again = load_catalog(source, catalog.item_ids)
    assert again.item_ids == (*catalog.item_ids, "zz-new-1") and again.source_version == source.version()
    assert load_categories(source)["zz-new-1"] == "Poles"


def test_a_repo_without_popularity_or_events_yet_is_served(private_repo):
    for t in ("item_popularity", "events"):
        (private_repo / "data" / "offline" / f"{t}.parquet").unlink()
    for stat_files in (True, False):
        source = FeastCatalogSource.from_feature_store(feast_ops.load_store(private_repo), stat_files=stat_files)
        catalog = load_catalog(source)
        assert len(catalog) > 0 and not catalog.popularity.any() and catalog.covisit == {}
        assert source.version()[1:] == (None, None)


def test_concurrent_reads_from_threads_are_safe(store):
    """Several gateways in one process refresh from worker threads; duckdb's connection is shared."""
    source = FeastCatalogSource.from_feature_store(store, stat_files=False)
    expected = (source.version(), len(source.latest_items(["category"])))
    results: list[tuple] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(5):
                results.append((source.version(), len(source.latest_items(["category"]))))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert results == [expected] * 20
