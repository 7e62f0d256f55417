"""Retrain, gate, promote, roll back: the closed loop for the encoder, the ranker, the interest model
and the next-item model.

    retrain -> for each model: fine-tune from its serving checkpoint on the label log (Feast's
               labels_source, which includes the feedback service's events)
            -> evaluate candidate vs serving on the time-split holdout (report either way)
            -> promote only if the candidate's gain in the gate metric over what serves, paired
               over the same examples, exceeds the gain's standard error plus `margin` (PairedGain,
               scorer/eval/paired_gain.py: the rule `recsys train encoder` and `recsys train
               interest` keep a candidate by): export a new Triton version
               and publish it with zero downtime (modelrepo/publish.py); the gateway notices
               (a new encoder: re-embeds the catalog and swaps its index; a new ranker or
               interest model: used from the next request)
    rollback -> publish a model's previous version again (its files stay in the model repository)

Gate metrics, each per example so that the gain's noise is measured (a gain of +0.007 on ~100
examples is noise): encoder NDCG@10 of retrieval on its validation split (query -> item on
searches, next item on interaction-only data; skipped when the data holds neither), serving vs the
best fine-tuned weights on the same examples; ranker NDCG@5 of the holdout's shown lists, serving vs
candidate on the same lists, with the position-debiased SNIPS-NDCG@5 as a veto; interest model
NDCG@10 of next-interaction retrieval on its validation split (the end of the training period),
against the serving model and the untrained fallback, each on the same examples (the gain over
each must pass); next-item model NDCG@10 of the next interaction on the confirm half of its
validation users (scorer/train/next_item_train.py: trained from scratch on today's log, its epoch
chosen on the other half), against popularity and the serving version's own ONNX file called as the
gateway calls it (each must pass). The encoder goes first: the
ranker's similarity feature and the interest model's item vectors come from the (new) serving
encoder. The registry (`var/models/registry.json`) records, per model, which checkpoint made which
version, what serves now and the promotion history, and when training last ran (for the
new-labels trigger).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from scorer.eval.paired_gain import PairedGain

if TYPE_CHECKING:
    from torch import nn

    from scorer.train.interest_data import VectorTable

MODELS = ("encoder", "ranker", "interest", "next_item")


@dataclass
class ModelEntry:
    serving: int | None = None  # version serving now
    checkpoints: dict[str, str] = field(default_factory=dict)  # version -> checkpoint dir ("" = packaged / untrained)
    history: list[int] = field(default_factory=list)  # promotions, oldest first

    def serving_checkpoint(self) -> Path | None:
        ckpt = self.checkpoints.get(str(self.serving)) if self.serving is not None else None
        return Path(ckpt) if ckpt else None


@dataclass
class Registry:
    path: Path
    models: dict[str, ModelEntry] = field(default_factory=dict)
    last_trained_at: str | None = None  # ISO time of the newest label used in training

    def entry(self, model: str) -> ModelEntry:
        if model not in MODELS:
            raise ValueError(f"model must be one of {', '.join(MODELS)}, got {model!r}")
        return self.models.setdefault(model, ModelEntry())

    @classmethod
    def load(cls, path: Path) -> "Registry":
        if not path.exists():
            return cls(path)
        data = json.loads(path.read_text())
        if "models" not in data:  # the first format: the encoder alone, at the top level
            data = {"models": {"encoder": {k: data[k] for k in ("serving", "checkpoints", "history") if k in data}},
                    "last_trained_at": data.get("last_trained_at")}
        return cls(path, {m: ModelEntry(**e) for m, e in data["models"].items()}, data.get("last_trained_at"))

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"models": {m: asdict(e) for m, e in self.models.items()},
                                   "last_trained_at": self.last_trained_at}, indent=2))
        tmp.replace(self.path)


@dataclass
class RetrainResult:
    model: str
    promoted: bool
    reason: str
    serving_score: float
    candidate_score: float
    version: int | None
    report: Path | None
    gain: PairedGain | None = None  # the candidate's gain over what serves and that gain's standard error (None: skipped)


def adopt_serving(registry: Registry, version: int, checkpoint: Path | None, model: str = "encoder") -> None:
    """Start a model's registry entry from what serves now (e.g. the version `make demo` published)."""
    entry = registry.entry(model)
    entry.serving = version
    entry.checkpoints[str(version)] = str(checkpoint) if checkpoint else ""
    entry.history = [version]
    registry.save()


