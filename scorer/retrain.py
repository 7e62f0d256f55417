"""Retrain, gate, promote, roll back: the encoder's closed loop.

    retrain -> fine-tune from the serving checkpoint on the label log (through Feast)
            -> evaluate candidate vs serving on the time-split holdout (report either way)
            -> promote only if NDCG@10 improves by `margin`: export a new Triton version and
               publish it with zero downtime (scorer/triton/publish.py); the gateway notices the
               version, re-embeds the catalog and swaps its index
    rollback -> publish the previous version again (its files stay in the model repository)

The registry (`var/models/registry.json`) records which checkpoint made which version, what
serves now, the promotion history, and when training last ran (for the new-labels trigger).
The ranker and the interest model are not in the loop yet (docs/feedback.md).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd


@dataclass
class Registry:
    path: Path
    serving: int | None = None  # encoder version serving now
    checkpoints: dict[str, str] = field(default_factory=dict)  # version -> checkpoint dir ("" = packaged)
    history: list[int] = field(default_factory=list)  # promotions, oldest first
    last_trained_at: str | None = None  # ISO time of the newest label used in training

    @classmethod
    def load(cls, path: Path) -> "Registry":
        if not path.exists():
            return cls(path)
        data = json.loads(path.read_text())
        return cls(path, data.get("serving"), data.get("checkpoints", {}), data.get("history", []),
                   data.get("last_trained_at"))

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"serving": self.serving, "checkpoints": self.checkpoints, "history": self.history,
                                   "last_trained_at": self.last_trained_at}, indent=2))
        tmp.replace(self.path)

    def serving_checkpoint(self) -> Path | None:
        ckpt = self.checkpoints.get(str(self.serving)) if self.serving is not None else None
        return Path(ckpt) if ckpt else None


@dataclass
class RetrainResult:
    promoted: bool
    reason: str
    serving_ndcg: float
    candidate_ndcg: float
    version: int | None
    report: Path | None


def adopt_serving(registry: Registry, version: int, checkpoint: Path | None) -> None:
    """Start a registry from what serves now (e.g. the version `make demo` published)."""
    registry.serving = version
    registry.checkpoints[str(version)] = str(checkpoint) if checkpoint else ""
    registry.history = [version]
    registry.save()


def serving_version_in_triton(triton_url: str) -> int | None:
    import tritonclient.grpc as grpcclient

    from scorer.triton.publish import ENCODER_COMPONENTS, ready_versions, serving_version

    client = grpcclient.InferenceServerClient(triton_url)
    try:
        pinned = serving_version(client)
        loaded = ready_versions(client, ENCODER_COMPONENTS[-1])
        return pinned if pinned is not None else (loaded[-1] if loaded else None)
    finally:
        client.close()


def new_labels_since(offline_dir: Path, since: str | None) -> int:
    labels = pd.read_parquet(offline_dir / "labels.parquet", columns=["event_timestamp", "grade"])
    positives = labels[labels["grade"] > 0]
    return len(positives) if since is None else int((positives["event_timestamp"] > pd.Timestamp(since)).sum())


def retrain_encoder(repo: Path, model_repo: Path, triton_url: str | None, registry: Registry, work_dir: Path,
                    steps: int = 200, margin: float = 0.005, lr: float = 1e-4, seed: int = 0,
                    log=print) -> RetrainResult:
    """One round of the loop for the encoder. `triton_url` None: export but do not publish."""
    from scorer.eval.retrieval_eval import build_eval_set, encoder_scorer, evaluate, write_report
    from scorer.export.encoder_export import export_encoder
    from scorer.models.encoder import EncoderConfig, TextEncoder
    from scorer.train.data import load_labelled_requests
    from scorer.train.encoder_train import EncoderTrainConfig, train_encoder, training_pairs

    offline = repo / "data" / "offline"
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    data = load_labelled_requests(repo)
    serving_ckpt = registry.serving_checkpoint()
    log(f"retrain: {len(data.train):,} training labels, serving encoder v{registry.serving} "
        f"({serving_ckpt or 'packaged weights'})")
    candidate_dir = work_dir / f"encoder-{stamp}"
    train_encoder(training_pairs(data.train), candidate_dir, EncoderTrainConfig(max_steps=steps, lr=lr, seed=seed),
                  start_from=serving_ckpt)
    ev = build_eval_set(data, pd.read_parquet(offline / "items.parquet"), pd.read_parquet(offline / "events.parquet"))
    serving_model = TextEncoder(EncoderConfig(model_path=str(serving_ckpt))) if serving_ckpt else TextEncoder()
    candidate = TextEncoder(EncoderConfig(model_path=str(candidate_dir)))
    result = evaluate(ev, {"serving": encoder_scorer(ev, serving_model), "candidate": encoder_scorer(ev, candidate)})
    report = write_report(result, work_dir / f"report-{stamp}", title=f"Retrain {stamp}: candidate vs serving")
    before, after = result.metrics["serving"]["all"]["ndcg@10"], result.metrics["candidate"]["all"]["ndcg@10"]
    registry.last_trained_at = str(data.rows["event_timestamp"].max())
    if after < before + margin:
        registry.save()
        reason = f"not promoted: NDCG@10 {after:.4f} vs serving {before:.4f} (margin {margin})"
        log(f"retrain: {reason}; report {report}")
        return RetrainResult(False, reason, before, after, None, report)
    version = export_encoder(model_repo, candidate)
    if triton_url:
        from scorer.triton.publish import publish_encoder

        publish_encoder(triton_url, model_repo, version)
    registry.checkpoints[str(version)] = str(candidate_dir)
    registry.serving = version
    registry.history.append(version)
    registry.save()
    reason = f"promoted v{version}: NDCG@10 {before:.4f} -> {after:.4f}"
    log(f"retrain: {reason}; report {report}")
    return RetrainResult(True, reason, before, after, version, report)


def rollback_encoder(model_repo: Path, triton_url: str, registry: Registry) -> int:
    """Serve the version promoted before the current one again; return it."""
    from scorer.triton.publish import publish_encoder

    if len(registry.history) < 2:
        raise RuntimeError("nothing to roll back to: fewer than two promotions in the registry")
    registry.history.pop()
    previous = registry.history[-1]
    publish_encoder(triton_url, model_repo, previous)
    registry.serving = previous
    registry.save()
    return previous


def run_loop(repo: Path, model_repo: Path, triton_url: str | None, registry_path: Path, work_dir: Path,
             min_new_labels: int, every_s: float | None, **train_kwargs) -> None:
    """Retrain whenever `min_new_labels` positive labels arrived since the last run; check every
    `every_s` seconds (None: check once)."""
    while True:
        registry = Registry.load(registry_path)
        fresh = new_labels_since(repo / "data" / "offline", registry.last_trained_at)
        if fresh >= min_new_labels:
            retrain_encoder(repo, model_repo, triton_url, registry, work_dir, **train_kwargs)
        else:
            print(f"retrain: {fresh} new positive labels (< {min_new_labels}); nothing to do", flush=True)
        if every_s is None:
            return
        time.sleep(every_s)
