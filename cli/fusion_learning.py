"""`recsys train fusion`: fit the learned source fusion on a shop's own log and keep it only when
it beats the rank fusion the gateway serves today.

Through the served code (cli/fusion_tuning.py's harness: the gateway's catalog, co-visitation,
retrieval, feature terms and pre-score; pages without a query; leave-one-out next item), each
validation user becomes one list: the gateway's candidates, their FUSION_FEATURES
(gateway/learned_fusion.py `candidate_features`, what the gateway computes per request) and where
the next item sits among them. The validation users are split in two seeded halves:
- the **fit half**: scorer/train/fusion_train.py fits the network (80% of the half) with early
  stopping (the other 20%), then the relevance's scale against the feature terms is chosen on the
  whole half;
- the **confirm half**, which took no part: the learned fusion and the served rank fusion (the
  settings the gateway would read from `--config`, else its defaults) are compared per user
  (NDCG@10 paired, `scorer.eval.paired_gain.PairedGain`: the rule the model gates keep a model by).
Test is read once and shown, never to decide. The model file is written only when the confirm
half's gain exceeds its standard error (+ margin); the gateway serves it with the setting
`learned_fusion`.

The interest vectors are the ones the gateway will use: its untrained formula, or (`--model-repo`
holding an `interest_onnx` version) the served interest model's ONNX file, run on onnxruntime as the
gateway calls it, so the interest ranks and cosines the fusion is fitted on are the served ones.
Limit: the item vectors are the zero-shot encoder's in float32 (the served index may hold int8's,
within ~0.01 cosine of them).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from cli.fusion_tuning import (CannotTune, InterestFn, NextItemFn, Request, Seeds, console, data_note, fused, load,
                               prepare, read_shop, subset, target_ranks)
from contract.fusion import FusionModel
from gateway.config import GatewaySettings, load_settings
from gateway.learned_fusion import LearnedFusion, LearnedFusionError, model_relevance
from gateway.scoring import weight_vector
from scorer.eval.interest_eval import ndcg_per_example
from scorer.eval.next_item import metrics_from_ranks
from scorer.eval.paired_gain import PairedGain, split_halves

MAX_EPOCHS = 300  # 100 was hit on the full Online Retail data with the next-item features (still improving)
SCALES = (1.0, 3.0, 9.0)  # the learned relevance's weight against the feature terms, chosen on the fit half


@dataclass
class Judged:
    """Rank fusion vs the learned fusion on one set of users."""

    rank_fusion: dict[str, float]
    learned: dict[str, float]
    gain: PairedGain
    # NDCG@10 per user, in the lists' order (for further paired comparisons on the same users).
    rank_fusion_ndcg: np.ndarray = field(default_factory=lambda: np.zeros(0))
    learned_ndcg: np.ndarray = field(default_factory=lambda: np.zeros(0))


@dataclass
class FusionTraining:
    shop: str
    model: FusionModel
    fit_half: Judged  # the users it was fitted on (optimistic: shown, never decisive)
    confirm: Judged  # the users that decide
    test: Judged  # read once
    curve: list[tuple[int, float]]
    best_epoch: int
    loss_curve: list[tuple[int, float]] = field(default_factory=list)
    # The new fit against the learned fusion served now, on the confirm half's lists from today's models
    # (None: no incumbent; `recsys retrain` refitting after a promotion passes the file in place).
    over_incumbent: PairedGain | None = None

    @property
    def learned_anything(self) -> bool:
        """The fit beat the untrained network on its early-stopping users' loss (else it kept the untrained one)."""
        return self.best_epoch > 0

    @property
    def keeps(self) -> bool:
        return (self.learned_anything and self.confirm.gain.beyond_noise
                and (self.over_incumbent is None or self.over_incumbent.beyond_noise))


def learned(model: FusionModel):
    return lambda r: model_relevance(model, r.features)


def judge(reqs: list[Request], model: FusionModel, settings: GatewaySettings, margin: float) -> Judged:
    w = weight_vector(settings.weights)
    before = target_ranks(reqs, fused(settings.fusion), w)
    after = target_ranks(reqs, learned(model), w)
    ours, theirs = ndcg_per_example(after), ndcg_per_example(before)
    gain = PairedGain.of(ours, theirs, margin, versus="the rank fusion", unit="users")
    return Judged(metrics_from_ranks(before), metrics_from_ranks(after), gain, theirs, ours)


