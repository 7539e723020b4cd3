"""``pipeline dlq ls`` over many records, pure: the compiled filters agree with
``Filter.matches``, the table with its plain definition, the fast record builder with
``from_message``, and ``GroupDlq.select`` (records filtered as they are read) with filtering
``records()``."""

from __future__ import annotations

import datetime as dt
import gc
import os
import random
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from pipeline import forked
from pipeline.config import load_config
from pipeline.dlq import store
from pipeline.dlq.records import (
    DlqRecord,
    Filter,
    Position,
    _cut,
    from_message,
    human_age,
    ls_cells,
    message_headers,
    record,
    select,
    summaries,
    table,
)
from pipeline.kafka import names
from pipeline.worker.routing import big_int

NOW = dt.datetime(2026, 11, 27, 7, 15, 0, 123456, tzinfo=dt.UTC)
NOW_MS = int(NOW.timestamp() * 1000)
DLQ = "erp.wms.dlq"


def reference_table(records: Sequence[DlqRecord], now: dt.datetime, width: int = 80
                    ) -> list[str]:
    """The table as first written, from the record's properties, line by line."""
    rows = []
    for r in records:
        msg = r.error_message.splitlines()[0] if r.error_message else ""
        rows.append((str(r.position), human_age(r.age_s(now)),
                     _cut(r.original if r.outbox_row is not None else
                          f"{(r.original_topic or '?').rsplit('.', 1)[-1]}"
                          f"[{r.original_partition}]@{r.original_offset}", 18),
                     _cut(r.key_text, 12), _cut(r.event_type or "?", 20), str(r.attempts),
                     f"{r.error_class}: {msg}" if msg else r.error_class))
    head = ("POS", "AGE", "ORIGINAL", "KEY", "TYPE", "N", "ERROR")
    widths = [max([len(head[i])] + [len(row[i]) for row in rows]) for i in range(6)]
    used = sum(widths) + 2 * 6
    out = ["  ".join(h.ljust(w) for h, w in zip(head[:6], widths, strict=True)) + "  " + head[6]]
    for row in rows:
        left = "  ".join(c.ljust(w) for c, w in zip(row[:6], widths, strict=True))
        out.append(left + "  " + _cut(row[6], max(10, width - used)))
    return [line[:width] if len(line) > width else line for line in out]


def _pick(rng: random.Random, *choices: Any) -> Any:
    return choices[rng.randrange(len(choices))]


def random_record(rng: random.Random, partition: int, offset: int) -> DlqRecord:
    """A dead letter with any mix of the headers ls reads: present, absent, empty, malformed,
    of a worker, a strict-ordering follower or the relay (an outbox row)."""
    h: dict[str, bytes] = {names.CE_ID: f"ev-{rng.randrange(50)}".encode()}

    def maybe(name: str, *values: bytes | None) -> None:
        v = _pick(rng, *values)
        if v is not None:
            h[name] = v

    maybe(names.CE_TYPE, None, b"", b"order.created", b"payment.completed",
          b"com.example.erp." + b"very_long_event_type" * 2)
    maybe(names.ORIGINAL_TOPIC, None, b"", b"erp.order", b"order", b"erp.\xff.x")
    maybe(names.ORIGINAL_PARTITION, None, struct.pack(">i", rng.randrange(-1, 5)),
          struct.pack(">q", 1), b"")
    maybe(names.ORIGINAL_OFFSET, None, struct.pack(">q", rng.randrange(2**41)),
          struct.pack(">i", 3), b"")
    maybe(names.ATTEMPTS, None, big_int(rng.randrange(5)), b"", b"\x01\x02", b"9" * 13)
    maybe(names.EXCEPTION_FQCN, None, b"", b"connectors.rest.client.TargetRefused",
          b"pipeline.errors.PermanentError", b"Bare", b"a.b.", b"x.\xfe")
    maybe(names.EXCEPTION_MESSAGE, None, b"", b"HTTP 422\nsecond line", b"\nafter a newline",
          b"m" * 300, b"caf\xc3\xa9 \xff")
    maybe(names.BLOCKED_BY, None, None, b"", b"ev-3", b"ev-4")
    maybe(names.ERROR_CLASS, None, None, None, b"pipeline.errors.PayloadError", b"")
    maybe(names.ERROR_MESSAGE, None, b"", b"lines[0].qty: expected an integer")
    maybe(names.OUTBOX_POSITION, None, b"41", b"x", b"12345678901234")
    maybe(names.CE_SOURCE, None, b"/erp", b"/bench")
    key = _pick(rng, None, b"", b"SO-1", b"SO-2", b"K" * 40, b"S\xffO")
    ts = NOW_MS - _pick(rng, 0, 1, 499, 500, 59_999, 60_000, 3_600_000, 400 * 86_400_000,
                        -5000)
    return DlqRecord(DLQ, Position(partition, offset), max(0, ts), key, b"v", h)


