"""The served path's source fusion, chosen on a shop's own log: the harness (moved here from
bench/tune_fusion.py, which imports it) and `recsys tune fusion`'s per-shop choice.

The harness runs the gateway's own code for a page without a query (a returning user, home feed),
not a copy: the catalog and its co-visitation (`gateway.catalog.load_catalog` over an in-memory
source of the training events), the item index over the zero-shot encoder's item vectors, the
user's profile as the feature tables build it (`scorer.data.feature_tables.user_profile`) read
through `gateway.scoring.UserView`, the untrained interest formula (`gateway.retrieval.fallback_interest`;
a served interest model would replace it), the candidates (`gateway.retrieval.retrieve`), the fused
relevance (`gateway.pipeline.prescore.fused_relevance`) and the pre-score (`gateway.scoring.feature_terms`
+ `fuse`, with the configured blend weights). No ranker: the untrained one is not applied
(ranker_mode auto). Split: leave-one-out next item (scorer/eval/next_item.py): each user's last
interaction is the test target, the one before it the validation target.

`tune_shop` splits the validation users in two seeded halves: it chooses the fusion's weights, k
and the co-visitation seeds on the choice half only (the harness's coordinate ascent; one shop, so
the objective is its NDCG@10), and keeps the choice only when its gain over the start on the
confirm half, users that took no part in the choice, exceeds the gain's paired standard error
(`scorer.eval.paired_gain.PairedGain`, the rule the model gates keep a candidate by). The gain on
the choice half is optimistic (about 70 settings tried on it): it is shown, never decisive. Test
is read once, never to decide.
`settings_toml` writes the keys the gateway's `--config` file reads (gateway/config.py).
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Console
from rich.progress import track
from rich.table import Table

from contract.next_item import NEXT_ITEM_HISTORY
from contract.scores import ScoreWeights
from gateway.catalog import COVISIT_EVENTS, COVISIT_NEIGHBOURS, Catalog, load_catalog
from gateway.config import GatewaySettings, SourceFusion
from gateway.index import ItemIndex
from gateway.pipeline.prescore import fused_relevance
from gateway.learned_fusion import candidate_features
from gateway.retrieval import Candidates, NextItems, fallback_interest, history_positions, retrieve
from gateway.scoring import UserView, feature_terms, fuse, weight_vector
from gateway.state import Snapshot, build_snapshot
from scorer.eval.next_item import Split, leave_one_out, metrics_from_ranks, ordered_interactions
from scorer.eval.paired_gain import PairedGain, split_halves
from sources.memory import InMemoryCatalogSource

console = Console()
# The events a next-item target, a history and the co-visitation are made of: the gateway's own.
INTERACTIONS = COVISIT_EVENTS
NUM_RESULTS = 50  # what the real-data bench asks the gateway for
MISS = np.iinfo(np.int32).max
# The grid of the coordinate ascent (interest's weight stays 1: the sources' weights count only by
# their ratios; scale weighs the fused relevance against the feature terms of the final score).
GRID = {"k": (2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0),
        "session": (0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0),
        "popular": (0.0, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0),
        "scale": (0.5, 1.0, 2.0, 3.0, 5.0, 9.0)}
# Co-visitation seeds: (profile items read, decay per older seed).
SEED_GRID = ((10, 0.8), (10, 0.5), (10, 0.2), (10, 0.05), (3, 0.8), (3, 0.2), (1, 0.8))


@dataclass
class Request:
    """One validation (or test) user's page without a query, up to the fusion: what the gateway's
    stages computed, so that any fusion setting can be scored without retrieving again."""

    positions: np.ndarray
    cands: Candidates
    pers: np.ndarray
    pop: np.ndarray
    fresh: np.ndarray
    target: int  # catalog position (-1: not in the catalog)
    features: np.ndarray  # the learned fusion's (gateway/learned_fusion.py candidate_features), one row per candidate


@dataclass
class Seeds:
    """How the co-visitation source reads the user's items (gateway settings of the same names)."""

    covisit_recent_items: int = GatewaySettings.model_fields["covisit_recent_items"].default
    covisit_seed_decay: float = GatewaySettings.model_fields["covisit_seed_decay"].default

    def label(self) -> str:
        return f"recent items {self.covisit_recent_items}, seed decay {self.covisit_seed_decay:g}"




