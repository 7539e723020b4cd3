"""ParquetTarget: layout, Arrow types and values, positions, conflicts, crash recovery, rejected
rows, schema evolution and reset — files in tmp_path, no broker, no database."""

from __future__ import annotations

import copy
import datetime as dt
import errno
import fcntl
import functools
import json
import os
import random
import threading
from collections import Counter
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from connectors.bi.columns import to_json
from connectors.bi.parquet import ParquetTarget
from pipeline.config import Settings
from pipeline.errors import (
    ConfigError,
    DecodeError,
    PayloadError,
    PermanentError,
    PipelineError,
    TransientError,
)
from pipeline.schemas.catalogue import Catalogue, SchemaVersion, parse_version
from pipeline.schemas.codec import Decoder, Encoder
from pipeline.simulator.payloads import payload_for
from pipeline.sink.target import (
    TP,
    Batch,
    BatchTarget,
    PositionConflict,
    Rejected,
    is_batch_target,
)
from pipeline.worker.connector import Event

NOW = dt.datetime(2026, 11, 27, 7, 15, 0, 123456, tzinfo=dt.UTC)
ORDER, CUSTOMER = "erp.order", "erp.customer"
P0, P1, C0 = (ORDER, 0), (ORDER, 1), (CUSTOMER, 0)
CONSUMER = "erp.bi-parquet"
UTC_TS = pa.timestamp("us", tz="UTC")
DEC = pa.decimal128(18, 2)


# -- helpers --------------------------------------------------------------------------------------
@functools.cache
def catalogue() -> Catalogue:
    return Catalogue.load()


def json_form(event_type: str, seed: int = 1, aggregate_id: str = "SO-000042",
              **changes: Any) -> dict[str, Any]:
    """A simulator payload (JSON form), with some fields replaced."""
    p = payload_for(event_type, random.Random(seed), aggregate_id=aggregate_id, now=NOW)
    p.update(changes)
    return p


def decoded(event_type: str, form: dict[str, Any]) -> dict[str, Any]:
    """What a sink sees: the JSON-form payload encoded to Avro and decoded again (Decimal,
    datetime, date …)."""
    value = Encoder(catalogue()).encode(event_type, form, topic=ORDER).value
    return Decoder(catalogue()).decode(value).value


def event(
    event_type: str,
    tp: TP,
    offset: int,
    payload: dict[str, Any],
    *,
    schema: SchemaVersion | None = None,
    occurred_at: dt.datetime | None = NOW,
    timestamp_ms: int = 0,
) -> Event:
    agg = str(payload.get("customer_id") or payload.get("order_id") or "X")
    return Event(
        event_id=f"ev-{tp[0]}-{tp[1]}-{offset}",
        event_type=event_type,
        aggregate_type=event_type.split(".")[0],
        aggregate_id=agg,
        aggregate_version=offset + 1,
        occurred_at=occurred_at,
        raw_headers={},
        topic=tp[0],
        partition=tp[1],
        offset=offset,
        schema=schema or catalogue().writer(event_type),
        timestamp_ms=timestamp_ms,
        load_payload=lambda: payload,
    )


def order(tp: TP, offset: int, seed: int = 1, order_id: str = "SO-000042") -> Event:
    form = json_form("order.created", seed, order_id)
    return event("order.created", tp, offset, decoded("order.created", form))


def invoice(tp: TP, offset: int, **kw: Any) -> Event:
    form = json_form("invoice.issued", 1, "SO-000042")
    return event("invoice.issued", tp, offset, decoded("invoice.issued", form), **kw)


def customer(tp: TP, offset: int, **changes: Any) -> Event:
    form = json_form("customer.upserted", 1, "CUST-1001", **changes)
    return event("customer.upserted", tp, offset, decoded("customer.upserted", form))


def batch(events: list[Event], positions: dict[TP, tuple[int | None, int]],
          consumer: str = CONSUMER) -> Batch:
    return Batch(events=list(events), positions=dict(positions), consumer=consumer)


