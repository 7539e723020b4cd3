"""Key-ordered scheduling (pure): events of one key run strictly one after another, events of
different keys run concurrently, at most ``max_in_flight`` at a time (the model of Confluent's
Parallel Consumer in key-order mode)."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

T = TypeVar("T")


class KeyScheduler(Generic[T]):
    """``size`` (optional) weighs an item (its bytes): :attr:`queued_size` sums the queued."""

    def __init__(self, max_in_flight: int, size: Callable[[T], int] | None = None) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self.max_in_flight = max_in_flight
        self._queues: dict[Hashable, deque[T]] = {}
        self._busy: set[Hashable] = set()
        self._ready: deque[Hashable] = deque()  # keys with work and no task running
        self._queued = 0
        self._size = size
        self._queued_size = 0

    def submit(self, key: Hashable, item: T) -> None:
        q = self._queues.get(key)
        if q is None:
            q = self._queues[key] = deque()
        q.append(item)
        self._queued += 1
        if self._size is not None:
            self._queued_size += self._size(item)
        if key not in self._busy and len(q) == 1:
            self._ready.append(key)

    def claim(self, key: Hashable) -> bool:
        """Start an item of ``key`` now, without queueing it: True (the key is busy until
        :meth:`done`) when the key has nothing queued or running and the cap allows."""
        if key in self._busy or key in self._queues or len(self._busy) >= self.max_in_flight:
            return False
        self._busy.add(key)
        return True

    def next_ready(self) -> tuple[Hashable, T] | None:
        """The next item that may start now, or None (all keys busy, empty, or at the cap)."""
        if len(self._busy) >= self.max_in_flight or not self._ready:
            return None
        key = self._ready.popleft()
        item = self._queues[key].popleft()
        self._queued -= 1
        if self._size is not None:
            self._queued_size -= self._size(item)
        self._busy.add(key)
        return key, item

    def done(self, key: Hashable) -> None:
        """The running item of ``key`` finished; the key's next item becomes ready."""
        if key not in self._busy:
            return  # nothing of this key was running: a repeated call changes nothing
        self._busy.discard(key)
        q = self._queues.get(key)
        if q:
            self._ready.append(key)
        elif q is not None:
            del self._queues[key]

    @property
    def has_ready(self) -> bool:
        return bool(self._ready)

    @property
    def in_flight(self) -> int:
        return len(self._busy)

    @property
    def queued(self) -> int:
        return self._queued

    @property
    def queued_size(self) -> int:
        return self._queued_size

    def drop(self, predicate: object) -> list[T]:
        """Remove queued (not running) items matching ``predicate(item)``; returns them."""
        removed: list[T] = []
        for key in list(self._queues):
            keep: deque[T] = deque()
            gone: list[T] = []
            for x in self._queues[key]:
                (gone if predicate(x) else keep).append(x)  # type: ignore[operator]
            removed.extend(gone)
            self._queued -= len(gone)
            if self._size is not None:
                self._queued_size -= sum(self._size(x) for x in gone)
            if keep:
                self._queues[key] = keep
            else:
                del self._queues[key]
                if key in self._ready:
                    self._ready.remove(key)
        return removed
