"""Fine-tune the bi-encoder for retrieval, keeping it only where validation says it helps.

Two objectives, one recipe, chosen by what the data holds (scorer/train/data.py `training_source`):
- **query -> item** (searches that led to a click / cart / purchase): the query's text -> the
  item's text;
- **item -> item** (interaction-only logs, e.g. an order export): the shopper's previous item's
  text -> the next item's text (`transition_pairs`), the retrieval a "more like what you bought"
  shelf and a text-only user vector (mean of recent items) need.

One obvious loop, nanoGPT style: sample a batch of pairs (in proportion to the grade: a purchase
teaches more than a click), embed both sides with the shared encoder, cross-entropy over the
batch's similarity matrix (every other item in the batch is a negative), AdamW, warm-up and
linear decay.

What makes it help or not be used (issue 14: 200 fixed item-to-item steps cost ~24% NDCG@10 on
real data):
- a **validation split**: held-out shoppers' last transitions (item -> item; the shoppers' pairs
  are not trained on), or the last `val_fraction` of the training period's searches (query);
- a **step budget that scales with the data** (`epochs` passes, within [min_steps, max_steps]);
- **early stopping** on validation NDCG@10 (scorer/eval/encoder_validation.py), best weights kept;
  the first validation is the starting encoder (zero-shot, or the serving one when fine-tuning it);
- **the gate** (`EncoderFit.verdict`): the fine-tuned weights are kept only when the gain of their
  best validation NDCG@10 over the start's, on the same examples, exceeds its paired standard
  error plus `min_gain` (PairedGain, scorer/eval/paired_gain.py: the rule of every model gate; the
  best of a noisy validation curve beats the start by chance on a few hundred examples);
  otherwise the start is what is saved, and the verdict says so (`encoder_validation.json`
  beside the checkpoint).
"""

from __future__ import annotations

import copy
import json
import math
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from scorer.eval.encoder_validation import PRIMARY, Judged
from scorer.eval.paired_gain import PairedGain, paired_standard_error
from scorer.models.encoder import EncoderConfig, TextEncoder, load_tokenizer
from scorer.train.data import CannotTrain
from scorer.train.early_stop import EarlyStopping, eval_interval, step_budget
from scorer.train.encoder_data import (ANCHOR_ITEM, ANCHOR_QUERY, encoder_pairs, item_pairs,  # noqa: F401 - re-exported
                                       training_pairs, transition_pairs)
from scorer.train.optim import optimizer_step, warmup_then_linear_decay

# Item-to-item pairs are close to the zero-shot model's own training (similar texts): a gentler step.
DEFAULT_LR = {ANCHOR_QUERY: 1e-4, ANCHOR_ITEM: 2e-5}
VALIDATION_FILE = "encoder_validation.json"  # the verdict, beside the checkpoint


@dataclass(frozen=True)
class EncoderTrainConfig:
    epochs: float = 1.0  # passes over the training pairs (the budget), within the bounds below
    min_steps: int = 30
    max_steps: int = 1_000  # ~2 s per step on 1 thread of the 2-core dev VM
    batch_size: int = 32
    lr: float | None = None  # None: DEFAULT_LR of the objective
    warmup_steps: int = 10
    scale: float = 20.0  # similarity temperature (cosine * scale), as in sentence-transformers' MNRL
    val_fraction: float = 0.1  # of the shoppers (item -> item) or of the training period (query)
    min_val_examples: int = 20
    max_val_examples: int = 2_000  # a validation embeds the catalog and ranks it per example
    evals_per_epoch: float = 4.0
    eval_every_bounds: tuple[int, int] = (10, 200)
    patience: int = 3  # validations without a gain before stopping
    min_gain: float = 0.0  # how much more than its standard error the validation gain over the start must be
    seed: int = 0
    # One intra-op thread: on the 2-core shared VM a second thread contends with the other jobs.
    threads: int | None = 1


