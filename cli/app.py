"""`recsys`: the project's command line (data, features, demo).

Heavy imports (feast, pandas, torch) happen inside the commands, so `recsys --help` stays instant.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from scorer.data.feast_ops import FEATURE_REPO, PROJECT_ROOT

app = typer.Typer(help="Real-time recommendation engine: data, features, demo.", no_args_is_help=True)
data_app = typer.Typer(help="Generate, validate and import data sets.", no_args_is_help=True)
features_app = typer.Typer(help="Inspect online features.", no_args_is_help=True)
export_app = typer.Typer(help="Export models into the Triton model repository.", no_args_is_help=True)
triton_app = typer.Typer(help="Run and control the local Triton server.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(features_app, name="features")
app.add_typer(export_app, name="export")
app.add_typer(triton_app, name="triton")
train_app = typer.Typer(help="Fine-tune models from the label log (through Feast).", no_args_is_help=True)
eval_app = typer.Typer(help="Offline evaluation against baselines.", no_args_is_help=True)
app.add_typer(train_app, name="train")
app.add_typer(eval_app, name="eval")
auth_app = typer.Typer(help="API keys for the gateway and the feedback service (docs/security.md).", no_args_is_help=True)
app.add_typer(auth_app, name="auth")
console = Console()

DEMO_SHOP_DIR = PROJECT_ROOT / "var" / "demo_shop"
AUTH_KEYS_FILE = PROJECT_ROOT / "var" / "auth" / "keys"
API_KEY_HELP = "API key sent as 'authorization: Bearer <key>' (env RECSYS_API_KEY)."
# The packaged ranker transformer (all-MiniLM-L6-v2) has 6 layers: `recsys train ranker --layers` keeps 0 (all) .. 6.
RANKER_MAX_LAYERS = 6


def append_key(path: Path, name: str, roles: list[str], key: str) -> None:
    """Append `key`'s hashed line to the key file, creating it (and its folder) owner-only (0600)."""
    import os

    from rpc.auth import key_line

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a") as f:
        f.write(key_line(name, roles, key) + "\n")


@auth_app.command("new-key")
def auth_new_key(
    name: str = typer.Argument(..., help="Who the key is for (logged as the caller), e.g. shop-web."),
    roles: str = typer.Argument(..., help="Comma-separated roles: recommend, events, internal, admin."),
    file: Path = typer.Option(AUTH_KEYS_FILE, "--file", help="Key file the services read (RECSYS_AUTH_KEYS_FILE)."),
) -> None:
    """Make an API key: print it once (only its hash is stored) and append its line to the key file."""
    from rpc.auth import ROLES, new_key, parse_keys

    role_list = [r.strip() for r in roles.split(",") if r.strip()]
    unknown = sorted(set(role_list) - set(ROLES))
    if unknown or not role_list:
        raise typer.BadParameter(f"unknown roles {unknown or '(none)'}; choose from {', '.join(ROLES)}",
                                 param_hint="ROLES")
    if not name or any(c.isspace() or c == "#" for c in name):
        raise typer.BadParameter("a name without spaces or '#'", param_hint="NAME")
    if file.exists() and any(k.name == name for k in parse_keys(file.read_text(), str(file)).values()):
        console.print(f"[yellow]note[/]: {file} already has a key named {name!r}; both are valid until you delete "
                      "the old line (that is how a key is rotated)")
    key = new_key()
    append_key(file, name, role_list, key)
    console.print(f"key [bold]{name}[/] ({', '.join(role_list)}) added to {file}; the services re-read it within "
                  "a second. The key (shown only now):")
    print(key)
    console.print(f"servers: export RECSYS_AUTH_KEYS_FILE={file.resolve()}\n"
                  f"callers: export RECSYS_API_KEY={key}   (or recsys query --api-key ...)")


@auth_app.command("roles")
def auth_roles() -> None:
    """Which methods each role may call."""
    from rpc.auth import roles_of

    for role, methods in roles_of().items():
        console.print(f"[bold]{role}[/]: {', '.join(methods) or '-'}")


privacy_app = typer.Typer(help="Pseudonymised ids and erasing a user (docs/security.md#privacy).", no_args_is_help=True)
app.add_typer(privacy_app, name="privacy")
PSEUDONYM_KEY_FILE = PROJECT_ROOT / "var" / "privacy" / "pseudonym.key"
EVENT_LOG_DIR = FEATURE_REPO / "data" / "events"


@privacy_app.command("new-key", help=(
    "Write a new pseudonym key (32 random bytes). Every process must use the same one: the gateway, the feedback "
    "service, `recsys data import` and `recsys privacy erase`. A new key unlinks all history stored under the old "
    "one (users look new): choose it once, before the first import."))
def privacy_new_key(
    file: Path = typer.Option(PSEUDONYM_KEY_FILE, "--file", help="Where to write the key (owner-only, 0600)."),
) -> None:
    import os

    from rpc.pseudonyms import KEY_FILE_ENV, new_key

    if file.exists():
        raise typer.BadParameter(f"{file} exists: replacing the key unlinks every stored profile, session and event "
                                 "from its user; delete the file yourself if that is what you want", param_hint="--file")
    file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(new_key() + "\n")
    console.print(f"pseudonym key written to {file} (0600). Give it to every service and to the import:\n"
                  f"  export {KEY_FILE_ENV}={file.resolve()}\n"
                  "then re-import the offline data (`recsys data import`) and materialize, so stored ids are pseudonyms.")


@privacy_app.command("pseudonym")
def privacy_pseudonym(user: str = typer.Argument(..., help="The shop's user id.")) -> None:
    """Print a user's pseudonym under the configured key (to find them in logs and stores)."""
    from contract.rules import id_error
    from rpc.pseudonyms import KEY_ENV, KEY_FILE_ENV, load

    if (problem := id_error(user)) is not None:
        raise typer.BadParameter(problem, param_hint="USER")
    pseudonyms = load()
    if not pseudonyms.on:
        console.print(f"[yellow]pseudonyms are off[/] (no {KEY_FILE_ENV} / {KEY_ENV}): ids are stored as they are")
    print(pseudonyms.user(user))


@privacy_app.command("erase", help=(
    "Erase a user from the event log, the label log and offline sources, the online store (live session included) "
    "and the learner's records, through the running feedback service (an admin key) or --offline; append an audit "
    "record that names the user by a keyed hash, never the id. Idempotent: a user with no data succeeds with zero "
    "counts. Not reached: backups, aggregates (item popularity), models trained before (docs/security.md#privacy)."))
def privacy_erase(
    user: str = typer.Argument(..., help="The shop's user id (raw; with pseudonyms on, its pseudonym is erased too)."),
    feedback: str = typer.Option("127.0.0.1:50052", help="The running feedback service (AdminService.EraseUser)."),
    api_key: Optional[str] = typer.Option(None, help="An admin API key (env RECSYS_API_KEY)."),
    offline: bool = typer.Option(False, "--offline", help="No service: erase from the files directly. Stop the "
                                                         "feedback service first (it holds sessions and learner "
                                                         "records in memory, and writes the event log)."),
    repo: Path = typer.Option(FEATURE_REPO, help="--offline: the feature repo (online store, data/offline)."),
    yaml: list[str] = typer.Option(["feature_store.yaml"], help="--offline: feature_store yaml(s) of the repo whose "
                                                               "online stores to erase from (repeat for SQLite and Redis)."),
    event_log: Path = typer.Option(EVENT_LOG_DIR, help="--offline: the feedback service's event log folder."),
    audit_file: Optional[Path] = typer.Option(None, help="--offline: the audit file (default: privacy_audit.jsonl in "
                                                          "the event log folder, as the service writes it)."),
) -> None:
    from contract.rules import id_error

    if (problem := id_error(user)) is not None:
        raise typer.BadParameter(problem, param_hint="USER")
    if offline:
        subject, removed, not_reached, where, pseudonymised = _erase_offline(user, repo, yaml, event_log, audit_file)
    else:
        subject, removed, not_reached, where, pseudonymised = _erase_online(user, feedback, api_key)
    table = Table("store", "removed", title=f"erased user (audit subject {subject})")
    for name, n in sorted(removed.items()):
        table.add_row(name, f"{n:,}")
    console.print(table)
    console.print(f"{sum(removed.values()):,} records removed; ids pseudonymised: {'yes' if pseudonymised else 'no'}; "
                  f"audit record appended to {where}")
    for line in not_reached:
        console.print(f"[yellow]not reached[/]: {line}")


