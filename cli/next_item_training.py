"""`recsys train next-item`: train the SASRec next-item model on a shop's own log, keep it only when
it beats popularity on held-out validation users beyond noise, and export it to Triton as `next_item_onnx`.

The split is the benchmark's leave-one-out (scorer/eval/next_item.py): each user's last interaction
is the test target, the one before it the validation target, everything earlier is training data.
SASRec trains on the training sequences as they happened (scorer/train/sasrec_train.py), but it is
validated, stopped, gated and tested on what the gateway will send it: the user's distinct recent
items, newest first (contract.next_item.served_history), not the raw sequence with its repeats.
The vocabulary is every item of the training sequences; a target outside it is a miss.

The validation users are split in two seeded halves (as `recsys train fusion` does): the choice half
picks the epoch (early stopping), the confirm half, which took no part in that, decides: the
NDCG@10 gain over popularity, paired per user, must exceed its standard error (+ margin). A gate
read on the users that chose the epoch would be optimistic by the best of ~50 noisy epochs.

Limits (said in the report too): the exported model is the one trained without each user's last two
interactions (no retraining on everything after the choice), and it knows only the items it saw:
a new item reaches users through the other sources until the next training.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from cli.fusion_tuning import INTERACTIONS, CannotTune, read_shop, split_halves
from contract.next_item import NEXT_ITEM_HISTORY, served_history
from scorer.eval.interest_eval import ndcg_per_example
from scorer.eval.next_item import leave_one_out, metrics_from_ranks, target_ranks
from scorer.eval.paired_gain import PairedGain
from scorer.models.sasrec import SASRec, SASRecConfig
from scorer.train.sasrec_train import SASRecCurve, SASRecTrainConfig, next_item_scores, train_sasrec


@dataclass
class NextItemData:
    vocabulary: list[str]  # catalog position i of the model = vocabulary[i]
    train_seqs: list[list[int]]  # positions, oldest first (raw training sequences)
    valid_hist: list[list[int]]  # served form: distinct recent items, oldest first, only known ones
    valid_target: np.ndarray  # positions; -1: not in the vocabulary (a miss for every method)
    test_hist: list[list[int]]
    test_target: np.ndarray
    popularity: np.ndarray  # training interactions per position


def prepare(events: pd.DataFrame) -> NextItemData:
    interactions = events[events["event_type"].isin(INTERACTIONS) & events["item_id"].notna()]
    split = leave_one_out(interactions)
    if not len(split.valid):
        raise CannotTune("no user has three interactions or more: nothing to validate a next-item model on")
    counts = split.train["item_id"].astype(str).value_counts()
    vocabulary = sorted(counts.index)
    position = {item: i for i, item in enumerate(vocabulary)}
    seqs = [[position[str(i)] for i in s] for s in split.train_sequences().values()]

    def served(frame: pd.DataFrame) -> tuple[list[list[int]], np.ndarray]:
        hist = [[position[i] for i in reversed(served_history([str(x) for x in h])) if i in position][-NEXT_ITEM_HISTORY:]
                for h in frame["history"]]
        return hist, np.array([position.get(str(t), -1) for t in frame["item_id"]], dtype=np.int64)

    valid_hist, valid_target = served(split.valid)
    test_hist, test_target = served(split.test)
    popularity = np.array([counts[v] for v in vocabulary], dtype=np.float64)
    return NextItemData(vocabulary, seqs, valid_hist, valid_target, test_hist, test_target, popularity)


@dataclass
class NextItemResult:
    model: SASRec
    vocabulary: list[str]
    curve: SASRecCurve
    gain: PairedGain  # NDCG@10 against popularity on the confirm half of validation, paired per user
    table: pd.DataFrame  # method x split metrics

    @property
    def kept(self) -> bool:
        return self.gain.beyond_noise


def _popularity_scores(pop: np.ndarray, n: int) -> np.ndarray:
    return np.broadcast_to(pop, (n, len(pop)))


def halves(data: NextItemData, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The validation users in two seeded halves: the choice half (it picks the epoch) and the
    confirm half (it decides whether the model is exported; it took no part in the choice)."""
    return split_halves(len(data.valid_hist), seed)


def _rows(data: NextItemData, users: np.ndarray) -> tuple[list[list[int]], np.ndarray]:
    return [data.valid_hist[i] for i in users], data.valid_target[users]


def evaluate(model: SASRec, data: NextItemData, min_gain: float, curve: SASRecCurve, seed: int = 0) -> NextItemResult:
    rows, ndcg = [], {}
    choice, confirm = halves(data, seed)
    for split, (hist, target) in (("validation, choice half", _rows(data, choice)),
                                  ("validation, confirm half", _rows(data, confirm)),
                                  ("test", (data.test_hist, data.test_target))):
        for method, scores in (("popularity", _popularity_scores(data.popularity, len(hist))),
                               ("SASRec (next-item model)", next_item_scores(model, hist))):
            ranks = target_ranks(scores, target)
            ndcg[(split, method)] = ndcg_per_example(ranks)
            rows.append({"method": method, "split": split, "users": len(ranks), **metrics_from_ranks(ranks)})
    decide = "validation, confirm half"
    gain = PairedGain.of(ndcg[(decide, "SASRec (next-item model)")], ndcg[(decide, "popularity")],
                         min_gain, versus="popularity", unit="users")
    return NextItemResult(model, data.vocabulary, curve, gain, pd.DataFrame(rows))