@dataclass(frozen=True)
class Verdict:
    """The gate's decision: fine-tuned kept only when its gain over the start on validation is
    beyond noise (`gain`, PairedGain.beyond_noise)."""

    kept: bool
    metric: str  # e.g. "NDCG@10, next item (mean of recent history)"
    start: float  # the starting encoder's validation score (zero-shot, or the serving one)
    fine_tuned: float  # the best fine-tuned validation score
    min_gain: float
    examples: int
    start_name: str = "zero-shot"
    se: float = 0.0  # standard error of fine_tuned - start, paired over the validation examples

    @property
    def gain(self) -> PairedGain:
        return PairedGain(self.fine_tuned, self.start, self.se, self.min_gain, self.examples, self.start_name)

    @property
    def says(self) -> str:
        change = (f"{(self.fine_tuned / self.start - 1) * 100:+.1f}%" if self.start > 0 else "n/a")
        nums = (f"validation {self.metric} on {self.examples:,} examples: {self.start_name} {self.start:.4f}, "
                f"fine-tuned {self.fine_tuned:.4f} ({change}): {self.gain.says()}")
        if self.kept:
            return f"{nums} -> fine-tuned encoder kept"
        return f"{nums} -> fine-tuning does not beat the {self.start_name} encoder beyond noise: the {self.start_name} encoder is kept"


def gate(start: float, fine_tuned: float, metric: str, examples: int, min_gain: float = 0.0,
         start_name: str = "zero-shot", se: float = 0.0) -> Verdict:
    """Keep the fine-tuned encoder only when its validation gain over the start exceeds `se` (the
    gain's paired standard error, `paired_standard_error`) plus `min_gain`."""
    if any(math.isnan(x) for x in (start, fine_tuned, se)):
        raise ValueError(f"validation scores must be numbers, got {start}, {fine_tuned} (standard error {se})")
    gain = PairedGain(float(fine_tuned), float(start), float(se), min_gain, examples, start_name)
    return Verdict(gain.beyond_noise, metric, float(start), float(fine_tuned), min_gain, examples, start_name, float(se))


# NextItemValidation / QueryValidation (scorer/eval/encoder_validation.py); they also `judge` per example.
Validator = Callable[[TextEncoder], dict[str, float]]


def _judge(validate: Validator, model: TextEncoder) -> Judged | dict[str, float]:
    judge = getattr(validate, "judge", None)
    return judge(model) if judge is not None else validate(model)


def _gain_se(start: Judged | dict[str, float], best: Judged | dict[str, float]) -> float:
    """The paired standard error of the best fine-tuned validation's gain over the start's. A
    validator with means only (a unit test's scripted scores) gives no estimate of the noise: 0."""
    if isinstance(start, Judged) and isinstance(best, Judged):
        return paired_standard_error(best.per_example, start.per_example)
    return 0.0


def _metrics(judged: Judged | dict[str, float]) -> dict[str, float]:
    return judged.metrics if isinstance(judged, Judged) else judged


@dataclass
class EncoderFit:
    model: TextEncoder  # the kept weights: the best fine-tuned ones, or the start's when refused
    tokenizer: object
    verdict: Verdict | None  # None: trained without validation (`train_encoder`)
    losses: list[float]
    curve: list[tuple[int, dict[str, float]]]  # (step, validation metrics); step 0 = the start
    best_step: int  # of the best fine-tuned validation (kept or not)
    steps_run: int
    budget: int
    stopped_early: bool
    objective: str  # ANCHOR_QUERY | ANCHOR_ITEM
    train_pairs: int
    lr: float
    fine_tuned_state: dict | None = None  # the best fine-tuned weights, kept or not (for comparisons)
    # Each validation example's NDCG@10 under the start and under the best fine-tuned weights, in
    # the same order (None: no validation, or a validator that gives means only).
    start_values: np.ndarray | None = None
    fine_tuned_values: np.ndarray | None = None

    def manifest(self) -> dict:
        if self.verdict is None:
            raise ValueError("no verdict: this encoder was trained without validation")
        return {"verdict": "fine-tuned" if self.verdict.kept else self.verdict.start_name, **asdict(self.verdict),
                "says": self.verdict.says, "objective": self.objective, "train_pairs": self.train_pairs,
                "lr": self.lr, "best_step": self.best_step, "steps_run": self.steps_run, "budget": self.budget,
                "stopped_early": self.stopped_early,
                "curve": [{"step": s, **m} for s, m in self.curve]}