def lists_of(reqs: list[Request]) -> tuple[list[np.ndarray], list[int]]:
    """Each request's candidate features and its target's index among them (-1: not retrieved)."""
    targets = []
    for r in reqs:
        hit = np.flatnonzero(r.positions == r.target)
        targets.append(int(hit[0]) if len(hit) else -1)
    return [r.features for r in reqs], targets


def fit(reqs: list[Request], seed: int):
    from scorer.train.fusion_train import fit_fusion

    lists, targets = lists_of(reqs)
    retrieved = sum(t >= 0 for t in targets)
    console.print(f"fitting on {len(lists):,} users' candidate lists ({retrieved:,} hold the next item; "
                  "early stopping on 20% of them, NDCG@10 within the list)")
    with Progress(TextColumn("fusion epoch {task.completed:.0f}"), BarColumn(), TextColumn("{task.fields[note]}"),
                  TimeElapsedColumn(), console=console, transient=True) as progress:
        task = progress.add_task("fit", total=MAX_EPOCHS, note="")

        def on_epoch(epoch: int, ndcg: float) -> None:
            progress.update(task, completed=epoch, note=f"early-stopping NDCG@10 {ndcg:.4f}")

        return fit_fusion(lists, targets, seed=seed, max_epochs=MAX_EPOCHS, on_epoch=on_epoch)


def _version_dir(model_repo: Path, model: str, version: int | None) -> Path | None:
    """`version`'s folder of `model` (None: the newest, what a fresh Triton over the repository
    serves; after a rollback the registry's serving version is not the newest), or None when it
    has no model file."""
    if version is not None:
        d = model_repo / model / str(version)
        return d if (d / "model.onnx").is_file() else None
    versions = [d for d in (model_repo / model).glob("*") if d.name.isdigit() and (d / "model.onnx").is_file()]
    return max(versions, key=lambda d: int(d.name)) if versions else None


def served_interest_model(model_repo: Path, version: int | None = None) -> Path | None:
    """The ONNX file of the interest model's `version` (None: the newest, what a gateway over a
    fresh Triton serves) in a Triton model repository, or None when there is none (the gateway's
    formula then)."""
    from contract.tensors import INTEREST_MODEL

    d = _version_dir(model_repo, INTEREST_MODEL.name, version)
    return d / "model.onnx" if d else None


def interest_window(interest_model: Path | None) -> tuple[pd.Timestamp | None, str]:
    """From when on the fusion's targets are clean for this interest model's ONNX file (None: every
    target is), and a line that says why, from the validation record beside it."""
    from modelrepo.layout import TRAINED_BEFORE, UNTRAINED, read_validation

    if interest_model is None:
        return None, ""
    record = read_validation(interest_model.parent) or {}
    if record.get(UNTRAINED):
        return None, "untrained, so every target judges the fusion"
    if record.get(TRAINED_BEFORE):
        since = pd.Timestamp(record[TRAINED_BEFORE])
        since = since.tz_localize("UTC") if since.tzinfo is None else since.tz_convert("UTC")
        return since, (f"trained on targets before {since:%Y-%m-%d %H:%M} UTC, so only validation and test targets "
                       "from then on judge the fusion (on earlier ones it recalls what it was taught)")
    return None, ("[yellow]its training window is unknown[/] (no validation.json with trained_before beside it): "
                  "if it was trained on this log's recent interactions, the gate below is optimistic")


