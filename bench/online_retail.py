"""Convert the UCI Online Retail data set into the generic import format, and optionally import it.

Reads `online_retail.parquet` (541,909 real invoice lines from a UK online gift shop, 2010-12 to
2011-12), keeps the genuine purchases, and writes items.parquet, users.parquet and events.parquet
(see scorer/data/schema.py) into --out. With --import-to it then runs the project's importer on them,
so the real data goes through exactly the same validation and feature derivation as any user's data.

The data set is UCI's "Online Retail" (Chen, Sain & Guo, 2012), licensed CC BY 4.0. It lives outside
the repository (../shared/datasets/online_retail/) and is never committed: neither the source nor
what this script writes (var/ is git-ignored). When the source is absent the script says so and
exits 0, so it is safe to call from scripts and CI that run without the data.

    python bench/online_retail.py [--source PATH] [--out DIR] [--limit N] [--import-to OFFLINE_DIR]

The mapping uses the format's optional fields as they are meant: no brand and no description
(empty: left out of the item text), the median unit price as the price, a one-word product kind as
the category (never near the 100-character limit), the stock code as an attribute. Every event is a
PURCHASE, so the import trains from interactions (docs/data_format.md, "Logs without impressions").
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
import typer

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = REPO_ROOT.parent / "shared" / "datasets" / "online_retail" / "online_retail.parquet"
DEFAULT_OUT = REPO_ROOT / "var" / "online_retail"

# Descriptions are free text; their last word is usually the product kind ("... T-LIGHT HOLDER").
# Only the most common kinds become categories: a long tail of one-item categories would make
# category features (user_profile.top_categories, price position within category) meaningless.
N_CATEGORIES = 40
OTHER_CATEGORY = "Other"

# Everything outside the id alphabet of scorer/data/schema.py (ID_PATTERN) becomes "_".
_NOT_ID_CHAR = re.compile(r"[^A-Za-z0-9_.:@\-]")
_WORD = re.compile(r"[A-Za-z]+")
# Trailing words that say what a product looks like, not what it is ("... HEART T-LIGHT HOLDER
# PINK", "... BAG RETROSPOT", "... 20 CM"): skipped so the category is the product kind.
_NOT_A_KIND = frozenset(
    "PINK BLUE RED GREEN WHITE BLACK CREAM IVORY GOLD SILVER PURPLE ORANGE YELLOW BROWN GREY CLEAR "
    "PASTEL TURQUOISE LILAC AMBER COPPER CHROME LARGE SMALL MEDIUM MINI JUMBO BIG GIANT TINY CM XL "
    "DESIGN DESIGNS ASSORTED ASST ASSTD COLOUR COLOURS COLOR RETROSPOT POLKADOT PAISLEY SPOT SPOTS "
    "STRIPE STRIPES VINTAGE SET OF AND IN WITH THE TO".split()
)

SOURCE_COLUMNS = ["InvoiceNo", "StockCode", "Description", "Quantity", "InvoiceDate", "UnitPrice", "CustomerID", "Country"]


def sanitise_id(s: str) -> str:
    return _NOT_ID_CHAR.sub("_", s.strip())


def purchase_mask(df: pd.DataFrame) -> pd.Series:
    """Rows that are genuine, attributable purchases.

    Anonymous rows cannot be tied to a user; "C" invoices are cancellations (negative quantities),
    and zero/negative prices or quantities are stock adjustments, write-offs and free samples, not
    purchases. Rows without a description cannot give an item a title.
    """
    desc = df["Description"].astype("string")
    return (
        df["CustomerID"].notna()
        & ~df["InvoiceNo"].astype(str).str.startswith("C")
        & (df["Quantity"] > 0)
        & (df["UnitPrice"] > 0)
        & desc.notna()
        & (desc.str.strip() != "")
    ).fillna(False).astype(bool)


def _category_word(title: str) -> str:
    """The last noun-ish word of a description: "WHITE HANGING HEART T-LIGHT HOLDER" -> "Holder".

    Numbers, punctuation, single letters and colour/size/pattern words are skipped.
    """
    for word in reversed(_WORD.findall(title.upper())):
        if len(word) > 1 and word not in _NOT_A_KIND:
            return word.title()
    return OTHER_CATEGORY


def _singular(words: pd.Series) -> pd.Series:
    # "Candles" and "Candle" are one kind; only strip an "s"/"es" when the singular is itself in
    # use, so "Earrings" or "Glass" survive intact.
    vocab = set(words)

    def one(w: str) -> str:
        for suffix in ("s", "es"):
            if w.endswith(suffix) and w[: -len(suffix)] in vocab:
                return w[: -len(suffix)]
        return w

    return words.map(one)


def _most_common(s: pd.Series) -> str:
    # value_counts sorts by count only; break ties alphabetically so reruns give the same title.
    counts = s.value_counts()
    return min(counts.index[counts == counts.max()])


def build_tables(raw: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Turn raw Online Retail rows into (items, users, events) in the generic format."""
    df = raw.loc[purchase_mask(raw), SOURCE_COLUMNS].copy()
    df["StockCode"] = df["StockCode"].astype(str).str.strip()
    df["InvoiceNo"] = df["InvoiceNo"].astype(str).str.strip()
    # Collapse runs of spaces: some descriptions carry double or trailing blanks.
    df["Description"] = df["Description"].astype(str).str.split().str.join(" ")
    # The shop logged UK wall-clock time without a zone; the generic format takes naive times as UTC,
    # so we say so explicitly rather than guess at GMT/BST.
    df["InvoiceDate"] = pd.to_datetime(df["InvoiceDate"]).dt.tz_localize("UTC")
    df["item_id"] = "sc" + df["StockCode"].map(sanitise_id)
    df["user_id"] = "c" + df["CustomerID"].astype("int64").astype(str)

    # Sanitising could in principle merge two stock codes into one id; fail loudly rather than
    # silently pool two products.
    codes_per_id = df.groupby("item_id")["StockCode"].nunique()
    if (codes_per_id > 1).any():
        clash = codes_per_id[codes_per_id > 1].index.tolist()[:5]
        raise ValueError(f"stock codes collide after sanitising: {clash}")

    by_item = df.groupby("item_id", sort=True)
    items = pd.DataFrame(
        {
            # A stock code's description drifts over time (typos fixed, renames); the most common
            # one is the best single title.
            "title": by_item["Description"].agg(_most_common).str.title(),
            "price": by_item["UnitPrice"].median().astype("float64"),
            "created_at": by_item["InvoiceDate"].min(),
            "stock_code": by_item["StockCode"].first(),
        }
    ).reset_index()
    words = _singular(items["title"].map(_category_word))
    # Count words over items (not rows) so a category means "many products", not "one best-seller".
    counts = words.value_counts()
    # Ties broken alphabetically so the 40 kept are the same on every run.
    ranked = sorted((w for w in counts.index if w != OTHER_CATEGORY), key=lambda w: (-counts[w], w))
    keep = set(ranked[:N_CATEGORIES])
    items["category"] = words.where(words.isin(keep), OTHER_CATEGORY)
    items["brand"] = ""
    items["description"] = ""
    # Keep the original code: ids are sanitised ("BANK CHARGES" -> "BANK_CHARGES") and prefixed.
    items["attributes"] = items["stock_code"].map(lambda c: json.dumps({"stock_code": c}))
    items = items[["item_id", "title", "description", "category", "brand", "price", "attributes", "created_at"]]

    by_user = df.groupby("user_id", sort=True)
    users = pd.DataFrame(
        {
            "created_at": by_user["InvoiceDate"].min(),
            # A few customers appear under two countries; the one they buy from most wins.
            "country": by_user["Country"].agg(_most_common),
        }
    ).reset_index()[["user_id", "created_at", "country"]]

    events = pd.DataFrame(
        {
            # The source row index makes ids unique even for the exact duplicate lines the data has.
            "event_id": (df["InvoiceNo"] + "-" + df.index.astype(str)).map(sanitise_id),
            "timestamp": df["InvoiceDate"],
            "user_id": df["user_id"],
            # One invoice is one basket, the closest thing this data has to a session.
            "session_id": "inv" + df["InvoiceNo"].map(sanitise_id),
            "event_type": "PURCHASE",
            "item_id": df["item_id"],
            "quantity": df["Quantity"].astype("int64"),
        }
    ).reset_index(drop=True)
    return items, users, events


