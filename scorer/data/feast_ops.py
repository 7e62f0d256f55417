"""Run the feature repo's Feast commands the way a user would (`feast apply`, `feast materialize`).

The demo and the tests go through the real `feast` CLI on the unmodified feature_repo/, so what they
prove is what an operator gets.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
FEATURE_REPO = PROJECT_ROOT / "feature_repo"
# First full load starts here: items created before it are older than any catalog we expect, and
# `materialize-incremental` on a fresh registry would otherwise look back only one TTL (or one year
# for ttl=0 views) and silently skip older catalog rows.
FULL_LOAD_START = "2000-01-01T00:00:00"


def feast_cmd(repo: Path, *args: str, yaml: str | None = None, env: dict[str, str] | None = None,
              quiet: bool = False) -> None:
    """Run `feast -c repo [-f yaml] args...`, streaming its output (progress bars included).

    quiet: capture the output instead, and put it into the error if the command fails.
    """
    # Feast's CLI through scorer/data/feast_quiet.py: the same command, minus ibis's warnings.
    cmd = [sys.executable, "-m", "scorer.data.feast_quiet", "-c", str(repo)] + (["-f", str(Path(repo) / yaml)] if yaml else []) + list(args)
    # ibis (inside Feast's duckdb store) floods the output with DeprecationWarnings.
    run_env = {**os.environ, "PYTHONWARNINGS": "ignore::DeprecationWarning", **(env or {})}
    if not quiet:
        subprocess.run(cmd, check=True, env=run_env)
        return
    done = subprocess.run(cmd, env=run_env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")


def apply(repo: Path = FEATURE_REPO, yaml: str | None = None, env: dict[str, str] | None = None,
          quiet: bool = False) -> None:
    feast_cmd(repo, "apply", yaml=yaml, env=env, quiet=quiet)


def materialize_all(repo: Path = FEATURE_REPO, end: datetime | None = None, yaml: str | None = None,
                    env: dict[str, str] | None = None, quiet: bool = False) -> None:
    """Full load from FULL_LOAD_START to `end` (default now). Later loads: `feast materialize-incremental`."""
    end = end or datetime.now(timezone.utc)
    feast_cmd(repo, "materialize", FULL_LOAD_START, end.strftime("%Y-%m-%dT%H:%M:%S"), yaml=yaml, env=env,
              quiet=quiet)


def copy_feature_repo(dest: Path) -> Path:
    """A copy of the unmodified feature repo definitions with an empty data folder of its own
    (tests and benchmarks build private stores this way and never touch feature_repo/data)."""
    shutil.copytree(FEATURE_REPO, dest, ignore=shutil.ignore_patterns("data", "__pycache__"))
    return dest


def load_store(repo: Path = FEATURE_REPO, yaml: str | None = None):
    """A FeatureStore for the repo (imports feast: seconds; keep out of hot paths)."""
    import warnings

    from feast import FeatureStore

    # ibis (Feast's DuckDB offline store) calls duckdb's deprecated fetch_arrow_table() on every
    # historical read; nothing here to fix, and training / the demo should not print it. After the
    # import: Feast puts its own DeprecationWarning filter first when it loads.
    warnings.filterwarnings("ignore", message=r"fetch_arrow_table\(\) is deprecated", category=DeprecationWarning)
    return FeatureStore(repo_path=str(repo), fs_yaml_file=Path(repo) / yaml if yaml else None)


def feature_views(repo: Path = FEATURE_REPO) -> list:
    """The repo's FeatureView definitions, loaded the way `feast apply` loads them (no registry
    needed: this works right after an import, before `feast apply`). Imports feast (seconds)."""
    return [v for v in _definitions(repo) if type(v).__name__ == "FeatureView"]


def _join_keys(repo: Path) -> dict[str, str]:
    return {e.name: e.join_key for e in _definitions(repo) if type(e).__name__ == "Entity"}


def _definitions(repo: Path) -> list:
    import importlib
    import sys

    from feast import Entity, FeatureView

    names = ("features", "data_sources", "entities")  # the repo's modules import each other by these plain names
    saved = {n: sys.modules.pop(n) for n in names if n in sys.modules}
    sys.path.insert(0, str(repo))
    try:
        module = importlib.import_module("features")
        return [v for v in vars(module).values() if isinstance(v, (FeatureView, Entity))]
    finally:
        sys.path.remove(str(repo))
        for n in names:
            sys.modules.pop(n, None)
        sys.modules.update(saved)


def _span(ttl) -> str:
    days, hours = ttl.days, ttl.seconds // 3600
    return f"{days} days" if days and not hours else f"{days * 24 + hours} h" if hours else f"{ttl.total_seconds():g} s"


def ttl_report(repo: Path = FEATURE_REPO, now: datetime | None = None) -> list[str]:
    """How each feature view's TTL applies to the imported data, one line per view, e.g.
    'user_profile: 4,338 users, newest row 2026-12-01 16:40 UTC, TTL 180 days: fresh until 2027-05-30 16:40 UTC'.
    Feast (and the gateway's reader) serve a row only while now - its timestamp <= the TTL."""
    from datetime import timedelta

    import pandas as pd

    now = pd.Timestamp(now or datetime.now(timezone.utc))
    lines, join_keys = [], _join_keys(repo)
    for view in sorted(feature_views(repo), key=lambda v: v.name):
        source = getattr(view, "batch_source", None) or view.stream_source.batch_source
        path = Path(source.path)
        if not path.exists():
            lines.append(f"{view.name}: no offline data ({path.name} missing)")
            continue
        key = join_keys[view.entities[0]]
        df = pd.read_parquet(path, columns=[key, source.timestamp_field])
        latest = df.groupby(key)[source.timestamp_field].max()
        entities = f"{len(latest):,} {key.removesuffix('_id')}s"
        if df.empty:
            lines.append(f"{view.name}: no rows")
            continue
        if not view.ttl or view.ttl <= timedelta(0):
            lines.append(f"{view.name}: {entities}, no TTL: never expire")
            continue
        newest = latest.max()
        fresh = int((now - latest <= pd.Timedelta(view.ttl)).sum())
        until = newest + pd.Timedelta(view.ttl)
        state = f"fresh until {until:%Y-%m-%d %H:%M} UTC" if until >= now else f"expired since {until:%Y-%m-%d %H:%M} UTC"
        lines.append(f"{view.name}: {entities}, newest row {newest:%Y-%m-%d %H:%M} UTC, TTL {_span(view.ttl)}: {state} "
                     f"({fresh:,} of {len(latest):,} fresh now)")
    return lines