def _erase_online(user: str, address: str, api_key: str | None) -> tuple[str, dict[str, int], list[str], str, bool]:
    import grpc

    from recsys.v1 import admin_pb2, admin_pb2_grpc
    from rpc.clients import channel

    with channel(address, api_key=api_key) as ch:
        try:
            reply = admin_pb2_grpc.AdminServiceStub(ch).EraseUser(admin_pb2.EraseUserRequest(user_id=user), timeout=300)
        except grpc.RpcError as e:
            console.print(f"[red]erase failed[/] ({e.code().name}): {e.details()}")
            if e.code() == grpc.StatusCode.UNAVAILABLE:
                console.print(f"is the feedback service running at {address}? Without it: --offline")
            raise typer.Exit(1) from None
    return reply.subject, dict(reply.removed), list(reply.not_reached), reply.audit_file, reply.pseudonymised


def _erase_offline(user: str, repo: Path, yamls: list[str], event_log: Path,
                   audit_file: Path | None) -> tuple[str, dict[str, int], list[str], str, bool]:
    import asyncio

    from feedback.erase import AUDIT_FILE, Stores, erase_user, offline_operator
    from rpc.pseudonyms import load
    from scorer.data.feast_ops import load_store

    with console.status("loading the feature store"):
        stores = Stores(audit_file or event_log / AUDIT_FILE, event_log_dir=event_log,
                        online=[load_store(repo, y) for y in yamls], offline_dir=repo / "data" / "offline")
    stores.not_configured.append("the learner's in-memory records: they live in the running feedback service "
                                 "(held at most a few minutes; gone when it stopped)")
    with console.status("erasing"):
        done = asyncio.run(erase_user(user, load(), stores, by=offline_operator()))
    return done.subject, done.removed, done.not_reached, str(done.audit_file), done.pseudonymised


@data_app.command("generate")
def data_generate(
    out: Path = typer.Option(DEMO_SHOP_DIR, help="Output folder (generic format: items/users/events.parquet)."),
    size: str = typer.Option("demo", help="tiny | small | demo (~5k items, 2k users, ~100k events)."),
    seed: int = typer.Option(7, help="Random seed: same seed and end time, same shop."),
    end: Optional[datetime] = typer.Option(None, help="End of the simulated period (UTC). Default: this hour."),
) -> None:
    """Generate a synthetic shop (see docs/synthetic_shop.md)."""
    from scorer.data.synthetic import SIZES, generate_shop

    if size not in SIZES:
        raise typer.BadParameter(f"size must be one of {', '.join(SIZES)}", param_hint="--size")
    end_utc = end.replace(tzinfo=timezone.utc) if end and end.tzinfo is None else end
    with console.status(f"generating the {size} shop (seed {seed})"):
        shop = generate_shop(size, seed=seed, end=end_utc)
        shop.write(out)
    counts = shop.events["event_type"].value_counts().to_dict()
    console.print(
        f"[green]wrote[/] {out}: {len(shop.items):,} items, {len(shop.users):,} users, "
        f"{len(shop.events):,} events {counts}"
    )


@data_app.command("import")
def data_import(
    source: Path = typer.Argument(..., help="Folder with items, users, events (.parquet or .csv)."),
    repo: Path = typer.Option(FEATURE_REPO, help="Feature repo whose data/offline/ receives the tables."),
    as_of: Optional[datetime] = typer.Option(None, "--as-of", help="Time of the profiles' and popularity's current "
                                             "snapshot (UTC; default now): TTLs count from it (docs/data_format.md)."),
) -> None:
    """Validate every row of a data set and write the feature repo's offline sources (user and session
    ids as pseudonyms when a pseudonym key is configured: RECSYS_PSEUDONYM_KEY_FILE)."""
    from contextlib import nullcontext

    from rpc.pseudonyms import load
    from scorer.data.importer import ImportValidationError, import_dataset
    from scorer.data.pseudonymise import pseudonymised_copy

    t0 = time.perf_counter()
    pseudonyms = load()
    try:
        with console.status("importing") as status, \
                (pseudonymised_copy(source, pseudonyms) if pseudonyms.on else nullcontext(source)) as data:
            counts = import_dataset(data, repo / "data" / "offline", progress=lambda m: status.update(f"importing: {m}"),
                                    as_of=as_of, notes=lambda m: console.print(f"[yellow]note[/]: {m}"))
    except ImportValidationError as e:
        console.print(f"[red]import failed, nothing written:[/] {e}")
        raise typer.Exit(1) from None
    table = Table("table", "rows", title=f"imported into {repo / 'data' / 'offline'} in {time.perf_counter() - t0:.1f}s"
                                         + (" (ids pseudonymised)" if pseudonyms.on else ""))
    for name, n in counts.items():
        table.add_row(name, f"{n:,}")
    console.print(table)
    from cli.data_summary import print_import_summary

    print_import_summary(console, repo)


@data_app.command("labels")
def data_labels(
    repo: Path = typer.Option(FEATURE_REPO, help="Feature repo whose data/offline holds events.parquet."),
    event_log: Optional[Path] = typer.Option(None, help="The feedback service's event log folder to include."),
) -> None:
    """Rebuild labels.parquet (Feast source labels_source): impressions + attributed interactions."""
    from scorer.data.labels import build_labels

    labels = build_labels(repo / "data" / "offline", event_log)
    counts = labels["grade"].value_counts().sort_index().to_dict()
    console.print(f"[green]wrote[/] {len(labels):,} labels (grade counts {counts}) to {repo / 'data' / 'offline' / 'labels.parquet'}")


@features_app.command("show")
def features_show(
    user: str = typer.Option(..., help="User id."),
    items: str = typer.Option("", help="Comma-separated item ids."),
    repo: Path = typer.Option(FEATURE_REPO, help="Feature repo."),
    yaml: Optional[str] = typer.Option(None, help="Alternative feature_store yaml in the repo (e.g. the Redis one)."),
) -> None:
    """Read one user + items through the fast online reader and print them (the user's pseudonym
    when a pseudonym key is configured)."""
    from rpc.pseudonyms import load

    show_features(load().user(user), [i for i in items.split(",") if i], repo, yaml)


def show_features(user: str, item_ids: list[str], repo: Path, yaml: str | None = None) -> None:
    from gateway.features.layout import FeatureLayout
    from gateway.features.online_reader import open_reader
    from scorer.data.feast_ops import load_store

    store = load_store(repo, yaml)
    reader = open_reader(store.config, FeatureLayout.from_feature_store(store), repo)
    t0 = time.perf_counter()
    feats = reader.read(user, item_ids)
    ms = (time.perf_counter() - t0) * 1e3
    reader.close()
    table = Table("feature", "value", title=f"user {user} ({', '.join(f'{v}: {s.value}' for v, s in feats.user.status.items())})")
    for name, value in feats.user.values.items():
        table.add_row(name, _short(value))
    console.print(table)
    items_table = Table("item", "title", "brand", "price", "popularity_7d", "ctr_7d", title=f"{len(item_ids)} items")
    for iid, f in feats.items.items():
        v = f.values
        items_table.add_row(iid, _short(v.get("title")), _short(v.get("brand")), _short(v.get("price")),
                            _short(v.get("popularity_7d")), _short(v.get("ctr_7d")))
    console.print(items_table)
    console.print(f"read 1 user + {len(item_ids)} items in one round trip: {ms:.2f} ms (first read, cold caches)")


def _short(v: object) -> str:
    if v is None:
        return "[dim]-[/]"
    if isinstance(v, float):
        return f"{v:.3f}"
    if isinstance(v, list):
        v = [round(x, 3) if isinstance(x, float) else x for x in v]
    s = json.dumps(v) if isinstance(v, list) else str(v)
    return s if len(s) <= 70 else s[:67] + "..."


@export_app.command("encoder")
def export_encoder_cmd(
    repo: Path = typer.Option(PROJECT_ROOT / "triton_models", help="Triton model repository."),
    checkpoint: Optional[Path] = typer.Option(None, help="Fine-tuned encoder folder (default: the zero-shot packaged model)."),
    int8: bool = typer.Option(True, help="onnxruntime per-channel int8 (the CPU serving default: ~2x faster, same "
                                         "retrieval quality on the demo shop, docs/models.md)."),
) -> None:
    """Export the encoder (ONNX) + its tokenizer as a new version."""
    from scorer.export.encoder_export import export_encoder
    from scorer.models.encoder import EncoderConfig, TextEncoder

    with console.status("exporting the encoder to ONNX"):
        config = EncoderConfig(model_path=str(checkpoint) if checkpoint else "")
        version = export_encoder(repo, TextEncoder(config), int8=int8)
    console.print(f"[green]exported[/] encoder_onnx/{version} and text_tokenizer/{version} into {repo}")