@dataclass
class Page:
    """A target's user as the gateway reads them (profile + live session), before retrieval."""

    user: UserView
    now: float
    target: int


@dataclass
class Loaded:
    """One split of one shop as the gateway would hold it when the targets' users come back."""

    snap: Snapshot
    pages: list[Page]


@dataclass
class ShopData:
    name: str
    items: pd.DataFrame  # the project's item format (scorer/data/schema.py)
    events: pd.DataFrame
    notes: list[str] = field(default_factory=list)



def embed_catalog(catalog: Catalog, encoder: Path | None = None) -> np.ndarray:
    """The item vectors the gateway's index holds: the zero-shot encoder's, or those of the
    fine-tuned checkpoint `encoder` (`recsys train encoder`'s output, as the demo serves it)."""
    import torch

    from scorer.eval.retrieval_eval import embed_texts
    from scorer.models.encoder import EncoderConfig, TextEncoder

    torch.set_num_threads(2)
    model = (TextEncoder(EncoderConfig(model_path=str(encoder))) if encoder else TextEncoder()).eval()
    which = f"the encoder {encoder}" if encoder else "the zero-shot encoder"
    with console.status(f"embedding {len(catalog):,} item texts with {which}"):
        return embed_texts(model, list(catalog.texts), model.config.item_max_length)


def history_events(events: pd.DataFrame, split: Split, which: str) -> pd.DataFrame:
    """Every split user's events up to their `which` target, in sequence order (scorer/eval/next_item.py):
    the interactions of the target's history, the earlier lines of the target's own invoice included
    (same timestamp, earlier in the log), never the target nor anything after it; a user's other
    events (impressions, queries) strictly before the target's time. Users outside the split (under
    3 interactions) are left out, as the served bench imports only the benchmark's customers."""
    targets = getattr(split, which).set_index("user_id")
    n_hist = targets["history"].map(len)
    ev = events[events["user_id"].isin(targets.index)].copy()
    ev["_row"] = np.arange(len(ev))
    ev = ev.sort_values(["user_id", "timestamp", "_row"], kind="stable").reset_index(drop=True)
    inter = ev["event_type"].isin(INTERACTIONS) & ev["item_id"].notna()
    it = ev[inter]
    # The interaction index of each row, consecutive repeats of one item sharing theirs (as the split counts).
    new = ~((it["user_id"] == it["user_id"].shift()) & (it["item_id"] == it["item_id"].shift()))
    index = new.astype(int).groupby(it["user_id"]).cumsum() - 1
    keep = (ev["timestamp"] < ev["user_id"].map(targets["timestamp"])).to_numpy()  # non-interactions
    keep[inter.to_numpy()] = index.to_numpy() < it["user_id"].map(n_hist).to_numpy()
    hist = ev[keep].drop(columns="_row").reset_index(drop=True)
    got = ordered_interactions(hist[hist["event_type"].isin(INTERACTIONS) & hist["item_id"].notna()])
    got = got.groupby("user_id", sort=False)["item_id"].agg(list)
    if not got.reindex(targets.index).equals(targets["history"]):
        raise AssertionError(f"the {which} histories do not match the split's")
    return hist


def _profiles(items: pd.DataFrame, events: pd.DataFrame) -> dict[str, dict]:
    """Each user's newest user_profile row (as materialized: the online store holds the newest)."""
    from scorer.data.feature_tables import user_profile

    with console.status("building user profiles (scorer/data/feature_tables.py)"):
        table = user_profile(items, events)
    newest = table.sort_values("event_timestamp", kind="stable").drop_duplicates("user_id", keep="last")
    return {r["user_id"]: r for r in newest.to_dict("records")}


def _live_session(events: pd.DataFrame, targets: pd.DataFrame) -> dict[str, dict]:
    """What the live session holds at each target: the clicked / carted items of the target's own
    session before it, newest first (empty when the target opens a new session)."""
    ev = events[events["event_type"].isin(INTERACTIONS)]
    first = targets.merge(ev[["user_id", "item_id", "timestamp", "session_id"]], on=["user_id", "item_id", "timestamp"],
                          how="left").drop_duplicates("user_id")
    sessions = first.dropna(subset=["session_id"]).set_index("user_id")[["session_id", "timestamp"]]
    prior = ev[ev["session_id"].isin(set(sessions["session_id"]))]
    out: dict[str, dict] = {}
    for user_id, (session_id, ts) in sessions.iterrows():
        s = prior[(prior["session_id"] == session_id) & (prior["timestamp"] < ts)].sort_values("timestamp")
        clicked = s.loc[s["event_type"] == "CLICK", "item_id"].tolist()[::-1]
        carted = s.loc[s["event_type"] == "ADD_TO_CART", "item_id"].tolist()[::-1]
        if clicked or carted:
            out[user_id] = {"recent_clicked_item_ids": tuple(dict.fromkeys(clicked)),
                            "recent_carted_item_ids": tuple(dict.fromkeys(carted))}
    return out


