"""The real UCI Online Retail data converts to the generic format and imports cleanly.

Uses the first 20,000 source rows of ../shared/datasets/online_retail/online_retail.parquet (CC BY 4.0,
never committed); skips when the file is not there.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pandas as pd
import pytest

from scorer.data.importer import import_dataset

REPO_ROOT = Path(__file__).resolve().parents[2]
SOURCE = REPO_ROOT.parent / "shared" / "datasets" / "online_retail" / "online_retail.parquet"
LIMIT = 20_000


def _load_converter():
    # bench/ is a folder of scripts, not a package: load the module from its file.
    spec = importlib.util.spec_from_file_location("online_retail", REPO_ROOT / "bench" / "online_retail.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _expected_rows(source: Path, limit: int) -> pd.DataFrame:
    # The filter rules, restated independently of the converter so a bug there cannot hide here.
    raw = pd.read_parquet(source).head(limit)
    keep = (
        raw["CustomerID"].notna()
        & ~raw["InvoiceNo"].astype(str).str.startswith("C")
        & (raw["Quantity"] > 0)
        & (raw["UnitPrice"] > 0)
        & raw["Description"].notna()
        & (raw["Description"].fillna("").str.strip() != "")
    )
    return raw[keep.astype(bool)]


@pytest.mark.integration
def test_online_retail_converts_and_imports(tmp_path: Path) -> None:
    if not SOURCE.exists():
        pytest.skip(f"{SOURCE} not found (the Online Retail data set is not in the repo)")
    online_retail = _load_converter()
    data_dir, offline_dir = tmp_path / "data", tmp_path / "offline"

    counts = online_retail.convert(SOURCE, data_dir, limit=LIMIT)
    tables = import_dataset(data_dir, offline_dir)

    expected = _expected_rows(SOURCE, LIMIT)
    items = pd.read_parquet(offline_dir / "items.parquet")
    users = pd.read_parquet(offline_dir / "users.parquet")
    events = pd.read_parquet(offline_dir / "events.parquet")

    assert counts["source_rows"] == LIMIT
    for name in ("items", "users", "events", "item_features", "item_popularity", "user_profile", "user_session"):
        assert tables[name] > 0, name
    assert len(expected) > 0
    assert len(events) == counts["events"] == len(expected)
    assert (events["event_type"] == "PURCHASE").all()
    assert events["event_id"].is_unique
    assert events["item_id"].isin(items["item_id"]).all()
    assert events["user_id"].isin(users["user_id"]).all()
    # Every item and user was seen in the kept rows: nothing invented, nothing lost.
    assert set(items["item_id"]) == {"sc" + c.replace(" ", "_") for c in expected["StockCode"].astype(str).str.strip()}
    assert set(users["user_id"]) == {f"c{int(c)}" for c in expected["CustomerID"]}
    # Baskets are sessions: one per distinct invoice, and quantities are carried over exactly.
    assert events["session_id"].nunique() == expected["InvoiceNo"].nunique()
    assert events["quantity"].sum() == int(expected["Quantity"].sum())
    assert (items["price"] > 0).all()
    assert items["category"].nunique() <= 41  # 40 kept words plus "Other"

    profile = pd.read_parquet(offline_dir / "user_profile.parquet")
    assert len(profile) > 0
    assert set(profile["user_id"]) <= set(users["user_id"])
