"""Train, judge and export the next-item model (SASRec over item ids): the one recipe behind
`recsys train next-item` (cli/next_item_training.py) and the retraining loop (scorer/retrain.py).

The split is the benchmark's leave-one-out (scorer/eval/next_item.py): each user's last interaction
is the test target, the one before it the validation target, everything earlier is training data.
SASRec trains on the training sequences as they happened (scorer/train/sasrec_train.py), but it is
validated, stopped, gated and tested on what the gateway will send it: the user's distinct recent
items, newest first (contract.next_item.served_history), not the raw sequence with its repeats.
The vocabulary is every item of the training sequences; a target outside it is a miss.

The validation users are split in two seeded halves (scorer/eval/paired_gain.py split_halves): the
choice half picks the epoch (early stopping), the confirm half, which took no part in that, decides:
the NDCG@10 gain over popularity (and, in the retraining loop, over the serving version), paired per
user, must exceed its standard error (+ margin). A gate read on the users that chose the epoch would
be optimistic by the best of ~50 noisy epochs.

What is exported is the judged model, trained without each user's last two interactions; on request
(`--refit`) the kept recipe **refit** on every interaction (each user's whole sequence) for the
epoch count validation chose (Refit), which knows the newest items and transitions but is not
judged itself (nothing is held out of it): off by default until its gain is measured. Either way
the model knows only the items it saw: a new item reaches users through the other sources until
the next training.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from contract.next_item import NEXT_ITEM_HISTORY, history_tensor, served_history
from contract.session import INTERACTION_EVENTS
from contract.tensors import NEXT_ITEM_MODEL
from scorer.eval.interest_eval import ndcg_per_example
from scorer.eval.next_item import leave_one_out, metrics_from_ranks, ordered_interactions, target_ranks, topk_ranks
from scorer.eval.paired_gain import PairedGain, split_halves
from scorer.models.sasrec import SASRec, SASRecConfig
from scorer.train.data import CannotTrain
from scorer.train.sasrec_train import SASRecCurve, SASRecTrainConfig, next_item_scores, train_sasrec

MODEL_NAME = "SASRec (next-item model)"
DECIDES = "validation, confirm half"  # the split whose paired gain decides


@dataclass
class NextItemData:
    vocabulary: list[str]  # catalog position i of the model = vocabulary[i]
    train_seqs: list[list[int]]  # positions, oldest first (raw training sequences)
    valid_hist: list[list[int]]  # served form: distinct recent items, oldest first, only known ones
    valid_target: np.ndarray  # positions; -1: not in the vocabulary (a miss for every method)
    valid_target_id: list[str]  # the same targets as item ids (for a model with another vocabulary)
    valid_time: np.ndarray  # when each validation target happened (UTC datetime64)
    test_hist: list[list[int]]
    test_target: np.ndarray
    test_target_id: list[str]
    popularity: np.ndarray  # training interactions per position

    def newest_first_ids(self, hist: Sequence[int]) -> list[str]:
        """A history as the gateway sends it to Triton: item ids, newest first."""
        return [self.vocabulary[p] for p in reversed(hist)]


def read_events(repo: Path) -> pd.DataFrame:
    """The shop's event log as `recsys data import` (and the demo) wrote it: <repo>/data/offline."""
    path = repo / "data" / "offline" / "events.parquet"
    if not path.is_file():
        raise CannotTrain(f"no imported data in {path.parent} (events.parquet missing): run `recsys data import` first")
    return pd.read_parquet(path)