class Commits:
    """A before_commit hook that records what it was given."""

    def __init__(self) -> None:
        self.calls: list[list[Rejected]] = []

    def __call__(self, rejected: Sequence[Rejected]) -> None:
        self.calls.append(list(rejected))


class Crash(BaseException):
    """The process dies here: like a kill, it runs no cleanup written for errors."""


def crash(rejected: Sequence[Rejected]) -> None:
    raise Crash


def data_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.parquet"))


def tmp_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if ".tmp-" in p.name)


def all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def read(root: Path, rel: str) -> pa.Table:
    return pq.ParquetFile(root / rel).read()


def landed_rows(root: Path) -> list[dict[str, Any]]:
    return [row for rel in data_files(root) for row in read(root, rel).to_pylist()]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "lake"


@pytest.fixture
def target(root: Path) -> ParquetTarget:
    t = ParquetTarget(str(root))
    t.open(Settings(), CONSUMER)
    return t


# -- protocol and open ----------------------------------------------------------------------------
def test_is_a_batch_target(target: ParquetTarget) -> None:
    assert is_batch_target(target)
    assert isinstance(target, BatchTarget)
    assert target.name == "parquet"


def test_open_creates_the_folder_and_refuses_one_it_cannot_write(tmp_path: Path) -> None:
    nested = tmp_path / "a" / "b" / "lake"
    ParquetTarget(str(nested)).open(Settings(), CONSUMER)
    assert nested.is_dir()
    assert list(nested.iterdir()) == []  # the write probe is gone

    def read_only(path: Any, flags: int, mode: int = 0o777) -> int:
        raise PermissionError(errno.EROFS, "Read-only file system", str(path))

    with pytest.MonkeyPatch.context() as mp:  # a read-only mount (root ignores permissions)
        mp.setattr(os, "open", read_only)
        with pytest.raises(ConfigError, match=r"lake \(Read-only file system\); set workers"):
            ParquetTarget(str(nested)).open(Settings(), CONSUMER)

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match=r"cannot create or write the folder .*file/lake"):
        ParquetTarget(str(blocker / "lake")).open(Settings(), CONSUMER)


def test_an_unknown_compression_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="compression 'zip'"):
        ParquetTarget(str(tmp_path), compression="zip")
    assert ParquetTarget(str(tmp_path), compression="NONE").compression == "none"