@export_app.command("ranker")
def export_ranker_cmd(
    checkpoint: Optional[Path] = typer.Option(None, help="From `recsys train ranker` (default: the untrained ranker)."),
    repo: Path = typer.Option(PROJECT_ROOT / "triton_models", help="Triton model repository."),
    int8: bool = typer.Option(True, help="onnxruntime per-channel int8 (the CPU serving default)."),
) -> None:
    """Write the ranker as a new version of ranker_onnx + pair_tokenizer."""
    from scorer.export.ranker_export import export_ranker
    from scorer.models.ranker import CrossEncoderRanker

    from modelrepo.layout import read_validation

    model = CrossEncoderRanker.load(checkpoint) if checkpoint else None
    # The checkpoint's validation verdict travels with the version (none: the gateway's ranker_mode
    # auto does not apply it).
    version = export_ranker(repo, model, int8=int8, validation=read_validation(checkpoint) if checkpoint else None)
    console.print(f"[green]exported[/] ranker_onnx/{version} and pair_tokenizer/{version} into {repo}")


@export_app.command("interest")
def export_interest_cmd(
    checkpoint: Path = typer.Option(PROJECT_ROOT / "var" / "models" / "interest", help="From `recsys train interest`."),
    repo: Path = typer.Option(PROJECT_ROOT / "triton_models", help="Triton model repository."),
) -> None:
    """Write the interest model as a new version of interest_onnx."""
    from modelrepo.layout import read_validation
    from scorer.export.interest_export import export_interest
    from scorer.models.interest import load_interest_model

    version = export_interest(repo, load_interest_model(checkpoint), validation=read_validation(checkpoint))
    console.print(f"[green]exported[/] interest_onnx/{version} into {repo}")


@triton_app.command("serve")
def triton_serve(
    repo: Path = typer.Option(PROJECT_ROOT / "triton_models", help="Triton model repository."),
    grpc_port: int = typer.Option(8001), http_port: int = typer.Option(8000), metrics_port: int = typer.Option(8002),
    workdir: Path = typer.Option(PROJECT_ROOT / "var" / "triton", help="Backends folder and tritonserver.log."),
) -> None:
    """Run tritonserver (nvidia-pytriton, CPU) on loopback, restarted when it dies, until Ctrl-C / SIGTERM."""
    import logging
    import signal as _signal

    from localtriton.launcher import TritonServer
    from localtriton.supervisor import SupervisorEvent, TritonSupervisor
    from modelrepo.admin import KEY_ENV, key_file

    # The supervisor's own log lines would repeat what `report` prints (Python's last-resort
    # handler writes WARNINGs to stderr when nothing is configured).
    logging.getLogger("localtriton.supervisor").addHandler(logging.NullHandler())

    def report(event: SupervisorEvent) -> None:
        style = {"restarted": "green", "died": "red"}.get(event.kind, "yellow")
        console.print(f"[{style}]{event.message}[/]", soft_wrap=True)
        if event.kind == "died" and event.reason is not None and event.reason.log_tail:
            # The end of tritonserver.log says why (a crash's stack trace); the whole log is kept as
            # tritonserver.log.1 next to the new one.
            tail = "\n".join("  " + line for line in event.reason.log_tail.splitlines()[-8:])
            console.print(tail, style="dim", markup=False, highlight=False, soft_wrap=True)

    server = TritonServer(model_repository=repo, workdir=workdir, grpc_port=grpc_port, http_port=http_port,
                          metrics_port=metrics_port)
    supervisor = TritonSupervisor(server, on_event=report)
    # Handlers first: a SIGTERM during start-up must also end tritonserver and its stubs (the
    # default action would kill only this process and leave them running, reparented to init).
    with supervisor.signals_stop():
        with console.status("starting tritonserver"):
            supervisor.start()
        console.print(f"[green]ready[/] (supervised): gRPC {server.grpc_url}, HTTP {server.http_url} "
                      f"(log: {server.log_path})", soft_wrap=True)
        console.print(f"model control (publish, load, unload) needs the admin key in {key_file()} "
                      f"(or ${KEY_ENV}); inference and health are open", soft_wrap=True)
        supervisor.wait()
        console.print("stopping tritonserver and its python-backend stubs")
    why = _signal.Signals(supervisor.received_signal).name if supervisor.received_signal else "stop"
    console.print(f"[green]stopped[/] ({why}; {supervisor.restarts} restart(s))")


@triton_app.command("publish")
def triton_publish(
    version: int = typer.Argument(..., help="Encoder version to serve (a rollback is publishing the old number)."),
    url: str = typer.Option("127.0.0.1:8001", help="Triton gRPC address, or several replicas comma-separated "
                                                   "(switched one at a time)."),
    repo: Path = typer.Option(PROJECT_ROOT / "triton_models", help="Triton model repository."),
) -> None:
    """Switch the serving encoder to VERSION with zero failed requests."""
    from modelrepo.publish import publish_encoder

    old = publish_encoder(url, repo, version)
    console.print(f"[green]serving encoder v{version}[/] (was v{old})")