def serving_versions_in_triton(triton_url: str) -> dict[str, int | None]:
    """Per model, the version Triton serves now (pinned in its ensemble, else the newest loaded).
    Several replicas (comma-separated): the first one's, as the gateway's version look-ups."""
    from modelrepo.admin import AdminClient
    from modelrepo.publish import COMPONENTS, ready_versions, replica_urls, serving_version

    client = AdminClient(replica_urls(triton_url)[0])
    try:
        out: dict[str, int | None] = {}
        for model, (ensemble, components) in COMPONENTS.items():
            pinned = serving_version(client, ensemble) if ensemble else None
            loaded = ready_versions(client, components[-1])
            out[model] = pinned if pinned is not None else (loaded[-1] if loaded else None)
        return out
    finally:
        client.close()


def new_labels_since(offline_dir: Path, since: str | None) -> int:
    labels = pd.read_parquet(offline_dir / "labels.parquet", columns=["event_timestamp", "grade"])
    positives = labels[labels["grade"] > 0]
    return len(positives) if since is None else int((positives["event_timestamp"] > pd.Timestamp(since)).sum())


def _stamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")


def _serving_encoder(registry: Registry):
    from scorer.models.encoder import EncoderConfig, TextEncoder

    ckpt = registry.entry("encoder").serving_checkpoint()
    return TextEncoder(EncoderConfig(model_path=str(ckpt))) if ckpt else TextEncoder()


