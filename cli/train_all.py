"""`recsys train all`: every model a shop's imported log can train, in the order they depend on
each other, each kept only by its own gate, exported into the Triton model repository; then the
gateway settings that serve them and a table of what was kept.

    1. encoder      `recsys train encoder`: kept only if it beats the zero-shot encoder on
                    validation (otherwise the zero-shot weights are saved and served)
    2. interest     `recsys train interest` on that encoder's vectors: kept only if it beats the
                    gateway's untrained formula (otherwise the untrained model, the same formula)
    3. export       encoder (int8), interest model, and the packaged ranker when the repository
                    has none (ranker_mode auto applies a ranker only with a validation verdict)
    4. next-item    `recsys train next-item`: exported only if it beats popularity
    5. rank fusion  `recsys tune fusion`: the rank fusion's weights and co-visitation seeds, kept
                    only if they beat the defaults (skipped when --config gives the settings served)
    6. fusion       `recsys train fusion` through the gateway's own retrieval code, with the served
                    interest and next-item models: kept only if it beats that rank fusion
    7. ranker       `recsys train ranker` on the shown lists: exported only if it beats the blend's
                    (logged) order on the holdout lists, and then applied (ranker_mode auto); not
                    trained on a log without impressions (no served order to beat)
    then            a gateway settings file (`recsys serve --config FILE`): the rank fusion's
                    settings, plus the learned fusion when it was kept

Each step is the command of the same name (one recipe, one gate); this module only orders them,
passes each one what the previous one kept, and says what the gateway will serve. A step the data
cannot train says so and the next step goes on with what serves without it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from scorer.eval.paired_gain import PairedGain


@dataclass
class StepResult:
    step: str
    kept: bool | None  # None: the data could not train it (or it was skipped)
    serves: str  # what the gateway serves for this part afterwards
    detail: str = ""


@dataclass
class Plan:
    repo: Path  # feature repo with the imported log in data/offline
    model_repo: Path  # Triton model repository
    models: Path  # checkpoints: models/encoder, models/interest, models/fusion/learned_fusion.json
    reports: Path  # one folder per step's report
    settings_out: Path  # the gateway settings file written at the end
    config: Path | None = None  # the settings the gateway serves with (the rank fusion to beat), copied into settings_out
    tune: bool = True  # choose the rank fusion's weights on this log (`recsys tune fusion`) when no config is given
    encoder: bool = True  # try fine-tuning the encoder (False: serve the zero-shot encoder)
    encoder_steps: int = 0  # 0: the command's default budget
    interest_steps: int = 0
    next_item_seconds: float = 600.0
    ranker_steps: int = 200  # 0: do not train the ranker
    seed: int = 0
    url: str = ""  # a running Triton to publish each new version to ('' : export only)


def _encoder(plan: Plan, console: Console) -> tuple[Path | None, StepResult]:
    from cli.app import train_encoder_cmd
    from scorer.train.encoder_train import VALIDATION_FILE

    out = plan.models / "encoder"
    if not plan.encoder:
        return None, StepResult("encoder", None, "zero-shot (packaged weights)", "skipped (--no-encoder)")
    try:
        train_encoder_cmd(repo=plan.repo, out=out, steps=plan.encoder_steps, lr=None, seed=plan.seed, start_from=None)
    except typer.Exit:  # the command said why (the data holds no pairs to train on)
        return None, StepResult("encoder", None, "zero-shot (packaged weights)", "the data cannot train it")
    verdict = json.loads((out / VALIDATION_FILE).read_text())
    kept = verdict["verdict"] == "fine-tuned"
    return out, StepResult("encoder", kept, "fine-tuned" if kept else "zero-shot (packaged weights)", verdict["says"])


def _interest(plan: Plan, encoder: Path | None, console: Console) -> tuple[Path | None, StepResult]:
    import shutil

    from cli.app import train_interest_cmd

    out, report = plan.models / "interest", plan.reports / "interest"
    shutil.rmtree(out, ignore_errors=True)  # an earlier run's model must not pass for this one's
    (report / "validation.json").unlink(missing_ok=True)

    def says() -> str:  # the command's own verdict line, from its report
        verdict = report / "validation.json"
        return json.loads(verdict.read_text()).get("summary", "") if verdict.is_file() else ""

    try:
        train_interest_cmd(repo=plan.repo, out=out, encoder=encoder, model="auto", steps=plan.interest_steps, lr=None,
                           seed=plan.seed, report=report)
    except typer.Exit:  # nothing beat the untrained formula, or the data cannot train it (the command said which)
        shutil.rmtree(out, ignore_errors=True)
        return None, StepResult("interest model", False, "the untrained formula (the gateway's fallback)",
                                says() or "the data cannot train it (see above)")
    from scorer.models.interest import load_interest_model

    return out, StepResult("interest model", True, f"trained: the {load_interest_model(out).kind} model", says())


def _export(plan: Plan, encoder: Path | None, interest: Path | None, console: Console) -> dict[str, int]:
    from contract.tensors import RANKER_ONNX
    from modelrepo.layout import read_validation, versions
    from scorer.export.encoder_export import export_encoder
    from scorer.export.interest_export import export_interest
    from scorer.export.ranker_export import export_ranker
    from scorer.models.encoder import EncoderConfig, TextEncoder
    from scorer.models.interest import load_interest_model

    out: dict[str, int] = {}
    with console.status("exporting the encoder (int8) and the interest model into the model repository"):
        out["encoder"] = export_encoder(plan.model_repo, TextEncoder(EncoderConfig(model_path=str(encoder)))
                                        if encoder else TextEncoder(), int8=True)
        out["interest"] = export_interest(plan.model_repo, load_interest_model(interest) if interest else None,
                                          validation=read_validation(interest) if interest else None)
        if not versions(plan.model_repo, RANKER_ONNX.name):
            out["ranker"] = export_ranker(plan.model_repo, int8=True)
    console.print("exported " + ", ".join(f"{m} v{v}" for m, v in out.items()) + f" into {plan.model_repo}")
    return out


def _next_item(plan: Plan, console: Console) -> tuple[int | None, StepResult]:
    from cli.next_item_training import run
    from contract.tensors import NEXT_ITEM_MODEL
    from modelrepo.layout import read_validation, versions
    from scorer.train.data import CannotTrain

    report = plan.reports / "next_item"
    earlier = versions(plan.model_repo, NEXT_ITEM_MODEL.name)
    without = (f"next_item_onnx v{earlier[-1]}, an earlier version already in the repository" if earlier
               else "no next-item source")
    try:
        version = run(plan.repo, plan.model_repo, report, plan.next_item_seconds, 200, plan.seed, 0.0, console)
    except CannotTrain as e:
        console.print(f"[yellow]cannot train the next-item model[/]: {e}")
        return None, StepResult("next-item model", None, without, str(e))
    if version is None:
        return None, StepResult("next-item model", False, without, "no gain over popularity beyond noise on the "
                                f"confirm half of validation; report: {report / 'report.md'}")
    v = read_validation(plan.model_repo / NEXT_ITEM_MODEL.name / str(version)) or {}
    return version, StepResult("next-item model", True, f"next_item_onnx v{version} (a candidate source)",
                               f"confirm half NDCG@10 {v.get('model', float('nan')):.4f} vs popularity "
                               f"{v.get('popularity', float('nan')):.4f}; report: {report / 'report.md'}")


def _ranker(plan: Plan, console: Console) -> tuple[int | None, StepResult]:
    """`recsys train ranker`, exported only when its verdict says it beat the blend (the gateway's
    ranker_mode auto then applies it; one that lost would be served but never applied, so it is
    not exported, as the next-item model that loses to popularity is not)."""
    from cli.app import train_ranker_cmd
    from contract.ranker_inputs import RANKER_VERDICT_PARAMETER
    from contract.tensors import RANKER_ONNX
    from modelrepo.layout import read_validation, versions
    from scorer.export.ranker_export import export_ranker
    from scorer.models.ranker import CrossEncoderRanker
    from scorer.train.data import SHOWN_LISTS, CannotTrain, require_source

    earlier = versions(plan.model_repo, RANKER_ONNX.name)
    proven = bool(earlier) and (read_validation(plan.model_repo / RANKER_ONNX.name / str(earlier[-1])) or {}).get(
        RANKER_VERDICT_PARAMETER) is True
    without = (f"ranker_onnx v{earlier[-1]}, applied (its verdict: it beat the blend)" if proven
               else "no ranker applied: the blend's order (ranker_mode auto)")
    if plan.ranker_steps == 0:
        return None, StepResult("ranker", None, without, "skipped (--ranker-steps 0)")
    try:
        source = require_source(plan.repo, "ranker")
    except CannotTrain as e:
        return None, StepResult("ranker", None, without, str(e))
    if source.source != SHOWN_LISTS:
        console.print("[yellow]not training the ranker[/]: the log has no impressions, so its lists would be "
                      "sampled (an interaction against random items) and there is no served order to beat; "
                      "ranker_mode auto would not apply it (docs/models.md)")
        return None, StepResult("ranker", None, without, "no impressions: no served order to beat (not trained)")
    out = plan.models / "ranker"
    try:
        train_ranker_cmd(repo=plan.repo, out=out, steps=plan.ranker_steps, seed=plan.seed,
                         report=plan.reports / "ranker", layers=None)
    except typer.Exit:  # the command said why
        return None, StepResult("ranker", None, without, "the data cannot train it (see above)")
    verdict = read_validation(out) or {}
    detail = (f"holdout {verdict.get('metric', '?')} {verdict.get('ranker', float('nan')):.4f} vs the logged order "
              f"{verdict.get('blend', float('nan')):.4f} ({verdict.get('lists', 0)} lists)")
    if verdict.get(RANKER_VERDICT_PARAMETER) is not True:
        return None, StepResult("ranker", False, without, detail)
    with console.status("exporting the fine-tuned ranker (int8)"):
        version = export_ranker(plan.model_repo, CrossEncoderRanker.load(out).eval(), int8=True, validation=verdict)
    console.print(f"exported {RANKER_ONNX.name}/{version} (it beat the blend) into {plan.model_repo}")
    return version, StepResult("ranker", True, f"ranker_onnx v{version}, applied (it beat the blend)", detail)


def confirm_says(g: PairedGain, versus: str) -> str:
    """A fusion gate's verdict in one line: NDCG@10 on the confirm half against what it must beat."""
    return f"confirm half NDCG@10 {g.candidate:.4f} vs {versus} {g.baseline:.4f} (gain {g.gain:+.4f} ± {g.se:.4f})"