@train_app.command("encoder")
def train_encoder_cmd(
    repo: Path = typer.Option(FEATURE_REPO, help="Feature repo (applied; its data/offline holds the label log)."),
    out: Path = typer.Option(PROJECT_ROOT / "var" / "models" / "encoder", help="Checkpoint folder (the kept encoder)."),
    steps: int = typer.Option(0, help="Cap on optimizer steps (batch 32; ~2 s per step on 1 thread of the 2-core dev "
                                      "VM); 0: the default budget (one pass over the pairs, 30-1,000 steps), "
                                      "stopped early on validation."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate (default: 1e-4 query -> item, 2e-5 item -> item)."),
    seed: int = typer.Option(0),
    start_from: Optional[Path] = typer.Option(None, help="Checkpoint to continue from (default: packaged model)."),
) -> None:
    """Fine-tune the bi-encoder (query -> clicked item; without searches, previous item -> next item)
    with in-batch negatives, early stopping on validation NDCG@10, and keep it only if it beats the
    zero-shot (or --start-from) encoder on validation; otherwise the start is saved and the command
    says so. The verdict and both numbers: OUT/encoder_validation.json, the curves: OUT/training_curves.png."""
    from cli.data_summary import require_trainable
    from scorer.train.data import CannotTrain
    from scorer.train.encoder_data import encoder_training_set
    from scorer.train.encoder_train import EncoderTrainConfig, fit_encoder, plot_fit, save_fit

    require_trainable(console, repo, "encoder")
    _quiet_transformers()
    try:
        with console.status("building training pairs and the validation split through Feast"):
            ts = encoder_training_set(repo, seed=seed)
    except CannotTrain as e:
        console.print(f"[red]cannot train the encoder[/]: {e}")
        raise typer.Exit(1) from None
    cfg = EncoderTrainConfig(lr=lr, seed=seed, **({"max_steps": steps} if steps else {}))
    console.print(f"{len(ts.fit):,} training pairs before {ts.data.cutoff:%Y-%m-%d %H:%M} (holdout after); validation: "
                  f"{ts.validation.examples:,} examples ({ts.validation.kind})")
    start = "zero-shot" if start_from is None else "starting"
    fit = fit_encoder(ts.fit, ts.validation, ts.validation.examples, ts.metric, cfg, start_from=start_from,
                      console=console, start_name=start)
    manifest = save_fit(fit, out)
    curves = plot_fit(fit, out / "training_curves.png")
    colour = "green" if fit.verdict.kept else "yellow"
    console.print(f"[{colour}]{fit.verdict.says}[/]")
    kept = "the fine-tuned encoder" if fit.verdict.kept else f"the {start} encoder (unchanged)"
    console.print(f"[green]saved[/] {kept} to {out} ({fit.steps_run} steps of a {fit.budget}-step budget"
                  f"{', stopped early' if fit.stopped_early else ''}); verdict: {manifest.name}, curves: {curves.name}")


def _quiet_transformers() -> None:
    """No "Loading weights" bars from transformers for a local checkpoint (they say nothing)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


@train_app.command("ranker")
def train_ranker_cmd(
    repo: Path = typer.Option(FEATURE_REPO, help="Feature repo (applied; its label log is the training data)."),
    out: Path = typer.Option(PROJECT_ROOT / "var" / "models" / "ranker", help="Checkpoint folder."),
    steps: int = typer.Option(200, help="Optimizer steps (4 lists each; ~1 s per step on 2 CPU cores)."),
    seed: int = typer.Option(0),
    report: Path = typer.Option(PROJECT_ROOT / "var" / "reports" / "ranker", help="Evaluation report folder."),
    layers: Optional[int] = typer.Option(None, "--layers", help=f"Transformer layers kept, the bottom ones: "
                                         f"1..{RANKER_MAX_LAYERS}, 0 = all {RANKER_MAX_LAYERS}. Default: the "
                                         "serving default (RankerConfig.num_layers, scorer/models/ranker.py). "
                                         "Recorded in the checkpoint; `recsys export ranker` exports that many."),
) -> None:
    """Fine-tune the ranker on shown lists (listwise) and compare it on the holdout lists."""
    if layers is not None and not 0 <= layers <= RANKER_MAX_LAYERS:
        raise typer.BadParameter(f"{layers} layers: the ranker's transformer has {RANKER_MAX_LAYERS}; give 1.."
                                 f"{RANKER_MAX_LAYERS}, or 0 for all of them", param_hint="--layers")
    from modelrepo.layout import write_validation
    from scorer.eval.ranking_eval import (blend_verdict, evaluate_lists, logged_order, popularity, ranker_scorer,
                                          write_ranking_report)
    from scorer.models.ranker import CrossEncoderRanker, RankerConfig
    from scorer.train.ranker_data import load_ranker_lists
    from scorer.train.ranker_train import RankerTrainConfig, train_ranker

    from cli.data_summary import require_trainable

    config = RankerConfig() if layers is None else RankerConfig(num_layers=layers)
    require_trainable(console, repo, "ranker")
    with console.status("building shown lists with features through Feast"):
        lists = load_ranker_lists(repo)
    model, losses = train_ranker(lists.split(holdout=False), out, RankerTrainConfig(max_steps=steps, seed=seed), config)
    holdout = lists.split(holdout=True)
    result = evaluate_lists(holdout, {"logged order": logged_order, "popularity": popularity,
                                      "untrained ranker": ranker_scorer(CrossEncoderRanker(config).eval()),
                                      "fine-tuned ranker": ranker_scorer(model)})
    kept = f"{config.num_layers} transformer layers" if config.num_layers else "all transformer layers"
    path = write_ranking_report(result, report, f"Ranker ({kept}) fine-tuned {steps} steps, on the holdout's "
                                                "shown lists")
    verdict = blend_verdict(result, "fine-tuned ranker", shown=holdout.shown)
    write_validation(out, verdict)  # `recsys export ranker` carries it into the version
    _plot_curve(losses, report / "training_loss.png")
    console.print(result.to_string(index=False))
    console.print(f"[green]saved[/] {out}; report: {path}")
    console.print(f"ranker {verdict['metric']} {verdict['ranker']:.4f} vs the lists' logged order {verdict['blend']:.4f}: "
                  + ("beats the blend (the gateway applies it)" if verdict["beats_blend"]
                     else f"[yellow]{verdict.get('reason', 'does not beat the blend')}: "
                          "the gateway (ranker_mode auto) will not apply it[/]"))


@train_app.command("fusion")
def train_fusion_cmd(
    repo: Path = typer.Option(FEATURE_REPO, help="Feature repo whose data/offline holds the imported log "
                              "(items.parquet, events.parquet: `recsys data import`, `recsys demo`)."),
    out: Path = typer.Option(PROJECT_ROOT / "var" / "models" / "fusion" / "learned_fusion.json",
                             help="Model file to write (the gateway's `learned_fusion` setting); only when it beats "
                                  "the rank fusion on the confirm half of validation."),
    config: Optional[Path] = typer.Option(None, help="Gateway settings file the gateway serves with (`recsys serve "
                                          "--config`): the rank fusion to beat and the co-visitation seeds."),
    max_users: int = typer.Option(5000, min=10, help="At most this many validation (and test) users, sampled."),
    seed: int = typer.Option(0, help="Seed of that sample, of the split in two halves and of the fit."),
    min_gain: float = typer.Option(0.0, help="How much more than its standard error the NDCG@10 gain on the "
                                   "confirm half of validation must be to write the model."),
    model_repo: Path = typer.Option(PROJECT_ROOT / "triton_models", help="Triton model repository the gateway serves "
                                    "from: its newest interest_onnx version gives the interest vectors (none: the "
                                    "gateway's untrained formula, as it serves then), its newest next_item_onnx "
                                    "version the next-item source (none: no such source)."),
    encoder: Optional[Path] = typer.Option(None, help="Fine-tuned encoder checkpoint the gateway's index is built "
                                           "with (`recsys train encoder`'s output; default: the zero-shot encoder)."),
) -> None:
    """Fit a learned fusion of the no-query sources (co-visitation, interest, popularity, the user's
    history) on one half of this shop's validation users, through the gateway's own retrieval code;
    compare it with the served rank fusion on the other half and on test. Writes OUT only when the
    gain on the other half (the confirm half, which took no part) exceeds its standard error."""
    from cli.fusion_learning import served_interest_model, served_next_item_model, train_fusion
    from cli.fusion_tuning import CannotTune

    _quiet_transformers()
    try:
        train_fusion(repo, out, max_users, seed, min_gain, config, served_interest_model(model_repo), encoder,
                     served_next_item_model(model_repo))
    except CannotTune as e:
        console.print(f"[red]cannot train the fusion[/]: {e}")
        raise typer.Exit(1) from None


@train_app.command("next-item")
def train_next_item_cmd(
    repo: Path = typer.Option(FEATURE_REPO, help="Feature repo whose data/offline holds the imported log "
                              "(items.parquet, events.parquet: `recsys data import`, `recsys demo`)."),
    model_repo: Path = typer.Option(PROJECT_ROOT / "triton_models", help="Triton model repository to export the "
                                    "kept model into (a new version of next_item_onnx)."),
    max_seconds: float = typer.Option(600.0, min=1.0, help="Wall-clock budget of the training run (it also stops "
                                      "when validation NDCG@10 has not improved for 8 epochs)."),
    max_epochs: int = typer.Option(200, min=1, help="Cap on epochs (one window of every user's sequence each)."),
    seed: int = typer.Option(0),
    min_gain: float = typer.Option(0.0, help="How much more than its standard error the validation NDCG@10 gain "
                                   "over popularity must be to export the model."),
    report: Path = typer.Option(PROJECT_ROOT / "var" / "reports" / "next_item", help="Report folder (report.md, curve.png)."),
    refit: bool = typer.Option(False, help="Export the recipe refit on every interaction for the chosen epoch count "
                               "instead of the judged model (trained without each user's last two; the refit is not "
                               "judged itself; served on Online Retail it gained +0.002 NDCG@10, within noise: "
                               "docs/models.md)."),
) -> None:
    """Train the next-item model (SASRec over item ids) on the shop's interactions, early-stopped on
    validation NDCG@10; export it to Triton only when it beats popularity on validation beyond noise."""
    from cli.next_item_training import run
    from scorer.train.data import CannotTrain

    try:
        version = run(repo, model_repo, report, max_seconds, max_epochs, seed, min_gain, console, refit)
    except CannotTrain as e:
        console.print(f"[red]cannot train the next-item model[/]: {e}")
        raise typer.Exit(1) from None
    if version is None:
        raise typer.Exit(1)


@train_app.command("all")
def train_all_cmd(
    repo: Path = typer.Option(FEATURE_REPO, help="Feature repo (applied and materialized; its data/offline holds the "
                              "imported log: `recsys data import`)."),
    model_repo: Path = typer.Option(PROJECT_ROOT / "triton_models", help="Triton model repository to export into."),
    models: Path = typer.Option(PROJECT_ROOT / "var" / "models", help="Checkpoints: MODELS/encoder, MODELS/interest, "
                                "MODELS/fusion/learned_fusion.json."),
    reports: Path = typer.Option(PROJECT_ROOT / "var" / "reports", help="Each step's report folder."),
    settings_out: Path = typer.Option(PROJECT_ROOT / "var" / "models" / "gateway.toml", "--settings",
                                      help="Gateway settings file to write: it serves what was kept "
                                           "(`recsys serve --config FILE`)."),
    config: Optional[Path] = typer.Option(None, help="Gateway settings the gateway serves with: the rank fusion the "
                                          "learned one must beat (no tuning then); copied into --settings."),
    tune: bool = typer.Option(True, help="Choose the rank fusion's weights on this log (`recsys tune fusion`) when "
                              "no --config is given (--no-tune: the defaults)."),
    encoder: bool = typer.Option(True, help="Try fine-tuning the encoder (--no-encoder: serve the zero-shot encoder; "
                                 "on order-only logs fine-tuning rarely passes its gate and costs the most CPU)."),
    encoder_steps: int = typer.Option(0, help="Cap on encoder steps; 0: `recsys train encoder`'s default budget."),
    interest_steps: int = typer.Option(0, help="Cap on interest-model steps; 0: `recsys train interest`'s default."),
    next_item_seconds: float = typer.Option(600.0, min=1.0, help="Wall-clock budget of the next-item training."),
    ranker_steps: int = typer.Option(200, min=0, help="`recsys train ranker` steps (0: do not train the ranker). "
                                     "Exported only if it beats the blend's order on the holdout's shown lists; "
                                     "not trained on a log without impressions."),
    seed: int = typer.Option(0),
    url: str = typer.Option("", help="A running Triton (or replicas, comma-separated) to publish each new version to "
                            "with zero downtime; '' = export only (a fresh `recsys triton serve` serves the newest)."),
) -> None:
    """Train every model the shop's log can train, in dependency order (encoder, interest model,
    export, next-item model, rank-fusion weights, learned fusion, ranker), each kept only by its own
    gate; write the gateway settings that serve what was kept and print a table of it."""
    from cli.train_all import Plan, train_all

    _quiet_transformers()
    if config is not None and not config.is_file():
        raise typer.BadParameter(f"{config} is not a file", param_hint="--config")
    train_all(Plan(repo, model_repo, models, reports, settings_out, config=config, tune=tune, encoder=encoder,
                   encoder_steps=encoder_steps, interest_steps=interest_steps, next_item_seconds=next_item_seconds,
                   ranker_steps=ranker_steps, seed=seed, url=url), console)


@train_app.command("interest")
def train_interest_cmd(
    repo: Path = typer.Option(FEATURE_REPO, help="Feature repo (applied; its data/offline holds the label log)."),
    out: Path = typer.Option(PROJECT_ROOT / "var" / "models" / "interest", help="Checkpoint folder."),
    encoder: Optional[Path] = typer.Option(None, help="Serving encoder checkpoint whose vectors the model reads (default: packaged)."),
    model: str = typer.Option("auto", help="attention | sequential | auto (train both, keep the simpler unless the other beats it beyond noise)."),
    steps: int = typer.Option(0, help="Cap on optimizer steps (batch 128); 0: the default budget (20 passes "
                                      "over the examples, 200-20,000 steps), stopped early on validation."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate (default: 3e-3 attention, 1e-3 sequential)."),
    seed: int = typer.Option(0),
    report: Path = typer.Option(PROJECT_ROOT / "var" / "reports" / "interest", help="Evaluation report folder."),
) -> None:
    """Train the interest model(s) (next interaction) with early stopping on a validation split, keep
    the simpler one unless the other beats it beyond noise, if it beats the untrained fallback, and evaluate on
    the holdout."""
    from dataclasses import replace

    from scorer.eval.interest_eval import evaluate_interest, write_interest_report
    from scorer.models.encoder import EncoderConfig, TextEncoder
    from scorer.models.interest import InterestModel
    from scorer.train.interest_data import embed_catalog_and_queries, load_interest_examples
    from scorer.train.interest_train import KINDS, InterestTrainConfig, train_candidates, with_max_steps

    if model not in (*KINDS, "auto"):
        raise typer.BadParameter(f"choose from {', '.join(KINDS)}, auto; got {model!r}", param_hint="--model")
    from cli.data_summary import require_trainable

    require_trainable(console, repo, "interest")
    with console.status("building next-interaction examples through Feast"):
        data = load_interest_examples(repo)
    with console.status("embedding the catalog and the queries with the serving encoder"):
        enc = TextEncoder(EncoderConfig(model_path=str(encoder))) if encoder else TextEncoder()
        table = embed_catalog_and_queries(repo, data.rows["query"].dropna().tolist(), enc)
    cfg = with_max_steps(replace(InterestTrainConfig(), lr=lr, seed=seed), steps)
    console.print(f"{len(data.train):,} training / {len(data.holdout):,} holdout examples (split {data.cutoff:%Y-%m-%d %H:%M}); "
                  f"validation: the last {cfg.val_fraction:.0%} of the training period")
    sel = train_candidates(data.train, table, KINDS if model == "auto" else (model,), cfg, console=console)
    methods = {"interest, untrained (gateway fallback)": InterestModel().eval()}
    methods.update({f"{f.kind}, trained": f.model for f in sel.fits.values()})
    result = evaluate_interest(data.holdout, data.train, table, methods)
    path = write_interest_report(result, report, {f.kind: f.losses for f in sel.fits.values()},
                                 {f.kind: f.curve for f in sel.fits.values()}, sel.fallback_val, sel.summary())
    console.print(result.round(3).to_string(index=False))
    console.print(sel.summary())
    winner = sel.winner
    if winner is None:
        console.print(f"[red]not saved[/]: no candidate beats the untrained fallback on validation, so there is "
                      f"nothing worth serving (the gateway's fallback stays); report: {path}")
        raise typer.Exit(1)
    from modelrepo.layout import write_validation

    winner.model.save(out)
    write_validation(out, data.training_window())  # exported beside each version: a fusion is judged after it
    console.print(f"[green]saved[/] {winner.kind} model to {out}; report: {path}")


def _plot_curve(losses: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(losses, alpha=0.4, label="loss")
    window = max(1, len(losses) // 20)
    smooth = [sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1]) for i in range(len(losses))]
    ax.plot(smooth, label=f"mean of {window}")
    ax.set_xlabel("step")
    ax.set_ylabel("in-batch cross-entropy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@eval_app.command("retrieval")
def eval_retrieval_cmd(
    repo: Path = typer.Option(FEATURE_REPO, help="Feature repo (applied)."),
    checkpoint: list[Path] = typer.Option([], help="Fine-tuned encoder checkpoint(s) to compare."),
    onnx: bool = typer.Option(False, help="Also score each checkpoint exported to ONNX fp32 and int8 (what Triton serves)."),
    out: Path = typer.Option(PROJECT_ROOT / "var" / "reports" / "retrieval", help="Report folder."),
) -> None:
    """Recall@k, NDCG@k, MRR on the time-split holdout: popularity, BM25, zero-shot and fine-tuned encoders."""
    import tempfile

    import pandas as pd

    from scorer.eval.retrieval_eval import (
        bm25_scorer, build_eval_set, encoder_scorer, evaluate, onnx_encoder_scorer, popularity_scorer, write_report,
    )
    from scorer.export.encoder_export import export_onnx, quantize_int8
    from scorer.models.encoder import EncoderConfig, TextEncoder
    from scorer.train.data import QUERIES, load_labelled_requests, training_source, what_data_holds

    _quiet_transformers()
    try:
        plan = training_source(what_data_holds(repo), "encoder")
    except FileNotFoundError as e:
        console.print(f"[red]nothing to evaluate[/]: no imported data in {repo / 'data' / 'offline'} "
                      f"({Path(e.filename).name if e.filename else e} missing): run `recsys data import` first")
        raise typer.Exit(1) from None
    if plan.source != QUERIES:
        _eval_next_item_retrieval(repo, checkpoint, out, plan)
        return
    with console.status("building the holdout through Feast"):
        data = load_labelled_requests(repo)
        offline = repo / "data" / "offline"
        ev = build_eval_set(data, pd.read_parquet(offline / "items.parquet"), pd.read_parquet(offline / "events.parquet"))
    if not len(ev.queries):
        console.print(f"[red]nothing to evaluate[/]: no search request after the holdout split "
                      f"({data.cutoff:%Y-%m-%d %H:%M}) led to a click, cart or purchase")
        raise typer.Exit(1)
    with console.status("embedding the catalog"):
        methods = {"popularity": popularity_scorer(ev), "bm25": bm25_scorer(ev),
                   "zero-shot encoder": encoder_scorer(ev, TextEncoder())}
        for ckpt in checkpoint:
            encoder = TextEncoder(EncoderConfig(model_path=str(ckpt)))
            methods[f"fine-tuned ({ckpt.name})"] = encoder_scorer(ev, encoder)
            if onnx:
                with tempfile.TemporaryDirectory() as tmp:
                    fp32, int8 = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
                    export_onnx(encoder, fp32)
                    quantize_int8(fp32, int8)
                    methods[f"fine-tuned ({ckpt.name}), ONNX fp32"] = onnx_encoder_scorer(ev, fp32, encoder)
                    methods[f"fine-tuned ({ckpt.name}), ONNX int8"] = onnx_encoder_scorer(ev, int8, encoder)
    result = evaluate(ev, methods)
    report = write_report(result, out)
    console.print(result.table().to_string(index=False))
    console.print(f"[green]report[/]: {report}")


def _eval_next_item_retrieval(repo: Path, checkpoints: list[Path], out: Path, plan) -> None:
    """`recsys eval retrieval` on data without searches: what it lacks, then the encoders judged
    by next-item retrieval on the holdout's transitions (mean of recent history, item to item)."""
    import pandas as pd

    from scorer.eval.encoder_validation import NextItemValidation
    from scorer.eval.retrieval_eval import markdown_table
    from scorer.models.encoder import EncoderConfig, TextEncoder
    from scorer.train.data import CannotTrain
    from scorer.train.encoder_data import HISTORY_LEN, catalog, item_pairs

    if plan.source is None:
        console.print(f"[red]nothing to evaluate[/]: no search request to rank items for and no shopper with two "
                      f"interactions (the encoder {plan.says})")
        raise typer.Exit(1)
    why = plan.says.split(":")[0]  # e.g. "no search queries"
    console.print(f"[yellow]no query retrieval to evaluate[/]: {why}, so there is no search request to rank "
                  "items for. Measuring next-item retrieval instead (the holdout's previous item -> next item "
                  "transitions: mean of recent history and item to item, full ranking over the catalog).")
    try:
        with console.status("building the holdout's transitions through Feast"):
            data = item_pairs(repo)
            holdout = data.holdout
            if len(holdout) > 5_000:  # each example ranks the whole catalog: a fixed sample is enough
                holdout = holdout.sample(5_000, random_state=0)
            ids, texts = catalog(repo)
            judge = NextItemValidation.of(holdout, ids, texts, HISTORY_LEN)
    except (CannotTrain, ValueError) as e:
        console.print(f"[red]nothing to evaluate[/]: {e}")
        raise typer.Exit(1) from None
    encoders = {"zero-shot encoder": TextEncoder()}
    encoders.update({f"fine-tuned ({c.name})": TextEncoder(EncoderConfig(model_path=str(c))) for c in checkpoints})
    rows = []
    with console.status(f"embedding the catalog and ranking {judge.examples:,} holdout transitions"):
        for name, enc in encoders.items():
            got = judge(enc)
            rows.append({"method": name, **{f"history {k}": round(v, 4) for k, v in got.items() if not k.startswith("item ")},
                         **{k: round(v, 4) for k, v in got.items() if k.startswith("item ")}})
    table = pd.DataFrame(rows)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps({"kind": "next item", "examples": judge.examples,
                                                  "why": why, "metrics": rows}, indent=2))
    (out / "report.md").write_text(f"# Next-item retrieval on the holdout\n\n{why}: no query retrieval to evaluate. "
                                   f"{judge.examples:,} holdout transitions after {data.cutoff:%Y-%m-%d %H:%M}; "
                                   f"history = the unit mean of the last {HISTORY_LEN} items' vectors, item = the "
                                   f"previous item's vector.\n\n{markdown_table(table)}\n")
    console.print(table.to_string(index=False))
    console.print(f"[green]report[/]: {out / 'report.md'}")


