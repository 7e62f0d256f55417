"""Switch a Triton model (encoder, ranker, interest model, next-item model) to a new version with no failed requests
(explicit model control).

Order of operations:
1. load the new version of each component *beside* the serving one (version_policy: specific
   [old, new]); traffic still flows through the old one;
2. re-load the ensemble with every step pinned to the new version: one atomic switch, in-flight
   requests finish on the old graph;
3. unload the old component versions; for the encoder, the previous version stays loaded: every
   gateway's item index holds the previous encoder's vectors until it has re-embedded the catalog,
   and meanwhile embeds its queries with that version (pinned component calls), so queries and
   items always come from the same encoder. The version before the previous one is unloaded.
Rolling back is the same call with the old version number (its files stay in the repository).
"""

from __future__ import annotations

from pathlib import Path

import tritonclient.grpc as grpcclient
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2

from contract.ranker_inputs import RANKER_VERDICT_PARAMETER
from contract.tensors import ENCODER_ONNX, INTEREST_MODEL, NEXT_ITEM_MODEL, PAIR_TOKENIZER, RANKER_ONNX, TEXT_TOKENIZER
from modelrepo.admin import AdminClient
from modelrepo.layout import read_validation

ENCODER_COMPONENTS = (TEXT_TOKENIZER.name, ENCODER_ONNX.name)
RANKER_COMPONENTS = (PAIR_TOKENIZER.name, RANKER_ONNX.name)
INTEREST_COMPONENTS = (INTEREST_MODEL.name,)
NEXT_ITEM_COMPONENTS = (NEXT_ITEM_MODEL.name,)


