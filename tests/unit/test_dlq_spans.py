"""How a large DLQ is shared among readers: pipeline.dlq.store.cut_spans (every record read
exactly once, equal shares, few partitions split) and pipeline.kafka.tail._within (a bounded
span's records never yielded past its stop)."""

from __future__ import annotations

import random

import pytest
from confluent_kafka import Message

from pipeline.dlq.store import cut_spans
from pipeline.kafka.tail import _within


def _offsets(spans: list[dict[int, tuple[int, int | None]]],
             marks: dict[int, tuple[int, int]]) -> dict[int, list[int]]:
    """Every offset each span covers (None: to the high watermark), per partition."""
    out: dict[int, list[int]] = {p: [] for p in marks}
    for span in spans:
        for p, (first, stop) in span.items():
            out[p] += range(first, marks[p][1] if stop is None else stop)
    return out


@pytest.mark.parametrize("readers", [2, 3, 4])
@pytest.mark.parametrize("seed", range(20))
def test_every_record_is_read_once_in_equal_shares(readers: int, seed: int) -> None:
    rng = random.Random(seed)
    marks = {}
    for p in range(rng.randint(1, 8)):
        lo = rng.choice([0, rng.randint(0, 5000)])
        marks[p] = (lo, lo + rng.choice([0, rng.randint(1, 40000)]))
    spans = cut_spans(marks, readers)
    covered = _offsets(spans, marks)
    for p, (lo, hi) in marks.items():
        assert sorted(covered[p]) == list(range(lo, hi)), f"partition {p}"
    total = sum(hi - lo for lo, hi in marks.values())
    if total >= readers:
        shares = [sum(len(range(a, marks[p][1] if b is None else b)) for p, (a, b) in s.items())
                  for s in spans]
        assert len(shares) == readers
        assert max(shares) - min(shares) <= 1
    # a partition is split where one share ends: at most readers - 1 of them
    split = {p for s in spans for p, (_a, b) in s.items() if b is not None}
    assert len(split) <= readers - 1
    # each partition's end (the read that settles a lying watermark) is read by one reader
    for p in marks:
        assert sum(1 for s in spans if p in s and s[p][1] is None) == 1


def test_whole_partitions_stay_whole_where_the_shares_fall_between_them() -> None:
    marks = {0: (0, 100), 1: (0, 100), 2: (0, 100), 3: (0, 100)}
    assert cut_spans(marks, 2) == [{0: (0, None), 1: (0, None)}, {2: (0, None), 3: (0, None)}]


def test_one_partition_is_cut_in_offset_ranges() -> None:
    assert cut_spans({0: (10, 310)}, 3) == [{0: (10, 110)}, {0: (110, 210)}, {0: (210, None)}]


def test_an_empty_partition_goes_to_the_last_reader_whole() -> None:
    spans = cut_spans({0: (0, 0), 1: (5, 5), 2: (0, 10)}, 2)
    assert spans == [{2: (0, 5)}, {0: (0, None), 1: (5, None), 2: (5, None)}]


def _msg(partition: int, offset: int, topic: str = "erp.sink.dlq") -> Message:
    return Message(topic=topic, partition=partition, offset=offset, value=b"v")


def test_records_past_a_stop_are_dropped_and_the_partition_named() -> None:
    batch = [_msg(0, 7), _msg(1, 3), _msg(0, 8), _msg(0, 9), _msg(1, 4), _msg(0, 10)]
    stops = {("erp.sink.dlq", 0): 9}
    kept, reached = _within(batch, stops)
    assert [(m.partition(), m.offset()) for m in kept] == [(0, 7), (1, 3), (0, 8), (1, 4)]
    assert reached == {("erp.sink.dlq", 0)}


def test_a_batch_before_every_stop_is_returned_as_it_is() -> None:
    batch = [_msg(0, 1), _msg(1, 1), _msg(0, 2)]
    kept, reached = _within(batch, {("erp.sink.dlq", 0): 10, ("erp.sink.dlq", 1): 10})
    assert kept is batch and reached == set()


def test_the_last_record_of_a_span_reaches_its_stop() -> None:
    kept, reached = _within([_msg(0, 8), _msg(0, 9)], {("erp.sink.dlq", 0): 10})
    assert len(kept) == 2 and reached == {("erp.sink.dlq", 0)}