def train_next_item(events: pd.DataFrame, cfg: SASRecTrainConfig, min_gain: float, console: Console) -> NextItemResult:
    data = prepare(events)
    choice, confirm = halves(data, cfg.seed)
    if len(confirm) < 2:
        raise CannotTune(f"{len(data.valid_hist)} users with three interactions or more: need 4 (half to choose "
                         "the epoch on, half to confirm the model on)")
    console.print(f"{len(data.train_seqs):,} users' training sequences over {len(data.vocabulary):,} items; "
                  f"validation: {len(data.valid_hist):,} users' next interaction (the gateway's view of their "
                  f"history), {len(choice):,} to choose the epoch on, {len(confirm):,} to confirm the model on")
    with Progress(TextColumn("SASRec epoch {task.completed:.0f}"), BarColumn(), TextColumn("{task.fields[note]}"),
                  TimeElapsedColumn(), console=console, transient=True) as progress:
        task = progress.add_task("train", total=cfg.max_epochs, note="")

        def on_epoch(epoch: int, curve: SASRecCurve) -> None:
            progress.update(task, completed=epoch + 1, note=f"loss {curve.loss[-1]:.3f}, validation NDCG@10 "
                            f"{curve.valid_ndcg10[-1]:.4f} (best {curve.best_valid_ndcg10:.4f})")

        hist, target = _rows(data, choice)
        model, curve = train_sasrec(data.train_seqs, hist, target.tolist(),
                                    SASRecConfig(n_items=len(data.vocabulary), max_len=NEXT_ITEM_HISTORY), cfg, on_epoch)
    return evaluate(model, data, min_gain, curve, cfg.seed)


def write_report(result: NextItemResult, folder: Path) -> Path:
    """report.md (the table, the curve, the verdict) and curve.png in `folder`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    c = result.curve
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.plot(range(1, len(c.loss) + 1), c.loss)
    a.set(xlabel="epoch", ylabel="training cross-entropy", title="loss")
    b.plot(range(1, len(c.valid_ndcg10) + 1), c.valid_ndcg10, marker=".")
    b.axvline(c.best_epoch + 1, color="grey", linestyle=":", label=f"kept: epoch {c.best_epoch + 1}")
    pop = result.table.set_index(["method", "split"]).loc[("popularity", "validation, choice half"), "NDCG@10"]
    b.axhline(pop, color="tab:red", linestyle="--", label="popularity")
    b.set(xlabel="epoch", ylabel="NDCG@10", title="validation, choice half")
    b.legend()
    fig.tight_layout()
    fig.savefig(folder / "curve.png", dpi=110)
    plt.close(fig)
    verdict = "kept and exported" if result.kept else "not kept (not exported)"
    text = (f"# Next-item model (SASRec)\n\n{result.table.round(4).to_markdown(index=False)}\n\n"
            f"NDCG@10 against popularity on the confirm half of validation (users that took no part in "
            f"choosing the epoch): {result.gain.says()}: **{verdict}**.\n\n"
            f"Best epoch {c.best_epoch + 1} of {len(c.loss)} ({c.seconds:.0f} s); ![curve](curve.png)\n\n"
            "Histories are what the gateway sends (distinct recent items, newest last); full ranking over the "
            "model's vocabulary (the training items). The exported model is this one, trained without each "
            "user's last two interactions.\n")
    path = folder / "report.md"
    path.write_text(text)
    return path


def run(repo: Path, model_repo: Path, report: Path, max_seconds: float, max_epochs: int, seed: int,
        min_gain: float, console: Console) -> int | None:
    """The command: train, report, export when kept. Returns the exported version (None: not kept)."""
    from modelrepo.layout import write_validation
    from scorer.export.next_item_export import export_next_item

    shop = read_shop(repo)
    cfg = replace(SASRecTrainConfig(), max_seconds=max_seconds, max_epochs=max_epochs, seed=seed)
    result = train_next_item(shop.events, cfg, min_gain, console)
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
    version = export_next_item(result.model, result.vocabulary, model_repo)
    out = model_repo / "next_item_onnx" / str(version)
    write_validation(out, {"metric": "NDCG@10", "model": result.gain.candidate, "popularity": result.gain.baseline,
                           "se": result.gain.se, "users": result.gain.examples, "best_epoch": result.curve.best_epoch + 1})
    console.print(f"[green]exported[/] next_item_onnx/{version} into {model_repo}; report: {path}")
    return version
