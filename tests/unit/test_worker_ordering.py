"""Ordering under retry: strict parking of followers behind a retried head, blocking behind a
dead-lettered head, persistence of the changes, and relaxed mode."""

from __future__ import annotations

import json
import random
from collections import defaultdict

import pytest

from pipeline.worker.ordering import BLOCKED, FOLLOW, PROCESS, KeyState, Ordering

# -- KeyState ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "state",
    [
        KeyState("e1"),
        KeyState("e1", ["e2", "e3"]),
        KeyState("e1", ["e2"], blocked_by="e1"),
        KeyState("ünïcode-id", [], blocked_by=None),
    ],
)
def test_key_state_json_round_trip(state: KeyState) -> None:
    data = state.to_json()
    assert isinstance(data, bytes)
    assert KeyState.from_json(data) == state


def test_key_state_json_form() -> None:
    data = json.loads(KeyState("h", ["f1"], blocked_by="h", partition=3, since_ms=7).to_json())
    assert data == {"head": "h", "followers": ["f1"], "blocked_by": "h", "partition": 3,
                    "since_ms": 7}


def test_key_state_from_minimal_json_uses_defaults() -> None:
    st = KeyState.from_json(b'{"head": "h"}')
    assert st == KeyState("h", [], None)


def test_key_state_from_json_copies_the_followers() -> None:
    st = KeyState.from_json(b'{"head": "h", "followers": ["a"]}')
    st2 = KeyState.from_json(b'{"head": "h", "followers": ["a"]}')
    st.followers.append("b")
    assert st2.followers == ["a"]


# -- strict mode -------------------------------------------------------------------------------


def test_unknown_key_processes() -> None:
    o = Ordering()
    assert o.strict
    assert o.admit("k", "e1") == (PROCESS, None)
    assert o.parked == 0
    assert o.take_changes() == {}


def test_retrying_makes_the_event_the_head_and_later_events_follow() -> None:
    o = Ordering()
    assert o.admit("k", "e1") == (PROCESS, None)
    o.retrying("k", "e1")
    assert o.keys["k"] == KeyState("e1")
    assert o.parked == 1
    assert o.admit("k", "e2") == (FOLLOW, "e1")
    assert o.admit("k", "e3") == (FOLLOW, "e1")
    assert o.keys["k"].followers == ["e2", "e3"]
    # The head itself, coming back from a retry tier, runs.
    assert o.admit("k", "e1") == (PROCESS, None)
    # Other keys are unaffected.
    assert o.admit("other", "x1") == (PROCESS, None)


def test_a_follower_seen_again_is_not_queued_twice() -> None:
    o = Ordering()
    o.retrying("k", "e1")
    assert o.admit("k", "e2") == (FOLLOW, "e1")
    o.take_changes()
    assert o.admit("k", "e2") == (FOLLOW, "e1")  # back from the retry tier, head still retrying
    assert o.keys["k"].followers == ["e2"]
    assert o.take_changes() == {}  # nothing changed, nothing to persist


def test_retrying_again_keeps_the_existing_head() -> None:
    o = Ordering()
    o.retrying("k", "e1")
    o.admit("k", "e2")
    o.retrying("k", "e1")
    assert o.keys["k"] == KeyState("e1", ["e2"])


def test_success_of_the_head_promotes_followers_in_arrival_order() -> None:
    o = Ordering()
    o.retrying("k", "e1")
    o.admit("k", "e2")
    o.admit("k", "e3")
    o.succeeded("k", "e1")
    assert o.keys["k"] == KeyState("e2", ["e3"])
    # e3 comes back before e2: it still follows, now behind e2.
    assert o.admit("k", "e3") == (FOLLOW, "e2")
    assert o.admit("k", "e2") == (PROCESS, None)
    o.succeeded("k", "e2")
    assert o.keys["k"] == KeyState("e3", [])
    assert o.admit("k", "e3") == (PROCESS, None)
    o.succeeded("k", "e3")
    assert "k" not in o.keys
    assert o.parked == 0
    assert o.admit("k", "e4") == (PROCESS, None)


def test_a_new_event_follows_a_promoted_head() -> None:
    o = Ordering()
    o.retrying("k", "e1")
    o.admit("k", "e2")
    o.succeeded("k", "e1")
    assert o.admit("k", "e9") == (FOLLOW, "e2")
    assert o.keys["k"] == KeyState("e2", ["e9"])


