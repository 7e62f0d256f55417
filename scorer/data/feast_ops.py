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
    feast = Path(sys.executable).with_name("feast")
    cmd = [str(feast), "-c", str(repo)] + (["-f", str(Path(repo) / yaml)] if yaml else []) + list(args)
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
