"""KeyScheduler: per-key FIFO, different keys concurrent, at most max_in_flight running."""

from __future__ import annotations

import random
from collections import defaultdict

import pytest

from pipeline.worker.scheduler import KeyScheduler


@pytest.mark.parametrize("cap", [0, -1, -100])
def test_max_in_flight_must_be_positive(cap: int) -> None:
    with pytest.raises(ValueError, match="max_in_flight"):
        KeyScheduler(cap)


def test_empty_scheduler() -> None:
    s: KeyScheduler[str] = KeyScheduler(4)
    assert s.next_ready() is None
    assert not s.has_ready
    assert s.queued == 0
    assert s.in_flight == 0
    assert s.max_in_flight == 4


def test_one_key_runs_strictly_one_after_another_in_fifo_order() -> None:
    s: KeyScheduler[str] = KeyScheduler(10)
    for item in ("a1", "a2", "a3"):
        s.submit("a", item)
    assert s.queued == 3
    assert s.next_ready() == ("a", "a1")
    assert s.in_flight == 1
    assert s.queued == 2
    # The key is busy: its next item may not start, although the cap allows it.
    assert s.next_ready() is None
    assert not s.has_ready
    s.done("a")
    assert s.has_ready
    assert s.next_ready() == ("a", "a2")
    assert s.next_ready() is None
    s.done("a")
    assert s.next_ready() == ("a", "a3")
    s.done("a")
    assert s.next_ready() is None
    assert s.in_flight == 0
    assert s.queued == 0


def test_submit_while_busy_waits_for_done() -> None:
    s: KeyScheduler[str] = KeyScheduler(3)
    s.submit("k", "x")
    assert s.next_ready() == ("k", "x")
    s.submit("k", "y")
    assert not s.has_ready
    assert s.next_ready() is None
    s.done("k")
    assert s.next_ready() == ("k", "y")


def test_different_keys_run_concurrently() -> None:
    s: KeyScheduler[str] = KeyScheduler(10)
    s.submit("a", "a1")
    s.submit("b", "b1")
    s.submit("c", "c1")
    started = [s.next_ready(), s.next_ready(), s.next_ready()]
    assert started == [("a", "a1"), ("b", "b1"), ("c", "c1")]
    assert s.in_flight == 3


def test_cap_limits_running_items_and_has_ready_still_reports_waiting_keys() -> None:
    s: KeyScheduler[str] = KeyScheduler(2)
    for k in "abc":
        s.submit(k, k + "1")
    assert s.next_ready() == ("a", "a1")
    assert s.next_ready() == ("b", "b1")
    assert s.next_ready() is None  # at the cap
    assert s.in_flight == 2
    assert s.has_ready  # c waits for a free slot, not for its key
    assert s.queued == 1
    s.done("b")
    assert s.next_ready() == ("c", "c1")
    assert s.next_ready() is None
    assert not s.has_ready


def test_done_frees_the_key_for_a_later_submit() -> None:
    s: KeyScheduler[str] = KeyScheduler(1)
    s.submit("k", "1")
    assert s.next_ready() == ("k", "1")
    s.done("k")
    assert s.in_flight == 0
    s.submit("k", "2")
    assert s.has_ready
    assert s.next_ready() == ("k", "2")


def test_a_busy_key_does_not_starve_other_keys() -> None:
    s: KeyScheduler[str] = KeyScheduler(1)
    for i in range(5):
        s.submit("hot", f"h{i}")
    s.submit("cold", "c0")
    assert s.next_ready() == ("hot", "h0")
    s.done("hot")
    # The cold key has waited since before h1 was ready: it goes first.
    assert s.next_ready() == ("cold", "c0")
    s.done("cold")
    assert s.next_ready() == ("hot", "h1")


def test_keys_may_be_any_hashable() -> None:
    s: KeyScheduler[int] = KeyScheduler(5)
    s.submit(("topic", 1), 1)
    s.submit(42, 2)
    s.submit(None, 3)
    got = {s.next_ready(), s.next_ready(), s.next_ready()}
    assert got == {(("topic", 1), 1), (42, 2), (None, 3)}


def test_drop_removes_matching_queued_items_and_returns_them_in_order() -> None:
    s: KeyScheduler[tuple[str, int]] = KeyScheduler(5)
    for i in range(4):
        s.submit("a", ("p0", i))
        s.submit("b", ("p1", i))
    assert s.next_ready() == ("a", ("p0", 0))  # running: never dropped
    dropped = s.drop(lambda w: w[0] == "p0")
    assert dropped == [("p0", 1), ("p0", 2), ("p0", 3)]
    assert s.queued == 4
    assert s.next_ready() == ("b", ("p1", 0))
    s.done("a")  # the running item of a finished; a has nothing left
    s.done("b")
    assert s.next_ready() == ("b", ("p1", 1))
    assert s.next_ready() is None
    assert s.queued == 2


