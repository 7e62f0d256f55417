"""`recsys train next-item`: train the SASRec next-item model on a shop's own log, keep it only when
it beats popularity on held-out validation users beyond noise, and export it to Triton as `next_item_onnx`.

The recipe (split, early stopping, the halves gate, the refit, export) is scorer/train/next_item_train.py,
the one the retraining loop runs too; this module adds the progress bars and what the command prints.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from scorer.train.next_item_train import NextItemResult, Refit, export_kept, read_events, write_report
from scorer.train.next_item_train import refit as refit_recipe
from scorer.train.next_item_train import train_next_item as train_recipe
from scorer.train.sasrec_train import SASRecCurve, SASRecTrainConfig


def train_next_item(events: pd.DataFrame, cfg: SASRecTrainConfig, min_gain: float, console: Console) -> NextItemResult:
    """The recipe with a progress bar (epoch, loss, validation NDCG@10) on `console`."""
    with Progress(TextColumn("SASRec epoch {task.completed:.0f}"), BarColumn(), TextColumn("{task.fields[note]}"),
                  TimeElapsedColumn(), console=console, transient=True) as progress:
        task = progress.add_task("train", total=cfg.max_epochs, note="")

        def on_epoch(epoch: int, curve: SASRecCurve) -> None:
            progress.update(task, completed=epoch + 1, note=f"loss {curve.loss[-1]:.3f}, validation NDCG@10 "
                            f"{curve.valid_ndcg10[-1]:.4f} (best {curve.best_valid_ndcg10:.4f})")

        return train_recipe(events, cfg, min_gain, on_epoch, log=console.print)


def refit_next_item(result: NextItemResult, events: pd.DataFrame, cfg: SASRecTrainConfig, console: Console) -> Refit:
    """The refit on every interaction with a progress bar (epochs of the chosen count, loss)."""
    epochs = result.curve.best_epoch + 1
    with Progress(TextColumn("refit epoch {task.completed:.0f}"), BarColumn(), TextColumn("{task.fields[note]}"),
                  TimeElapsedColumn(), console=console, transient=True) as progress:
        task = progress.add_task("refit", total=epochs, note="")

        def on_epoch(epoch: int, curve: SASRecCurve) -> None:
            progress.update(task, completed=epoch + 1, note=f"loss {curve.loss[-1]:.3f}")

        return refit_recipe(result, events, cfg, on_epoch, log=console.print)


def run(repo: Path, model_repo: Path, report: Path, max_seconds: float, max_epochs: int, seed: int,
        min_gain: float, console: Console, refit: bool = False) -> int | None:
    """The command: train, report, export when kept (with `refit`, the recipe refit on every
    interaction). Returns the exported version (None: not kept)."""
    cfg = replace(SASRecTrainConfig(), max_seconds=max_seconds, max_epochs=max_epochs, seed=seed)
    events = read_events(repo)
    result = train_next_item(events, cfg, min_gain, console)
    path = write_report(result, report)
    console.print("Recall@k / NDCG@k: where each user's next interaction ranks among all the model's items "
                  "(validation: the one before last; its choice half chose the epoch, its confirm half decides; "
                  "test: the last, shown only)")
    console.print(result.table.round(4).to_string(index=False))
    c = result.curve
    console.print(f"best epoch {c.best_epoch + 1} of {len(c.loss)} ({c.seconds:.0f} s); confirm half of validation, "
                  f"NDCG@10: {result.gain.says()}")
    if not result.kept:
        console.print(f"[red]not exported[/]: the model does not beat popularity on the confirm half of validation "
                      f"beyond noise; report: {path}")
        return None
    refitted = refit_next_item(result, events, cfg, console) if refit else None
    version = export_kept(result, model_repo, refitted=refitted)
    what = (f"the refit on every interaction ({refitted.epochs} epochs, {len(refitted.vocabulary):,} items)" if refitted
            else "the judged model (no refit)")
    console.print(f"[green]exported[/] next_item_onnx/{version} into {model_repo}: {what}; report: {path}")
    return version
