"""Who owns a key's retry state: the member holding its whole cell (partition p of every topic
the group consumes), and the co-partitioning check of a group's event topics."""

from __future__ import annotations

import random

import pytest

from pipeline.worker.ownership import Cells, copartition_problems

TOPICS = ["erp.order", "erp.item", "erp.wms.retry.1"]
PARTITIONS = 4


def _cell(p: int, topics: list[str] = TOPICS) -> list[tuple[str, int]]:
    return [(t, p) for t in topics]


# -- Cells ---------------------------------------------------------------------------------------


def test_a_cell_is_whole_when_every_topic_partition_is_held() -> None:
    c = Cells(TOPICS)
    assert c.assign(_cell(0)) == [0]
    assert c.whole == [0]
    assert c.owns(0)
    assert not c.owns(1)
    assert c.partitions(0) == _cell(0)


def test_partial_assignment_makes_nothing_whole() -> None:
    c = Cells(TOPICS)
    assert c.assign([(t, p) for t in TOPICS[:2] for p in range(PARTITIONS)]) == []
    assert c.whole == []
    assert not any(c.owns(p) for p in range(PARTITIONS))
    assert c.partitions(1) == [("erp.order", 1), ("erp.item", 1)]
    # the missing topic's partition completes exactly that cell
    assert c.assign([("erp.wms.retry.1", 2)]) == [2]
    assert c.whole == [2]
    assert not c.owns(1)


def test_assign_reports_only_cells_that_just_became_whole() -> None:
    c = Cells(TOPICS)
    assert c.assign(_cell(0)) == [0]
    assert c.assign(_cell(0)) == []  # already whole
    assert c.assign(_cell(3) + _cell(1)) == [1, 3]
    assert c.whole == [0, 1, 3]


def test_assign_in_steps_and_any_order() -> None:
    c = Cells(TOPICS)
    parts = [tp for p in range(PARTITIONS) for tp in _cell(p)]
    random.Random(7).shuffle(parts)
    became: list[int] = []
    for tp in parts:
        became += c.assign([tp])
    assert sorted(became) == list(range(PARTITIONS))
    assert c.whole == list(range(PARTITIONS))


def test_revoking_one_partition_breaks_the_cell_and_affected_names_it_first() -> None:
    c = Cells(TOPICS)
    c.assign(_cell(0) + _cell(1))
    assert c.affected([("erp.item", 0)]) == [0]
    assert c.whole == [0, 1]  # asking does not change anything
    assert c.revoke([("erp.item", 0)]) == [0]
    assert c.whole == [1]
    assert not c.owns(0)
    assert c.owns(1)
    assert c.partitions(0) == [("erp.order", 0), ("erp.wms.retry.1", 0)]
    # revoking the rest of a broken cell breaks nothing more
    assert c.affected([("erp.order", 0)]) == []
    assert c.revoke([("erp.order", 0), ("erp.wms.retry.1", 0)]) == []
    assert c.partitions(0) == []
    # and getting the partition back makes it whole again
    assert c.assign(_cell(0)) == [0]


def test_affected_names_each_whole_cell_once_and_ignores_partial_ones() -> None:
    c = Cells(TOPICS)
    c.assign(_cell(0) + _cell(2) + [("erp.order", 1)])
    parts = _cell(0) + _cell(1) + [("erp.item", 2), ("erp.order", 3)]
    assert c.affected(parts) == [0, 2]
    assert c.revoke(parts) == [0, 2]
    assert c.whole == []


def test_unknown_topics_are_ignored() -> None:
    c = Cells(TOPICS)
    assert c.assign([("erp.other", 0), ("erp.other", 1)]) == []
    assert c.partitions(0) == []
    assert c.assign([*_cell(0), ("erp.other", 0)]) == [0]
    assert ("erp.other", 0) not in c.partitions(0)
    assert c.affected([("erp.other", 0)]) == []
    assert c.revoke([("erp.other", 0)]) == []
    assert c.whole == [0]


def test_revoking_what_is_not_held_is_harmless() -> None:
    c = Cells(TOPICS)
    c.assign(_cell(0))
    assert c.revoke([("erp.order", 1), ("erp.item", 5)]) == []
    assert c.whole == [0]


def test_duplicate_topic_names_count_once() -> None:
    c = Cells(["erp.order", "erp.order", "erp.wms.retry.1"])
    assert c.topics == ("erp.order", "erp.wms.retry.1")
    assert c.assign([("erp.order", 0), ("erp.wms.retry.1", 0)]) == [0]


def test_clear_forgets_everything_held() -> None:
    c = Cells(TOPICS)
    c.assign(_cell(0) + _cell(1)[:2])
    c.clear()
    assert c.whole == []
    assert not c.owns(0)
    assert c.partitions(0) == [] and c.partitions(1) == []
    # what was held before clear() does not count towards a cell afterwards
    assert c.assign([_cell(1)[2]]) == []
    assert c.assign(_cell(0)[:2]) == []
    assert c.assign([_cell(0)[2]]) == [0]