def _rank_fusion(plan: Plan, console: Console) -> tuple[Path | None, StepResult]:
    """The rank fusion's weights and co-visitation seeds for this shop (`recsys tune fusion`), unless
    --config names the settings the gateway serves with (then those are the rank fusion)."""
    from cli.fusion_tuning import CannotTune, tune_fusion

    if plan.config is not None:
        return plan.config, StepResult("rank fusion", None, f"the settings in {plan.config}", "given (--config)")
    if not plan.tune:
        return None, StepResult("rank fusion", None, "the defaults", "skipped (--no-tune)")
    out = plan.models / "rank_fusion.toml"
    out.unlink(missing_ok=True)  # an earlier run's choice was made on another log
    try:
        t = tune_fusion(plan.repo, out, seed=plan.seed)
    except CannotTune as e:
        console.print(f"[yellow]cannot tune the fusion[/]: {e}")
        return None, StepResult("rank fusion", None, "the defaults", str(e))
    detail = confirm_says(t.confirm.gain, "the defaults")
    if not t.changes:
        return None, StepResult("rank fusion", False, "the defaults", detail if t.chosen != t.start
                                else "the defaults are the best found on the choice half")
    return out, StepResult("rank fusion", True, f"the weights and seeds in {out.name}", detail)


def _fusion(plan: Plan, encoder: Path | None, rank_fusion: Path | None,
            console: Console) -> tuple[Path | None, StepResult]:
    from cli.fusion_learning import served_interest_model, served_next_item_model, train_fusion
    from cli.fusion_tuning import CannotTune

    out = plan.models / "fusion" / "learned_fusion.json"
    out.unlink(missing_ok=True)  # an earlier run's model was fitted on other models' lists
    try:
        t = train_fusion(plan.repo, out, seed=plan.seed, config=rank_fusion,
                         interest_model=served_interest_model(plan.model_repo),
                         encoder=encoder, next_item_model=served_next_item_model(plan.model_repo))
    except CannotTune as e:
        console.print(f"[yellow]cannot train the fusion[/]: {e}")
        return None, StepResult("learned fusion", None, "the rank fusion (gateway settings)", str(e))
    detail = confirm_says(t.confirm.gain, "rank fusion")
    if not t.keeps:
        return None, StepResult("learned fusion", False, "the rank fusion (gateway settings)", detail)
    return out, StepResult("learned fusion", True, f"{out.name} for pages without a query", detail)