# -- layout, types, values ------------------------------------------------------------------------
def test_files_land_where_the_layout_says_with_arrow_types_and_values(
    target: ParquetTarget, root: Path
) -> None:
    plus_one = dt.timezone(dt.timedelta(hours=1))
    ts_29 = int(dt.datetime(2026, 11, 29, 12, 0, tzinfo=dt.UTC).timestamp() * 1000)
    events = [
        order(P0, 10),
        invoice(P0, 11),
        order(P1, 20, seed=2, order_id="SO-000043"),
        # 00:30 at +01:00 is still the 27th in UTC
        invoice(P1, 21, occurred_at=dt.datetime(2026, 11, 28, 0, 30, tzinfo=plus_one)),
        invoice(P1, 22, occurred_at=None, timestamp_ms=ts_29),  # the record's timestamp
        invoice(P1, 23, occurred_at=None),  # neither: 1970-01-01
        customer(C0, 5, email=None, credit_limit=None),
        customer(C0, 6),
    ]
    commits = Commits()
    target.write(batch(events, {P0: (None, 12), P1: (None, 24), C0: (None, 7)}), commits)

    assert data_files(root) == [
        "customer_upserted/date=2026-11-27/erp.customer+0+00000000000000000005.parquet",
        "invoice_issued/date=1970-01-01/erp.order+1+00000000000000000020.parquet",
        "invoice_issued/date=2026-11-27/erp.order+0+00000000000000000010.parquet",
        "invoice_issued/date=2026-11-27/erp.order+1+00000000000000000020.parquet",
        "invoice_issued/date=2026-11-29/erp.order+1+00000000000000000020.parquet",
        "order_created/date=2026-11-27/erp.order+0+00000000000000000010.parquet",
        "order_created/date=2026-11-27/erp.order+1+00000000000000000020.parquet",
    ]
    assert commits.calls == [[]]

    # order.created: metadata columns, _landed_at, then the fields; lines as JSON
    rel = "order_created/date=2026-11-27/erp.order+0+00000000000000000010.parquet"
    table = read(root, rel)
    assert table.column_names == [
        "_event_id", "_aggregate_type", "_aggregate_id", "_aggregate_version", "_occurred_at",
        "_schema_version", "_topic", "_partition", "_offset", "_landed_at",
        "order_id", "customer", "lines", "currency", "total", "created_at", "note",
    ]
    types = {f.name: f.type for f in table.schema}
    assert types["_event_id"] == pa.string()
    assert types["_aggregate_version"] == pa.int64()
    assert types["_occurred_at"] == UTC_TS
    assert types["_schema_version"] == pa.int32()
    assert types["_partition"] == pa.int32()
    assert types["_offset"] == pa.int64()
    assert types["_landed_at"] == UTC_TS
    assert types["lines"] == pa.string()
    assert types["total"] == DEC
    assert types["created_at"] == UTC_TS
    assert types["note"] == pa.string()
    assert not table.schema.field("_event_id").nullable
    assert table.schema.field("note").nullable
    [row] = table.to_pylist()
    source = events[0].payload
    assert row["_event_id"] == "ev-erp.order-0-10"
    assert row["_aggregate_id"] == "SO-000042"
    assert (row["_topic"], row["_partition"], row["_offset"]) == (ORDER, 0, 10)
    assert row["_schema_version"] == 1
    assert row["_occurred_at"] == NOW
    assert abs(row["_landed_at"] - dt.datetime.now(dt.UTC)) < dt.timedelta(minutes=5)
    assert isinstance(row["total"], Decimal) and isinstance(source["total"], Decimal)
    assert row["total"] == source["total"]
    assert str(row["total"]) == json_form("order.created")["total"]  # scale 2 kept
    assert row["created_at"] == NOW
    assert row["note"] == source["note"] == "Deliver to loading dock B"
    assert row["lines"] == to_json(source["lines"])
    # the JSON of lines is the JSON form the ERP wrote (decimals as strings)
    assert json.loads(row["lines"]) == json_form("order.created")["lines"]
    assert isinstance(json.loads(row["lines"])[0]["unit_price"], str)

    meta = table.schema.metadata
    assert meta[b"event_type"] == b"order.created"
    assert meta[b"topic"] == ORDER.encode()
    assert meta[b"partition"] == b"0"
    assert meta[b"start_offset"] == b"10"
    assert meta[b"end_offset"] == b"10"
    compression = pq.ParquetFile(root / rel).metadata.row_group(0).column(0).compression
    assert compression == "ZSTD"

    # invoice.issued: decimals, timestamp, date
    table = read(root, "invoice_issued/date=2026-11-27/erp.order+0+00000000000000000010.parquet")
    types = {f.name: f.type for f in table.schema}
    assert (types["amount"], types["tax"]) == (DEC, DEC)
    assert types["issued_at"] == UTC_TS
    assert types["due_date"] == pa.date32()
    [row] = table.to_pylist()
    assert row["amount"] == events[1].payload["amount"]
    assert str(row["amount"]) == json_form("invoice.issued")["amount"]
    assert row["tax"] == events[1].payload["tax"]
    assert row["issued_at"] == NOW
    assert row["due_date"] == dt.date(2026, 12, 27)

    # the partition-1 invoice files hold the rows of their date only
    p1 = "erp.order+1+00000000000000000020.parquet"
    for day, offset in (("2026-11-27", 21), ("2026-11-29", 22), ("1970-01-01", 23)):
        table = read(root, f"invoice_issued/date={day}/{p1}")
        assert table.column("_offset").to_pylist() == [offset]

    # customer.upserted: nullable fields stay null
    table = read(root, "customer_upserted/date=2026-11-27/"
                       "erp.customer+0+00000000000000000005.parquet")
    assert {f.name: f.type for f in table.schema}["credit_limit"] == DEC
    rows = table.to_pylist()
    assert [r["_offset"] for r in rows] == [5, 6]
    assert (rows[0]["email"], rows[0]["credit_limit"]) == (None, None)
    assert rows[1]["email"] == events[7].payload["email"] is not None
    assert rows[1]["credit_limit"] == events[7].payload["credit_limit"]
    limit = json_form("customer.upserted", 1, "CUST-1001")["credit_limit"]
    assert limit is not None and str(rows[1]["credit_limit"]) == limit
    assert tmp_files(root) == []