def _batches(pairs: pd.DataFrame, batch_size: int, rng: random.Random):
    weights = pairs["grade"].to_numpy(dtype=float)
    idx = np.arange(len(pairs))
    items = pairs["item_id"].to_numpy()
    while True:
        chosen = rng.choices(idx, weights=weights, k=batch_size * 2)
        # No item twice in a batch: it would be its own negative.
        seen, batch = set(), []
        for i in chosen:
            if items[i] not in seen:
                seen.add(items[i])
                batch.append(i)
            if len(batch) == batch_size:
                break
        yield pairs["query"].iloc[batch].tolist(), pairs["item_text"].iloc[batch].tolist()


def _progress(console: Console | None) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]}"), TextColumn("val NDCG@10 {task.fields[val]}"),
                    TimeElapsedColumn(), console=console, transient=False, disable=console is None)


def _objective(pairs: pd.DataFrame) -> str:
    return ANCHOR_ITEM if "anchor" in pairs and (pairs["anchor"] == ANCHOR_ITEM).all() else ANCHOR_QUERY


def fit_encoder(pairs: pd.DataFrame, validate: Validator | None, val_examples: int = 0, metric: str = PRIMARY,
                cfg: EncoderTrainConfig = EncoderTrainConfig(), enc_cfg: EncoderConfig = EncoderConfig(),
                start_from: Path | None = None, console: Console | None = None,
                start_name: str = "zero-shot") -> EncoderFit:
    """Fine-tune from `start_from` (a checkpoint; default the packaged model) on `pairs`, validating
    with `validate` (its NDCG@10: the start first, then every few steps), stop early, and gate the
    best fine-tuned weights against the start: `.model` holds the kept ones. `cfg.max_steps` caps
    the data-scaled budget. `validate` None: no validation, no gate, the last weights."""
    pairs = pairs.reset_index(drop=True)  # a split's slice keeps its frame's index; batches index by position
    if len(pairs) < 2:
        raise CannotTrain("need at least two (query, item) or (previous item, next item) pairs to train")
    objective = _objective(pairs)
    # An item anchor is as long as the item it pairs with: give it the item's token budget.
    anchor_max_length = enc_cfg.item_max_length if objective == ANCHOR_ITEM else enc_cfg.query_max_length
    lr = cfg.lr or DEFAULT_LR[objective]
    before = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        torch.manual_seed(cfg.seed)
        rng = random.Random(cfg.seed)
        if start_from:
            enc_cfg = EncoderConfig(**{**enc_cfg.__dict__, "model_path": str(start_from)})
        model = TextEncoder(enc_cfg).train()
        tok = load_tokenizer(enc_cfg)
        budget = step_budget(len(pairs), cfg.batch_size, cfg.epochs, min(cfg.min_steps, cfg.max_steps), cfg.max_steps)
        every = eval_interval(len(pairs), cfg.batch_size, cfg.evals_per_epoch, *cfg.eval_every_bounds)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
        sched = warmup_then_linear_decay(opt, cfg.warmup_steps, budget)
        stopper = EarlyStopping(cfg.patience)  # patience only; the weights kept are chosen below
        # best fine-tuned (score, step, weights, its validation)
        best_ft: tuple[float, int, dict | None, Judged | dict | None] = (-math.inf, 0, None, None)
        curve: list[tuple[int, dict[str, float]]] = []
        start_state = start_judged = None
        if validate is not None:
            start_state = copy.deepcopy(model.state_dict())
            start_judged = _judge(validate, model)
            curve.append((0, _metrics(start_judged)))
            stopper.update(0, curve[0][1][PRIMARY], model)
        losses: list[float] = []
        batches = _batches(pairs, cfg.batch_size, rng)
        stopped = False
        shown = lambda: "-" if not curve else f"{curve[-1][1][PRIMARY]:.4f} (best {stopper.best_score:.4f} @ {stopper.best_step})"  # noqa: E731
        with _progress(console) as progress:
            task = progress.add_task(f"fine-tuning the encoder ({objective} -> item)", total=budget, loss="-", val=shown())
            for step in range(1, budget + 1):
                model.train()
                anchors, items = next(batches)
                q = tok(anchors, padding=True, truncation=True, max_length=anchor_max_length, return_tensors="pt")
                d = tok(items, padding=True, truncation=True, max_length=enc_cfg.item_max_length, return_tensors="pt")
                logits = cfg.scale * model(q["input_ids"], q["attention_mask"]) @ model(d["input_ids"], d["attention_mask"]).T
                loss = torch.nn.functional.cross_entropy(logits, torch.arange(len(anchors)))
                losses.append(optimizer_step(model, opt, sched, loss))
                if validate is not None and (step % every == 0 or step == budget):
                    judged = _judge(validate, model)
                    curve.append((step, _metrics(judged)))
                    score = curve[-1][1][PRIMARY]
                    if score > best_ft[0]:
                        best_ft = (score, step, copy.deepcopy(model.state_dict()), judged)
                    stopped = stopper.update(step, score, model) and step < budget
                    progress.update(task, val=shown())
                progress.update(task, advance=1, loss=f"{np.mean(losses[-20:]):.3f}")
                if stopped:
                    break
        verdict = None
        if validate is not None:
            verdict = gate(curve[0][1][PRIMARY], best_ft[0], metric, val_examples, cfg.min_gain, start_name,
                           _gain_se(start_judged, best_ft[3]))
            model.load_state_dict(best_ft[2] if verdict.kept else start_state)  # refused: the start is kept
        model.eval()
    finally:
        torch.set_num_threads(before)
    values = lambda j: j.per_example if isinstance(j, Judged) else None  # noqa: E731
    return EncoderFit(model, tok, verdict, losses, curve, best_ft[1], len(losses), budget, stopped, objective,
                      len(pairs), lr, best_ft[2], values(start_judged), values(best_ft[3]))