def test_success_of_a_non_head_changes_nothing() -> None:
    o = Ordering()
    o.succeeded("k", "e1")  # no state at all
    assert o.take_changes() == {}
    o.retrying("k", "e1")
    o.admit("k", "e2")
    o.take_changes()
    o.succeeded("k", "e2")
    assert o.keys["k"] == KeyState("e1", ["e2"])
    assert o.take_changes() == {}


def test_dead_lettered_head_blocks_the_key() -> None:
    o = Ordering()
    o.retrying("k", "e1")
    o.admit("k", "e2")
    o.admit("k", "e3")
    o.dead_lettered("k", "e1")
    assert o.keys["k"].blocked_by == "e1"
    # Followers coming back are dead-lettered behind e1 and leave the follower list.
    assert o.admit("k", "e3") == (BLOCKED, "e1")
    assert o.keys["k"].followers == ["e2"]
    assert o.admit("k", "e2") == (BLOCKED, "e1")
    assert o.keys["k"].followers == []
    # New events of the key too; the key stays blocked.
    assert o.admit("k", "e4") == (BLOCKED, "e1")
    assert o.keys["k"].followers == []
    assert o.keys["k"].blocked_by == "e1"
    # Other keys run.
    assert o.admit("k2", "x") == (PROCESS, None)


def test_a_promoted_head_dead_lettered_blocks_by_its_own_id() -> None:
    o = Ordering()
    o.retrying("k", "e1")
    o.admit("k", "e2")
    o.admit("k", "e3")
    o.succeeded("k", "e1")
    o.dead_lettered("k", "e2")
    assert o.admit("k", "e3") == (BLOCKED, "e2")


def test_dead_lettered_non_head_does_not_block() -> None:
    o = Ordering()
    o.dead_lettered("k", "e1")  # failed permanently on first delivery: not in the retry path
    assert "k" not in o.keys
    assert o.admit("k", "e2") == (PROCESS, None)
    o.retrying("k", "e2")
    o.admit("k", "e3")
    o.dead_lettered("k", "e3")  # a follower, not the head
    assert o.keys["k"].blocked_by is None


def test_a_second_dead_letter_keeps_the_first_blocker() -> None:
    o = Ordering()
    o.retrying("k", "e1")
    o.dead_lettered("k", "e1")
    o.take_changes()
    o.dead_lettered("k", "e1")
    assert o.keys["k"].blocked_by == "e1"
    assert o.take_changes() == {}


def test_release_forgets_the_key_and_persists_a_tombstone() -> None:
    o = Ordering()
    o.retrying("k", "e1")
    o.dead_lettered("k", "e1")
    o.take_changes()
    o.release("k")
    assert "k" not in o.keys
    assert o.take_changes() == {"k": None}
    assert o.admit("k", "e5") == (PROCESS, None)


def test_release_of_an_unknown_key_is_a_no_op() -> None:
    o = Ordering()
    o.release("nope")
    assert o.take_changes() == {}


def test_take_changes_lists_each_changed_key_once_and_then_clears() -> None:
    o = Ordering()
    o.retrying("a", "a1")
    o.admit("a", "a2")
    o.retrying("b", "b1")
    o.succeeded("b", "b1")
    changes = o.take_changes()
    assert set(changes) == {"a", "b"}
    assert changes["a"] == KeyState("a1", ["a2"])
    assert changes["b"] is None  # tombstone: b's head succeeded with no followers
    assert o.take_changes() == {}


def test_load_rebuilds_state_without_recording_changes() -> None:
    o = Ordering()
    o.load("k", KeyState("e1", ["e2"]))
    o.load("gone", KeyState("g1"))
    o.load("gone", None)  # a later tombstone in the compacted topic
    o.load("never", None)
    assert set(o.keys) == {"k"}
    assert o.parked == 1
    assert o.take_changes() == {}
    assert o.admit("k", "e2") == (FOLLOW, "e1")
    assert o.admit("k", "e1") == (PROCESS, None)


def test_load_of_a_blocked_key_blocks() -> None:
    o = Ordering()
    o.load("k", KeyState.from_json(KeyState("e1", ["e2"], "e1").to_json()))
    assert o.admit("k", "e2") == (BLOCKED, "e1")
    assert o.admit("k", "e3") == (BLOCKED, "e1")