def test_positions_advance_and_the_next_batch_starts_where_the_last_ended(
    target: ParquetTarget, root: Path
) -> None:
    assert target.positions(CONSUMER, [P0, P1]) == {P0: None, P1: None}
    target.write(batch([order(P0, 10), invoice(P0, 11)], {P0: (None, 12)}), Commits())
    assert target.positions(CONSUMER, [P0, P1]) == {P0: 12, P1: None}
    stored = json.loads((root / "_positions" / CONSUMER / "erp.order+0.json").read_text())
    assert stored["next_offset"] == 12
    assert dt.datetime.fromisoformat(stored["updated_at"]).tzinfo is not None

    # the next batch: offsets 12 and 15 were undecodable (dead-lettered, covered by the
    # positions); its file is named by the position it starts from, not by its first row
    target.write(batch([order(P0, 13), order(P0, 14)], {P0: (12, 16)}), Commits())
    assert target.positions(CONSUMER, [P0]) == {P0: 16}
    assert data_files(root) == [
        "invoice_issued/date=2026-11-27/erp.order+0+00000000000000000010.parquet",
        "order_created/date=2026-11-27/erp.order+0+00000000000000000010.parquet",
        "order_created/date=2026-11-27/erp.order+0+00000000000000000012.parquet",
    ]
    assert sorted(r["_offset"] for r in landed_rows(root)) == [10, 11, 13, 14]
    # positions belong to their consumer
    assert target.positions("another", [P0]) == {P0: None}


def test_a_stale_expected_position_conflicts_and_writes_nothing(
    target: ParquetTarget, root: Path
) -> None:
    target.write(batch([order(P0, 10), order(P0, 11)], {P0: (None, 12)}), Commits())
    before = all_files(root)

    for stale in (None, 11, 13):  # another instance landed it; an old or unknown position
        commits = Commits()
        b = batch([order(P0, 12), order(P1, 20)], {P0: (stale, 13), P1: (None, 21)})
        with pytest.raises(PositionConflict) as info:
            target.write(b, commits)
        assert info.value.tps == [P0]
        assert "erp.order[0] is 12" in str(info.value)
        assert commits.calls == []
        assert all_files(root) == before

    # expecting a position where none is stored conflicts too
    with pytest.raises(PositionConflict) as info:
        target.write(batch([order(P1, 20)], {P1: (20, 21)}), Commits())
    assert info.value.tps == [P1]
    assert "erp.order[1] is none, the batch expected 20" in str(info.value)
    assert all_files(root) == before
    assert target.positions(CONSUMER, [P0, P1]) == {P0: 12, P1: None}