def load(shop: ShopData, which: str, max_users: int, seed: int = 0, vectors: dict[str, np.ndarray] | None = None,
         covisit_neighbours: int = COVISIT_NEIGHBOURS, encoder: Path | None = None,
         targets_from: pd.Timestamp | None = None) -> Loaded:
    """The gateway's catalog (co-visitation, popularity) over every user's history before their
    `which` ("valid" or "test") target, and each sampled target's user as the gateway reads them.
    `targets_from`: only targets at or after this time (UTC) are sampled (the users whose target a
    model in the path was trained on would judge it on what it recalls)."""
    from scorer.data.feature_tables import item_features, item_popularity

    interactions = shop.events[shop.events["event_type"].isin(INTERACTIONS) & shop.events["item_id"].notna()]
    split = leave_one_out(interactions)
    history = history_events(shop.events, split, which)
    targets = getattr(split, which)
    if targets_from is not None:
        times = pd.to_datetime(targets["timestamp"], utc=True)
        targets = targets[(times >= targets_from).to_numpy()].reset_index(drop=True)
    if len(targets) > max_users:
        targets = targets.sample(max_users, random_state=seed).reset_index(drop=True)
    source = InMemoryCatalogSource(item_features(shop.items), item_popularity(history), history)
    catalog = load_catalog(source, covisit_neighbours=covisit_neighbours)
    vectors = vectors if vectors is not None else {}
    key = "|".join(catalog.item_ids)
    if key not in vectors:
        vectors[key] = embed_catalog(catalog, encoder) if encoder else embed_catalog(catalog)
    snap = build_snapshot(catalog, ItemIndex(vectors[key], "zero-shot"))
    profiles = _profiles(shop.items, history[history["user_id"].isin(set(targets["user_id"]))])
    sessions = _live_session(shop.events, targets)
    pages = []
    for row in targets.itertuples(index=False):
        values = {**profiles.get(row.user_id, {}), **sessions.get(row.user_id, {})}
        user = UserView.build(values, catalog, row.user_id in profiles, row.user_id in sessions)
        pages.append(Page(user, row.timestamp.timestamp(), catalog.position.get(row.item_id, -1)))
    missing = sum(1 for p in pages if not p.user.known)
    console.print(f"{shop.name} {which}: {len(pages)} users, {missing} without a profile or session")
    return Loaded(snap, pages)


# A user's interest vector from their history (catalog positions, newest first): the gateway's
# untrained formula by default, or the served interest model (cli/fusion_learning.py onnx_interest).
InterestFn = Callable[[Snapshot, list[int]], "np.ndarray | None"]
# The next-item model's list for a history (catalog positions, newest first): the served model's
# ONNX file (cli/fusion_learning.py onnx_next_item); None: no model served (the gateway then has no
# such source).
NextItemFn = Callable[[Snapshot, list[int]], "NextItems | None"]


def prepare(loaded: Loaded, per_source: int, seeds: Seeds, label: str = "",
            interest_fn: InterestFn | None = None, next_item_fn: NextItemFn | None = None) -> list[Request]:
    """gateway/pipeline/retrieve.py + prescore.py for each page (no query, no page item), and each
    candidate's learned-fusion features (what prescore.learned_relevance computes)."""
    snap, allowed = loaded.snap, np.ones(len(loaded.snap.catalog), dtype=bool)
    out = []
    for page in track(loaded.pages, description=label or "pages", console=console, transient=True):
        hist = history_positions(page.user, None, 10)
        interest = (interest_fn(snap, hist) if interest_fn else fallback_interest(snap, hist, None)) if hist else None
        recent = history_positions(page.user, None, NEXT_ITEM_HISTORY)
        next_items = next_item_fn(snap, recent) if next_item_fn and recent else None
        cands = retrieve(snap, per_source, allowed, None, "", interest, page.user, None,
                         seeds.covisit_recent_items, seeds.covisit_seed_decay, next_items)
        positions = np.array(cands.positions, dtype=np.int64)
        pers, pop, fresh = feature_terms(positions, snap.catalog, page.user, snap.catalog.popularity[positions],
                                         now=page.now)
        cosine = snap.index.similarity(interest, positions) if interest is not None else None
        features = candidate_features(snap, cands, positions, page.user, cosine, pop, pers, fresh)
        out.append(Request(positions, cands, pers, pop, fresh, page.target, features))
    return out