def keep_last(events: pd.DataFrame, n: int) -> pd.DataFrame:
    """Each customer's purchase lines of their last `n` interactions (a line repeating the item just
    before it is the same interaction, as the benchmark's split counts them), in the input's order: a
    sparse shop cut from a dense one (Online Retail has ~90 interactions per customer, most public
    review-based data sets under 10)."""
    order = events.reset_index(drop=True).assign(_row=lambda d: np.arange(len(d)))
    order = order.sort_values(["user_id", "timestamp", "_row"])
    new = (order["user_id"] != order["user_id"].shift()) | (order["item_id"] != order["item_id"].shift())
    index = new.astype(int).groupby(order["user_id"]).cumsum()
    keep = index > index.groupby(order["user_id"]).transform("max") - n
    return order[keep].sort_values("_row").drop(columns="_row").reset_index(drop=True)


def convert(source: Path, out: Path, limit: int | None = None, last: int | None = None) -> dict[str, int]:
    """Read `source`, write items/users/events.parquet into `out`; return the row count of each.

    `limit` keeps only the first `limit` source rows (before filtering), for quick tests; `last`
    keeps each customer's last `last` interactions only (keep_last: a sparse shop).
    """
    raw = pd.read_parquet(source, columns=SOURCE_COLUMNS)
    if limit is not None:
        raw = raw.head(limit)
    items, users, events = build_tables(raw)
    if last is not None:
        events = keep_last(events, last)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tables = {"items": items, "users": users, "events": events}
    for name, df in tables.items():
        df.to_parquet(out / f"{name}.parquet", index=False)
    return {"source_rows": len(raw), **{name: len(df) for name, df in tables.items()}}