# -- crash recovery -------------------------------------------------------------------------------
def test_a_crash_before_the_positions_leaves_orphans_that_positions_removes(
    target: ParquetTarget, root: Path
) -> None:
    first = [order(P0, 10), order(P0, 11)]
    target.write(batch(first, {P0: (None, 12)}), Commits())
    landed_first = data_files(root)

    crashed = [order(P0, 12), invoice(P0, 13), order(P1, 20), invoice(P1, 21)]
    with pytest.raises(Crash):
        target.write(batch(crashed, {P0: (12, 14), P1: (None, 22)}), crash)
    orphans = sorted(set(data_files(root)) - set(landed_first))
    assert orphans == [
        "invoice_issued/date=2026-11-27/erp.order+0+00000000000000000012.parquet",
        "invoice_issued/date=2026-11-27/erp.order+1+00000000000000000020.parquet",
        "order_created/date=2026-11-27/erp.order+0+00000000000000000012.parquet",
        "order_created/date=2026-11-27/erp.order+1+00000000000000000020.parquet",
    ]

    restarted = ParquetTarget(str(root))
    restarted.open(Settings(), CONSUMER)
    assert restarted.positions(CONSUMER, [P0, P1]) == {P0: 12, P1: None}
    assert data_files(root) == landed_first  # the orphans are gone, the landed batch stays

    # the records are read again from the stored positions, in other batches this time
    restarted.write(batch([order(P0, 12)], {P0: (12, 13)}), Commits())
    restarted.write(batch([invoice(P0, 13), order(P1, 20), invoice(P1, 21)],
                          {P0: (13, 14), P1: (None, 22)}), Commits())
    ids = Counter(r["_event_id"] for r in landed_rows(root))
    assert ids == Counter(e.event_id for e in first + crashed)  # every row exactly once
    assert restarted.positions(CONSUMER, [P0, P1]) == {P0: 14, P1: 22}


def test_rewriting_the_same_batch_after_a_crash_lands_each_row_once(
    target: ParquetTarget, root: Path
) -> None:
    events = [order(P0, 10), invoice(P0, 11), customer(C0, 3)]
    positions: dict[TP, tuple[int | None, int]] = {P0: (None, 12), C0: (None, 4)}
    with pytest.raises(Crash):
        target.write(batch(events, positions), crash)
    assert len(data_files(root)) == 3
    assert target.positions(CONSUMER, [P0, C0]) == {P0: None, C0: None}
    assert data_files(root) == []

    target.write(batch(events, positions), Commits())
    assert sorted(r["_event_id"] for r in landed_rows(root)) == sorted(e.event_id for e in events)
    assert target.positions(CONSUMER, [P0, C0]) == {P0: 12, C0: 4}


def test_positions_removes_orphans_of_the_asked_partitions_only(
    target: ParquetTarget, root: Path
) -> None:
    with pytest.raises(Crash):
        target.write(batch([order(P0, 10), order(P1, 20)], {P0: (None, 11), P1: (None, 21)}),
                     crash)
    assert target.positions(CONSUMER, [P0]) == {P0: None}
    assert data_files(root) == [
        "order_created/date=2026-11-27/erp.order+1+00000000000000000020.parquet"
    ]


def test_a_failing_before_commit_propagates_and_leaves_nothing_visible(
    target: ParquetTarget, root: Path
) -> None:
    target.write(batch([order(P0, 10)], {P0: (None, 11)}), Commits())
    before = data_files(root)

    def dlq_down(rejected: Sequence[Rejected]) -> None:
        raise RuntimeError("dead-letter topic did not acknowledge")

    b = batch([order(P0, 11), invoice(P0, 12)], {P0: (11, 13)})
    with pytest.raises(RuntimeError, match="did not acknowledge"):
        target.write(b, dlq_down)
    assert data_files(root) == before
    assert target.positions(CONSUMER, [P0]) == {P0: 11}

    target.write(b, Commits())  # the runtime retries the same batch
    assert sorted(r["_offset"] for r in landed_rows(root)) == [10, 11, 12]


def test_leftover_tmp_files_are_removed(target: ParquetTarget, root: Path) -> None:
    target.write(batch([order(P0, 10), order(P1, 20)], {P0: (None, 11), P1: (None, 21)}),
                 Commits())
    day = root / "order_created" / "date=2026-11-27"
    pdir = root / "_positions" / CONSUMER
    leftovers = [
        day / ".erp.order+0+00000000000000000011.parquet.tmp-0a1b2c3d",
        day / ".erp.order+0+00000000000000000010.parquet.tmp-ffff",  # even below the position
        pdir / ".erp.order+0.json.tmp-1234abcd",
    ]
    others = [
        day / ".erp.order+1+00000000000000000021.parquet.tmp-0a1b2c3d",
        pdir / ".erp.order+1.json.tmp-1234abcd",
    ]
    for f in leftovers + others:
        f.write_bytes(b"PAR1 half written")

    assert target.positions(CONSUMER, [P0]) == {P0: 11}
    assert [f.exists() for f in leftovers] == [False, False, False]
    assert [f.exists() for f in others] == [True, True]
    assert data_files(root) == [
        "order_created/date=2026-11-27/erp.order+0+00000000000000000010.parquet",
        "order_created/date=2026-11-27/erp.order+1+00000000000000000020.parquet",
    ]

    assert target.positions(CONSUMER, [P1]) == {P1: 21}
    assert [f.exists() for f in others] == [False, False]