def read_config(repo: Path, model: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse((repo / model / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def load_with_versions(client: grpcclient.InferenceServerClient, repo: Path, model: str, versions: list[int]) -> None:
    config = read_config(repo, model)
    config.version_policy.specific.versions[:] = sorted(set(versions))
    client.load_model(model, config=json_format.MessageToJson(config))


def pin_ensemble(client: grpcclient.InferenceServerClient, repo: Path, ensemble: str, version: int) -> None:
    """Re-load `ensemble` with every step pinned to `version` and the verdict of that version's
    weights set in its config (`ensemble_verdict`; a version without one carries none). Every pin
    goes through here (publish, rollback, a restarted server's restore, a fresh start's
    `pin_verdicts`), so the gateway's ranker_mode auto sees the same verdict after each."""
    config = read_config(repo, ensemble)
    for step in config.ensemble_scheduling.step:
        step.model_version = version
    for key, value in ensemble_verdict(repo, config, version).items():
        config.parameters[key].string_value = value
    client.load_model(ensemble, config=json_format.MessageToJson(config))


def verdict_parameters(repo: Path, weights_model: str, version: int) -> dict[str, str]:
    """The ensemble parameters that carry a version's validation verdict (empty: it has none)."""
    validation = read_validation(repo / weights_model / str(version))
    if validation is None or RANKER_VERDICT_PARAMETER not in validation:
        return {}
    return {RANKER_VERDICT_PARAMETER: "true" if validation[RANKER_VERDICT_PARAMETER] is True else "false"}


def ensemble_verdict(repo: Path, config: model_config_pb2.ModelConfig, version: int) -> dict[str, str]:
    """The verdict parameters of an ensemble served at `version`: those its steps' version folders
    carry (the ranker's `beats_blend`, beside ranker_onnx/<version>)."""
    params: dict[str, str] = {}
    for step in config.ensemble_scheduling.step:
        params.update(verdict_parameters(repo, step.model_name, version))
    return params


def pin_verdicts(url: str, repo: Path, admin_key: str | None = None) -> dict[str, int]:
    """After a fresh start: pin each loaded ensemble whose served version has a verdict to that
    version, with the verdict in its config; return {ensemble: version} for what was pinned.

    Why: a fresh server loads each ensemble with the committed config.pbtxt (unpinned: the newest
    version), which carries no verdict, so a ranker exported with `beats_blend` true (`recsys export
    ranker`, `recsys train all` without --url) would never be applied by ranker_mode auto until
    someone published it. Writing the verdict into the committed config instead would edit a
    tracked file and go stale at the next export. Only ensembles with a verdict are re-loaded."""
    client = AdminClient(url, admin_key)
    pinned: dict[str, int] = {}
    try:
        ready: dict[str, list[int]] = {}  # one index read: model -> its READY versions
        for m in client.get_model_repository_index(as_json=True).get("models", []):
            if m.get("state") == "READY" and m.get("version", "").isdigit():
                ready.setdefault(m["name"], []).append(int(m["version"]))
        for name in ready:
            if not (repo / name / "config.pbtxt").is_file():
                continue
            config = read_config(repo, name)
            if config.platform != "ensemble" or serving_version(client, name) is not None:
                continue  # a bare model, or an ensemble already pinned (its verdict came with the pin)
            # Unpinned, each step serves its newest loaded version; one version for all of them
            # (the exporters version a model's components together) is the one to pin.
            newest = {max(ready.get(s.model_name, []), default=0) for s in config.ensemble_scheduling.step}
            version = newest.pop() if len(newest) == 1 else 0
            if version and ensemble_verdict(repo, config, version):
                pin_ensemble(client, repo, name, version)
                pinned[name] = version
        return pinned
    finally:
        client.close()


def serving_version(client: grpcclient.InferenceServerClient, ensemble: str = "encoder") -> int | None:
    """The version the ensemble's steps are pinned to (None: unpinned, i.e. latest)."""
    config = client.get_model_config(ensemble, as_json=True)["config"]
    pinned = {int(s.get("model_version", -1)) for s in config["ensemble_scheduling"]["step"]}
    return pinned.pop() if len(pinned) == 1 and -1 not in pinned else None


def ready_versions(client: grpcclient.InferenceServerClient, model: str) -> list[int]:
    index = client.get_model_repository_index(as_json=True).get("models", [])
    return sorted(int(m["version"]) for m in index if m["name"] == model and m.get("state") == "READY")


def publish_model(url: str, repo: Path, version: int, components: tuple[str, ...], ensemble: str | None = None,
                  keep_previous: bool = False) -> int | None:
    """Make `version` of `components` the serving one (pinned in `ensemble` when there is one);
    return the version it replaced (None if none was loaded). `keep_previous` leaves the replaced
    version loaded (only for an ensemble: a bare model serves its newest loaded version)."""
    if keep_previous and not ensemble:
        raise ValueError("keep_previous needs an ensemble that pins the serving version")
    client = AdminClient(url)
    try:
        old = serving_version(client, ensemble) if ensemble else None
        if old is None:  # unpinned ensemble (fresh start) or a bare model: the newest loaded version serves
            loaded = ready_versions(client, components[-1])
            old = loaded[-1] if loaded else None
        keep = [version] + ([old] if old is not None and old != version else [])
        for model in components:
            load_with_versions(client, repo, model, keep)
        if ensemble:
            pin_ensemble(client, repo, ensemble, version)
        for model in components:
            load_with_versions(client, repo, model, keep if keep_previous else [version])
        return old
    finally:
        client.close()


def publish_encoder(url: str, repo: Path, version: int) -> int | None:
    """Make `version` the serving encoder; return the version it replaced (None if none was loaded)."""
    return publish(url, repo, "encoder", version)


# model -> (ensemble that pins it, or None; its components, the last one being the weights)
# The encoder's previous version stays loaded after a switch (module docstring, step 3).
KEEP_PREVIOUS = {"encoder"}
COMPONENTS = {"encoder": ("encoder", ENCODER_COMPONENTS), "ranker": ("ranker", RANKER_COMPONENTS),
              "interest": (None, INTEREST_COMPONENTS), "next_item": (None, NEXT_ITEM_COMPONENTS)}


class PublishError(RuntimeError):
    """A publish to several Triton replicas stopped part-way: says which serve the new version."""


def replica_urls(url: str) -> list[str]:
    """`host:port[,host:port...]`: the Triton replicas that serve one model repository."""
    urls = [u.strip() for u in url.split(",")]
    if not url.strip() or any(not u for u in urls):
        raise ValueError(f"Triton url {url!r}: one address or a comma-separated list of addresses, none empty")
    return urls


def publish(url: str, repo: Path, model: str, version: int) -> int | None:
    """Make `version` of `model` (encoder, ranker, interest or next_item) the serving one, with zero downtime.

    `url` may list several replicas (comma-separated, as the gateway's `triton_urls`): they switch one
    after the other, so while one loads the others serve and the gateway's pool (gateway/triton_pool.py)
    keeps answering; the encoder's previous version stays loaded on each (KEEP_PREVIOUS), so a query
    embedded with either version finds it on every replica during the rollout. Returns the version
    the first replica served before."""
    ensemble, components = COMPONENTS[model]
    urls = replica_urls(url)
    old: int | None = None
    for i, one in enumerate(urls):
        try:
            replaced = publish_model(one, repo, version, components, ensemble, keep_previous=model in KEEP_PREVIOUS)
        except Exception as e:
            if len(urls) == 1:
                raise
            done = ", ".join(urls[:i]) or "none"
            raise PublishError(f"publishing {model} v{version} stopped at {one} ({type(e).__name__}: {e}); "
                               f"serving v{version} already: {done}; publish again to finish") from e
        if i == 0:
            old = replaced
    return old