Relevance = Callable[[Request], np.ndarray]


def fused(fusion: SourceFusion) -> Relevance:
    return lambda r: fused_relevance(r.cands, r.positions, fusion)


def evaluate(requests: list[Request], relevance: Relevance, weights: np.ndarray) -> dict[str, float]:
    """Recall/NDCG@10/50 of the pre-score order (the first NUM_RESULTS answered)."""
    return metrics_from_ranks(target_ranks(requests, relevance, weights))


def target_ranks(requests: list[Request], relevance: Relevance, weights: np.ndarray) -> np.ndarray:
    """Each request's target's 0-based place in the pre-score order's first NUM_RESULTS (MISS: not there)."""
    ranks = np.empty(len(requests), dtype=np.int64)
    for i, r in enumerate(requests):
        if not len(r.positions):
            ranks[i] = MISS
            continue
        pre = fuse(weights, relevance(r), r.pers, r.pop, r.fresh)
        shown = r.positions[np.argsort(-pre, kind="stable")[:NUM_RESULTS]]
        hit = np.flatnonzero(shown == r.target)
        ranks[i] = hit[0] if len(hit) else MISS
    return ranks


def objective_of(shops: dict[str, list[Request]], weights: np.ndarray, base: dict[str, float]) -> Callable[[SourceFusion], float]:
    """The mean over shops of NDCG@10 relative to `base` (each shop counts alike, whatever its level)."""
    return lambda f: float(np.mean([evaluate(reqs, fused(f), weights)["NDCG@10"] / max(base[name], 1e-9)
                                    for name, reqs in shops.items()]))


def tune(shops: dict[str, list[Request]], weights: np.ndarray, start: SourceFusion, passes: int = 2) -> SourceFusion:
    """Coordinate ascent over GRID on the mean over shops of NDCG@10 relative to the start."""
    base = {name: evaluate(reqs, fused(start), weights)["NDCG@10"] for name, reqs in shops.items()}
    objective = objective_of(shops, weights, base)
    best, best_score = start, objective(start)
    for _ in range(passes):
        for param, values in GRID.items():
            for v in values:
                candidate = best.model_copy(update={param: v})
                score = objective(candidate)
                if score > best_score + 1e-9:
                    best, best_score = candidate, score
        console.print(f"  pass: {best.model_dump()} -> {best_score:.4f} x the start's NDCG@10")
    return best



def choose_seeds(loaded: dict[str, Loaded], fusion: SourceFusion, weights: np.ndarray, per_source: int,
                 start: Seeds, base: dict[str, float]) -> tuple[Seeds, dict[str, list[Request]], dict[str, float]]:
    """The co-visitation seeds (how many profile items, their decay) with the best mean relative NDCG@10."""
    scores: dict[str, float] = {}
    best: tuple[float, Seeds, dict[str, list[Request]]] | None = None
    for n, decay in SEED_GRID:
        seeds = Seeds(n, decay)
        reqs = {name: prepare(ld, per_source, seeds, f"{name}: {seeds.label()}") for name, ld in loaded.items()}
        score = objective_of(reqs, weights, base)(fusion)
        scores[seeds.label()] = score
        console.print(f"  {seeds.label()}: {score:.4f} x the start's NDCG@10")
        if best is None or score > best[0] + 1e-9 or (seeds == start and score >= best[0] - 1e-9):
            best = (score, seeds, reqs)
    assert best is not None
    return best[1], best[2], scores


# --- `recsys tune fusion`: one shop's choice --------------------------------------------------------

# The keys of the gateway's settings file that `recsys tune fusion` writes (gateway/config.py).
OWN_KEYS = frozenset({"fusion", "covisit_recent_items", "covisit_seed_decay"})


