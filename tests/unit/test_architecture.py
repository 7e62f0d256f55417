"""The house's rules, checked: which room imports which (import-linter, contracts in pyproject.toml),
and that no constant of the shared contract is defined again somewhere else."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ROOMS = ("contract", "eventlog", "rpc", "sources", "modelrepo", "gateway", "feedback", "scorer", "localtriton", "cli")


def test_import_contracts_hold() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    out = subprocess.run([str(lint), "--config", "pyproject.toml", "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "0 broken" in out.stdout


def _module_constants(path: Path) -> dict[str, int]:
    """UPPER_CASE names assigned at a module's top level -> line."""
    tree = ast.parse(path.read_text())
    found: dict[str, int] = {}
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        for t in targets:
            if isinstance(t, ast.Name) and t.id.isupper():
                found[t.id] = node.lineno
    return found


def test_no_contract_constant_is_defined_twice() -> None:
    owned = {name: path for path in (ROOT / "contract").glob("*.py") for name in _module_constants(path)}
    assert {"RANKER_PRIOR", "POPULARITY_SCALE", "PART_NAMES", "RECENCY_DECAY", "SESSION_FEATURES",
            "PUSH_SOURCE", "NUMERIC_FEATURES", "EMBEDDING_DIM"} <= owned.keys()
    clashes = []
    for room in ROOMS[1:]:
        for path in (ROOT / room).rglob("*.py"):
            for name, line in _module_constants(path).items():
                if name in owned:
                    clashes.append(f"{path.relative_to(ROOT)}:{line} defines {name} (owned by {owned[name].relative_to(ROOT)})")
    assert not clashes, "\n".join(clashes)