def prepare(events: pd.DataFrame) -> NextItemData:
    interactions = events[events["event_type"].isin(INTERACTION_EVENTS) & events["item_id"].notna()]
    split = leave_one_out(interactions)
    if not len(split.valid):
        raise CannotTrain("no user has three interactions or more: nothing to validate a next-item model on")
    counts = split.train["item_id"].astype(str).value_counts()
    vocabulary = sorted(counts.index)
    position = {item: i for i, item in enumerate(vocabulary)}
    seqs = [[position[str(i)] for i in s] for s in split.train_sequences().values()]

    def served(frame: pd.DataFrame) -> tuple[list[list[int]], np.ndarray, list[str]]:
        hist = [[position[i] for i in reversed(served_history([str(x) for x in h])) if i in position][-NEXT_ITEM_HISTORY:]
                for h in frame["history"]]
        ids = [str(t) for t in frame["item_id"]]
        return hist, np.array([position.get(t, -1) for t in ids], dtype=np.int64), ids

    valid_hist, valid_target, valid_ids = served(split.valid)
    test_hist, test_target, test_ids = served(split.test)
    popularity = np.array([counts[v] for v in vocabulary], dtype=np.float64)
    valid_time = pd.to_datetime(split.valid["timestamp"], utc=True).to_numpy()
    return NextItemData(vocabulary, seqs, valid_hist, valid_target, valid_ids, valid_time, test_hist, test_target,
                        test_ids, popularity)


@dataclass
class NextItemResult:
    model: SASRec
    vocabulary: list[str]
    curve: SASRecCurve
    gain: PairedGain  # NDCG@10 against popularity on the confirm half of validation, paired per user
    table: pd.DataFrame  # method x split metrics
    data: NextItemData
    ndcg: dict[tuple[str, str], np.ndarray]  # (split, method) -> NDCG@10 per user (for paired gains)
    seed: int  # the seed that drew the validation halves

    @property
    def kept(self) -> bool:
        return self.gain.beyond_noise


