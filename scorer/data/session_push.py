"""Push a user's live session state to the online store through Feast (PushSource user_session_push).

The feedback service applies events to a `SessionState` and pushes the result; the demo and the
tests use the same function to simulate a shopper's clicks.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timezone

import pandas as pd

from contract.session import PUSH_SOURCE, SessionState


def session_row(user_id: str, state: SessionState, at: datetime | None = None) -> pd.DataFrame:
    return pd.DataFrame([{"user_id": user_id, **state.features(),
                          "event_timestamp": pd.Timestamp(at or datetime.now(timezone.utc))}])


def push_session(store, user_id: str, state: SessionState, at: datetime | None = None) -> None:
    """Write `state` as the user's current session features (online store only)."""
    from feast.data_source import PushMode

    store.push(PUSH_SOURCE, session_row(user_id, state, at), to=PushMode.ONLINE)


def session_of_clicks(session_id: str, item_ids: Iterable[str], categories: dict[str, str],
                      queries: Iterable[str] = ()) -> SessionState:
    """A session in which the user searched `queries` and then clicked `item_ids` in order."""
    state = SessionState(session_id)
    for q in queries:
        state.apply("QUERY", None, q, None)
    for item_id in item_ids:
        state.apply("CLICK", item_id, None, categories.get(item_id))
    return state