@eval_app.command("ranker")
def eval_ranker_cmd(
    repo: Path = typer.Option(FEATURE_REPO, help="Feature repo (applied)."),
    checkpoint: Optional[Path] = typer.Option(None, help="Fine-tuned ranker checkpoint (default: only baselines)."),
    onnx: bool = typer.Option(True, help="Also score the checkpoint exported to ONNX fp32 and int8 (what Triton serves)."),
    out: Path = typer.Option(PROJECT_ROOT / "var" / "reports" / "ranker_eval", help="Report folder."),
) -> None:
    """NDCG@5 and MRR of the holdout's shown lists: logged order, popularity, untrained ranker, a
    fine-tuned checkpoint in torch, and its ONNX fp32 and int8 exports (report + plot)."""
    import tempfile

    from scorer.eval.ranking_eval import (evaluate_lists, logged_order, onnx_scorer, popularity, ranker_scorer,
                                          write_ranking_report)
    from scorer.export.encoder_export import quantize_int8
    from scorer.export.ranker_export import export_ranker_onnx
    from scorer.models.ranker import CrossEncoderRanker
    from scorer.train.ranker_data import load_ranker_lists

    with console.status("building shown lists with features through Feast"):
        holdout = load_ranker_lists(repo).split(holdout=True)
    methods = {"logged order": logged_order, "popularity": popularity,
               "untrained ranker": ranker_scorer(CrossEncoderRanker().eval())}
    with tempfile.TemporaryDirectory() as tmp:
        if checkpoint is not None:
            model = CrossEncoderRanker.load(checkpoint)
            methods[f"fine-tuned ({checkpoint.name}), torch"] = ranker_scorer(model)
            if onnx:
                fp32, int8 = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
                export_ranker_onnx(model, fp32)
                quantize_int8(fp32, int8)
                methods["fine-tuned, ONNX fp32"] = onnx_scorer(fp32, model.config)
                methods["fine-tuned, ONNX int8"] = onnx_scorer(int8, model.config)
        with console.status(f"scoring {holdout.rows['request_id'].nunique():,} holdout lists"):
            table = evaluate_lists(holdout, methods)
    report = write_ranking_report(table, out, "Ranker on the holdout's shown lists")
    console.print(table.to_string(index=False))
    console.print(f"[green]report[/]: {report}")