def test_drop_keeps_the_order_of_the_remaining_items() -> None:
    s: KeyScheduler[int] = KeyScheduler(3)
    for i in range(10):
        s.submit("k", i)
    assert sorted(s.drop(lambda i: i % 3 == 0)) == [0, 3, 6, 9]
    seen = []
    while (nxt := s.next_ready()) is not None:
        seen.append(nxt[1])
        s.done("k")
    assert seen == [1, 2, 4, 5, 7, 8]


def test_drop_everything_leaves_nothing_ready() -> None:
    s: KeyScheduler[str] = KeyScheduler(4)
    s.submit("a", "a1")
    s.submit("b", "b1")
    s.submit("b", "b2")
    assert s.next_ready() == ("a", "a1")
    assert sorted(s.drop(lambda _: True)) == ["b1", "b2"]
    assert s.queued == 0
    assert not s.has_ready
    assert s.next_ready() is None
    assert s.in_flight == 1  # the running item is not affected
    s.done("a")
    assert s.in_flight == 0
    assert s.next_ready() is None
    # The scheduler is still usable afterwards.
    s.submit("b", "b3")
    assert s.next_ready() == ("b", "b3")


def test_drop_nothing_matching_changes_nothing() -> None:
    s: KeyScheduler[str] = KeyScheduler(2)
    s.submit("a", "x")
    s.submit("a", "y")
    assert s.drop(lambda _: False) == []
    assert s.queued == 2
    assert s.next_ready() == ("a", "x")


@pytest.mark.parametrize("seed", range(30))
def test_randomized_simulation_keeps_key_order_and_the_cap(seed: int) -> None:
    rng = random.Random(seed)
    cap = rng.randrange(1, 6)
    keys = [f"k{i}" for i in range(rng.randrange(1, 8))]
    s: KeyScheduler[tuple[str, int]] = KeyScheduler(cap)
    submitted: dict[str, list[int]] = defaultdict(list)
    started: dict[str, list[int]] = defaultdict(list)
    dropped: set[tuple[str, int]] = set()
    running: dict[str, int] = {}
    queued_model: dict[str, list[int]] = defaultdict(list)
    seq = 0
    for _ in range(600):
        action = rng.random()
        if action < 0.4:
            k = rng.choice(keys)
            seq += 1
            s.submit(k, (k, seq))
            submitted[k].append(seq)
            queued_model[k].append(seq)
        elif action < 0.75:
            nxt = s.next_ready()
            waiting = [k for k in keys if queued_model[k] and k not in running]
            if nxt is None:
                # Nothing may start only when at the cap or every waiting key is busy.
                assert len(running) >= cap or not waiting
            else:
                k, (k2, n) = nxt
                assert k == k2
                assert k not in running, "two items of one key running at once"
                assert queued_model[k] and queued_model[k][0] == n, "key FIFO broken"
                queued_model[k].pop(0)
                running[k] = n
                started[k].append(n)
            assert s.has_ready == bool([k for k in keys if queued_model[k] and k not in running])
        elif action < 0.95:
            if running:
                k = rng.choice(sorted(running))
                del running[k]
                s.done(k)
        else:
            victim = rng.randrange(1, seq + 1) if seq else 0
            out = s.drop(lambda w, v=victim: w[1] % 7 == v % 7)
            for k, n in out:
                assert n in queued_model[k]
                queued_model[k].remove(n)
                dropped.add((k, n))
            for k in keys:
                assert all(n % 7 != victim % 7 for n in queued_model[k])
        assert s.in_flight == len(running) <= cap
        assert s.queued == sum(len(v) for v in queued_model.values())
    # Drain: everything still queued runs, key by key in order.
    while running or any(queued_model.values()):
        nxt = s.next_ready()
        if nxt is None:
            assert running
            k = next(iter(running))
            del running[k]
            s.done(k)
            continue
        k, (_, n) = nxt
        assert queued_model[k].pop(0) == n
        running[k] = n
        started[k].append(n)
        assert s.in_flight <= cap
    for k in keys:
        expected = [n for n in submitted[k] if (k, n) not in dropped]
        assert started[k] == expected
    assert s.queued == 0
    assert not s.has_ready
    assert s.next_ready() is None


def test_queued_size_follows_submit_start_and_drop() -> None:
    s: KeyScheduler[str] = KeyScheduler(2, size=len)
    for item in ("a-1", "a-22", "b-333", "c-4444"):
        s.submit(item[0], item)
    assert (s.queued, s.queued_size) == (4, 3 + 4 + 5 + 6)
    started = s.next_ready()
    assert started == ("a", "a-1")
    assert s.queued_size == 4 + 5 + 6  # a running item no longer waits
    assert s.drop(lambda x: x.startswith("c")) == ["c-4444"]
    assert (s.queued, s.queued_size) == (2, 4 + 5)
    s.done("a")
    assert s.next_ready() == ("b", "b-333")
    assert s.next_ready() == ("a", "a-22")
    assert (s.queued, s.queued_size) == (0, 0)


def test_without_a_size_nothing_is_weighed() -> None:
    s: KeyScheduler[str] = KeyScheduler(2)
    s.submit("a", "a-1")
    assert (s.queued, s.queued_size) == (1, 0)