# -- rejected rows --------------------------------------------------------------------------------
def test_a_row_arrow_cannot_store_is_rejected_and_the_others_land(
    target: ParquetTarget, root: Path
) -> None:
    good = invoice(P0, 10)
    not_decimal = event("invoice.issued", P0, 11, {**invoice(P0, 11).payload, "amount": "abc"})
    too_precise = event("invoice.issued", P0, 12,
                        {**invoice(P0, 12).payload, "tax": Decimal("1.234")})
    reserved = decoded("inventory.reserved", json_form("inventory.reserved"))
    too_big = event("inventory.reserved", P0, 13, {**reserved, "qty": 2**40})
    other = order(P0, 14)
    seen: list[list[Rejected]] = []

    def before_commit(rejected: Sequence[Rejected]) -> None:
        # the rows are in place, the position not yet
        assert len(data_files(root)) == 2
        assert not (root / "_positions" / CONSUMER / "erp.order+0.json").exists()
        seen.append(list(rejected))

    b = batch([good, not_decimal, too_precise, too_big, other], {P0: (None, 15)})
    target.write(b, before_commit)

    assert len(seen) == 1
    assert seen[0] == b.rejected
    by_event = {r.event.event_id: r.error for r in seen[0]}
    assert sorted(by_event) == sorted(e.event_id for e in (not_decimal, too_precise, too_big))
    for err in by_event.values():
        assert isinstance(err, PermanentError)
        assert isinstance(err, PayloadError)
    amount = str(by_event[not_decimal.event_id])
    assert "ev-erp.order-0-11" in amount and "'amount'" in amount and "'abc'" in amount
    assert "decimal128(18, 2)" in amount
    tax = str(by_event[too_precise.event_id])
    assert "'tax'" in tax and "1.234" in tax
    qty = str(by_event[too_big.event_id])
    assert "ev-erp.order-0-13" in qty and "'qty'" in qty and str(2**40) in qty
    assert "int32" in qty
    assert getattr(by_event[too_big.event_id], "path", None) == "qty"

    assert data_files(root) == [
        "invoice_issued/date=2026-11-27/erp.order+0+00000000000000000010.parquet",
        "order_created/date=2026-11-27/erp.order+0+00000000000000000010.parquet",
    ]  # no inventory_reserved file: its only row was rejected
    assert sorted(r["_offset"] for r in landed_rows(root)) == [10, 14]
    assert target.positions(CONSUMER, [P0]) == {P0: 15}  # past the rejected ones too


def test_an_undecodable_payload_is_rejected_with_its_own_error(
    target: ParquetTarget, root: Path
) -> None:
    def corrupt() -> dict[str, Any]:
        raise DecodeError("corrupt Avro body for order.created v1: EOFError")

    bad = Event(
        event_id="ev-bad", event_type="order.created", aggregate_type="order",
        aggregate_id="SO-1", aggregate_version=1, occurred_at=NOW, raw_headers={},
        topic=ORDER, partition=0, offset=11, schema=catalogue().writer("order.created"),
        load_payload=corrupt,
    )
    commits = Commits()
    target.write(batch([order(P0, 10), bad], {P0: (None, 12)}), commits)
    [[rejected]] = commits.calls
    assert rejected.event.event_id == "ev-bad"
    assert isinstance(rejected.error, DecodeError)
    assert [r["_offset"] for r in landed_rows(root)] == [10]