class CannotTune(ValueError):
    """The shop's log or the output file does not allow a choice (the message says why)."""


@dataclass
class Setting:
    """What `recsys tune fusion` chooses: the fusion and the co-visitation seeds."""

    fusion: SourceFusion = field(default_factory=SourceFusion)
    seeds: Seeds = field(default_factory=Seeds)

    def label(self) -> str:
        f = self.fusion
        return (f"k {f.k:g}, interest {f.interest:g}, session {f.session:g}, popular {f.popular:g}, "
                f"scale {f.scale:g}; {self.seeds.label()}")


@dataclass
class SplitResult:
    """The start and the chosen setting on one set of users (a half of validation, or test), and
    the chosen one's NDCG@10 gain paired over those users."""

    start: dict[str, float]
    chosen: dict[str, float]
    gain: PairedGain

    @property
    def users(self) -> int:
        return self.gain.examples


@dataclass
class ShopTuning:
    shop: str
    start: Setting
    chosen: Setting  # the best on the choice half of validation, kept only if `changes`
    choice: SplitResult  # the validation users the setting was chosen on (optimistic: shown, never decisive)
    confirm: SplitResult  # the other validation users, which took no part in the choice: they decide
    test: SplitResult  # read once, never to decide
    seed_scores: dict[str, float]

    @property
    def changes(self) -> bool:
        """The chosen setting differs from the start and its gain on the confirm half exceeds its
        standard error (+ margin)."""
        return self.chosen != self.start and self.confirm.gain.beyond_noise

    @property
    def served(self) -> Setting:
        return self.chosen if self.changes else self.start


def read_shop(repo: Path) -> ShopData:
    """The shop's offline log as `recsys data import` (and the demo) wrote it: <repo>/data/offline."""
    offline = repo / "data" / "offline"
    tables = {name: offline / f"{name}.parquet" for name in ("items", "events")}
    missing = [p.name for p in tables.values() if not p.is_file()]
    if missing:
        raise CannotTune(f"no imported data in {offline} ({', '.join(missing)} missing): run `recsys data import` first")
    return ShopData(str(offline), pd.read_parquet(tables["items"]), pd.read_parquet(tables["events"]))


def compare(start_reqs: list[Request], chosen_reqs: list[Request], start: Setting, chosen: Setting,
            weights: np.ndarray, margin: float) -> SplitResult:
    """Both settings on the same pages (prepare keeps the pages' order), NDCG@10 paired per user."""
    from scorer.eval.interest_eval import ndcg_per_example

    before = target_ranks(start_reqs, fused(start.fusion), weights)
    after = target_ranks(chosen_reqs, fused(chosen.fusion), weights)
    gain = PairedGain.of(ndcg_per_example(after), ndcg_per_example(before), margin, versus="the defaults", unit="users")
    return SplitResult(metrics_from_ranks(before), metrics_from_ranks(after), gain)


def subset(loaded: Loaded, positions: np.ndarray) -> Loaded:
    """The same catalog (co-visitation, popularity over every user's history) and only these pages."""
    return Loaded(loaded.snap, [loaded.pages[i] for i in positions])


def judge(loaded: Loaded, start: Setting, chosen: Setting, weights: np.ndarray, per_source: int, margin: float,
          label: str) -> SplitResult:
    """Both settings on `loaded`'s pages, each with its own co-visitation seeds' candidates."""
    start_reqs = prepare(loaded, per_source, start.seeds, f"{label}: the defaults' candidates")
    chosen_reqs = (start_reqs if chosen.seeds == start.seeds
                   else prepare(loaded, per_source, chosen.seeds, f"{label}: the chosen seeds"))
    return compare(start_reqs, chosen_reqs, start, chosen, weights, margin)