tune_app = typer.Typer(help="Choose serving settings on the shop's own log (validation; test read once).",
                       no_args_is_help=True)
app.add_typer(tune_app, name="tune")


@tune_app.command("fusion")
def tune_fusion_cmd(
    repo: Path = typer.Option(FEATURE_REPO, help="Feature repo whose data/offline holds the imported log "
                              "(items.parquet, events.parquet: `recsys data import`, `recsys demo`)."),
    out: Path = typer.Option(PROJECT_ROOT / "var" / "gateway.toml", help="Gateway settings file to write "
                             "(`recsys serve --config`); only when the choice beats the defaults on the confirm half "
                             "of validation."),
    max_users: int = typer.Option(2000, min=4, help="At most this many validation (and test) users, sampled."),
    seed: int = typer.Option(0, help="Seed of that sample and of the validation users' split in two halves."),
    min_gain: float = typer.Option(0.0, help="How much more than its standard error the NDCG@10 gain on the "
                                   "confirm half of validation must be to write the choice."),
) -> None:
    """Choose the source fusion of pages without a query (weights, k, co-visitation seeds) on one half of
    this shop's validation users, through the gateway's own retrieval and pre-score code; print the
    defaults vs the choice on both halves and on test. Writes OUT (the fusion table, covisit_*) only
    when the choice's gain on the other half (the confirm half, which took no part in the choice)
    exceeds its standard error (+ --min-gain); otherwise writes nothing."""
    from cli.fusion_tuning import CannotTune, tune_fusion

    _quiet_transformers()
    try:
        tune_fusion(repo, out, max_users, seed, min_gain)
    except CannotTune as e:
        console.print(f"[red]cannot tune[/]: {e}")
        raise typer.Exit(1) from None