# -- schema evolution -----------------------------------------------------------------------------
def evolved(event_type: str, change: Any) -> SchemaVersion:
    raw = copy.deepcopy(catalogue().writer(event_type).raw)
    change(raw)
    return parse_version(raw, event_type, 2, origin="test")


def test_a_version_with_a_new_optional_field_gives_the_union_of_columns(
    target: ParquetTarget, root: Path
) -> None:
    v2 = evolved("customer.upserted", lambda raw: raw["fields"].append(
        {"name": "segment", "type": ["null", "string"], "default": None}))
    old = customer(C0, 5)
    new = event("customer.upserted", C0, 6, {**customer(C0, 6).payload, "segment": "KEY"},
                schema=v2)
    older = customer(C0, 7, email=None)
    target.write(batch([old, new, older], {C0: (None, 8)}), Commits())

    [rel] = data_files(root)
    table = read(root, rel)
    assert table.column_names[-2:] == ["updated_at", "segment"]
    assert table.schema.field("segment").type == pa.string()
    assert table.column("segment").to_pylist() == [None, "KEY", None]
    assert table.column("_schema_version").to_pylist() == [1, 2, 1]
    assert table.column("email").to_pylist()[2] is None
    assert table.schema.metadata[b"schema_versions"] == b"1,2"


def test_an_int_field_promoted_to_long_widens_the_column(
    target: ParquetTarget, root: Path
) -> None:
    def qty_long(raw: dict[str, Any]) -> None:
        next(f for f in raw["fields"] if f["name"] == "qty")["type"] = "long"

    v2 = evolved("inventory.reserved", qty_long)
    reserved = decoded("inventory.reserved", json_form("inventory.reserved"))
    rows = [event("inventory.reserved", P0, 10, reserved),
            event("inventory.reserved", P0, 11, {**reserved, "qty": 2**40}, schema=v2)]
    commits = Commits()
    target.write(batch(rows, {P0: (None, 12)}), commits)
    assert commits.calls == [[]]
    [rel] = data_files(root)
    table = read(root, rel)
    assert table.schema.field("qty").type == pa.int64()
    assert table.column("qty").to_pylist() == [reserved["qty"], 2**40]


# -- reset, failures ------------------------------------------------------------------------------
def test_reset_removes_every_data_file_and_the_consumers_positions(
    target: ParquetTarget, root: Path
) -> None:
    target.write(batch([order(P0, 10), invoice(P1, 20), customer(C0, 1)],
                       {P0: (None, 11), P1: (None, 21), C0: (None, 2)}), Commits())
    target.write(batch([order(P0, 10)], {P0: (None, 11)}, consumer="other"), Commits())
    assert data_files(root)

    target.reset(CONSUMER)
    assert data_files(root) == []
    assert [p.name for p in root.iterdir()] == ["_positions"]
    assert target.positions(CONSUMER, [P0, P1, C0]) == {P0: None, P1: None, C0: None}
    assert (root / "_positions" / "other" / "erp.order+0.json").exists()

    # a backfill lands everything again from the beginning
    target.write(batch([order(P0, 10)], {P0: (None, 11)}), Commits())
    assert [r["_offset"] for r in landed_rows(root)] == [10]