def onnx_interest(path: Path, recent_items: int) -> InterestFn:
    """The served interest model (its ONNX file, on onnxruntime's CPU) called as the gateway calls it
    without a query (gateway/pipeline/retrieve.py interest_vector: the history padded to
    `recent_items`, a mask, a zero query with has_query 0)."""
    import onnxruntime as ort

    from contract.tensors import INTEREST_MODEL, names

    options = ort.SessionOptions()
    options.log_severity_level = 3  # no graph-optimizer chatter in the command's output
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    query_name, has_query_name, items_name, mask_name = names(INTEREST_MODEL.inputs)

    def interest(snap, history: list[int]) -> np.ndarray:
        items = np.zeros((1, recent_items, snap.index.dim), np.float32)
        items[0, : len(history)] = snap.index.embeddings[history[:recent_items]]
        mask = np.zeros((1, recent_items), np.float32)
        mask[0, : len(history)] = 1.0
        feeds = {query_name: np.zeros((1, snap.index.dim), np.float32), has_query_name: np.zeros((1, 1), np.float32),
                 items_name: items, mask_name: mask}
        return session.run(None, feeds)[0][0]

    return interest


def served_next_item_model(model_repo: Path, version: int | None = None) -> Path | None:
    """The ONNX file to fit a fusion on for the next-item model's `version` (None: the newest) in a
    Triton model repository (None: none): its judged graph when the version is a refit (the refit has
    seen the validation users' targets the fusion is fitted on: modelrepo/layout.py
    JUDGED_NEXT_ITEM_FILE), else what serves."""
    from contract.tensors import NEXT_ITEM_MODEL
    from modelrepo.layout import JUDGED_NEXT_ITEM_FILE

    d = _version_dir(model_repo, NEXT_ITEM_MODEL.name, version)
    if d is None:
        return None
    judged = d / JUDGED_NEXT_ITEM_FILE
    return judged if judged.is_file() else d / "model.onnx"


def onnx_next_item(path: Path) -> NextItemFn:
    """The served next-item model (its ONNX file on onnxruntime's CPU) called as the gateway calls it
    (gateway/pipeline/retrieve.py next_item_list: item ids newest first in, item ids out, mapped to
    catalog positions by gateway/retrieval.py next_item_positions)."""
    import onnxruntime as ort

    from contract.next_item import history_tensor
    from contract.tensors import NEXT_ITEM_MODEL
    from gateway.retrieval import next_item_positions

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    history_name = NEXT_ITEM_MODEL.inputs[0].name

    def next_items(snap, history: list[int]):
        catalog = snap.catalog
        ids, logp = session.run(None, {history_name: history_tensor([catalog.item_ids[p] for p in history])[None]})
        return next_item_positions(catalog.position, [str(i) for i in ids[0]], logp[0])

    return next_items