@app.command("retrain")
def retrain_cmd(
    repo: Path = typer.Option(FEATURE_REPO, help="Feature repo (applied; its label log is the training data)."),
    model_repo: Path = typer.Option(PROJECT_ROOT / "triton_models", help="Triton model repository."),
    url: str = typer.Option("127.0.0.1:8001", help="Triton gRPC address to publish to, or several replicas "
                                                   "comma-separated (switched one at a time); '' = export only."),
    registry: Path = typer.Option(PROJECT_ROOT / "var" / "models" / "registry.json"),
    work_dir: Path = typer.Option(PROJECT_ROOT / "var" / "models" / "retrain", help="Candidates and reports."),
    model: list[str] = typer.Option(["encoder", "ranker", "interest", "next_item"], "--model",
                                    help="Models to retrain (repeatable), encoder first."),
    steps: int = typer.Option(200, help="Encoder fine-tuning steps per round."),
    ranker_steps: int = typer.Option(100, help="Ranker fine-tuning steps per round (4 lists each)."),
    interest_steps: int = typer.Option(0, help="Cap on interest-model steps per round (batch 128); 0: the default "
                                               "budget (scales with the data, stopped early on validation)."),
    next_item_epochs: int = typer.Option(0, help="Cap on next-item model epochs per round; 0: the default (200, "
                                                 "stopped early on validation)."),
    next_item_seconds: float = typer.Option(600.0, min=1.0, help="Wall-clock budget of a next-item training round."),
    next_item_refit: bool = typer.Option(False, help="Publish the next-item candidate refit on every interaction "
                                         "(as `recsys train next-item --refit`)."),
    margin: float = typer.Option(0.005, help="Promote only if the gain over what is served, paired over the same validation "
                                              "examples (ranker: holdout lists), exceeds its standard error plus this."),
    min_new_labels: int = typer.Option(0, help="Retrain only when this many new positive labels arrived."),
    every: Optional[float] = typer.Option(None, help="Keep running: check every this many seconds."),
    serving_checkpoint: Optional[Path] = typer.Option(None, help="Checkpoint of the serving encoder, for a new "
                                                                 "registry (default: the packaged weights)."),
    serving_ranker_checkpoint: Optional[Path] = typer.Option(None, help="Same for the ranker (default: packaged start)."),
    serving_interest_checkpoint: Optional[Path] = typer.Option(None, help="Same for the interest model "
                                                                          "(default: untrained)."),
    gateway_config: Optional[Path] = typer.Option(None, help="Settings file the gateway serves with (`recsys serve "
                                                  "--config`, e.g. `recsys train all`'s var/models/gateway.toml): when "
                                                  "it names a learned fusion, a round that promotes the encoder, "
                                                  "interest or next-item model fits that fusion again and replaces "
                                                  "the file only if the new fit beats it and the rank fusion."),
) -> None:
    """Fine-tune encoder, ranker and interest model from their serving versions, train the next-item
    model afresh, gate each against what serves on held-out data, promote the winners with zero downtime;
    then refit the learned fusion on the promoted models' lists (with --gateway-config)."""
    from functools import partial

    from cli.fusion_refresh import refresh_fusion
    from scorer.retrain import MODELS, Registry, adopt_serving, run_loop, serving_versions_in_triton

    unknown = sorted(set(model) - set(MODELS))
    if unknown:
        raise typer.BadParameter(f"unknown model(s) {', '.join(unknown)}: choose from {', '.join(MODELS)}",
                                 param_hint="--model")
    reg = Registry.load(registry)
    checkpoints = {"encoder": serving_checkpoint, "ranker": serving_ranker_checkpoint,
                   "interest": serving_interest_checkpoint, "next_item": None}
    if url and any(reg.entry(m).serving is None for m in model):
        for m, v in serving_versions_in_triton(url).items():
            if m in model and reg.entry(m).serving is None and v is not None:
                adopt_serving(reg, v, checkpoints[m], m)
                console.print(f"registry started from Triton: {m} v{v} serves ({checkpoints[m] or 'packaged start'})")
    run_loop(repo, model_repo, url or None, registry, work_dir, min_new_labels, every, models=tuple(model),
             steps={"encoder": steps, "ranker": ranker_steps, "interest": interest_steps,
                    "next_item": next_item_epochs}, margin=margin, log=console.print,
             extra={"next_item": {"max_seconds": next_item_seconds, "refit": next_item_refit}},
             after_round=partial(refresh_fusion, repo=repo, model_repo=model_repo, registry_path=registry,
                                 gateway_config=gateway_config, margin=margin, log=console.print))


@app.command("rollback")
def rollback_cmd(
    model: str = typer.Option("encoder", help="encoder | ranker | interest | next_item"),
    url: str = typer.Option("127.0.0.1:8001", help="Triton gRPC address."),
    model_repo: Path = typer.Option(PROJECT_ROOT / "triton_models", help="Triton model repository."),
    registry: Path = typer.Option(PROJECT_ROOT / "var" / "models" / "registry.json"),
    repo: Path = typer.Option(FEATURE_REPO, help="Feature repo whose log the learned fusion is fitted on again."),
    gateway_config: Optional[Path] = typer.Option(None, help="Settings file the gateway serves with: when it names a "
                                                  "learned fusion and the model rolled back is one of its inputs "
                                                  "(encoder, interest, next_item), that fusion is fitted again on the "
                                                  "lists of the version serving now and replaced only if the new fit "
                                                  "beats it and the rank fusion."),
    margin: float = typer.Option(0.005, help="The learned fusion refit's margin (as `recsys retrain --margin`)."),
) -> None:
    """Serve a model's previously promoted version again (zero downtime); then refit the learned
    fusion on its lists (with --gateway-config)."""
    from cli.fusion_refresh import FUSION_INPUTS, refit_fusion
    from scorer.retrain import MODELS, Registry, rollback

    if model not in MODELS:
        raise typer.BadParameter(f"choose from {', '.join(MODELS)}", param_hint="--model")
    if gateway_config is not None and not gateway_config.is_file():
        raise typer.BadParameter(f"{gateway_config} is not a file", param_hint="--gateway-config")
    try:
        version = rollback(model_repo, url, Registry.load(registry), model)
    except RuntimeError as e:
        console.print(f"[red]{e}[/]")
        raise typer.Exit(1) from None
    console.print(f"[green]serving {model} v{version}[/] again")
    if model in FUSION_INPUTS:
        refit_fusion(f"{model} rolled back to v{version}", repo, model_repo, registry, gateway_config, margin,
                     log=console.print)


@app.command("serve")
def serve_cmd(
    config: Optional[Path] = typer.Option(None, help="TOML settings file (RECSYS_* environment variables win)."),
    workers: int = typer.Option(1, min=1, help="Gateway processes on one port (SO_REUSEPORT), each with its share "
                                "of max_in_flight / max_queued and metrics on metrics_port + i."),
) -> None:
    """Run the gRPC gateway (RecommendService, health, reflection; Prometheus on RECSYS_METRICS_PORT)."""
    if workers == 1:
        from gateway.server import main

        main(config)
        return
    from cli.gateway_workers import run_workers
    from gateway.config import load_settings

    try:
        settings = load_settings(config)
        code = run_workers(settings, config, workers, say=lambda m: console.print(m, soft_wrap=True))
    except (ValueError, FileNotFoundError) as e:
        console.print(f"[red]{e}[/]")
        raise typer.Exit(2) from None
    raise typer.Exit(code)


@app.command("query")
def query_cmd(
    text: str = typer.Argument("", help="Free-text query; empty for a home-page feed."),
    user: str = typer.Option("", "--user", help="User id (unknown or empty: cold start)."),
    session: str = typer.Option("", "--session", help="Session id."),
    n: int = typer.Option(10, "-n", help="Number of results."),
    address: str = typer.Option("127.0.0.1:50051", help="Gateway address."),
    brand: list[str] = typer.Option([], help="Filter: brand (repeatable)."),
    category: list[str] = typer.Option([], help="Filter: category (repeatable)."),
    max_price: Optional[float] = typer.Option(None), min_price: Optional[float] = typer.Option(None),
    timeout: float = typer.Option(2.0, help="Deadline in seconds."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="RECSYS_API_KEY", help=API_KEY_HELP),
) -> None:
    """Ask the gateway for recommendations and print them with their reasons."""
    import grpc

    from cli.tables import response_table
    from rpc.clients import RecommendClient
    from recsys.v1 import common_pb2

    filters = common_pb2.Filters(brands=brand, categories=category)
    if max_price is not None:
        filters.max_price = max_price
    if min_price is not None:
        filters.min_price = min_price
    with RecommendClient(address, timeout, api_key=api_key or "") as client:
        try:
            response = client.recommend(text, user_id=user, session_id=session, num_results=n, filters=filters)
        except grpc.RpcError as e:
            console.print(f"[red]{e.code().name}[/]: {e.details()}")
            raise typer.Exit(1)
    p = response.parsed_query
    understood = ", ".join(x for x in [f"text={p.text!r}" if p.text else "", *p.brands, *p.categories,
                                       f">= {p.min_price:g}" if p.HasField("min_price") else "",
                                       f"<= {p.max_price:g}" if p.HasField("max_price") else ""] if x)
    console.print(response_table(response, title=f"{text!r} for {user or 'anonymous'}; understood: {understood or '-'}"))
    versions = ", ".join(f"{k} v{v}" for k, v in sorted(response.model_versions.items()))
    console.print(f"request {response.request_id}; models: {versions}"
                  + (f"; [yellow]degraded[/]: {'; '.join(response.degraded_reasons)}" if response.degraded else ""))