def main(
    source: Path = typer.Option(DEFAULT_SOURCE, help="online_retail.parquet (UCI Online Retail, CC BY 4.0)."),
    out: Path = typer.Option(DEFAULT_OUT, help="Folder for items/users/events.parquet (generic format)."),
    limit: Optional[int] = typer.Option(None, min=1, help="Keep only the first N source rows."),
    import_to: Optional[Path] = typer.Option(None, help="Also import into this offline folder (replaced)."),
) -> None:
    """Convert UCI Online Retail to the generic format and optionally import it."""
    if not source.exists():
        # Absent data is a normal situation (fresh clone, CI): not an error.
        typer.echo(f"skipping: {source} not found (the Online Retail data set is not in the repo)")
        raise typer.Exit(0)
    t0 = time.perf_counter()
    counts = convert(source, out, limit)
    typer.echo(
        f"converted {counts['source_rows']:,} source rows in {time.perf_counter() - t0:.1f}s -> {out}: "
        f"{counts['items']:,} items, {counts['users']:,} users, {counts['events']:,} events"
    )
    if import_to is not None:
        from scorer.data.importer import import_dataset

        t1 = time.perf_counter()
        tables = import_dataset(out, import_to, progress=lambda msg: typer.echo(f"  import: {msg}"),
                                notes=lambda msg: typer.echo(f"  note: {msg}"))
        elapsed = time.perf_counter() - t1
        typer.echo(f"imported into {import_to} in {elapsed:.1f}s:")
        for name, n in tables.items():
            typer.echo(f"  {name:<16} {n:>10,}")


if __name__ == "__main__":
    typer.run(main)