def test_persisted_changes_rebuild_the_same_state() -> None:
    o = Ordering()
    persisted: dict[str, bytes] = {}

    def persist() -> None:
        for key, st in o.take_changes().items():
            if st is None:
                persisted.pop(key, None)
            else:
                persisted[key] = st.to_json()

    o.retrying("a", "a1")
    persist()
    o.admit("a", "a2")
    persist()
    o.retrying("b", "b1")
    o.dead_lettered("b", "b1")
    o.admit("b", "b2")
    persist()
    o.succeeded("a", "a1")
    persist()
    rebuilt = Ordering()
    for key, data in persisted.items():
        rebuilt.load(key, KeyState.from_json(data))
    assert rebuilt.keys == o.keys


# -- relaxed mode ------------------------------------------------------------------------------


def test_relaxed_mode_never_parks_or_blocks() -> None:
    o = Ordering(strict=False)
    assert o.admit("k", "e1") == (PROCESS, None)
    o.retrying("k", "e1")
    assert o.admit("k", "e2") == (PROCESS, None)
    o.dead_lettered("k", "e1")
    assert o.admit("k", "e3") == (PROCESS, None)
    o.succeeded("k", "e2")
    assert o.parked == 0
    assert o.keys == {}
    assert o.take_changes() == {}


# -- randomized simulation ---------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(40))
def test_randomized_strict_simulation_keeps_each_keys_order(seed: int) -> None:
    """Events flow through a main topic and one retry path; outcomes are random. Strict mode
    must never apply an event while an earlier event of its key is unresolved, never apply an
    event of a key blocked behind a dead letter, and persisting every change must rebuild the
    same state."""
    rng = random.Random(seed)
    tiers = rng.randrange(1, 4)
    keys = [f"k{i}" for i in range(rng.randrange(1, 5))]
    arrivals: list[tuple[str, str]] = []
    index: dict[str, int] = {}
    per_key = defaultdict(int)
    for _ in range(rng.randrange(5, 60)):
        k = rng.choice(keys)
        eid = f"{k}-{per_key[k]}"
        index[eid] = per_key[k]
        per_key[k] += 1
        arrivals.append((k, eid))
    main = list(arrivals)
    retry: list[tuple[str, str]] = []
    failures: dict[str, int] = defaultdict(int)
    resolved: dict[str, str] = {}  # event id → applied | dlq | blocked
    applied: dict[str, list[int]] = defaultdict(list)
    blocked_by: dict[str, str] = {}
    o = Ordering()
    persisted: dict[str, bytes] = {}
    steps = 0
    while main or retry:
        steps += 1
        assert steps < 100_000, "the simulation does not terminate"
        src = main if main and (not retry or rng.random() < 0.5) else retry
        k, eid = src.pop(0)
        verdict, ref = o.admit(k, eid)
        if verdict == FOLLOW:
            assert ref is not None and ref != eid
            assert o.keys[k].head == ref
            assert index[ref] < index[eid]
            retry.append((k, eid))
        elif verdict == BLOCKED:
            assert ref == blocked_by[k]
            resolved[eid] = "blocked"
        else:
            assert ref is None
            assert k not in blocked_by, "an event ran behind a dead-lettered head"
            earlier = [e for kk, e in arrivals if kk == k and index[e] < index[eid]]
            assert all(e in resolved for e in earlier), "an event overtook an unresolved one"
            roll = rng.random()
            if roll < 0.5:
                o.succeeded(k, eid)
                resolved[eid] = "applied"
                applied[k].append(index[eid])
            elif roll < 0.9:
                failures[eid] += 1
                if failures[eid] <= tiers:
                    o.retrying(k, eid)
                    retry.append((k, eid))
                else:
                    head = o.keys.get(k)
                    if head is not None and head.head == eid:
                        blocked_by[k] = eid
                    o.dead_lettered(k, eid)
                    resolved[eid] = "dlq"
            else:
                head = o.keys.get(k)
                if head is not None and head.head == eid:
                    blocked_by[k] = eid
                o.dead_lettered(k, eid)
                resolved[eid] = "dlq"
        for key, st in o.take_changes().items():
            if st is None:
                persisted.pop(key, None)
            else:
                persisted[key] = st.to_json()
        rebuilt = Ordering()
        for key, data in persisted.items():
            rebuilt.load(key, KeyState.from_json(data))
        assert rebuilt.keys == o.keys
    assert set(resolved) == set(index), "every event ends applied or dead-lettered"
    for k in keys:
        assert applied[k] == sorted(applied[k])
    # Keys left in the state are exactly the blocked ones (everything else resolved).
    assert {k for k, st in o.keys.items()} == set(blocked_by)
    assert all(st.followers == [] for st in o.keys.values())