def write_gate_report(out_dir: Path, title: str, table: pd.DataFrame, metric: str, before: float, after: float,
                      decision: str) -> Path:
    """report.md (decision + table), metrics.json and a bar plot of serving vs candidate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from scorer.eval.retrieval_eval import markdown_table

    out_dir.mkdir(parents=True, exist_ok=True)
    table.to_json(out_dir / "metrics.json", orient="records", indent=2)
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    ax.bar(["serving", "candidate"], [before, after], color=["#999999", "#1f77b4"])
    ax.set_ylabel(metric)
    ax.set_title(decision, fontsize=9)
    fig.tight_layout()
    fig.savefig(out_dir / "comparison.png", dpi=110)
    plt.close(fig)
    (out_dir / "report.md").write_text(f"# {title}\n\n**{decision}**\n\n{markdown_table(table)}\n\n"
                                       "![serving vs candidate](comparison.png)\n")
    return out_dir / "report.md"


def _gate(model: str, registry: Registry, gain: PairedGain, metric: str, report: Path, candidate_dir: Path,
          promote: Callable[[], int], log, veto: str | None = None) -> RetrainResult:
    """Promote (export + publish via `promote`) only if the candidate's paired `gain` over what
    serves exceeds its standard error plus its margin (PairedGain.beyond_noise), and no `veto` (why
    a second judge refuses the candidate)."""
    before, after = gain.baseline, gain.candidate
    if not gain.beyond_noise or veto is not None:
        registry.save()
        reason = (f"not promoted: {veto}" if veto is not None
                  else f"not promoted: {metric} {after:.4f} vs {gain.versus} {before:.4f}: {gain.says()}")
        log(f"retrain {model}: {reason}; report {report}")
        return RetrainResult(model, False, reason, before, after, None, report, gain)
    version = promote()
    entry = registry.entry(model)
    entry.checkpoints[str(version)] = str(candidate_dir)
    entry.serving = version
    entry.history.append(version)
    registry.save()
    reason = f"promoted v{version}: {metric} {before:.4f} -> {after:.4f} ({gain.says()})"
    log(f"retrain {model}: {reason}; report {report}")
    return RetrainResult(model, True, reason, before, after, version, report, gain)


def interest_gain(candidate: "nn.Module", baselines: dict[str, "nn.Module"], val: pd.DataFrame,
                  table: "VectorTable", margin: float) -> PairedGain:
    """The candidate's gain over each of `baselines` (what serves, the untrained fallback) on the
    same validation examples, judged by the rule of `recsys train interest` (PairedGain): the
    binding one, i.e. the baseline the candidate beats by the least beyond its noise (if it passes
    that one, it passes them all)."""
    from scorer.train.interest_train import paired_gain

    if not baselines:
        raise ValueError("no baseline to judge the candidate against")
    gains = [paired_gain(candidate, model, val, table, margin, name) for name, model in baselines.items()]
    return min(gains, key=lambda g: g.gain - g.se)


def _publisher(model: str, model_repo: Path, triton_url: str | None, export: Callable[[], int]) -> Callable[[], int]:
    def promote() -> int:
        version = export()
        if triton_url:
            from modelrepo.publish import publish

            publish(triton_url, model_repo, model, version)
        return version

    return promote


def retrain_encoder(repo: Path, model_repo: Path, triton_url: str | None, registry: Registry, work_dir: Path,
                    steps: int = 200, margin: float = 0.005, lr: float | None = None, seed: int = 0,
                    log=print) -> RetrainResult:
    """One round of the loop for the encoder, gated on **validation** NDCG@10 (the split, early
    stopping, objective and keep rule of `recsys train encoder`, scorer/train/encoder_train.py):
    fine-tune the serving encoder (query -> item, or previous item -> next item on data without
    searches) and promote the best fine-tuned weights only if their gain over the serving encoder,
    on the same validation examples, exceeds its paired standard error plus `margin` (PairedGain; a
    negative `margin` tolerates a loss). On query data the holdout is reported too, not used to
    choose. When the data holds nothing the encoder can learn from, the step is skipped (not
    promoted, no report) and says why. `steps` caps the step budget; `triton_url` None: export but do not publish."""
    from scorer.eval.encoder_validation import NextItemValidation
    from scorer.eval.retrieval_eval import build_eval_set, encoder_scorer, evaluate
    from scorer.export.encoder_export import export_encoder
    from scorer.train.data import INTERACTIONS, CannotTrain
    from scorer.train.encoder_data import HISTORY_LEN, catalog, encoder_training_set
    from scorer.train.encoder_train import EncoderTrainConfig, best_fine_tuned, fit_encoder, save_encoder

    stamp = _stamp()
    entry = registry.entry("encoder")
    serving_ckpt = entry.serving_checkpoint()
    try:
        ts = encoder_training_set(repo, seed=seed)
    except CannotTrain as e:
        reason = f"skipped: {e}"
        log(f"retrain encoder: {reason}")
        return RetrainResult("encoder", False, reason, math.nan, math.nan, None, None)
    log(f"retrain encoder: {len(ts.fit):,} training pairs ({ts.objective} -> item), {ts.validation.examples:,} "
        f"validation examples, serving v{entry.serving} ({serving_ckpt or 'packaged weights'})")
    # The fit's own keep rule is the gate's: its verdict, with `margin`, decides.
    fit = fit_encoder(ts.fit, ts.validation, ts.validation.examples, ts.metric,
                      EncoderTrainConfig(max_steps=steps, lr=lr, seed=seed, min_gain=margin), start_from=serving_ckpt,
                      start_name="serving")
    candidate = best_fine_tuned(fit)
    candidate_dir = work_dir / f"encoder-{stamp}"
    save_encoder(candidate, fit.tokenizer, candidate_dir)
    gain = fit.verdict.gain
    before, after = gain.baseline, gain.candidate
    serving = _serving_encoder(registry)
    if ts.source == INTERACTIONS:
        ids, texts = catalog(repo)
        hold = ts.data.holdout
        hold = hold.sample(min(len(hold), 5_000), random_state=seed)  # each example ranks the catalog: a sample is enough
        judge = NextItemValidation.of(hold, ids, texts, HISTORY_LEN) if len(hold) else None
        holdout = {name: judge(enc) for name, enc in (("serving", serving), ("candidate", candidate))} if judge else {}
        table = pd.DataFrame([{"method": n, "split": "holdout", **{k: round(v, 4) for k, v in m.items()}}
                              for n, m in holdout.items()])
    else:
        offline = repo / "data" / "offline"
        ev = build_eval_set(ts.data, pd.read_parquet(offline / "items.parquet"), pd.read_parquet(offline / "events.parquet"))
        got = evaluate(ev, {"serving": encoder_scorer(ev, serving), "candidate": encoder_scorer(ev, candidate)}).metrics
        table = pd.DataFrame([{"method": n, "split": "holdout", **by["all"]} for n, by in got.items()])
    validation = pd.DataFrame([{"method": "serving", "split": "validation", "NDCG@10": round(before, 4)},
                               {"method": "candidate", "split": "validation", "NDCG@10": round(after, 4)}])
    decision = (f"{'promote' if gain.beyond_noise else 'keep serving'}: {fit.verdict.says} "
                f"(best step {fit.best_step} of {fit.steps_run})")
    report = write_gate_report(work_dir / f"report-encoder-{stamp}", f"Encoder retrain {stamp}: candidate vs serving",
                               pd.concat([validation, table], ignore_index=True), f"validation {ts.metric}", before,
                               after, decision)
    (report.parent / "encoder_validation.json").write_text(json.dumps(fit.manifest(), indent=2))
    # Every positive label was seen (a click without a query too): the new-labels trigger counts from here.
    labels = repo / "data" / "offline" / "labels.parquet"
    seen = pd.read_parquet(labels, columns=["event_timestamp"])["event_timestamp"] if labels.exists() else pd.Series([])
    registry.last_trained_at = max(registry.last_trained_at or "", str(max([*seen.tolist(), ts.data.rows["event_timestamp"].max()])))
    return _gate("encoder", registry, gain, "validation NDCG@10", report, candidate_dir,
                 _publisher("encoder", model_repo, triton_url, lambda: export_encoder(model_repo, candidate, int8=True)), log)


def ranker_gain(per_list: dict[str, pd.DataFrame], margin: float) -> PairedGain:
    """The candidate ranker's NDCG@5 gain over the serving one, paired over the same holdout lists
    (per_list_metrics' frames, scorer/eval/ranking_eval.py)."""
    return PairedGain.of(per_list["candidate"]["ndcg@5"], per_list["serving"]["ndcg@5"], margin, "serving", "lists")


def snips_veto(overall: pd.DataFrame, gain: PairedGain, margin: float) -> str | None:
    """Why the position-debiased judge refuses the candidate (its SNIPS-NDCG@5 drops below the
    serving ranker's by more than |margin|: a negative margin, "any candidate passes", tolerates as
    much), else None. `overall`: the lists' table for slice "all", indexed by method."""
    fair_before, fair_after = float(overall.loc["serving", "snips_ndcg@5"]), float(overall.loc["candidate", "snips_ndcg@5"])
    if fair_after >= fair_before - abs(margin):
        return None
    return (f"SNIPS-NDCG@5 {fair_after:.4f} vs serving {fair_before:.4f}: the NDCG@5 gain ({gain.baseline:.4f} -> "
            f"{gain.candidate:.4f}) does not survive the position correction")


def retrain_ranker(repo: Path, model_repo: Path, triton_url: str | None, registry: Registry, work_dir: Path,
                   steps: int = 100, margin: float = 0.005, seed: int = 0, log=print) -> RetrainResult:
    """One round for the ranker: listwise fine-tuning from the serving ranker, gated on holdout NDCG@5:
    promoted only if the candidate's gain over the serving ranker, paired over the same holdout
    lists, exceeds its standard error plus `margin` (PairedGain), with the position-debiased
    SNIPS-NDCG@5 (scorer/eval/ips.py) as a veto: a candidate whose gain is only agreement with the
    logged order (clicked because shown high) is not promoted."""
    from scorer.eval.ranking_eval import blend_verdict, logged_order, per_list_metrics, ranker_scorer, summarize_lists
    from scorer.export.ranker_export import export_ranker
    from scorer.models.ranker import CrossEncoderRanker
    from scorer.train.ranker_data import load_ranker_lists
    from scorer.train.ranker_train import RankerTrainConfig, train_ranker

    stamp = _stamp()
    entry = registry.entry("ranker")
    serving_ckpt = entry.serving_checkpoint()
    lists = load_ranker_lists(repo, encoder=_serving_encoder(registry))
    log(f"retrain ranker: {lists.rows['request_id'].nunique():,} shown lists, serving v{entry.serving} "
        f"({serving_ckpt or 'packaged start'})")
    candidate_dir = work_dir / f"ranker-{stamp}"
    candidate, _ = train_ranker(lists.split(holdout=False), candidate_dir, RankerTrainConfig(max_steps=steps, seed=seed),
                                start_from=serving_ckpt)
    serving = CrossEncoderRanker.load(serving_ckpt) if serving_ckpt else CrossEncoderRanker().eval()
    per_list = per_list_metrics(lists.split(holdout=True), {"logged order": logged_order,
                                                            "serving": ranker_scorer(serving),
                                                            "candidate": ranker_scorer(candidate)})
    table = summarize_lists(per_list)
    overall = table[table["slice"] == "all"].set_index("method")
    gain = ranker_gain(per_list, margin)
    log(f"retrain ranker: NDCG@5 (naive holdout) {gain.baseline:.4f} -> {gain.candidate:.4f}; SNIPS-NDCG@5 "
        f"(position-debiased) {overall.loc['serving', 'snips_ndcg@5']:.4f} -> {overall.loc['candidate', 'snips_ndcg@5']:.4f}; "
        f"the logged order {overall.loc['logged order', 'ndcg@5']:.4f} / {overall.loc['logged order', 'snips_ndcg@5']:.4f}")
    veto = snips_veto(overall, gain, margin)
    decision = (f"{'promote' if gain.beyond_noise and veto is None else 'keep serving'}: NDCG@5 {gain.says()}"
                + (f"; vetoed: {veto}" if veto else ""))
    report = write_gate_report(work_dir / f"report-ranker-{stamp}", f"Ranker retrain {stamp}: candidate vs serving",
                               table, "NDCG@5", gain.baseline, gain.candidate, decision)
    registry.last_trained_at = max(registry.last_trained_at or "", str(lists.rows["event_timestamp"].max()))
    return _gate("ranker", registry, gain, "NDCG@5", report, candidate_dir,
                 # The version carries whether it beat the logged (blend) order on these lists: the
                 # gateway's ranker_mode auto applies it only then (docs/gateway.md#the-ranker-gate).
                 _publisher("ranker", model_repo, triton_url, lambda: export_ranker(
                     model_repo, candidate, int8=True,
                     validation=blend_verdict(table, "candidate", shown=lists.shown))),
                 log, veto)


def retrain_interest(repo: Path, model_repo: Path, triton_url: str | None, registry: Registry, work_dir: Path,
                     steps: int | None = None, margin: float = 0.005, seed: int = 0, log=print) -> RetrainResult:
    """One round for the interest model, gated on **validation** NDCG@10 (the split, early stopping
    and model choice of `recsys train interest`, scorer/train/interest_train.py): fine-tune the
    serving model (or, while the untrained fallback serves, train both kinds and take the winner);
    promote only if the candidate's gain over the serving model and over the untrained fallback,
    on the same validation examples, exceeds that gain's standard error plus `margin` (the rule of
    `recsys train interest`, PairedGain; a negative `margin` tolerates a loss). The holdout is
    reported, not used to choose. `steps`: a cap on the step budget (None: the default budget,
    which scales with the data)."""
    from dataclasses import replace

    from scorer.eval.interest_eval import evaluate_interest
    from modelrepo.layout import write_validation
    from scorer.export.interest_export import export_interest
    from scorer.models.interest import InterestConfig, InterestModel, load_interest_model
    from scorer.train.interest_data import embed_catalog_and_queries, load_interest_examples
    from scorer.train.interest_train import (KINDS, InterestTrainConfig, train_candidates, validation_rows,
                                             validation_split, with_max_steps)

    stamp = _stamp()
    entry = registry.entry("interest")
    serving_ckpt = entry.serving_checkpoint()
    data = load_interest_examples(repo)
    table = embed_catalog_and_queries(repo, data.rows["query"].dropna().tolist(), _serving_encoder(registry))
    log(f"retrain interest: {len(data.train):,} training examples, serving v{entry.serving} "
        f"({serving_ckpt or 'untrained = the gateway fallback'})")
    cfg = with_max_steps(replace(InterestTrainConfig(), seed=seed), steps)
    fit, val = validation_split(data.train, cfg.val_fraction)
    sel = train_candidates(fit, table, KINDS, cfg, start_from=serving_ckpt, val=val)
    candidate = sel.best.model
    candidate_dir = work_dir / f"interest-{stamp}"
    candidate.save(candidate_dir)
    window = data.training_window()  # the serving checkpoint it started from was trained on an earlier log
    write_validation(candidate_dir, window)
    fallback = InterestModel(InterestConfig(dim=table.items.shape[1])).eval()
    serving = load_interest_model(serving_ckpt).eval() if serving_ckpt else fallback
    # The validation examples train_candidates chose on (the same usable, capped sample).
    val_rows = validation_rows(val, table, cfg.max_val_examples, cfg.seed)
    baselines = {"serving": serving, "fallback": fallback} if serving_ckpt else {"serving (= the fallback)": fallback}
    gain = interest_gain(candidate, baselines, val_rows, table, margin)
    log(f"retrain interest: {sel.summary()}")
    result = evaluate_interest(data.holdout, data.train, table, {"untrained (fallback)": InterestModel().eval(),
                                                                 "serving": serving, "candidate": candidate})
    decision = (f"{'promote' if gain.beyond_noise else 'keep serving'} ({sel.best.kind}; validation NDCG@10 "
                f"{gain.candidate:.4f} vs {gain.versus} {gain.baseline:.4f}: {gain.says()})")
    report = write_gate_report(work_dir / f"report-interest-{stamp}", f"Interest model retrain {stamp}: candidate vs serving",
                               result.round(4), "validation NDCG@10", gain.baseline, gain.candidate, decision)
    registry.last_trained_at = max(registry.last_trained_at or "", str(data.rows["event_timestamp"].max()))
    return _gate("interest", registry, gain, "validation NDCG@10", report, candidate_dir,
                 _publisher("interest", model_repo, triton_url, lambda: export_interest(model_repo, candidate, validation=window)), log)


def retrain_next_item(repo: Path, model_repo: Path, triton_url: str | None, registry: Registry, work_dir: Path,
                      steps: int | None = None, margin: float = 0.005, seed: int = 0, max_seconds: float = 600.0,
                      refit: bool = False, log=print) -> RetrainResult:
    """One round for the next-item model: train it from scratch on today's log (its vocabulary is the
    log's items, so yesterday's weights do not fit; the recipe of `recsys train next-item`), and
    promote it only if its NDCG@10 gain on the confirm half of validation, paired per user, exceeds
    its standard error plus `margin` over popularity and over the serving version, which is judged
    from its own ONNX file in `model_repo` (what Triton serves, in its own vocabulary). A serving
    refit has seen every interaction up to its `trained_through`: only users whose validation
    interaction is newer judge it (too few: popularity alone judges). With `refit`, what is
    published is the candidate refit on every interaction (off by default: not judged, not
    measured). `steps`: a cap on epochs (None: 200, stopped early on validation). A log that cannot
    train it (too few users with three interactions) skips the round, as the encoder's does."""
    from dataclasses import replace

    from contract.tensors import NEXT_ITEM_MODEL
    from modelrepo.layout import read_validation
    from scorer.train.next_item_train import (export_kept, read_events, save_next_item, served_version_gain,
                                              train_next_item, write_report)
    from scorer.train.next_item_train import refit as refit_recipe
    from scorer.train.data import CannotTrain
    from scorer.train.next_item_train import utc64
    from scorer.train.sasrec_train import SASRecTrainConfig

    say = lambda m: log(f"retrain next_item: {m}")  # noqa: E731
    stamp = _stamp()
    entry = registry.entry("next_item")
    cfg = replace(SASRecTrainConfig(), seed=seed, max_seconds=max_seconds, **({"max_epochs": steps} if steps else {}))
    try:
        events = read_events(repo)
        result = train_next_item(events, cfg, margin, log=say)
    except CannotTrain as e:
        say(f"skipped: {e}")
        return RetrainResult("next_item", False, f"skipped: {e}", float("nan"), float("nan"), None, None)
    candidate_dir = save_next_item(result, work_dir / f"next_item-{stamp}")
    served_dir = model_repo / NEXT_ITEM_MODEL.name / str(entry.serving)
    gains, table = [result.gain], result.table
    if entry.serving is not None and (served_dir / "model.onnx").is_file():
        trained_through = ((read_validation(served_dir) or {}).get("refit") or {}).get("trained_through")
        after = utc64(trained_through) if trained_through else None
        over_serving, rows = served_version_gain(result, served_dir / "model.onnx", f"serving (v{entry.serving})",
                                                 margin, after)
        table = pd.concat([table, rows], ignore_index=True)
        if over_serving is not None:
            gains.append(over_serving)
        else:
            say(f"serving v{entry.serving} was refit on every interaction up to {trained_through}: fewer than 2 "
                "confirm users have a newer validation interaction, so popularity alone judges the candidate")
    elif entry.serving is not None:
        say(f"serving v{entry.serving} has no model file in {model_repo}; judged against popularity only")
    # The binding baseline: the one the candidate beats by the least beyond its noise.
    gain = min(gains, key=lambda g: g.gain - g.se)
    decision = (f"{'promote' if gain.beyond_noise else 'keep serving'} (validation NDCG@10, confirm half, "
                f"{gain.candidate:.4f} vs {gain.versus} {gain.baseline:.4f}: {gain.says()})")
    report = write_report(result, work_dir / f"report-next_item-{stamp}", table, f"**{decision}**")
    times = pd.to_datetime(events["timestamp"], utc=True)
    registry.last_trained_at = max(registry.last_trained_at or "", str(times.max()))

    def export() -> int:
        refitted = refit_recipe(result, events, cfg, log=say) if refit else None
        return export_kept(result, model_repo, gain, refitted)

    return _gate("next_item", registry, gain, "validation NDCG@10", report, candidate_dir,
                 _publisher("next_item", model_repo, triton_url, export), log)


RETRAIN = {"encoder": retrain_encoder, "ranker": retrain_ranker, "interest": retrain_interest,
           "next_item": retrain_next_item}


def retrain_models(repo: Path, model_repo: Path, triton_url: str | None, registry: Registry, work_dir: Path,
                   models: tuple[str, ...] = MODELS, steps: dict[str, int] | None = None, margin: float = 0.005,
                   log=print, extra: dict[str, dict] | None = None) -> list[RetrainResult]:
    """One round for each of `models`, encoder first (the others read its vectors). `extra`: per
    model, further keyword arguments of its round (e.g. the next-item model's max_seconds)."""
    unknown = set(models) - set(MODELS)
    if unknown:
        raise ValueError(f"unknown model(s) {sorted(unknown)}: choose from {', '.join(MODELS)}")
    results = []
    for model in (m for m in MODELS if m in models):
        kwargs = {"steps": steps[model]} if steps and model in steps else {}
        kwargs.update((extra or {}).get(model, {}))
        results.append(RETRAIN[model](repo, model_repo, triton_url, registry, work_dir, margin=margin, log=log, **kwargs))
    return results


def rollback(model_repo: Path, triton_url: str, registry: Registry, model: str = "encoder") -> int:
    """Serve the version of `model` promoted before the current one again; return it."""
    from modelrepo.publish import publish

    entry = registry.entry(model)
    if len(entry.history) < 2:
        raise RuntimeError(f"nothing to roll back to: fewer than two {model} promotions in the registry")
    entry.history.pop()
    previous = entry.history[-1]
    publish(triton_url, model_repo, model, previous)
    entry.serving = previous
    registry.save()
    return previous


def run_loop(repo: Path, model_repo: Path, triton_url: str | None, registry_path: Path, work_dir: Path,
             min_new_labels: int, every_s: float | None, models: tuple[str, ...] = MODELS,
             after_round: Callable[[list[RetrainResult]], object] | None = None, **train_kwargs) -> None:
    """Retrain whenever `min_new_labels` positive labels arrived since the last run; check every
    `every_s` seconds (None: check once). `after_round` gets each round's results (the CLI refits
    the learned fusion there: it is a gateway setting, not a model this package publishes)."""
    while True:
        registry = Registry.load(registry_path)
        fresh = new_labels_since(repo / "data" / "offline", registry.last_trained_at)
        if fresh >= min_new_labels:
            results = retrain_models(repo, model_repo, triton_url, registry, work_dir, models, **train_kwargs)
            if after_round is not None:
                after_round(results)
        else:
            print(f"retrain: {fresh} new positive labels (< {min_new_labels}); nothing to do", flush=True)
        if every_s is None:
            return
        time.sleep(every_s)
