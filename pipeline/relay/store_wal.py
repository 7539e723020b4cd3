"""The relay's WAL engine (``relay.engine: wal``, DESIGN decision 3): outbox events read from a
logical replication slot in commit order, instead of polled from the outbox table.

Per shard, one slot (``pgoutput``), read with ``pg_logical_slot_peek_binary_changes`` on the
relay's ordinary connection (psycopg 3 has no replication protocol; the SQL functions need
none) and advanced with ``pg_replication_slot_advance`` only once Kafka acknowledged every
event up to the position. While the engine is ``wal``, ``outbox_emit`` writes events as WAL
messages (migration 0005): no row is inserted or deleted. What it reads, in commit order:

1. rows inserted before the slots existed (ids up to ``wal_slots.boundary``): from the table,
   in id order, before the slot; they are deleted once published, as the polling relay does;
2. then the slot: messages of ``<schema>.outbox`` and inserts into ``<schema>.outbox`` (rows
   written while the engine was ``poll``: under REPEATABLE READ a transaction older than the
   switch; after ``pipeline outbox engine poll``). An insert whose row is gone was published
   from the table in step 1 and is passed over; one still there is published, then deleted.

No duplicates after a crash (decision 4): a slot stands where the last acknowledged batch
ended, so a new leader reads again at most what was sent and not confirmed; the relay's
read-back of each partition's tail gives the positions already in Kafka, and those events are
passed over. Leadership, ``relay_state`` and wake-ups (LISTEN/NOTIFY) are the polling store's.

Idle slots: every idle heartbeat (once a second) writes a tiny transactional message of another
prefix, so a slot on a database whose other tables are busy keeps advancing and does not hold
WAL back (Debezium's ``heartbeat.action.query``, built in).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from pipeline.errors import ConfigError, DatabaseUnavailable
from pipeline.outbox import engine
from pipeline.relay.envelope import OutboxRow
from pipeline.relay.pgoutput import DecodeError, Decoder, Transaction, WalEvent, lsn_text, parse_lsn
from pipeline.relay.store import RelayStore

log = logging.getLogger("pipeline.relay")

# protocol rows asked of one peek per event wanted: an event of its own transaction is three
# rows (begin, message, commit)
_ROWS_PER_EVENT = 3


@dataclass(slots=True)
class _Batch:
    last_id: int
    lsn: int  # where the slot may stand once this batch is in Kafka
    # the batch ends inside a transaction larger than a batch: (its end LSN, the last id sent)
    carry: tuple[int, int] | None = None


class WalRelayStore(RelayStore):
    """:class:`RelayStore`'s interface over a replication slot (see the module's docstring)."""

    def __init__(
        self,
        conninfo: str,
        schema: str,
        shard: int,
        shards: int,
        writer_fingerprints: dict[str, bytes] | None = None,
        slot_prefix: str | None = None,
    ) -> None:
        super().__init__(conninfo, schema, shard, shards, writer_fingerprints)
        self.slot_prefix = slot_prefix
        self.slot = ""
        self.publication = engine.publication(schema)
        self._prefix = f"{schema}.outbox"
        self._reset()

    def _reset(self) -> None:
        self._confirmed = 0  # the slot's confirmed position as we last set or read it
        self._read_lsn = 0  # every transaction up to here is handed out or passed over
        self._carry: list[WalEvent] = []  # the rest of a transaction larger than a batch
        self._carry_lsn = 0
        self._batches: collections.deque[_Batch] = collections.deque()
        self._boundary: int | None = None  # table rows up to this id come first
        self._drain_done = False
        self._drain_query: sql.Composed | None = None
        self._drained: set[int] = set()  # table rows handed out from step 1
        self._table_rows: set[int] = set()  # handed-out events that are rows (to delete)
        self._skip: set[tuple[int, str]] = set()  # (position, event id) found in Kafka
        # (end LSN, id): a transaction published in parts before the last stop, up to the id
        self._resume: tuple[int, int] | None = None
        self._progress: tuple[int, tuple[int, int] | None] | None = None
        self._snapshots: bool | None = None  # pg_log_standby_snapshot() works here
        self._snapshot_at = 0.0

    # -- connection and slots -----------------------------------------------------------------
    def connect(self) -> None:
        super().connect()
        self._reset()
        conn = self._c()
        conn.execute("SET bytea_output = 'hex'")
        conn.execute("SET DateStyle = 'ISO, YMD'")
        engine.require_wal_ready(conn, self.schema)

    def check_engine(self) -> None:
        """On leadership: every shard's slot exists and is registered (made here on first
        use, which switches outbox_emit to messages), then this shard's slot is read."""
        conn = self._c()
        s = sql.Identifier(self.schema)
        registered = conn.execute(
            sql.SQL("SELECT slot_name, shard, shards, boundary FROM {}.wal_slots").format(s)
        ).fetchall()
        others = sorted({int(r[2]) for r in registered} - {self.shards})
        if others:
            raise ConfigError(
                f"the outbox's WAL slots are for relay.shards={others[0]}, this relay runs "
                f"with relay.shards={self.shards}: resharding the WAL engine needs the old "
                "slots drained and dropped first (pipeline outbox engine poll), then "
                "pipeline outbox engine wal with the new relay.shards"
            )
        mine = {int(r[1]): (str(r[0]), int(r[3])) for r in registered}
        live = engine.live_slots(conn)
        lost = sorted(name for name, _b in mine.values() if name not in live)
        mode, pinned = engine.current_engine(conn, self.schema)
        if len(mine) == self.shards and not lost:
            self.slot, self._boundary = mine[self.shard]
            if mode != "wal":
                log.warning(
                    "the outbox is switched to rows (pipeline outbox engine poll): this relay "
                    "publishes what is left in slot %s and the rows written since",
                    self.slot, extra={"shard": self.shard})
        elif pinned:
            raise ConfigError(
                f"the outbox in schema {self.schema} was switched to polling (pipeline outbox "
                "engine poll): run the relay with relay.engine: poll, or switch to the WAL "
                "engine again with pipeline outbox engine wal"
            )
        else:
            if lost:
                log.error(
                    "replication slot(s) %s of the outbox were dropped outside the pipeline: "
                    "events written as WAL messages and not yet published when they were "
                    "dropped are gone with them (outbox_emit has written rows since, which "
                    "are published); making new slots", ", ".join(lost),
                    extra={"shard": self.shard})
            names = engine.slot_names(conn, self.schema, self.shards, self.slot_prefix)
            self.slot = names[self.shard]
            self._boundary = engine.switch_to_wal(conn, self.schema, names)[self.slot]
        engine.ensure_publication(conn, self.schema)
        row = conn.execute(
            "SELECT confirmed_flush_lsn::text FROM pg_catalog.pg_replication_slots "
            "WHERE slot_name = %s", (self.slot,)).fetchone()
        if row is None or row[0] is None:
            raise DatabaseUnavailable(f"replication slot {self.slot} vanished while starting")
        self._confirmed = self._read_lsn = parse_lsn(str(row[0]))
        self._catch_up_to_recorded()
        log.info("relay reads replication slot %s from %s", self.slot,
                 lsn_text(self._confirmed), extra={"shard": self.shard})

    def _catch_up_to_recorded(self) -> None:
        """PostgreSQL saves an advanced slot's position at the next checkpoint only: after a
        server crash the slot may stand before what the relay confirmed, which is recorded
        with every batch (relay_state). Move it up again; note a transaction in parts."""
        row = self._c().execute(
            sql.SQL("SELECT wal_lsn::text, wal_carry_lsn::text, wal_carry_id FROM "
                    "{}.relay_state WHERE shard = %s AND wal_slot = %s").format(
                sql.Identifier(self.schema)), (self.shard, self.slot)).fetchone()
        if row is None:
            return
        if row[0] is not None and parse_lsn(str(row[0])) > self._confirmed:
            recorded = parse_lsn(str(row[0]))
            log.warning(
                "replication slot %s stands at %s, before %s that this shard's relay "
                "confirmed (a server crash rolls a slot back to its last checkpoint): moved "
                "up, so nothing is published twice", self.slot, lsn_text(self._confirmed),
                lsn_text(recorded), extra={"shard": self.shard})
            self._advance(recorded)
            self._read_lsn = recorded
        if row[1] is not None and parse_lsn(str(row[1])) > self._confirmed:
            self._resume = (parse_lsn(str(row[1])), int(row[2]))

    # -- reading ------------------------------------------------------------------------------
    def pending_aggregate_types(self) -> list[str]:
        """Of the table's rows and of the slot's first events: the topics a read-back needs."""
        types = set(super().pending_aggregate_types())
        for txn in self._peek(10_000):
            types.update(ev.aggregate_type for ev in txn.events)
        return sorted(types)

    def fetch(self, limit: int, exclude: list[int] | None = None) -> list[OutboxRow]:
        if not self._drain_done:
            rows = self._drain(limit, exclude or [])
            if rows:
                return rows
        return self._from_slot(limit)

    def _drain(self, limit: int, exclude: list[int]) -> list[OutboxRow]:
        assert self._boundary is not None, "check_engine() runs before fetch()"
        if self._drain_query is None:  # the polling relay's own batch query, to the boundary
            self._drain_query = self._fetch_query(encoded_column=self._has_encoded,
                                                  upto_id=self._boundary)
        rows = self._fetch_rows(self._drain_query, limit, exclude)
        if not rows:
            self._drain_done = True
            return []
        self._drained.update(r.id for r in rows)
        self._table_rows.update(r.id for r in rows)
        self._batches.append(_Batch(rows[-1].id, self._read_lsn))
        return rows

    def _peek(self, rows: int, after: int = 0) -> list[Transaction]:
        got = self._on_slot(
            "SELECT lsn::text, xid::text, data FROM pg_logical_slot_peek_binary_changes("
            "%s, NULL, %s, 'proto_version', '1', 'publication_names', %s, 'messages', 'true')",
            (self.slot, rows, self.publication))
        try:
            # a decoder per decoding session: relations are described again in each
            return list(Decoder(self.schema).transactions(got, after))
        except DecodeError as exc:
            raise DecodeError(
                f"relay cannot read slot {self.slot}: {exc}. Nothing after it is published. If "
                "the outbox was installed by a newer version, upgrade the relay; otherwise "
                "report it. To skip that transaction (its events are lost): SELECT "
                f"pg_replication_slot_advance('{self.slot}', '<its end LSN>')") from exc

    def _on_slot(self, query: str, params: tuple[Any, ...]) -> list[Any]:
        """A call that takes the slot; a slot gone ends the session."""
        try:
            return engine.on_slot(self._c(), self.slot, query, params)
        except psycopg.errors.UndefinedObject as exc:
            raise DatabaseUnavailable(
                f"replication slot {self.slot} is gone ({exc.diag.message_primary}); the "
                "relay starts again and finds out why") from exc

    def _from_slot(self, limit: int) -> list[OutboxRow]:
        out: list[WalEvent] = []
        full_lsn = self._read_lsn  # the last transaction wholly in `out` or before
        if self._carry:
            take, self._carry = self._carry[:limit], self._carry[limit:]
            out.extend(take)
            if not self._carry:
                full_lsn = self._read_lsn = self._carry_lsn
        if len(out) < limit:
            # the batches in flight are decoded again: the slot stands before them
            wanted = _ROWS_PER_EVENT * (limit - len(out) + limit * len(self._batches)) + 16
            # transactions up to _read_lsn (handed out, or passed over) are not read again
            for txn in self._peek(wanted, self._read_lsn):
                events = txn.events
                if self._resume is not None and txn.commit_lsn == self._resume[0]:
                    # published in parts before the last stop: what went is not sent again
                    done = self._resume[1]
                    events = [ev for ev in events if ev.id > done]
                    log.info("relay resumes a transaction of slot %s published in part before "
                             "the last stop, after outbox id %d", self.slot, done,
                             extra={"shard": self.shard})
                events = self._keep(events)
                if out and len(out) + len(events) > limit and len(events) <= limit:
                    break  # the next batch takes it whole (one larger than a batch is split)
                room = limit - len(out)
                out.extend(events[:room])
                if len(events) > room:
                    self._carry, self._carry_lsn = events[room:], txn.commit_lsn
                    break
                full_lsn = self._read_lsn = txn.commit_lsn
                if len(out) >= limit:
                    break
        if not out:
            if not self._batches and self._read_lsn > self._confirmed:
                # only passed-over transactions (other shards, heartbeats, duplicates)
                self._advance(self._read_lsn)
            return []
        carry = (self._carry_lsn, out[-1].id) if self._carry else None
        self._batches.append(_Batch(out[-1].id, full_lsn, carry))
        self._table_rows.update(ev.id for ev in out if ev.from_table)
        return [self._row(ev) for ev in out]

    def _keep(self, events: list[WalEvent]) -> list[WalEvent]:
        """Of a transaction's events, those this relay publishes: in its shard, not found in
        Kafka by the read-back, and (inserts) whose row was not published from the table."""
        if not events:
            return events
        if self.shards > 1:
            shard_of = self._shards_of({ev.aggregate_id for ev in events})
            events = [ev for ev in events if shard_of[ev.aggregate_id] == self.shard]
        if self._skip:
            kept = [ev for ev in events if (ev.id, ev.event_id) not in self._skip]
            if len(kept) < len(events):
                log.warning(
                    "relay passed over %d event(s) of slot %s already in Kafka (acknowledged "
                    "before the last stop, the slot not yet advanced)",
                    len(events) - len(kept), self.slot, extra={"shard": self.shard})
            events = kept
        rows = [ev.id for ev in events if ev.from_table]
        if rows:
            there = set(super().existing(rows)) - self._drained
            events = [ev for ev in events if not ev.from_table or ev.id in there]
        return events

    def _shards_of(self, ids: set[str]) -> dict[str, int]:
        """The shard of each aggregate id, by the same hash as the polling relay's."""
        return dict(engine.shards_of(self._c(), ids, self.shards))

    def _row(self, ev: WalEvent) -> OutboxRow:
        fp = self._fingerprints.get(ev.event_type)
        if ev.encoded is not None and fp is not None and ev.encoded[2:10] == fp:
            # passed through as its writer encoded it; a dead letter of it shows the readable
            # payload, which the slot carries
            if ev.headers_text == "{}":
                return OutboxRow(ev.id, ev.event_id, ev.aggregate_type, ev.aggregate_id,
                                 ev.aggregate_version, ev.event_type, None, {},
                                 ev.occurred_at, ev.payload_text, None, ev.encoded)
            row = OutboxRow.from_stored(
                ev.id, ev.event_id, ev.aggregate_type, ev.aggregate_id, ev.aggregate_version,
                ev.event_type, None, ev.headers_text, ev.occurred_at, ev.encoded)
            return dataclasses.replace(row, payload_text=ev.payload_text)
        return OutboxRow.from_stored(
            ev.id, ev.event_id, ev.aggregate_type, ev.aggregate_id, ev.aggregate_version,
            ev.event_type, ev.payload_text, ev.headers_text, ev.occurred_at)

    # -- completing ---------------------------------------------------------------------------
    def complete(self, ids: list[int], leader: str, published: int, dead_lettered: int) -> None:
        """Delete the table rows among ``ids`` (step 1, or inserts read from the slot), then
        advance the slot past the batch; an idle call writes the heartbeat message."""
        target = None
        if ids and self._batches and self._batches[0].last_id == ids[-1]:
            batch = self._batches.popleft()
            # the last batch in flight: the slot may pass the transactions passed over since
            target = batch.lsn if self._batches else max(batch.lsn, self._read_lsn)
            self._progress = (max(target, self._confirmed), batch.carry)
        elif ids:
            log.warning("relay completed a batch it did not hand out (ids %d..%d): slot %s not "
                        "advanced for it", ids[0], ids[-1], self.slot, extra={"shard": self.shard})
        rows = [i for i in ids if i in self._table_rows]
        try:
            super().complete(rows, leader, published, dead_lettered)
        finally:
            self._progress = None
        self._table_rows.difference_update(rows)
        self._drained.difference_update(rows)
        if target is not None and target > self._confirmed:
            self._advance(target)
        if not ids:
            self._c().execute(
                "SELECT pg_logical_emit_message(true, %s, '')", (f"{self._prefix}.heartbeat",))

    def forget_published(self, found: set[tuple[int, str]], leader: str) -> int:
        """The read-back found these (position, event id) in Kafka: table rows among them are
        deleted now, and slot events among them are passed over when met."""
        self._skip = set(found)
        published = RelayStore.existing_events(self, found)
        if published:
            RelayStore.complete(self, published, leader, 0, 0)
        return len(published)

    def _advance(self, lsn: int) -> None:
        self._on_slot("SELECT pg_replication_slot_advance(%s, %s::pg_lsn)",
                      (self.slot, lsn_text(lsn)))
        self._confirmed = lsn
        self._log_snapshot()

    def _log_snapshot(self) -> None:
        """Every decoding call (each peek, each advance) reads the WAL from the slot's
        restart_lsn, which moves only past a running-transactions record: PostgreSQL logs one
        every 15 s, so at a steady rate each call would read up to 15 s of WAL again. Logging
        one a second (pg_log_standby_snapshot, PostgreSQL 16+, superuser or granted) keeps it
        within a second; without the function or the right, the 15 s stand."""
        if self._snapshots is False or time.monotonic() - self._snapshot_at < 1.0:
            return
        self._snapshot_at = time.monotonic()
        try:
            self._c().execute("SELECT pg_log_standby_snapshot()")
            self._snapshots = True
        except (psycopg.errors.UndefinedFunction, psycopg.errors.InsufficientPrivilege) as exc:
            self._snapshots = False
            log.info("relay cannot log running-transaction snapshots (%s): slot %s's restart "
                     "point moves every 15 s, and each read of it re-reads up to 15 s of WAL; "
                     "GRANT EXECUTE ON FUNCTION pg_log_standby_snapshot() to the relay's role "
                     "(PostgreSQL 16+) to make its reads cheaper", exc.diag.message_primary,
                     self.slot, extra={"shard": self.shard})

    def _progress_to_record(self) -> bool:
        return self._progress is not None

    def _record_progress(self, conn: psycopg.Connection[Any]) -> None:
        if self._progress is None:
            return
        lsn, carry = self._progress
        conn.execute(
            sql.SQL("UPDATE {}.relay_state SET wal_slot = %s, wal_lsn = %s::pg_lsn, "
                    "wal_carry_lsn = %s::pg_lsn, wal_carry_id = %s WHERE shard = %s").format(
                sql.Identifier(self.schema)),
            (self.slot, lsn_text(lsn), lsn_text(carry[0]) if carry else None,
             carry[1] if carry else None, self.shard))