def random_records(seed: int, n: int = 400) -> list[DlqRecord]:
    rng = random.Random(seed)
    return [random_record(rng, i % 3, i // 3) for i in range(n)]


FILTERS: list[dict[str, Any]] = [
    {}, {"error": "TargetRefused"}, {"error": "targetrefused"}, {"error": "PayloadError"},
    {"error": "BlockedByDeadLetter"}, {"error": "?"}, {"error": "rest.client.TargetRefused"},
    {"error": "Bare"}, {"topic": "erp.order"}, {"topic": ""}, {"event_type": "order.created"},
    {"event_type": ""}, {"key": "SO-1"}, {"key": ""}, {"key": "S\ufffdO"}, {"key": "\udcff"},
    {"since": "1h"}, {"until": "1h"}, {"since": "2026-11-27T07:14:00.123Z"},
    {"until": "2026-11-27T07:15:00.123Z", "since": "2026-11-27T07:14:59.623Z"},
    {"header": ["ce_source=/erp"]}, {"header": ["ce_source="]},
    {"header": ["erp_blocked_by=ev-3", "ce_type=order.created"]},
    {"error": "PermanentError", "key": "SO-2", "topic": "erp.order"},
]


@pytest.mark.parametrize("kw", FILTERS)
def test_compiled_filters_agree_with_matches(kw: dict[str, Any]) -> None:
    flt = Filter.build(now=NOW, **kw)
    recs = random_records(1)
    want = [r for r in recs if flt.matches(r)]
    assert select(recs, flt) == want
    assert select(recs, flt, limit=3) == want[:3]
    test = flt.predicate()
    assert [test(r) for r in recs] == [flt.matches(r) for r in recs]
    on_message, on_headers = flt.message_predicate(), flt.headers_predicate()
    for r in recs:
        split = ((on_message is None or on_message(r.key, r.timestamp_ms))
                 and (on_headers is None or on_headers(r.headers)))
        assert split == flt.matches(r), r


def test_a_header_without_a_value_filters_as_an_empty_one() -> None:
    flt = Filter.build(header=["ce_source="], error="BlockedByDeadLetter")
    raw: dict[str, bytes | None] = {names.CE_SOURCE: None, names.BLOCKED_BY: b"ev-1"}
    test = flt.headers_predicate()
    assert test is not None
    assert test(raw)
    assert not test({names.BLOCKED_BY: b"ev-1"})  # absent is not empty
    assert test(raw)  # and the answer kept for the absent one did not leak
    assert not test({names.CE_SOURCE: None, names.BLOCKED_BY: None})  # nothing to wait for


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("width", [40, 80, 132, 200])
def test_table_agrees_with_its_plain_definition(seed: int, width: int) -> None:
    recs = random_records(seed, 300)
    assert table(recs, NOW, width) == reference_table(recs, NOW, width)
    assert table(recs[:1], NOW, width) == reference_table(recs[:1], NOW, width)


@pytest.mark.parametrize("seed", range(4))
def test_summaries_are_the_records_summaries(seed: int) -> None:
    recs = random_records(seed, 300)
    for r in recs[::7]:  # corrections, well-formed or not
        r.headers[names.EDIT_OF] = _pick(random.Random(r.position.offset), b"1:9", b"x", b"")
    want = [r.summary(NOW) for r in recs]
    got = summaries(recs, NOW)
    assert got == want
    assert [list(g) for g in got] == [list(w) for w in want]  # the same fields, in order
    led = summaries(recs, NOW, "wms")
    assert led == [{"group": "wms", **w} for w in want]
    assert [list(g) for g in led] == [["group", *w] for w in want]


def test_table_of_no_records_is_the_header() -> None:
    assert table([], NOW) == reference_table([], NOW)


class Msg:
    """A consumer message as confluent-kafka gives it."""

    def __init__(self, partition: int, offset: int, heads: list[tuple[str, bytes | None]] | None,
                 *, key: bytes | None = b"SO-1", value: bytes | None = b"\xc3\x01",
                 ts: tuple[int, int] = (1, NOW_MS), error: object = None) -> None:
        self._p, self._o, self._h, self._k, self._v, self._ts, self._e = (
            partition, offset, heads, key, value, ts, error)

    def error(self) -> object:
        return self._e

    def headers(self) -> list[tuple[str, bytes | None]] | None:
        return self._h

    def timestamp(self) -> tuple[int, int]:
        return self._ts

    def topic(self) -> str:
        return DLQ

    def partition(self) -> int:
        return self._p

    def offset(self) -> int:
        return self._o

    def key(self) -> bytes | None:
        return self._k

    def value(self) -> bytes | None:
        return self._v


@pytest.mark.parametrize("heads", [
    None, [], [(names.CE_ID, b"first"), (names.CE_ID, b"last"), (names.BLOCKED_BY, None)],
    [(names.CE_TYPE, b"order.created"), (names.ATTEMPTS, big_int(2))],
])
@pytest.mark.parametrize("ts", [(1, NOW_MS), (0, -1), (2, 0)])
def test_record_reads_a_message_as_from_message(heads: Any, ts: tuple[int, int]) -> None:
    m = Msg(2, 40, heads, ts=ts)
    fast, plain = record(m, DLQ), from_message(m)
    assert fast == plain
    assert record(m, DLQ, message_headers(m)) == plain
    assert all(isinstance(v, bytes) for v in fast.headers.values())


def _messages(recs: Sequence[DlqRecord]) -> list[Msg]:
    """The records as messages, in the order a consumer of all partitions may give them."""
    by_part: dict[int, list[DlqRecord]] = {}
    for r in recs:
        by_part.setdefault(r.position.partition, []).append(r)
    rng = random.Random(9)
    out: list[Msg] = []
    queues = [list(rs) for _p, rs in sorted(by_part.items())]
    while any(queues):
        q = rng.choice([q for q in queues if q])
        k = rng.randrange(1, 20)
        out += [Msg(r.position.partition, r.position.offset, list(r.headers.items()),
                    key=r.key, value=r.value, ts=(1, r.timestamp_ms)) for r in q[:k]]
        del q[:k]
    return out


@pytest.fixture
def dlq(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[store.GroupDlq, list[DlqRecord]]]:
    recs = sorted(random_records(4, 600), key=lambda r: (r.position.partition,
                                                          r.position.offset))
    msgs = _messages(recs)
    msgs.insert(5, Msg(0, 10**9, None, error="a transport error"))  # errors are passed over

    def batches(*_a: Any, **_kw: Any) -> Iterator[list[Msg]]:
        for lo in range(0, len(msgs), 64):
            yield msgs[lo:lo + 64]

    monkeypatch.setattr(store, "read_batches", batches)
    # one reader, here: the read is stubbed (helper processes are tested on a real broker,
    # tests/integration/test_dlq_parallel_read.py)
    monkeypatch.setattr(forked, "cores", lambda: 1)
    s = load_config(Path(os.devnull), overrides={"kafka": {"bootstrap_servers": "nowhere:1"},
                                                 "topics": {"prefix": "erp"}})
    yield store.GroupDlq(s, "wms", topics={DLQ}), recs


def test_group_select_filters_as_it_reads(dlq: tuple[store.GroupDlq, list[DlqRecord]]
                                          ) -> None:
    d, recs = dlq
    for kw in FILTERS:
        flt = Filter.build(now=NOW, **kw)
        want = [r for r in recs if flt.matches(r)]
        assert d.select(flt) == want, kw
        assert d.select(flt, limit=5) == want[:5], kw
        assert d.listing(flt, NOW) == ls_cells(want, NOW), kw
        assert d.listing(flt, NOW, limit=5) == ls_cells(want[:5], NOW), kw
        assert d._records is None  # nothing kept
    assert gc.isenabled()
    assert d.records() == recs  # in (partition, offset) order, as they were
    assert d.select(Filter(key="SO-1")) == [r for r in recs if r.key == b"SO-1"]
