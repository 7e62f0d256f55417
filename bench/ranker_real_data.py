"""Does the cross-encoder ranker add over the retrieval + features blend on a real shop's log?

    python -m bench.ranker_real_data [--limit 20000] [--steps 100 [--layers N] | --checkpoint DIR] [--depths 10 20]
                                     [--out DIR]

On the real-data benchmark's split of Online Retail (bench/real_data_bench.py `load_data`; purchases
only, so the ranker's lists are interactions with sampled negatives, scorer/train/ranker_data.py):
1. the history (never a test purchase) is imported once into a private feature repo, exactly as the
   served bench does (bench/real_data_served.py `import_history`);
2. `recsys train ranker` (the default recipe, `--steps` of it, `--layers` of the transformer) fine-tunes
   on that repo and writes its verdict (`beats_blend`) beside the checkpoint;
3. the served path (bench/real_data_served.py `measure_served_path`: real Feast, Triton, gateway, one
   Recommend per test customer, no query) answers with the ranker off (depth 0), the untrained
   ranker forced at the largest depth, and the fine-tuned ranker forced at every `--depths`.
Writes report.md and metrics.json into --out. Nothing here re-implements the served path.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from bench.real_data_bench import DEFAULT_SOURCE, console, load_data, machine

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "var" / "reports" / "ranker_real_data"
OFF = "ranker off (depth 0)"


def forced(depth: int) -> dict[str, str]:
    """The gateway's environment that applies whatever ranker Triton serves to the top `depth`."""
    return {"RECSYS_RERANK_DEPTH": str(depth), "RECSYS_RANKER_MODE": "always"}


def untrained_variants(depths: list[int]) -> dict[str, dict[str, str]]:
    """Served with the untrained ranker: off, and forced at the largest depth asked for."""
    return {OFF: {"RECSYS_RERANK_DEPTH": "0", "RECSYS_RANKER_MODE": "never"},
            f"untrained ranker forced, depth {max(depths)}": forced(max(depths))}


def fine_tuned_variants(depths: list[int]) -> dict[str, dict[str, str]]:
    return {f"fine-tuned ranker forced, depth {d}": forced(d) for d in sorted(set(depths))}


def train_ranker_cli(repo: Path, out: Path, steps: int, layers: int | None = None) -> dict:
    """`recsys train ranker` itself (its default recipe, `steps` steps, `layers` layers or the default); its
    validation record."""
    from modelrepo.layout import read_validation

    cmd = [sys.executable, "-m", "cli.app", "train", "ranker", "--repo", str(repo), "--out", str(out / "ranker"),
           "--steps", str(steps), "--report", str(out / "ranker_report")]
    if layers is not None:
        cmd += ["--layers", str(layers)]
    console.print("$ " + " ".join(cmd[1:]))
    subprocess.run(cmd, check=True, cwd=ROOT)
    record = read_validation(out / "ranker")
    if record is None:
        raise RuntimeError(f"recsys train ranker wrote no validation record in {out / 'ranker'}")
    return record


def write_report(out: Path, rows: dict[str, tuple[dict[str, float], str]], verdict: dict | None, meta: dict) -> Path:
    # The numbers first: a formatting slip below must not lose minutes of serving.
    (out / "metrics.json").write_text(json.dumps({"meta": meta, "verdict": verdict, "served": rows}, indent=2))
    lines = [f"# Ranker on Online Retail ({meta['users']} customers, {meta['items']} items; {meta['date']})", "",
             f"Machine: {meta['machine']}; {meta['seconds']:.0f} s.", ""]
    if verdict is not None:
        layers = f" --layers {meta['layers']}" if meta.get("layers") is not None else ""
        lines += [f"`recsys train ranker --steps {meta['steps']}{layers}`: {verdict['metric']} ranker {verdict['ranker']:.4f} vs "
                  f"logged order {verdict['blend']:.4f} on {verdict['lists']} validation lists: beats_blend "
                  f"{verdict['beats_blend']}", "", "```", json.dumps(verdict, indent=2), "```", ""]
    lines += ["| served path (no query, 50 results) | Recall@10 | NDCG@10 | Recall@50 | NDCG@50 | note |",
              "|---|---:|---:|---:|---:|---|"]
    for label, (m, note) in rows.items():
        lines.append(f"| {label} | {m['Recall@10']:.4f} | {m['NDCG@10']:.4f} | {m['Recall@50']:.4f} | "
                     f"{m['NDCG@50']:.4f} | {note} |")
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    from bench.real_data_served import import_history, measure_served_path

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--limit", type=int, default=20000, help="first N source rows (20000: CI's sample)")
    ap.add_argument("--steps", type=int, default=100, help="`recsys train ranker --steps`; 0: no fine-tuning")
    ap.add_argument("--layers", type=int, default=None,
                    help="`recsys train ranker --layers` (transformer layers kept; default: the recipe's)")
    ap.add_argument("--checkpoint", type=Path, default=None,
                    help="serve this `recsys train ranker` checkpoint (its validation.json) instead of training one")
    ap.add_argument("--depths", type=int, nargs="+", default=[10, 20], help="rerank depths for the fine-tuned ranker")
    args = ap.parse_args(argv)
    if not args.source.exists():
        console.print(f"skipping: {args.source} not found (the Online Retail data set is not in the repo)")
        return 0
    t0 = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    data = load_data(args.source, args.out / "generic", args.limit)
    repo = import_history(args.out / "generic", data.split, args.out / "work", console.print)
    if args.checkpoint is not None:
        from modelrepo.layout import read_validation

        ckpt, verdict = args.checkpoint, read_validation(args.checkpoint)
    else:
        ckpt, verdict = args.out / "ranker", (train_ranker_cli(repo, args.out, args.steps, args.layers)
                                               if args.steps else None)
    rows: dict[str, tuple[dict[str, float], str]] = {}
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as progress:
        # The interest model: the gateway's untrained fallback (none exported), the same for every row.
        rows.update(measure_served_path(args.out / "generic", data.split, None, console.print, progress,
                                        untrained_variants(args.depths), repo=repo))
        if verdict is not None:
            from scorer.models.ranker import CrossEncoderRanker

            rows.update(measure_served_path(args.out / "generic", data.split, None, console.print, progress,
                                            fine_tuned_variants(args.depths), repo=repo,
                                            ranker=CrossEncoderRanker.load(ckpt).eval(),
                                            ranker_validation=verdict))
    meta = {"machine": machine(), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "limit": args.limit, "users": len(data.test_target), "items": data.n_items, "steps": args.steps,
            "layers": args.layers, "seconds": time.perf_counter() - t0}
    report = write_report(args.out, rows, verdict, meta)
    console.print(f"[green]report[/] {report}")
    print(report.read_text())
    return 0


if __name__ == "__main__":
    from rpc.process_exit import exit_without_teardown

    exit_without_teardown(main())  # no duckdb nanobind teardown report after the results