def train_fusion(repo: Path, out: Path, max_users: int = 5000, seed: int = 0, margin: float = 0.0,
                 config: Path | None = None, interest_model: Path | None = None,
                 encoder: Path | None = None, next_item_model: Path | None = None,
                 incumbent: Path | None = None) -> FusionTraining:
    """Fit, choose the scale, judge; write `out` only when the confirm half says so. `interest_model`:
    the ONNX file of the interest model the gateway serves (None: it serves its untrained formula);
    `encoder`: the fine-tuned encoder checkpoint whose item vectors the gateway's index holds (None:
    the zero-shot encoder's). `incumbent`: the learned fusion file the gateway serves now; when it
    can be read, the new fit must also beat it on the confirm half (paired, beyond its standard error
    + margin), both scoring the same lists from the models given here."""
    if out.exists() and not out.is_file():
        raise CannotTune(f"{out} is not a file: --out names the model file to write")
    settings = load_settings(config)
    seeds = Seeds(settings.covisit_recent_items, settings.covisit_seed_decay)
    per_source = settings.candidates_per_source
    shop = read_shop(repo)
    interest_fn = onnx_interest(interest_model, settings.interest_recent_items) if interest_model else None
    since, window = interest_window(interest_model)
    console.print("interest vectors: " + (f"the served interest model ({interest_model}), {window}" if interest_model
                                          else "the gateway's untrained formula (no interest model served)"))
    next_fn = onnx_next_item(next_item_model) if next_item_model else None
    console.print("next-item source: " + (f"the served next-item model ({next_item_model})" if next_item_model
                                          else "none (no next-item model served)"))
    vectors: dict[str, np.ndarray] = {}
    loaded = load(shop, "valid", max_users, seed, vectors=vectors, encoder=encoder, targets_from=since)
    if len(loaded.pages) < 10:
        after = (f" and a validation interaction from {since:%Y-%m-%d %H:%M} UTC on (the served interest model was "
                 "trained on earlier ones)" if since is not None else "")
        raise CannotTune(f"{len(loaded.pages)} users with at least 3 interactions{after}: need 10 (a half to fit on, "
                         "split again for early stopping, and a half to confirm on)")
    fit_pages, confirm_pages = (subset(loaded, h) for h in split_halves(len(loaded.pages), seed))
    console.print(f"validation users split in two (seed {seed}): {len(fit_pages.pages):,} to fit on, "
                  f"{len(confirm_pages.pages):,} to confirm on")
    fit_reqs = prepare(fit_pages, per_source, seeds, "fit half: candidates and features", interest_fn, next_fn)
    result = fit(fit_reqs, seed)
    w = weight_vector(settings.weights)
    by_scale = {s: metrics_from_ranks(target_ranks(fit_reqs, learned(_scaled(result.model, s)), w))["NDCG@10"]
                for s in SCALES}
    scale = max(SCALES, key=lambda s: (by_scale[s], -s))
    console.print("scale (the learned relevance against the feature terms), NDCG@10 on the fit half: "
                  + ", ".join(f"{s:g}: {v:.4f}" for s, v in by_scale.items()) + f"; chosen {scale:g}")
    model = _scaled(result.model, scale)
    confirm_reqs = prepare(confirm_pages, per_source, seeds, "confirm half: candidates and features", interest_fn, next_fn)
    fit_half = judge(fit_reqs, model, settings, margin)
    confirm = judge(confirm_reqs, model, settings, margin)
    over_incumbent = versus_incumbent(confirm_reqs, confirm, incumbent, settings, margin) if incumbent else None
    test_reqs = prepare(load(shop, "test", max_users, seed, vectors=vectors, encoder=encoder, targets_from=since),
                        per_source, seeds, "test", interest_fn, next_fn)
    test = judge(test_reqs, model, settings, margin)
    t = FusionTraining(shop.name, model, fit_half, confirm, test, result.curve, result.best_epoch, result.loss_curve,
                       over_incumbent)
    console.print(result_table(t))
    plot = out.with_name(out.stem + "_curve.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    save_curve(t, plot)
    console.print(f"early-stopping curve: {plot} (best epoch {t.best_epoch})")
    if not t.keeps:
        left = f"; {out} left as it was" if out.exists() else ""
        if not t.learned_anything:
            why = "the fit never beat the untrained network on its early-stopping users"
        else:
            binding = over_incumbent if confirm.gain.beyond_noise and over_incumbent is not None else confirm.gain
            why = f"{binding.says()} on the confirm half of validation"
        keeps = "the learned fusion in place" if over_incumbent is not None else "the rank fusion"
        console.print(f"[yellow]not kept[/]: {why}: the gateway keeps {keeps}, nothing written{left}")
        return t
    about = {"trained_at": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
             "data": data_note(repo, shop), "max_users": max_users, "seed": seed,
             "candidates_per_source": per_source, "covisit_recent_items": seeds.covisit_recent_items,
             "covisit_seed_decay": seeds.covisit_seed_decay, "best_epoch": t.best_epoch,
             "interest": str(interest_model) if interest_model else "the gateway's untrained formula",
             "targets_from": since.isoformat() if since is not None else "any time",
             "next_item": str(next_item_model) if next_item_model else "none",
             "encoder": str(encoder) if encoder else "zero-shot",
             **({"over_incumbent_ndcg10": {"incumbent": over_incumbent.baseline, "learned": over_incumbent.candidate,
                                          "gain": over_incumbent.gain, "se": over_incumbent.se,
                                          "users": over_incumbent.examples}} if over_incumbent is not None else {}),
             **{f"{name}_ndcg10": {"rank_fusion": j.rank_fusion["NDCG@10"], "learned": j.learned["NDCG@10"],
                                    "gain": j.gain.gain, "se": j.gain.se, "users": j.gain.examples}
                for name, j in (("fit_half", fit_half), ("confirm_half", confirm), ("test", test))}}
    model = FusionModel(model.w1, model.b1, model.w2, model.b2, model.scale, about)
    # Written whole or not at all (a gateway that reads a half-written file refuses to start).
    partial = out.with_name(out.name + ".partial")
    partial.write_text(model.to_json())
    LearnedFusion.load(partial)  # what the gateway will read: never leave a file it cannot serve
    partial.replace(out)
    t.model = model
    console.print(f"[green]wrote[/] {out} ({confirm.gain.says()} on the confirm half of validation); serve it with "
                  f"RECSYS_LEARNED_FUSION={out} (or `learned_fusion = \"{out}\"` in the --config file)")
    return t


def versus_incumbent(reqs: list[Request], judged: Judged, incumbent: Path, settings: GatewaySettings,
                     margin: float) -> PairedGain | None:
    """The new model's NDCG@10 gain over the incumbent file's on the same lists (`judged`: the new
    model and the rank fusion on `reqs`), paired per user; None when there is no file to beat or it
    cannot be served (the gateway would not load it either)."""
    if not incumbent.is_file():
        return None
    try:
        old = LearnedFusion.load(incumbent)
    except LearnedFusionError as e:
        console.print(f"[yellow]the learned fusion in place cannot be served[/] ({e}): judged against the rank "
                      "fusion only")
        return None
    w = weight_vector(settings.weights)
    theirs = ndcg_per_example(target_ranks(reqs, learned(old.model), w))
    gain = PairedGain.of(judged.learned_ndcg, theirs, margin, versus=f"the learned fusion in place ({old.version})",
                         unit="users")
    console.print(f"against the learned fusion in place on the confirm half, on today's models' lists: {gain.says()}")
    held = PairedGain.of(theirs, judged.rank_fusion_ndcg, unit="users")
    if held.gain + held.se < 0:  # what serves now has fallen below the rank fusion: an operator should know
        console.print(f"[yellow]the learned fusion in place now scores below the rank fusion[/] on these lists "
                      f"(NDCG@10 {held.candidate:.4f} vs {held.baseline:.4f}, {held.examples:,} users); if no new fit "
                      "replaces it, remove `learned_fusion` from the gateway settings")
    return gain


def _scaled(model: FusionModel, scale: float) -> FusionModel:
    return replace(model, scale=scale)


def result_table(t: FusionTraining) -> Table:
    table = Table("users", "count", "fusion", "Recall@10", "NDCG@10", "NDCG@10 gain ± SE",
                  title=f"learned fusion on {t.shop}: fitted on one half of validation, kept only if the other "
                        "half says so (test read once)")
    for name, j in (("validation, fit half", t.fit_half), ("validation, confirm half", t.confirm), ("test", t.test)):
        g = j.gain
        rel = f" ({g.gain / g.baseline:+.0%})" if g.baseline > 0 else ""
        table.add_row(name, f"{g.examples:,}", "rank fusion (served settings)", f"{j.rank_fusion['Recall@10']:.4f}",
                      f"{j.rank_fusion['NDCG@10']:.4f}", "")
        table.add_row("", "", "learned", f"{j.learned['Recall@10']:.4f}", f"{j.learned['NDCG@10']:.4f}",
                      f"{g.gain:+.4f} ± {g.se:.4f}{rel}", end_section=True)
    return table


def save_curve(t: FusionTraining, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    epochs, values = zip(*t.curve)
    ax.plot(epochs, values, marker=".", label="NDCG@10, early-stopping users (fit half)")
    ax.axvline(t.best_epoch, color="grey", linestyle=":", label=f"kept: epoch {t.best_epoch} (lowest loss)")
    if t.loss_curve:
        loss_ax = ax.twinx()
        loss_epochs, losses = zip(*t.loss_curve)
        loss_ax.plot(loss_epochs, losses, color="tab:green", alpha=0.6)
        loss_ax.set_ylabel("held-out loss (decides)", color="tab:green")
    ax.axhline(t.fit_half.rank_fusion["NDCG@10"], color="tab:red", linestyle="--",
               label="rank fusion, whole fit half (served order)")
    ax.set_xlabel("epoch (0: untrained)")
    ax.set_ylabel("NDCG@10 within the candidates")
    ax.set_title("learned fusion: validation curve")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
