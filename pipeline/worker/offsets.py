"""Offset bookkeeping (pure): which offset of a partition is safe to commit.

Records of one partition finish out of order when their keys differ; the committable position
is one past the highest offset below which *every* record has finished, so a crash never skips
an unfinished record (it may redo finished ones, which the idempotent apply absorbs).
"""

from __future__ import annotations

import heapq


class PartitionOffsets:
    """Tracks started and finished offsets of one partition."""

    def __init__(self) -> None:
        self._started: list[int] = []  # heap of offsets started and not finished
        self._done: set[int] = set()
        self._next_commit: int | None = None  # one past the last contiguous finished offset
        self._highest_seen: int | None = None

    def started(self, offset: int) -> None:
        heapq.heappush(self._started, offset)
        if self._highest_seen is None or offset > self._highest_seen:
            self._highest_seen = offset

    def finished(self, offset: int) -> None:
        started, done = self._started, self._done
        if started and started[0] == offset:  # the oldest unfinished one (the usual case)
            heapq.heappop(started)
            self._next_commit = offset + 1
        else:
            done.add(offset)
        # Pop every finished offset at the head: the head is the oldest unfinished one.
        while done and started and started[0] in done:
            head = heapq.heappop(started)
            done.discard(head)
            self._next_commit = head + 1

    @property
    def in_flight(self) -> int:
        """Records started and not finished (finished ones waiting behind a lower unfinished
        offset are not counted)."""
        return len(self._started) - len(self._done)

    def committable(self) -> int | None:
        """The offset to commit (the next one to read), or None when nothing finished yet."""
        return self._next_commit

    def oldest_unfinished(self) -> int | None:
        return self._started[0] if self._started else None
