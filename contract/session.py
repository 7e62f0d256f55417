"""A user's live session: its state, how an event updates it, and the features it becomes.

The feedback service applies events online and pushes the features through Feast; training builds
the offline `user_session` table with the same class (scorer/data/feature_tables.py); the gateway
reads the features by these names. One definition, so online and offline sessions cannot drift.
"""

from __future__ import annotations

from collections import Counter, deque

SESSION_RECENT_QUERIES = 5
SESSION_RECENT_ITEMS = 10
# The events in which a shopper acted on an item: a history, the co-visitation and a next-item
# target are made of these (the gateway, the next-item model's training and the benchmark alike).
INTERACTION_EVENTS = ("CLICK", "ADD_TO_CART", "PURCHASE")
# The events that change a session (impressions do not).
SESSION_EVENTS = ("QUERY", *INTERACTION_EVENTS)
# The `user_session` feature view's fields (feature_repo/features.py), in SessionState.features() order.
SESSION_FEATURES = ("session_id", "recent_queries", "recent_clicked_item_ids", "recent_carted_item_ids",
                    "session_categories", "session_category_counts", "session_event_count")
# The Feast push source the feedback service writes sessions through.
PUSH_SOURCE = "user_session_push"


class SessionState:
    """Live session features of one user. The feedback service applies the same updates online."""

    def __init__(self, session_id: str):
        self.session_id = session_id
        self.queries: deque[str] = deque(maxlen=SESSION_RECENT_QUERIES)
        self.clicked: deque[str] = deque(maxlen=SESSION_RECENT_ITEMS)
        self.carted: deque[str] = deque(maxlen=SESSION_RECENT_ITEMS)
        self.categories: Counter[str] = Counter()
        self.event_count = 0

    def apply(self, event_type: str, item_id: str | None, query: str | None, category: str | None) -> None:
        self.event_count += 1
        if event_type == "QUERY" and query:
            self.queries.appendleft(query)
        elif event_type == "CLICK" and item_id:
            self.clicked.appendleft(item_id)
        elif item_id and (event_type == "ADD_TO_CART" or (event_type == "PURCHASE" and item_id not in self.carted)):
            # A purchase is usually of an item carted a moment ago: count it once.
            self.carted.appendleft(item_id)
        if category and event_type != "QUERY":
            self.categories[category] += 1

    def features(self) -> dict:
        """The `user_session` feature values, keyed by SESSION_FEATURES."""
        cats = self.categories.most_common()
        return dict(zip(SESSION_FEATURES, (
            self.session_id, list(self.queries), list(self.clicked), list(self.carted),
            [c for c, _ in cats], [int(n) for _, n in cats], int(self.event_count))))
