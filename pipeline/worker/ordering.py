"""Ordering under retry (pure): the state of each key that has an event in the retry path.

Strict mode (the default): while a key's *head* event is in the retry path, every later event of
that key follows it there (queued behind it, in arrival order) instead of overtaking it. When
the head finally succeeds, the next follower becomes the head. When the head is dead-lettered,
the key is *blocked*: its followers, and new events of the key, go to the DLQ marked with the
event id that blocked them, so a replay can restore the key's order.

Relaxed mode: no parking; later events overtake a retried one (as Spring Kafka does).

The worker persists each change to the compacted ``<prefix>.<group>.parked`` topic (key = the
event's topic and key, partition = the event's partition number) and rebuilds a cell's keys from
that partition when the cell becomes its own (see :mod:`pipeline.worker.ownership`).

A key is *stalled* when its head has headed it for longer than ``stall_after_s`` (more than its
tiers' delays): :meth:`Ordering.stalled` names them, the worker logs and counts them, and
``pipeline status`` reads them from the parked topic.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

PROCESS, FOLLOW, BLOCKED = "process", "follow", "blocked"


@dataclass
class KeyState:
    head: str  # event id at the front of the key's retry path
    followers: list[str] = field(default_factory=list)
    blocked_by: str | None = None  # set when the head was dead-lettered
    partition: int = 0  # the key's partition number (its cell)
    since_ms: int = field(default=0, compare=False)  # when the head began heading it (ms)

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "head": self.head,
                "followers": self.followers,
                "blocked_by": self.blocked_by,
                "partition": self.partition,
                "since_ms": self.since_ms,
            }
        ).encode()

    @classmethod
    def from_json(cls, data: bytes, partition: int = 0) -> KeyState:
        """``partition``: for a state that does not name its own (written by older versions)."""
        d = json.loads(data)
        return cls(
            d["head"],
            list(d.get("followers", [])),
            d.get("blocked_by"),
            int(d.get("partition", partition)),
            int(d.get("since_ms", 0)),
        )

    def waited_ms(self, now_ms: int) -> int:
        return max(0, now_ms - self.since_ms) if self.since_ms else 0


class Ordering:
    """Decisions for strict ordering; ``changes`` lists keys whose state must be persisted."""

    def __init__(self, strict: bool = True, clock: Callable[[], float] = time.time) -> None:
        self.strict = strict
        self.keys: dict[str, KeyState] = {}
        self.changes: dict[str, KeyState | None] = {}
        self._where: dict[str, int] = {}  # partition number of each changed key
        self._clock = clock

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def _set(self, key: str, state: KeyState | None, partition: int | None = None) -> None:
        if state is None:
            old = self.keys.pop(key, None)
            where = partition if partition is not None else (old.partition if old else 0)
        else:
            self.keys[key] = state
            where = state.partition
        self.changes[key] = state
        self._where[key] = where

    def take_changes(self) -> dict[str, KeyState | None]:
        out, self.changes, self._where = self.changes, {}, {}
        return out

    def take_placed_changes(self) -> dict[str, tuple[int, KeyState | None]]:
        """The changes with the partition each must be written to (tombstones too)."""
        where = self._where
        return {k: (where.get(k, 0), st) for k, st in self.take_changes().items()}

    def load(self, key: str, state: KeyState | None) -> None:
        """Rebuild from the parked topic (a tombstone is None)."""
        if state is None:
            self.keys.pop(key, None)
        else:
            self.keys[key] = state

    def forget(self, partitions: set[int]) -> int:
        """Drop the keys of cells this member no longer owns (their state stays in the parked
        topic, written before the cells were let go). Returns how many were dropped."""
        gone = [k for k, st in self.keys.items() if st.partition in partitions]
        for k in gone:
            del self.keys[k]
        return len(gone)

    def stalled(self, after_ms: int) -> list[tuple[str, KeyState]]:
        """Keys whose head has waited longer than ``after_ms`` (blocked keys wait for an
        operator's replay, and are counted in the DLQ instead)."""
        now = self._now_ms()
        return [
            (k, st)
            for k, st in self.keys.items()
            if st.blocked_by is None and st.waited_ms(now) > after_ms
        ]

    # -- decisions -----------------------------------------------------------------------------
    def admit(self, key: str, event_id: str) -> tuple[str, str | None]:
        """May this event (first delivery or from a retry tier) run now?

        Returns (PROCESS, None), (FOLLOW, head) — send it to the retry path behind the head —
        or (BLOCKED, blocking event id) — send it to the DLQ.
        """
        if not self.strict:
            return PROCESS, None
        st = self.keys.get(key)
        if st is None:
            return PROCESS, None
        if st.blocked_by is not None:
            if event_id in st.followers:
                st.followers.remove(event_id)
                self._set(key, st)
            return BLOCKED, st.blocked_by
        if st.head == event_id:
            return PROCESS, None
        if event_id not in st.followers:
            st.followers.append(event_id)
            self._set(key, st)
        return FOLLOW, st.head

    def retrying(self, key: str, event_id: str, partition: int = 0) -> None:
        """The event failed transiently and goes to a retry tier: it heads (or keeps heading)
        the key's retry path."""
        if not self.strict:
            return
        st = self.keys.get(key)
        if st is None:
            self._set(key, KeyState(event_id, partition=partition, since_ms=self._now_ms()))

    def succeeded(self, key: str, event_id: str) -> None:
        st = self.keys.get(key)
        if st is None or st.head != event_id:
            return
        if st.followers:
            self._set(
                key,
                KeyState(
                    st.followers[0],
                    st.followers[1:],
                    partition=st.partition,
                    since_ms=self._now_ms(),
                ),
            )
        else:
            self._set(key, None)

    def dead_lettered(self, key: str, event_id: str) -> None:
        """The event went to the DLQ. If it headed the key's retry path, the key is blocked."""
        if not self.strict:
            return
        st = self.keys.get(key)
        if st is not None and st.head == event_id and st.blocked_by is None:
            st.blocked_by = event_id
            self._set(key, st)

    def replayed(self, key: str, event_id: str) -> None:
        """An operator replayed this event from the DLQ. If it is what blocks its key, it heads
        the key again (unblocked): it runs, and the key's replayed followers queue behind it."""
        st = self.keys.get(key)
        if st is not None and st.blocked_by == event_id:
            self._set(key, KeyState(event_id, partition=st.partition, since_ms=self._now_ms()))

    def release(self, key: str) -> None:
        """Forget a key's state (an operator replayed or discarded its dead letters)."""
        if key in self.keys:
            self._set(key, None)

    @property
    def parked(self) -> int:
        return len(self.keys)
