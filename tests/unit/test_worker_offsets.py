"""PartitionOffsets: the committable offset is one past the highest contiguous finished offset."""

from __future__ import annotations

import random

import pytest

from pipeline.worker.offsets import PartitionOffsets


def _expected_commit(started: list[int], finished: set[int]) -> int | None:
    """Brute force: one past the last offset of the longest all-finished prefix of ``started``."""
    commit = None
    for off in sorted(started):
        if off not in finished:
            break
        commit = off + 1
    return commit


def test_fresh_tracker_has_nothing_to_commit() -> None:
    po = PartitionOffsets()
    assert po.committable() is None
    assert po.in_flight == 0
    assert po.oldest_unfinished() is None


def test_started_but_unfinished_is_not_committable() -> None:
    po = PartitionOffsets()
    po.started(0)
    assert po.committable() is None
    assert po.in_flight == 1
    assert po.oldest_unfinished() == 0


def test_in_order_completion_commits_one_past_each() -> None:
    po = PartitionOffsets()
    for off in range(5):
        po.started(off)
    for off in range(5):
        po.finished(off)
        assert po.committable() == off + 1
    assert po.in_flight == 0
    assert po.oldest_unfinished() is None


def test_out_of_order_completion_waits_for_the_gap() -> None:
    po = PartitionOffsets()
    for off in range(5):
        po.started(off)
    po.finished(3)
    assert po.committable() is None
    po.finished(0)
    assert po.committable() == 1
    po.finished(1)
    assert po.committable() == 2
    assert po.oldest_unfinished() == 2
    po.finished(2)
    assert po.committable() == 4  # 3 was already finished
    assert po.oldest_unfinished() == 4
    po.finished(4)
    assert po.committable() == 5


def test_first_offset_need_not_be_zero() -> None:
    po = PartitionOffsets()
    po.started(1000)
    po.started(1001)
    po.finished(1001)
    assert po.committable() is None
    po.finished(1000)
    assert po.committable() == 1002


def test_offset_gaps_from_compaction_or_transaction_markers() -> None:
    # Offsets of a partition need not be contiguous (compacted away, transaction markers).
    po = PartitionOffsets()
    for off in (10, 12, 15):
        po.started(off)
    po.finished(12)
    assert po.committable() is None
    po.finished(10)
    assert po.committable() == 13
    assert po.oldest_unfinished() == 15
    po.finished(15)
    assert po.committable() == 16


def test_committable_never_goes_backwards_and_keeps_its_value() -> None:
    po = PartitionOffsets()
    po.started(0)
    po.finished(0)
    assert po.committable() == 1
    po.started(1)
    po.started(2)
    assert po.committable() == 1  # new unfinished work does not move it
    po.finished(2)
    assert po.committable() == 1
    po.finished(1)
    assert po.committable() == 3


def test_in_flight_counts_only_unfinished_records() -> None:
    # The runtime's revoke handler waits while in_flight exceeds the number of handed-back
    # records, so a record that already finished must not count as in flight.
    po = PartitionOffsets()
    po.started(0)
    po.started(1)
    po.started(2)
    po.finished(2)
    assert po.in_flight == 2
    po.finished(1)
    assert po.in_flight == 1
    po.finished(0)
    assert po.in_flight == 0


@pytest.mark.parametrize("seed", range(40))
def test_random_completion_order_never_commits_past_an_unfinished_offset(seed: int) -> None:
    rng = random.Random(seed)
    # Increasing offsets with random gaps, as a partition delivers them.
    offsets: list[int] = []
    off = rng.randrange(0, 1000)
    for _ in range(rng.randrange(1, 60)):
        offsets.append(off)
        off += rng.choice((1, 1, 1, 2, 5))
    po = PartitionOffsets()
    started: list[int] = []
    finished: set[int] = set()
    pending = list(offsets)  # not yet started, in delivery order
    running: list[int] = []
    last_commit: int | None = None
    while pending or running:
        if pending and (not running or rng.random() < 0.5):
            o = pending.pop(0)
            po.started(o)
            started.append(o)
            running.append(o)
        else:
            o = running.pop(rng.randrange(len(running)))
            po.finished(o)
            finished.add(o)
        commit = po.committable()
        assert commit == _expected_commit(started, finished)
        unfinished = [s for s in started if s not in finished]
        if commit is not None:
            # Every started offset below the commit position finished...
            assert all(s >= commit for s in unfinished)
            # ...and the commit position never moves backwards.
            assert last_commit is None or commit >= last_commit
            last_commit = commit
        assert po.oldest_unfinished() == (min(unfinished) if unfinished else None)
    assert po.committable() == offsets[-1] + 1
    assert po.oldest_unfinished() is None
    assert po.in_flight == 0


@pytest.mark.parametrize("seed", range(20))
def test_random_permutation_finish_after_all_started(seed: int) -> None:
    rng = random.Random(1000 + seed)
    n = rng.randrange(1, 200)
    po = PartitionOffsets()
    for o in range(n):
        po.started(o)
    order = list(range(n))
    rng.shuffle(order)
    finished: set[int] = set()
    for o in order:
        po.finished(o)
        finished.add(o)
        commit = po.committable()
        # The commit is exactly the first unfinished offset (or None before offset 0 finished).
        first_unfinished = next((x for x in range(n) if x not in finished), n)
        assert commit == (first_unfinished if first_unfinished > 0 else None)
    assert po.committable() == n
