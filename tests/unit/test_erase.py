"""Erasing a user, store by store (feedback/erase.py and the stores' own erase methods): nothing of
the user stays in the bytes of the files, everything of other users does, the counts stay right.
The whole path through the real service and a real Feast store: tests/integration/test_privacy.py."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from eventlog.event_log import DB_NAME, EventLog, erase_from_segments, recover
from feedback.blend_learner import BlendLearner, LearnerSettings
from feedback.erase import EraseError, Stores, erase_user
from rpc.pseudonyms import Pseudonyms
from scorer.data.pseudonymise import pseudonymised_copy

T0 = datetime(2026, 11, 23, 10, tzinfo=timezone.utc)
ERASED, KEPT = "shopper-erased", "shopper-kept"


def ev(i: int, user: str, request_id: str | None = None) -> dict:
    ts = (T0 + timedelta(seconds=i)).isoformat(timespec="microseconds")
    return {"event_id": f"e{i}", "event_type": "CLICK", "user_id": user, "session_id": "s1", "item_id": f"i{i % 7}",
            "request_id": request_id, "position": 1, "query": None, "quantity": None, "timestamp": ts,
            "received_at": ts}


def files_containing(directory: Path, needle: str) -> list[Path]:
    return [p for p in directory.rglob("*") if p.is_file() and needle.encode() in p.read_bytes()]


def test_the_event_log_forgets_a_user_in_every_byte_and_keeps_its_count_and_order(tmp_path: Path):
    log = EventLog(tmp_path)
    for start in range(0, 600, 100):  # erased rows spread over many pages, some at the very end
        log.append([ev(i, ERASED if i % 3 == 0 or i >= 590 else KEPT, f"r{i}") for i in range(start, start + 100)])
    kept = [e for e in log.read_all() if e["user_id"] == KEPT]
    assert files_containing(tmp_path, ERASED)
    erased = log.erase([ERASED, "nobody"])
    assert erased.events == 600 - len(kept) and "r0" in erased.request_ids and "r1" not in erased.request_ids
    assert len(log) == len(kept) == len(list(log.read_all()))
    # e1 is KEPT's (a duplicate still); e0 was erased, so its id is free again (a resend is stored anew)
    assert log.append([ev(1000, KEPT), ev(1, KEPT), ev(0, KEPT)]) == [True, False, True]
    assert len(log) == len(kept) + 2
    n = len(log)
    log.close()
    assert not files_containing(tmp_path, ERASED)  # secure_delete + the WAL truncated
    again = EventLog(tmp_path)
    assert len(again) == n == len(list(again.read_all()))  # max(seq) - gaps, after reopening
    assert [e["event_id"] for e in again.read_all()][:len(kept)] == [e["event_id"] for e in kept]
    assert again.erase([ERASED]).events == 0  # idempotent
    again.close()
    report = recover(tmp_path)  # the recovery's expected count knows the gaps
    assert report.lost == 0 and report.copied == n


def test_the_former_segment_files_lose_the_users_lines_only(tmp_path: Path):
    lines = [json.dumps(ev(i, ERASED if i % 2 else KEPT)) + "\n" for i in range(6)]
    (tmp_path / "segment-000001.jsonl").write_text("".join(lines) + "{torn")
    assert erase_from_segments(tmp_path, [ERASED]) == 3
    text = (tmp_path / "segment-000001.jsonl").read_text()
    assert ERASED not in text and text.count(KEPT) == 3 and text.endswith("{torn")


def test_the_learner_forgets_the_users_budget_and_everything_held_for_their_requests():
    learner = BlendLearner([1.0, 1.0, 0.3, 0.2], None, LearnerSettings(min_batch=10_000))
    parts = np.full((2, 4), 0.5, np.float32)
    for rid in ("r-erased", "r-kept", "r-early"):
        if rid != "r-early":
            assert learner.add_served_arrays(rid, ["i1", "i2"], parts)
    learner.observe([{"event_type": "IMPRESSION", "request_id": "r-erased", "item_id": "i1", "position": 1,
                      "user_id": ERASED},
                     {"event_type": "IMPRESSION", "request_id": "r-kept", "item_id": "i1", "position": 1,
                      "user_id": KEPT},
                     {"event_type": "CLICK", "request_id": "r-early", "item_id": "i1", "user_id": ERASED}])
    assert {"r-erased i1", "r-kept i1"} <= set(learner.pending) and "r-early" in learner.early
    removed = learner.forget([ERASED], {"r-erased", "r-early"})
    assert removed == 4  # the user's budget window, the served list, the pending impression, the early event
    assert "r-erased" not in learner.served and "r-early" not in learner.early
    assert list(learner.pending) == ["r-kept i1"] and "r-kept" in learner.served
    assert [k for k in learner.sources if ERASED in k] == [] and [k for k in learner.sources if KEPT in k]
    assert learner.forget([ERASED], {"r-erased"}) == 0


def test_erase_user_covers_offline_parquet_and_audits_without_the_id(tmp_path: Path):
    p = Pseudonyms(b"k" * 32)
    offline, events = tmp_path / "offline", tmp_path / "events"
    offline.mkdir()
    pseudonym = p.user(ERASED)
    # The label log and a table written before pseudonyms were on (the raw id) both go.
    pd.DataFrame({"user_id": [pseudonym, p.user(KEPT), pseudonym], "grade": [1, 0, 3]}).to_parquet(offline / "labels.parquet")
    pd.DataFrame({"user_id": [ERASED, KEPT]}).to_parquet(offline / "users.parquet")
    pd.DataFrame({"item_id": ["i1"]}).to_parquet(offline / "items.parquet")
    log = EventLog(events)
    log.append([ev(1, pseudonym, "r1"), ev(2, p.user(KEPT))])
    stores = Stores(events / "privacy_audit.jsonl", event_log=log, offline_dir=offline)

    done = asyncio.run(erase_user(ERASED, p, stores, by="ops"))
    assert done.removed == {"event_log": 1, "offline/labels.parquet": 2, "offline/users.parquet": 1}
    assert pd.read_parquet(offline / "labels.parquet")["grade"].tolist() == [0]
    assert pd.read_parquet(offline / "users.parquet")["user_id"].tolist() == [KEPT]
    again = asyncio.run(erase_user(ERASED, p, stores, by="ops"))  # idempotent: zero counts, audited again
    assert again.total == 0 and again.subject == done.subject
    log.close()
    records = [json.loads(line) for line in (events / "privacy_audit.jsonl").read_text().splitlines()]
    assert [(r["by"], r["total"], r["complete"], r["subject"]) for r in records] == [
        ("ops", 4, True, p.audit_subject(ERASED)), ("ops", 0, True, p.audit_subject(ERASED))]
    assert not files_containing(tmp_path, ERASED) and not files_containing(tmp_path, pseudonym)
    assert files_containing(tmp_path, p.user(KEPT))
    with pytest.raises(EraseError, match="user_id"):
        asyncio.run(erase_user("not an id", p, stores, by="ops"))


def test_an_import_with_a_key_reads_a_pseudonymised_copy(tmp_path: Path):
    p = Pseudonyms(b"k" * 32)
    pd.DataFrame({"user_id": ["u1", "u2"], "session_id": ["s1", None]}).to_parquet(tmp_path / "events.parquet")
    (tmp_path / "users.csv").write_text("user_id,created_at\nu1,2026-01-01\nbad id,2026-01-02\n")
    (tmp_path / "items.csv").write_text("item_id\ni1\n")
    with pseudonymised_copy(tmp_path, p) as copy:
        events = pd.read_parquet(copy / "events.parquet")
        assert events["user_id"].tolist() == [p.user("u1"), p.user("u2")]
        assert events["session_id"].tolist() == [p.session("s1"), None]
        users = pd.read_csv(copy / "users.csv", dtype=str, keep_default_na=False)
        assert users["user_id"].tolist() == [p.user("u1"), "bad id"]  # left for the importer to report
        assert users["created_at"].tolist() == ["2026-01-01", "2026-01-02"]
        assert (copy / "items.csv").read_text() == "item_id\ni1\n"
    assert not copy.exists()


class _Aborted(Exception):
    pass


class _Context:
    """What AdminServicer uses of a grpc.aio context: abort raises, as grpc's does."""

    def __init__(self) -> None:
        self.code = None
        self.details = ""

    async def abort(self, code, details):
        self.code, self.details = code, details
        raise _Aborted(details)


class _UnreachableLearner:
    def forget(self, ids, request_ids):
        from feedback.learner_state import StateUnavailable

        raise StateUnavailable("shared learner state: Redis at 127.0.0.1:1 refused the connection")


def test_an_unreachable_learner_store_is_unavailable_and_audited_incomplete(tmp_path: Path):
    """Not INTERNAL: the erasure stops, says which store, and the audit record says incomplete."""
    import grpc

    from feedback.admin import AdminServicer
    from recsys.v1 import admin_pb2

    stores = Stores(audit_file=tmp_path / "audit.jsonl", learner=_UnreachableLearner())
    context = _Context()
    with pytest.raises(_Aborted):
        asyncio.run(AdminServicer(stores, Pseudonyms()).EraseUser(admin_pb2.EraseUserRequest(user_id=ERASED), context))
    assert context.code == grpc.StatusCode.UNAVAILABLE and "StateUnavailable" in context.details
    record = json.loads((tmp_path / "audit.jsonl").read_text().splitlines()[-1])
    assert record["complete"] is False and ERASED not in json.dumps(record)
