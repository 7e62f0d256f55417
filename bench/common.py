"""What every benchmark here shares: the machine's name, percentiles, and writing its results."""

from __future__ import annotations

import json
import os
import platform
from datetime import datetime, timezone
from pathlib import Path


def machine() -> str:
    model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                  if ln.startswith("model name")), platform.processor())
    return f"{model}, {os.cpu_count()} cores, Python {platform.python_version()}"


def percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


def write_results(path: Path, benchmark: str, rows: list[dict]) -> dict:
    """Save rows with the machine and date (bench/results/*.json), print the heading; return it all."""
    result = {"benchmark": benchmark, "machine": machine(),
              "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "rows": rows}
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{benchmark} — {result['machine']}, {result['date']}\n")
    return result