def tune_shop(shop: ShopData, max_users: int, seed: int = 0, margin: float = 0.0, start: Setting | None = None,
              per_source: int = GatewaySettings.model_fields["candidates_per_source"].default) -> ShopTuning:
    """The fusion and seeds chosen from `start` (default: the gateway's defaults) on the choice half
    of the validation users, as bench/tune_fusion.py chooses them for several shops; judged against
    the start on the confirm half; test read once, for both settings."""
    start = start or Setting()
    weights = weight_vector(ScoreWeights())
    vectors: dict[str, np.ndarray] = {}
    loaded = load(shop, "valid", max_users, seed, vectors=vectors)
    if len(loaded.pages) < 4:
        raise CannotTune(f"{len(loaded.pages)} users with at least 3 interactions: need 4 (two halves of validation "
                         "with a standard error each; a validation and a test target each need a history, "
                         "scorer/eval/next_item.py)")
    choice_half, confirm_half = (subset(loaded, h) for h in split_halves(len(loaded.pages), seed))
    console.print(f"validation users split in two (seed {seed}): {len(choice_half.pages):,} to choose on, "
                  f"{len(confirm_half.pages):,} to confirm on")
    choice_start = prepare(choice_half, per_source, start.seeds, "choice half: the defaults' candidates")
    shops = {shop.name: choice_start}
    base = {shop.name: evaluate(choice_start, fused(start.fusion), weights)["NDCG@10"]}
    console.print("tuning the fusion on the choice half of validation (coordinate ascent on NDCG@10)")
    fusion = tune(shops, weights, start.fusion)
    console.print("choosing the co-visitation seeds on the choice half of validation")
    seeds, choice_chosen, seed_scores = choose_seeds({shop.name: choice_half}, fusion, weights, per_source,
                                                     start.seeds, base)
    if seeds != start.seeds:
        console.print("tuning the fusion again with those seeds")
        fusion = tune(choice_chosen, weights, fusion)
    chosen = Setting(fusion, seeds)
    choice = compare(choice_start, choice_chosen[shop.name], start, chosen, weights, margin)
    confirm = judge(confirm_half, start, chosen, weights, per_source, margin, "confirm half")
    test_loaded = load(shop, "test", max_users, seed, vectors=vectors)
    test = judge(test_loaded, start, chosen, weights, per_source, margin, "test")
    return ShopTuning(shop.name, start, chosen, choice, confirm, test, seed_scores)


def result_table(t: ShopTuning) -> Table:
    """Start vs chosen on both halves of validation and on test: Recall@10, NDCG@10, the paired
    NDCG@10 gain ± its standard error."""
    table = Table("split", "users", "settings", "Recall@10", "NDCG@10", "NDCG@10 gain ± SE",
                  title=f"source fusion on {t.shop}: the defaults vs the choice (made on the choice half of "
                        "validation, kept only if the confirm half says so)")
    for split, r in shown_splits(t):
        g = r.gain
        rel = f" ({g.gain / g.baseline:+.0%})" if g.baseline > 0 else ""
        table.add_row(split, f"{r.users:,}", "defaults", f"{r.start['Recall@10']:.4f}", f"{r.start['NDCG@10']:.4f}", "")
        table.add_row("", "", "chosen", f"{r.chosen['Recall@10']:.4f}", f"{r.chosen['NDCG@10']:.4f}",
                      f"{g.gain:+.4f} ± {g.se:.4f}{rel}", end_section=True)
    return table


def shown_splits(t: ShopTuning) -> tuple[tuple[str, SplitResult], ...]:
    """The table's and the file's rows, in the order shown."""
    return (("validation, choice half", t.choice), ("validation, confirm half", t.confirm), ("test", t.test))


def settings_toml(t: ShopTuning, out: Path, max_users: int, seed: int, data: str) -> str:
    """The gateway settings file for the chosen setting: a header saying when, on what data and with
    which numbers it was chosen, then the keys gateway/config.py reads (all of them, so that a later
    change of the defaults does not change what this shop serves)."""
    s = t.chosen
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    def numbers(split: str, r: SplitResult) -> str:
        return (f"# {split} ({r.users:,} users): NDCG@10 {r.start['NDCG@10']:.4f} -> {r.chosen['NDCG@10']:.4f} "
                f"(gain {r.gain.gain:+.4f} ± {r.gain.se:.4f}), Recall@10 {r.start['Recall@10']:.4f} -> "
                f"{r.chosen['Recall@10']:.4f}")

    lines = [f"# Source fusion chosen by `recsys tune fusion` on {when}.",
             f"# Data: {data}.",
             f"# Leave-one-out next item (scorer/eval/next_item.py), pages without a query, no ranker; validation "
             f"users (at most {max_users:,}, sample and split seed {seed}) split in two: chosen on one half, kept "
             f"because it beat the defaults on the other; test read once.",
             f"# Defaults: {t.start.label()}.",
             f"# Chosen:   {s.label()}.",
             *(numbers(split, r) for split, r in shown_splits(t)),
             f"# Serve: recsys serve --config {out}   (RECSYS_* environment variables win over this file)",
             f"covisit_recent_items = {int(s.seeds.covisit_recent_items)}",
             f"covisit_seed_decay = {float(s.seeds.covisit_seed_decay)!r}",
             "", "[fusion]"]
    lines += [f"{name} = {float(value)!r}" for name, value in s.fusion.model_dump().items()]
    return "\n".join(lines) + "\n"


