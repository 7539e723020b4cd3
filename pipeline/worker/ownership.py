"""Who owns a key's retry state (pure): the member that holds its whole *cell*.

A worker's topics are co-partitioned: its event topics, its retry tiers, its DLQ and its
parked-keys topic have the same number of partitions, and every copy of an event (retry, DLQ,
parked state) is written to the partition *number* of the event's own partition. Cell ``p`` is
partition ``p`` of every topic the group consumes (event topics and retry tiers). All of a key's
records and state live in one cell.

A member works on cell ``p`` only while the group has given it **every** partition of the cell
(the range assignor gives co-partitioned topics' partitions together, on both group protocols;
while an incremental assignment is half way, a member holding part of a cell leaves it paused).
Kafka assigns a partition to one member at a time, so at most one member holds a cell whole:
one owner per key, by construction. The owner reads the cell's parked keys when the cell
becomes whole, and writes every change of them before the offsets that depend on it; when any
partition of the cell is revoked it finishes or hands back the cell's work, commits, and forgets
the cell's keys before it lets the partition go.
"""

from __future__ import annotations

from collections.abc import Iterable

TP = tuple[str, int]


class Cells:
    """The cells a member holds whole, from the partitions the group assigned it."""

    def __init__(self, topics: Iterable[str]) -> None:
        self.topics = tuple(dict.fromkeys(topics))
        self._held: dict[int, set[str]] = {}
        self._whole: set[int] = set()

    def assign(self, parts: Iterable[TP]) -> list[int]:
        """Partitions added; returns the cells that became whole."""
        became = []
        for topic, p in parts:
            if topic not in self.topics:
                continue
            self._held.setdefault(p, set()).add(topic)
        for p, held in self._held.items():
            if p not in self._whole and len(held) == len(self.topics):
                self._whole.add(p)
                became.append(p)
        return sorted(became)

    def affected(self, parts: Iterable[TP]) -> list[int]:
        """The whole cells that revoking ``parts`` would break (ask before revoking)."""
        return sorted({p for t, p in parts if t in self.topics and p in self._whole})

    def revoke(self, parts: Iterable[TP]) -> list[int]:
        """Partitions removed; returns the cells that stopped being whole."""
        broken = set()
        for topic, p in parts:
            held = self._held.get(p)
            if held is None or topic not in held:
                continue
            held.discard(topic)
            if p in self._whole:
                self._whole.discard(p)
                broken.add(p)
            if not held:
                del self._held[p]
        return sorted(broken)

    def owns(self, partition: int) -> bool:
        return partition in self._whole

    @property
    def whole(self) -> list[int]:
        return sorted(self._whole)

    def partitions(self, cell: int) -> list[TP]:
        """The partitions of ``cell`` this member holds now."""
        return [(t, cell) for t in self.topics if t in self._held.get(cell, ())]

    def clear(self) -> None:
        self._held.clear()
        self._whole.clear()


def copartition_problems(counts: dict[str, int | None], main: list[str]) -> list[str]:
    """What stops the topics of a group from being co-partitioned (``counts``: partitions of each
    topic, None when it does not exist yet). Event topics must agree with each other; the group's
    own topics are raised to match by the caller, never lowered."""
    have = {t: counts.get(t) for t in main}
    known = {t: n for t, n in have.items() if n is not None}
    if len(set(known.values())) > 1:
        listing = ", ".join(f"{t} ({n})" for t, n in sorted(known.items()))
        return [
            "the event topics of one worker must have the same number of partitions, so that "
            "a key's retry state has one owner; they have: " + listing + ". Give them the same "
            "count (topics.partitions / topics.overrides, then `pipeline topics apply`), or "
            "split the worker by aggregate_types into workers whose topics agree"
        ]
    return []
