"""A bounded in-memory store: entries in arrival order, limited by count, estimated bytes and age.

The online learner keeps three of these (served lists, pending impressions, early events). Each is
best effort by design (it only teaches; the events themselves are durable in the event log), so
when a bound is hit the *oldest* entries go first: they are the least likely to still be joined.
Bytes are an estimate (`size_of`, per entry, see blend_learner.py), not a measurement: tracking
real allocations would cost more than the entries themselves.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from feedback import metrics

V = TypeVar("V")


class Held(Generic[V]):
    def __init__(self, name: str, max_count: int, max_bytes: int, time_of: Callable[[V], float],
                 size_of: Callable[[str, V], int], units_of: Callable[[V], int] = lambda v: 1):
        self.name = name
        self.max_count = max_count
        self.max_bytes = max_bytes
        self.time_of = time_of  # when the entry arrived (the learner's clock): age bounds
        self.size_of = size_of  # estimated bytes of one entry, its key and its share of the dict
        self.units_of = units_of  # what max_count counts (one per entry, or e.g. events in an entry)
        self.entries: OrderedDict[str, V] = OrderedDict()
        self.count = 0
        self.bytes = 0
        self.dropped: Counter[str] = Counter()  # reason -> units dropped unused (also in Prometheus)

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def get(self, key: str) -> V | None:
        return self.entries.get(key)

    def put(self, key: str, value: V) -> bool:
        """Add (or replace, as the newest) an entry, then drop the oldest while over a bound. An
        entry larger than a bound on its own is dropped at once (False): it must not flush the rest."""
        self.pop(key)
        units, nbytes = self.units_of(value), self.size_of(key, value)
        if units > self.max_count or nbytes > self.max_bytes:
            self._dropped("count" if units > self.max_count else "bytes", units)
            return False
        self.entries[key] = value
        self.count += units
        self.bytes += nbytes
        self._enforce()
        return True

    def grew(self, units: int, nbytes: int) -> None:
        """An entry was extended in place (the caller appended to it): account for it, then enforce."""
        self.count += units
        self.bytes += nbytes
        self._enforce()

    def pop(self, key: str) -> V | None:
        """Remove an entry that was used (not counted as dropped)."""
        value = self.entries.pop(key, None)
        if value is not None:
            self.count -= self.units_of(value)
            self.bytes -= self.size_of(key, value)
        return value

    def pop_older(self, cutoff: float) -> Iterator[tuple[str, V]]:
        """Remove and yield the entries that arrived at or before `cutoff`, oldest first."""
        while self.entries:
            key, value = next(iter(self.entries.items()))
            if self.time_of(value) > cutoff:
                return
            self.pop(key)
            yield key, value

    def drop_older(self, cutoff: float) -> None:
        """Drop (unused) the entries that arrived at or before `cutoff`."""
        for _, value in self.pop_older(cutoff):
            self._dropped("age", self.units_of(value))

    def _enforce(self) -> None:
        while self.entries and (self.count > self.max_count or self.bytes > self.max_bytes):
            reason = "count" if self.count > self.max_count else "bytes"
            key, value = self.entries.popitem(last=False)
            units = self.units_of(value)
            self.count -= units
            self.bytes -= self.size_of(key, value)
            self._dropped(reason, units)

    def _dropped(self, reason: str, units: int) -> None:
        self.dropped[reason] += units
        metrics.DROPPED.labels(self.name, reason).inc(units)

    def publish(self) -> None:
        metrics.HELD.labels(self.name).set(self.count)
        metrics.HELD_BYTES.labels(self.name).set(self.bytes)