@app.command("simulate")
def simulate_cmd(
    shop: Path = typer.Option(DEMO_SHOP_DIR, help="The generated shop (its hidden tastes drive the shoppers)."),
    gateway: str = typer.Option("127.0.0.1:50051", help="Gateway address."),
    feedback: str = typer.Option("127.0.0.1:50052", help="Feedback service address."),
    requests: int = typer.Option(600, help="Requests to send."),
    shift_at: Optional[int] = typer.Option(200, help="Request at which tastes shift to the new-arrivals trend "
                                                     "(negative: no shift)."),
    concurrency: int = typer.Option(4, help="Shoppers in flight at once."),
    window: int = typer.Option(50, help="Requests per point of the curves."),
    seed: int = typer.Option(0),
    out: Path = typer.Option(PROJECT_ROOT / "var" / "reports" / "simulation", help="Plot and tables go here."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="RECSYS_API_KEY",
                                          help="The shop's key (roles recommend, events; env RECSYS_API_KEY)."),
    weights_api_key: Optional[str] = typer.Option(None, "--weights-api-key", envvar="RECSYS_WEIGHTS_API_KEY",
                                                  help="A key with role internal or admin, to plot the learned "
                                                       "weights (default: --api-key)."),
) -> None:
    """Synthetic shoppers use the live gateway and feedback service; CTR and conversion over time per arm.

    Start the feedback service with a short click window (RECSYS_FEEDBACK_LABEL_DELAY_S=2: simulated
    shoppers click at once) and the gateway with RECSYS_FEEDBACK_URL and RECSYS_ONLINE_WEIGHTS_HOLDOUT=0.5,
    so one run compares online-learned weights with the configured ones.
    """
    from cli.simulate import SimConfig, SimulatedShop

    try:
        truth = SimulatedShop.from_dir(shop)
    except FileNotFoundError as e:
        console.print(f"[red]{e}[/]")
        raise typer.Exit(1) from None
    config = SimConfig(requests=requests, shift_at=shift_at if shift_at is not None and shift_at >= 0 else None,
                       concurrency=concurrency, window=window, seed=seed, api_key=api_key or "",
                       weights_api_key=weights_api_key)
    run_simulation(truth, gateway, feedback, config, out)


def run_simulation(truth, gateway: str, feedback: str, config, out: Path):
    """Run a simulation with a progress bar; print the per-arm table; write the plot and the tables."""
    from rich.progress import Progress

    from cli.simulate import plot, simulate

    with Progress(console=console) as progress:
        task = progress.add_task("simulated shoppers", total=config.requests)
        result = simulate(truth, gateway, feedback, config, progress=lambda n: progress.advance(task, n))
    if result.outcomes.empty:
        console.print(f"[red]no request succeeded[/] ({result.failed} failed): is the gateway at {gateway} serving?")
        raise typer.Exit(1)
    summary = result.summary()
    table = Table(*(["arm", "requests"] + [c for c in summary.columns if c not in ("arm", "requests")]),
                  title=f"{config.requests} simulated requests" + (f", tastes shift at {config.shift_at}"
                                                                   if config.shift_at is not None else ""))
    for row in summary.itertuples(index=False):
        table.add_row(row.arm, str(row.requests), *(f"{v:.3f}" for v in row[2:]))
    console.print(table)
    out.mkdir(parents=True, exist_ok=True)
    result.windows().to_csv(out / "windows.csv", index=False)
    result.weights.to_csv(out / "weights.csv", index=False)
    if not result.weights.empty:
        last = result.weights.iloc[-1]
        console.print("learned blend weights: " + ", ".join(
            f"{p} {last[p]:.2f}" for p in ("relevance", "personalization", "popularity", "freshness") if p in last)
            + f" (v{int(last['version'])}, {int(last['labelled']):,} labelled impressions)")
    if config.shift_at is not None and "online" in set(result.outcomes["arm"]):
        events = result.recovery_events("online")
        console.print("online arm back at its pre-shift CTR " + (f"after {events:,} feedback events" if events
                                                                 else "[yellow]not within this run[/]"))
    console.print(f"plot: {plot(result, out / 'simulation.png')}" + (f"; {result.failed} requests failed"
                                                                      if result.failed else ""))
    return result


@app.command("demo")
def demo(
    size: str = typer.Option("demo", help="Shop size: tiny | small | demo."),
    seed: int = typer.Option(7),
    train_steps: int = typer.Option(40, help="Encoder fine-tuning steps (~2-3 s each on 2 cores)."),
) -> None:
    """End to end on the embedded default: shop -> features -> fine-tune -> evaluate -> Triton -> gateway."""
    from scorer.data import feast_ops

    console.rule("1. synthetic shop")
    data_generate(out=DEMO_SHOP_DIR, size=size, seed=seed, end=None)
    console.rule("2. import (validate + derive feature tables)")
    data_import(source=DEMO_SHOP_DIR, repo=FEATURE_REPO, as_of=None)
    console.rule("3. feast apply")
    feast_ops.apply(FEATURE_REPO)
    console.rule("4. feast materialize (full load into the SQLite online store)")
    feast_ops.materialize_all(FEATURE_REPO)
    console.rule("5. a live session event, pushed to the online store")
    user, item_ids = push_demo_session(FEATURE_REPO)
    console.rule("6. online features through the fast reader")
    show_features(user, item_ids, FEATURE_REPO)
    console.rule("7. `recsys train all`: encoder, interest model, export, next-item model, rank and learned fusion")
    from cli.train_all import Plan, train_all

    _quiet_transformers()
    trained = train_all(Plan(FEATURE_REPO, PROJECT_ROOT / "triton_models", PROJECT_ROOT / "var" / "models",
                             PROJECT_ROOT / "var" / "reports", PROJECT_ROOT / "var" / "models" / "gateway.toml",
                             encoder_steps=train_steps, next_item_seconds=120.0), console)
    console.rule("8. offline evaluation of retrieval on the time-split holdout")
    ckpt = trained.encoder
    eval_retrieval_cmd(repo=FEATURE_REPO, checkpoint=[ckpt] if ckpt else [], onnx=True,
                       out=PROJECT_ROOT / "var" / "reports" / "retrieval")
    from cli.demo_live import live_demo

    live_demo(trained, FEATURE_REPO, console, shop_dir=DEMO_SHOP_DIR)
    from rpc.process_exit import exit_without_teardown

    exit_without_teardown(0)  # duckdb's nanobind teardown report would be the last thing printed


def push_demo_session(repo: Path) -> tuple[str, list[str]]:
    """Push a fresh session state for the most active user (what the feedback service does live)."""
    import pandas as pd

    from scorer.data.feast_ops import load_store
    from scorer.data.session_push import push_session, session_of_clicks

    offline = repo / "data" / "offline"
    events = pd.read_parquet(offline / "events.parquet")
    items = pd.read_parquet(offline / "item_features.parquet", columns=["item_id", "category"])
    user = events.loc[events["event_type"] == "PURCHASE", "user_id"].value_counts().index[0]
    clicked = list(events[(events["user_id"] == user) & (events["event_type"] == "CLICK")].tail(3)["item_id"])
    state = session_of_clicks(f"demo-{int(time.time())}", clicked, dict(zip(items["item_id"], items["category"])),
                              ["waterproof jacket under 200"])
    t0 = time.perf_counter()
    push_session(load_store(repo), user, state)
    console.print(f"pushed session {state.session_id} for user {user} in {(time.perf_counter() - t0) * 1e3:.0f} ms "
                  f"(clicked {clicked})")
    return user, clicked + list(items["item_id"].head(2))


def main() -> None:
    """The `recsys` command: the typer app, then an exit without the interpreter's teardown, where
    duckdb (Feast's offline store, via ibis) would print its nanobind "leaked ..." report after every
    command that read the offline store (rpc/process_exit.py). A crash still raises as usual."""
    from rpc.process_exit import exit_without_teardown

    try:
        app()
        code = 0
    except SystemExit as e:  # typer/click end every command this way, errors included
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
    exit_without_teardown(code)


if __name__ == "__main__":
    main()