def check_writable(out: Path) -> None:
    """Refuse a settings file holding other settings: writing would drop them (there is no TOML
    writer that keeps a file's other keys and comments); an earlier tuning's file is replaced."""
    if not out.exists():
        return
    if not out.is_file():
        raise CannotTune(f"{out} is not a file: --out names the settings file to write")
    try:
        held = tomllib.loads(out.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise CannotTune(f"{out} is not a TOML file ({e}): choose another --out") from None
    foreign = sorted(set(held) - OWN_KEYS)
    if foreign:
        raise CannotTune(f"{out} holds other settings ({', '.join(foreign)}), which writing it would drop: write to "
                         "another --out and copy its keys into that file")


def read_back(out: Path, want: Setting) -> list[str]:
    """What the gateway reads from `out` (load_settings: RECSYS_* environment > file > defaults)
    that differs from `want`, with the environment variable that overrides it when one does."""
    import os

    from gateway.config import load_settings

    got = load_settings(out)
    expected = {**{f"fusion.{k}": v for k, v in want.fusion.model_dump().items()},
                "covisit_recent_items": want.seeds.covisit_recent_items,
                "covisit_seed_decay": want.seeds.covisit_seed_decay}
    read = {**{f"fusion.{k}": v for k, v in got.fusion.model_dump().items()},
            "covisit_recent_items": got.covisit_recent_items, "covisit_seed_decay": got.covisit_seed_decay}
    wrong = []
    for key, value in expected.items():
        if read[key] != value:
            env = "RECSYS_" + key.upper().replace(".", "__")
            why = f" ({env} is set)" if env in os.environ else ""
            wrong.append(f"{key} = {read[key]!r}, not {value!r}{why}")
    return wrong


def data_note(repo: Path, shop: ShopData) -> str:
    """What the log is, for the file's header: where, how many events and items, what was imported when."""
    import json

    from scorer.data.importer import MANIFEST

    note = f"{shop.name}, {len(shop.events):,} events, {len(shop.items):,} items"
    manifest = repo / "data" / "offline" / MANIFEST
    if manifest.is_file():
        m = json.loads(manifest.read_text())
        note += f", imported from {m.get('source', '?')} as of {m.get('as_of', '?')}"
    return note


def tune_fusion(repo: Path, out: Path, max_users: int = 2000, seed: int = 0, margin: float = 0.0) -> ShopTuning:
    """`recsys tune fusion`: choose on one half of the shop's validation users, print start vs
    chosen on both halves and test, and write `out` only when the choice beats the defaults on the
    other (confirm) half beyond its standard error (plus `margin`); otherwise write nothing and say so."""
    check_writable(out)  # before minutes of work
    shop = read_shop(repo)
    t = tune_shop(shop, max_users, seed, margin)
    console.print(result_table(t))
    console.print(f"defaults: {t.start.label()}")
    console.print(f"chosen:   {t.chosen.label()}")
    if not t.changes:
        why = ("the defaults are the best found on the choice half" if t.chosen == t.start
               else f"{t.confirm.gain.says()} on the confirm half")
        left = f"; {out} left as it was" if out.exists() else ""
        console.print(f"[yellow]no change[/]: keep the defaults, nothing written ({why} of validation{left})")
        return t
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(settings_toml(t, out, max_users, seed, data_note(repo, shop)))
    wrong = read_back(out, t.chosen)
    if wrong:
        console.print(f"[yellow]the gateway would not serve all of {out}[/]: " + "; ".join(wrong))
    console.print(f"[green]wrote[/] {out} ({t.confirm.gain.says()} on the confirm half of validation); serve it with "
                  f"`recsys serve --config {out}`")
    return t