# -- a group of members: at most one owner per cell ---------------------------------------------


def _check(members: list[Cells], owner: dict[tuple[str, int], int | None]) -> None:
    for m, cells in enumerate(members):
        held = {tp for tp, o in owner.items() if o == m}
        expect = [p for p in range(PARTITIONS) if all((t, p) in held for t in TOPICS)]
        assert cells.whole == expect, (m, sorted(held))
        for p in range(PARTITIONS):
            assert cells.owns(p) == (p in expect)
            assert cells.partitions(p) == [(t, p) for t in TOPICS if (t, p) in held]
    for p in range(PARTITIONS):
        assert sum(cells.owns(p) for cells in members) <= 1, p


@pytest.mark.parametrize("seed", range(25))
def test_a_cell_is_whole_on_at_most_one_member(seed: int) -> None:
    """Kafka gives each (topic, partition) to at most one member at a time. Partitions move
    between members in random batches (revoked from one, later assigned to another, in partial
    steps and random orders); each member's Cells sees exactly its own assign/revoke calls."""
    rnd = random.Random(seed)
    n_members = rnd.randint(2, 4)
    members = [Cells(TOPICS) for _ in range(n_members)]
    all_tps = [(t, p) for t in TOPICS for p in range(PARTITIONS)]
    owner: dict[tuple[str, int], int | None] = dict.fromkeys(all_tps)
    noise = [("erp.unrelated", p) for p in range(PARTITIONS)]
    for _step in range(150):
        roll = rnd.random()
        if roll < 0.45:  # assign some free partitions to one member
            free = [tp for tp, o in owner.items() if o is None]
            if not free:
                continue
            m = rnd.randrange(n_members)
            batch = rnd.sample(free, rnd.randint(1, len(free)))
            before = set(members[m].whole)
            call = batch + rnd.sample(noise, rnd.randint(0, 1))
            rnd.shuffle(call)
            became = members[m].assign(call)
            for tp in batch:
                owner[tp] = m
            assert became == sorted(set(members[m].whole) - before)
        elif roll < 0.9:  # revoke some of one member's partitions
            m = rnd.randrange(n_members)
            mine = [tp for tp, o in owner.items() if o == m]
            if not mine:
                continue
            batch = rnd.sample(mine, rnd.randint(1, len(mine)))
            before = set(members[m].whole)
            call = batch + rnd.sample(noise, rnd.randint(0, 1))
            rnd.shuffle(call)
            would_break = members[m].affected(call)
            broken = members[m].revoke(call)
            for tp in batch:
                owner[tp] = None
            assert broken == would_break == sorted(before - set(members[m].whole))
        else:  # a member loses everything at once (partitions lost, left the group)
            m = rnd.randrange(n_members)
            members[m].clear()
            for tp, o in owner.items():
                if o == m:
                    owner[tp] = None
        _check(members, owner)


# -- copartition_problems ------------------------------------------------------------------------


def test_equal_counts_have_no_problem() -> None:
    assert copartition_problems({"erp.order": 6, "erp.item": 6}, ["erp.order", "erp.item"]) == []


def test_a_single_topic_has_no_problem() -> None:
    assert copartition_problems({"erp.order": 3}, ["erp.order"]) == []


def test_different_counts_are_one_problem_naming_topics_counts_and_fix() -> None:
    problems = copartition_problems({"erp.order": 3, "erp.item": 6}, ["erp.order", "erp.item"])
    assert len(problems) == 1
    msg = problems[0]
    assert "erp.order (3)" in msg
    assert "erp.item (6)" in msg
    assert "topics.overrides" in msg or "aggregate_types" in msg


def test_three_topics_two_counts_is_still_one_problem_listing_all() -> None:
    counts = {"erp.a": 4, "erp.b": 4, "erp.c": 8}
    problems = copartition_problems(counts, ["erp.c", "erp.a", "erp.b"])
    assert len(problems) == 1
    for t, n in counts.items():
        assert f"{t} ({n})" in problems[0]


def test_topics_not_created_yet_are_ignored() -> None:
    main = ["erp.order", "erp.item", "erp.invoice"]
    assert copartition_problems({"erp.order": 3, "erp.item": None}, main) == []
    assert copartition_problems({"erp.order": None, "erp.item": None}, main) == []
    problems = copartition_problems({"erp.order": 3, "erp.item": None, "erp.invoice": 5}, main)
    assert len(problems) == 1
    assert "erp.item" not in problems[0]
    assert "erp.order (3)" in problems[0] and "erp.invoice (5)" in problems[0]


def test_only_the_event_topics_are_compared() -> None:
    # the group's own topics (retry tiers, DLQ, parked) are raised to match by the caller
    counts = {"erp.order": 6, "erp.item": 6, "erp.wms.retry.1": 1, "erp.wms.dlq": 2}
    assert copartition_problems(counts, ["erp.order", "erp.item"]) == []