def best_fine_tuned(fit: EncoderFit) -> TextEncoder:
    """The best fine-tuned weights, whether or not the gate kept them (a copy of the kept model
    with them loaded): what a comparison of zero-shot and fine-tuned reads."""
    model = copy.deepcopy(fit.model)
    if fit.fine_tuned_state is not None:
        model.load_state_dict(fit.fine_tuned_state)
    return model.eval()


def save_fit(fit: EncoderFit, out_dir: Path) -> Path:
    """The kept encoder (loadable as EncoderConfig(model_path=out_dir)) and its verdict beside it."""
    save_encoder(fit.model, fit.tokenizer, out_dir)
    path = out_dir / VALIDATION_FILE
    path.write_text(json.dumps(fit.manifest(), indent=2))
    return path


def train_encoder(pairs: pd.DataFrame, out_dir: Path, cfg: EncoderTrainConfig = EncoderTrainConfig(max_steps=200),
                  enc_cfg: EncoderConfig = EncoderConfig(), start_from: Path | None = None) -> tuple[TextEncoder, list[float]]:
    """Fine-tune for min(max_steps, budget) steps with no validation and no gate (for tests and
    callers that need a trained checkpoint whatever it scores); save to out_dir."""
    exact = EncoderTrainConfig(**{**asdict(cfg), "min_steps": cfg.max_steps})
    fit = fit_encoder(pairs, None, cfg=exact, enc_cfg=enc_cfg, start_from=start_from)
    save_encoder(fit.model, fit.tokenizer, out_dir)
    return fit.model, fit.losses


def save_encoder(model: TextEncoder, tokenizer, out_dir: Path) -> None:
    """A checkpoint loadable as EncoderConfig(model_path=out_dir)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.transformer.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))


def plot_fit(fit: EncoderFit, path: Path) -> Path:
    """Training loss and the validation curve (NDCG@10) against the start's line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    left.plot(fit.losses, alpha=0.4, label="loss")
    window = max(1, len(fit.losses) // 20)
    if fit.losses:
        left.plot(pd.Series(fit.losses).rolling(window, min_periods=1).mean(), label=f"mean of {window}")
    left.set_xlabel("step")
    left.set_ylabel("in-batch cross-entropy")
    left.legend()
    if fit.curve:
        steps = [s for s, _ in fit.curve]
        right.plot(steps, [m[PRIMARY] for _, m in fit.curve], marker="o", label="fine-tuning")
        right.axhline(fit.curve[0][1][PRIMARY], color="grey", linestyle="--", label=fit.verdict.start_name if fit.verdict else "start")
        right.set_xlabel("step")
        right.set_ylabel(f"validation {PRIMARY}")
        right.legend()
        right.set_title(("kept: fine-tuned" if fit.verdict.kept else f"kept: {fit.verdict.start_name}") if fit.verdict else "",
                        fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