def halves(data: NextItemData, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The validation users in two seeded halves: the choice half (it picks the epoch) and the
    confirm half (it decides whether the model is exported; it took no part in the choice)."""
    return split_halves(len(data.valid_hist), seed)


def splits(data: NextItemData, seed: int) -> dict[str, tuple[list[list[int]], np.ndarray, list[str]]]:
    """Each reported split: (histories, target positions, target ids)."""
    choice, confirm = halves(data, seed)

    def rows(users: np.ndarray):
        return [data.valid_hist[i] for i in users], data.valid_target[users], [data.valid_target_id[i] for i in users]

    return {"validation, choice half": rows(choice), DECIDES: rows(confirm),
            "test": (data.test_hist, data.test_target, data.test_target_id)}


def evaluate(model: SASRec, data: NextItemData, min_gain: float, curve: SASRecCurve, seed: int = 0) -> NextItemResult:
    rows, ndcg = [], {}
    for split, (hist, target, _) in splits(data, seed).items():
        for method, scores in (("popularity", np.broadcast_to(data.popularity, (len(hist), len(data.popularity)))),
                               (MODEL_NAME, next_item_scores(model, hist))):
            ranks = target_ranks(scores, target)
            ndcg[(split, method)] = ndcg_per_example(ranks)
            rows.append({"method": method, "split": split, "users": len(ranks), **metrics_from_ranks(ranks)})
    gain = PairedGain.of(ndcg[(DECIDES, MODEL_NAME)], ndcg[(DECIDES, "popularity")], min_gain,
                         versus="popularity", unit="users")
    return NextItemResult(model, data.vocabulary, curve, gain, pd.DataFrame(rows), data, ndcg, seed)


EpochCallback = Callable[[int, SASRecCurve], None]


def train_next_item(events: pd.DataFrame, cfg: SASRecTrainConfig, min_gain: float,
                    on_epoch: EpochCallback | None = None, log: Callable[[str], None] = print) -> NextItemResult:
    data = prepare(events)
    choice, confirm = halves(data, cfg.seed)
    if len(confirm) < 2:
        raise CannotTrain(f"{len(data.valid_hist)} users with three interactions or more: need 4 (half to choose "
                          "the epoch on, half to confirm the model on)")
    log(f"{len(data.train_seqs):,} users' training sequences over {len(data.vocabulary):,} items; "
        f"validation: {len(data.valid_hist):,} users' next interaction (the gateway's view of their "
        f"history), {len(choice):,} to choose the epoch on, {len(confirm):,} to confirm the model on")
    hist, target, _ = splits(data, cfg.seed)["validation, choice half"]
    model, curve = train_sasrec(data.train_seqs, hist, target.tolist(),
                                SASRecConfig(n_items=len(data.vocabulary), max_len=NEXT_ITEM_HISTORY), cfg, on_epoch)
    return evaluate(model, data, min_gain, curve, cfg.seed)


# --- the refit: what is exported --------------------------------------------------------------


@dataclass
class Refit:
    """The kept recipe trained again on every interaction (each user's whole sequence, the last two
    included) for the epoch count validation chose: it knows the newest items and transitions, which
    the judged model never saw. It is not judged itself (nothing is held out of it); the gate's
    verdict is the judged model's."""

    model: SASRec
    vocabulary: list[str]
    epochs: int
    users: int
    trained_through: str  # ISO time of the newest interaction it was trained on

    def record(self) -> dict:
        return {"epochs": self.epochs, "users": self.users, "items": len(self.vocabulary),
                "trained_through": self.trained_through}


def utc64(iso: str) -> np.datetime64:
    """An ISO time (with or without an offset; none: UTC) as the naive-UTC datetime64 of `valid_time`."""
    t = pd.Timestamp(iso)
    return np.datetime64((t.tz_localize("UTC") if t.tz is None else t).tz_convert(None))


def all_sequences(events: pd.DataFrame) -> tuple[list[str], list[list[int]], pd.Timestamp]:
    """Every user's whole interaction sequence (two items or more) as positions in its vocabulary."""
    interactions = ordered_interactions(events[events["event_type"].isin(INTERACTION_EVENTS) & events["item_id"].notna()])
    vocabulary = sorted(interactions["item_id"].astype(str).unique())
    position = {item: i for i, item in enumerate(vocabulary)}
    seqs = [[position[str(i)] for i in g] for _, g in interactions.groupby("user_id", sort=False)["item_id"]]
    return vocabulary, [q for q in seqs if len(q) >= 2], pd.to_datetime(interactions["timestamp"], utc=True).max()


def refit(result: NextItemResult, events: pd.DataFrame, cfg: SASRecTrainConfig,
          on_epoch: EpochCallback | None = None, log: Callable[[str], None] = print) -> Refit:
    epochs = result.curve.best_epoch + 1
    vocabulary, seqs, newest = all_sequences(events)
    log(f"refit on every interaction: {len(seqs):,} users' whole sequences over {len(vocabulary):,} items, "
        f"{epochs} epochs (the count validation chose)")
    model, _ = train_sasrec(seqs, None, None, replace(result.model.config, n_items=len(vocabulary)),
                            replace(cfg, max_epochs=epochs), on_epoch)
    return Refit(model, vocabulary, epochs, len(seqs), newest.isoformat())


# --- a served version, judged on the same users -------------------------------------------------


def served_top_k(model_file: Path) -> Callable[[list[list[str]]], list[list[str]]]:
    """An exported version (its ONNX file on onnxruntime's CPU) called as the gateway calls Triton:
    histories of item ids, newest first -> its ranked next item ids. It answers in its own
    vocabulary, so a version trained on older data is judged on today's users as it would serve them."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])
    name = NEXT_ITEM_MODEL.inputs[0].name

    def top_k(histories: list[list[str]]) -> list[list[str]]:
        out: list[list[str]] = []
        for start in range(0, len(histories), 256):
            batch = np.stack([history_tensor(h) for h in histories[start:start + 256]])
            ids = session.run([NEXT_ITEM_MODEL.outputs[0].name], {name: batch})[0]
            out.extend([str(i) for i in row] for row in ids)
        return out

    return top_k


def served_version_gain(result: NextItemResult, model_file: Path, label: str, min_gain: float,
                        after: np.datetime64 | None = None) -> tuple[PairedGain | None, pd.DataFrame]:
    """The candidate's NDCG@10 gain over an exported version on the deciding split (paired per
    user; NDCG@10 needs only each list's top 10, so the version's top-K list ranks exactly), and
    that version's rows for the report's table. `after`: the newest interaction the version was
    trained on (a refit); only users whose validation interaction is newer decide, since the
    version has seen the others' (None as the gain when fewer than 2 such users)."""
    top_k = served_top_k(model_file)
    rows, gain = [], None
    for split, (hist, _, target_ids) in splits(result.data, result.seed).items():
        ranks = topk_ranks(top_k([result.data.newest_first_ids(h) for h in hist]), target_ids)
        rows.append({"method": label, "split": split, "users": len(ranks), **metrics_from_ranks(ranks)})
        if split != DECIDES:
            continue
        fair = np.ones(len(ranks), dtype=bool)
        if after is not None:
            _, confirm = halves(result.data, result.seed)
            fair = result.data.valid_time[confirm] > after
        if fair.sum() >= 2:
            gain = PairedGain.of(result.ndcg[(DECIDES, MODEL_NAME)][fair], ndcg_per_example(ranks)[fair], min_gain,
                                 versus=label, unit="users")
    return gain, pd.DataFrame(rows)