def test_a_file_system_error_is_transient_and_leaves_nothing_half_visible(
    target: ParquetTarget, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_replace = os.replace
    calls: list[str] = []

    def replace(src: Any, dst: Any) -> None:
        calls.append(str(dst))
        if len(calls) == 2:  # the second data file: the disk is full
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    b = batch([order(P0, 10), invoice(P0, 11)], {P0: (None, 12)})
    commits = Commits()
    with pytest.raises(TransientError) as info:
        target.write(b, commits)
    message = str(info.value)
    assert calls[1] in message
    assert "No space left on device" in message and "free space" in message
    assert commits.calls == []
    assert data_files(root) == [] and tmp_files(root) == []
    assert target.positions(CONSUMER, [P0]) == {P0: None}

    monkeypatch.setattr(os, "replace", real_replace)
    target.write(b, commits)  # the retry lands it
    assert sorted(r["_offset"] for r in landed_rows(root)) == [10, 11]


def test_a_failing_positions_write_removes_the_data_of_that_partition(
    target: ParquetTarget, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_replace = os.replace

    def replace(src: Any, dst: Any) -> None:
        if str(dst).endswith("erp.order+1.json"):
            raise OSError(errno.EACCES, "Permission denied", str(dst))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    b = batch([order(P0, 10), order(P1, 20)], {P0: (None, 11), P1: (None, 21)})
    with pytest.raises(TransientError, match=r"erp\.order\+1\.json: Permission denied"):
        target.write(b, Commits())
    # partition 0 is committed; partition 1's file is gone with its position
    assert target.positions(CONSUMER, [P0, P1]) == {P0: 11, P1: None}
    assert data_files(root) == [
        "order_created/date=2026-11-27/erp.order+0+00000000000000000010.parquet"
    ]
    assert tmp_files(root) == []


def test_a_corrupt_positions_file_is_named(target: ParquetTarget, root: Path) -> None:
    pdir = root / "_positions" / CONSUMER
    pdir.mkdir(parents=True)
    (pdir / "erp.order+0.json").write_text("{\"next_offset\": \"twelve\"}")
    with pytest.raises(PipelineError, match=r"positions file .*erp\.order\+0\.json is corrupt"):
        target.positions(CONSUMER, [P0])


def test_consumer_names_stay_one_folder_under_positions(
    target: ParquetTarget, root: Path
) -> None:
    for name in ("../escape", "..", "a/b"):
        target.write(batch([order(P0, 10)], {P0: (None, 11)}, consumer=name), Commits())
        assert target.positions(name, [P0]) == {P0: 11}
    assert sorted(p.parent.name for p in root.rglob("*.json")) == sorted(
        ["..%2Fescape", "%2E%2E", "a%2Fb"])
    assert all(p.parent.parent == root / "_positions" for p in root.rglob("*.json"))


# -- concurrent instances -------------------------------------------------------------------------
def test_positions_waits_for_a_write_in_progress_instead_of_deleting_its_files(
    target: ParquetTarget, root: Path
) -> None:
    """A replaced instance still landing a batch: the new owner's positions() waits for its
    commit rather than taking its files for orphans."""
    landing, release = threading.Event(), threading.Event()

    def slow_dead_letter(rejected: Sequence[Rejected]) -> None:
        landing.set()
        assert release.wait(5)

    old_owner = threading.Thread(target=target.write, args=(
        batch([order(P0, 10), invoice(P0, 11)], {P0: (None, 12)}), slow_dead_letter))
    old_owner.start()
    assert landing.wait(5)
    files = data_files(root)
    assert len(files) == 2

    new_owner = ParquetTarget(str(root))
    seen: list[dict[TP, int | None]] = []
    asking = threading.Thread(target=lambda: seen.append(new_owner.positions(CONSUMER, [P0])))
    asking.start()
    asking.join(0.3)
    assert asking.is_alive()  # waiting for the lock
    assert data_files(root) == files
    release.set()
    old_owner.join(5)
    asking.join(5)
    assert seen == [{P0: 12}]
    assert data_files(root) == files


def test_a_lock_held_too_long_is_a_transient_error(target: ParquetTarget, root: Path) -> None:
    lock = root / "_positions" / CONSUMER / ".lock"
    impatient = ParquetTarget(str(root), lock_timeout_s=0.1)
    impatient.positions(CONSUMER, [P0])
    assert lock.exists()
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another process is landing
        with pytest.raises(TransientError, match=r"\.lock stayed locked for 0\.1s"):
            impatient.positions(CONSUMER, [P0])
        with pytest.raises(TransientError, match="stayed locked"):
            impatient.write(batch([order(P0, 10)], {P0: (None, 11)}), Commits())
        assert data_files(root) == []
    finally:
        os.close(fd)
    impatient.write(batch([order(P0, 10)], {P0: (None, 11)}), Commits())
    assert impatient.positions(CONSUMER, [P0]) == {P0: 11}
