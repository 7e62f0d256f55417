"""`recsys retrain --gateway-config FILE`: fit the learned fusion again after a round that promoted
one of the models it reads.

The learned fusion is fitted on the candidate lists of the models served when it was trained: the
interest model's ranks and cosines, the next-item model's ranks and log-probabilities, the
encoder's item vectors (cli/fusion_learning.py). A round of the retrain loop that promotes a new
version of one of them changes those lists under a fusion that never saw them, and nothing else
in the loop would notice. So after such a round the loop fits the fusion again on the lists of what
serves now and replaces the file the gateway's `learned_fusion` setting names only when the new fit
beats both the rank fusion and the file in place on the confirm half of validation (the same rule
as every model gate). The gateway reloads the file by itself (gateway/learned_fusion.py
FusionFileWatch): no restart, and a file it cannot read leaves the old model serving.

`recsys rollback --gateway-config FILE` does the same after it serves an earlier version of one of
those models again: the file in place was fitted on the lists of the version rolled back from.
Both fit on the versions the registry says are serving, not the newest in the repository (after a
rollback the newest is the one taken out of service).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from scorer.retrain import Registry, RetrainResult

# The models whose lists or vectors the learned fusion's features are computed from.
FUSION_INPUTS = ("encoder", "interest", "next_item")


def promoted_inputs(results: list[RetrainResult]) -> list[str]:
    return [r.model for r in results if r.promoted and r.model in FUSION_INPUTS]


def refresh_fusion(results: list[RetrainResult], repo: Path, model_repo: Path, registry_path: Path,
                   gateway_config: Path | None, margin: float = 0.0, log: Callable[[str], object] = print):
    """After one round: fit the learned fusion again when the round promoted one of its inputs and the
    gateway serves a learned fusion (its settings file names one); returns the FusionTraining, or None
    when there was nothing to do or the shop's log cannot train it."""
    promoted = promoted_inputs(results)
    if not promoted:
        return None
    return refit_fusion(f"{', '.join(promoted)} promoted", repo, model_repo, registry_path, gateway_config, margin, log)


def refit_fusion(why: str, repo: Path, model_repo: Path, registry_path: Path, gateway_config: Path | None,
                 margin: float = 0.0, log: Callable[[str], object] = print):
    """Fit the learned fusion the gateway's settings name again on the lists of the versions serving
    now (the registry's), replacing the file only if the new fit beats it and the rank fusion; `why`
    says what changed. None when the settings name no learned fusion or the log cannot train it."""
    from cli.fusion_learning import served_interest_model, served_next_item_model, train_fusion
    from cli.fusion_tuning import CannotTune
    from gateway.config import load_settings

    fusion_file = load_settings(gateway_config).learned_fusion
    if fusion_file is None:
        where = gateway_config or "the default settings (no --gateway-config)"
        log(f"retrain fusion: {why}; {where} name no learned fusion, so none is refit "
            "(a gateway serving one with other settings keeps a fusion fitted on the models before this change: "
            "pass its settings file as --gateway-config)")
        return None
    log(f"retrain fusion: {why}: fitting the learned fusion {fusion_file} again on the lists of the models serving now")
    registry = Registry.load(registry_path)
    try:
        t = train_fusion(repo, fusion_file, margin=margin, config=gateway_config,
                         interest_model=served_interest_model(model_repo, registry.entry("interest").serving),
                         encoder=registry.entry("encoder").serving_checkpoint(),
                         next_item_model=served_next_item_model(model_repo, registry.entry("next_item").serving),
                         incumbent=fusion_file)
    except CannotTune as e:
        log(f"retrain fusion: skipped: {e}")
        return None
    log(f"retrain fusion: {'replaced' if t.keeps else 'kept the file in place'} ({fusion_file})")
    return t