# --- files --------------------------------------------------------------------------------------


def save_next_item(result: NextItemResult, folder: Path) -> Path:
    """The candidate's weights, config and vocabulary (the registry's checkpoint of a version)."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(result.model.state_dict(), folder / "model.pt")
    (folder / "config.json").write_text(json.dumps(asdict(result.model.config)))
    (folder / "vocabulary.json").write_text(json.dumps(result.vocabulary))
    return folder


def load_next_item(folder: Path) -> tuple[SASRec, list[str]]:
    model = SASRec(SASRecConfig(**json.loads((folder / "config.json").read_text())))
    model.load_state_dict(torch.load(folder / "model.pt", weights_only=True))
    return model.eval(), json.loads((folder / "vocabulary.json").read_text())


def export_kept(result: NextItemResult, model_repo: Path, gain: PairedGain | None = None,
                refitted: Refit | None = None) -> int:
    """A new `next_item_onnx` version in `model_repo` (the refit when given, else the judged model)
    with its validation verdict beside it (validation.json: the gain that let it through, and what
    the refit was trained on); returns the version."""
    import onnx

    from modelrepo.layout import JUDGED_NEXT_ITEM_FILE, write_validation
    from scorer.export.next_item_export import build_next_item_onnx, export_next_item

    gain = gain or result.gain
    model, vocabulary = (refitted.model, refitted.vocabulary) if refitted else (result.model, result.vocabulary)
    version = export_next_item(model, vocabulary, model_repo)
    if refitted:  # the judged graph beside it, for fitting a fusion on lists that have not seen its targets
        onnx.save(build_next_item_onnx(result.model, result.vocabulary),
                  str(model_repo / NEXT_ITEM_MODEL.name / str(version) / JUDGED_NEXT_ITEM_FILE))
    write_validation(model_repo / NEXT_ITEM_MODEL.name / str(version),
                     {"metric": "NDCG@10", "model": gain.candidate, gain.versus: gain.baseline, "se": gain.se,
                      "users": gain.examples, "best_epoch": result.curve.best_epoch + 1,
                      **({"refit": refitted.record()} if refitted else {})})
    return version


def write_report(result: NextItemResult, folder: Path, table: pd.DataFrame | None = None,
                 verdict: str | None = None) -> Path:
    """report.md (the table, the curve, the verdict) and curve.png in `folder`. `table`: the rows to
    show (default: the result's own); `verdict`: the decision line (default: against popularity)."""
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
    if verdict is None:
        verdict = (f"NDCG@10 against popularity on the confirm half of validation (users that took no part in "
                   f"choosing the epoch): {result.gain.says()}: "
                   f"**{'kept and exported' if result.kept else 'not kept (not exported)'}**.")
    shown = result.table if table is None else table
    text = (f"# Next-item model (SASRec)\n\n{shown.round(4).to_markdown(index=False)}\n\n{verdict}\n\n"
            f"Best epoch {c.best_epoch + 1} of {len(c.loss)} ({c.seconds:.0f} s); ![curve](curve.png)\n\n"
            "Histories are what the gateway sends (distinct recent items, newest last); full ranking over the "
            "model's vocabulary (the training items). The exported model is this one, trained without each "
            "user's last two interactions (with --refit: this recipe refit on every interaction for the chosen "
            "epoch count).\n")
    path = folder / "report.md"
    path.write_text(text)
    return path
