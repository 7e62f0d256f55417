"""What an imported data set holds, what can be trained from it and how its TTLs apply: printed by
`recsys data import`, and checked by `recsys train ...` before any work starts."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console


def print_import_summary(console: Console, repo: Path) -> None:
    """Event kinds, the training plan (scorer/train/data.py) and each view's freshness."""
    from scorer.data.feast_ops import ttl_report
    from scorer.train.data import training_plan, what_data_holds

    holds = what_data_holds(repo)
    kinds = ", ".join(f"{n:,} {k}" for k, n in holds.events.items() if n)
    absent = [k for k, n in holds.events.items() if not n]
    console.print(f"the log holds {kinds or 'no events'}"
                  + (f" between {holds.start:%Y-%m-%d} and {holds.end:%Y-%m-%d}" if holds.start is not None else "")
                  + (f"; no {', '.join(absent)}" if absent else ""))
    if holds.items_without_price:
        console.print(f"{holds.items_without_price:,} of {holds.items:,} items have no price: no price in their text, "
                      "neutral price features (docs/data_format.md)")
    if not holds.events["IMPRESSION"]:
        console.print("no impressions: labels will come from interactions (next item); "
                      "the ranker trains on sampled negatives")
    console.print("[bold]can be trained[/]:")
    for plan in training_plan(holds):
        colour = "green" if plan.source else "yellow"
        console.print(f"  [{colour}]{plan.model}[/]: {plan.says}")
    if not (repo / "features.py").is_file():  # data written into a folder that is no feature repo (yet)
        console.print(f"[yellow]no Feast definitions in {repo} (features.py)[/]: the TTLs that will apply "
                      "are those of the feature repo this data is materialized with")
        return
    with console.status("reading the feature views' TTLs"):
        lines = ttl_report(repo)
    console.print("[bold]after `feast materialize`, served as[/] (TTLs count from each row's timestamp; "
                  "profiles and popularity carry a current snapshot at the import's as-of time):")
    for line in lines:
        console.print(f"  {line}")


def require_trainable(console: Console, repo: Path, model: str) -> str:
    """The model's training source; exit 1 with a plain sentence when the data cannot train it."""
    from scorer.train.data import CannotTrain, require_source

    try:
        plan = require_source(repo, model)
    except CannotTrain as e:
        console.print(f"[red]{e}[/]")
        raise typer.Exit(1) from None
    except FileNotFoundError as e:
        missing = Path(e.filename).name if e.filename else str(e)
        console.print(f"[red]cannot train the {model} model[/]: no imported data in {repo / 'data' / 'offline'} ({missing} missing): "
                      "run `recsys data import` first")
        raise typer.Exit(1) from None
    console.print(f"training the {model} model on {plan.says}")
    return plan.source