def write_settings(path: Path, learned_fusion: Path | None, base: Path | None = None) -> Path:
    """The gateway settings file that serves what was kept (read by `recsys serve --config`): the
    `base` file's settings (e.g. `recsys tune fusion`'s rank fusion) with `learned_fusion` set when
    one was kept (and removed when not). The key goes first: a TOML key after a [table] header
    would belong to that table."""
    import re
    import tomllib

    from gateway.config import load_settings

    kept = [line for line in (base.read_text().splitlines() if base else [])
            if not re.match(r"\s*learned_fusion\s*=", line)]
    head = ["# Written by `recsys train all`" + (f" from {base}" if base else "")
            + f": serve with `recsys serve --config {path}`."]
    if learned_fusion is not None:
        head.append(f"learned_fusion = {json.dumps(str(learned_fusion.resolve()))}")
    else:
        head.append("# No learned fusion was kept: the gateway scores pages without a query by its rank fusion.")
    text = "\n".join(head + kept) + "\n"
    tomllib.loads(text)  # a file the gateway could not read is never written
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    load_settings(partial)
    partial.replace(path)
    return path


def _publish(plan: Plan, exported: dict[str, int], console: Console) -> None:
    from modelrepo.publish import publish

    for model, version in exported.items():
        publish(plan.url, plan.model_repo, model, version)
        console.print(f"published {model} v{version} to {plan.url}")


def summary_table(results: list[StepResult]) -> Table:
    table = Table("model", "kept", "the gateway serves", "why", title="recsys train all: what each gate kept")
    for r in results:
        kept = {True: "[green]yes[/]", False: "[yellow]no[/]", None: "-"}[r.kept]
        table.add_row(r.step, kept, r.serves, r.detail)
    return table


@dataclass
class Trained:
    results: list[StepResult]  # one per model, in training order
    exported: dict[str, int]  # model -> the version exported by this run (next_item, a fine-tuned ranker: only when kept)
    encoder: Path | None  # the encoder checkpoint served (None: the packaged zero-shot weights)
    fusion: Path | None  # the learned fusion file (None: not kept; the rank fusion serves)
    settings: Path  # the gateway settings file that serves what was kept


def train_all(plan: Plan, console: Console) -> Trained:
    """The steps in order; prints what each gate kept and how to serve it."""
    console.rule("train all 1/7: the encoder")
    encoder, enc = _encoder(plan, console)
    console.rule("train all 2/7: the interest model")
    interest, inter = _interest(plan, encoder, console)
    console.rule("train all 3/7: export to Triton's model repository")
    exported = _export(plan, encoder, interest, console)
    console.rule("train all 4/7: the next-item model")
    next_item, nxt = _next_item(plan, console)
    if next_item is not None:
        exported["next_item"] = next_item
    console.rule("train all 5/7: the rank fusion's weights for this shop")
    rank_fusion, rank = _rank_fusion(plan, console)
    console.rule("train all 6/7: the learned fusion of the no-query sources")
    fusion, fus = _fusion(plan, encoder, rank_fusion, console)
    console.rule("train all 7/7: the ranker")
    ranker, rnk = _ranker(plan, console)
    if ranker is not None:
        exported["ranker"] = ranker
    settings = write_settings(plan.settings_out, fusion, rank_fusion)
    if plan.url:
        _publish(plan, exported, console)
    results = [enc, inter, nxt, rank, fus, rnk]
    console.print(summary_table(results))
    start = (f"Triton at {plan.url} serves the new versions" if plan.url
             else f"start Triton on the model repository (`recsys triton serve --repo {plan.model_repo}`: a fresh "
                  "start serves the newest versions)")
    console.print(f"to serve: {start}, then `recsys serve --config {settings}`")
    # The retrain loop's registry starts from what Triton serves; it must know which checkpoints made it.
    serving = "".join(f" --serving-{flag}checkpoint {path}" for flag, path in
                      (("", encoder), ("interest-", interest), ("ranker-", plan.models / "ranker" if ranker else None))
                      if path is not None)
    console.print(f"to keep them fresh: `recsys retrain --repo {plan.repo} --model-repo {plan.model_repo}{serving} "
                  f"--gateway-config {settings}` (it also refits the learned fusion after a promotion)")
    return Trained(results, exported, encoder, fusion, settings)
