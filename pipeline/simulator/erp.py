"""An ERP activity simulator: concurrent writers that run order lifecycles against the outbox,
as an ERP would, each business step in its own transaction.

Some transactions roll back (and must never be published) and some commit late (held open
while later transactions commit: the case that breaks id-cursor relays). ``written`` counts
committed events only; ``committed_at`` maps event id → commit wall time for latency figures.
"""

from __future__ import annotations

import datetime as dt
import logging
import random
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from pipeline.outbox.emit import emit, emit_statement
from pipeline.schemas.catalogue import Catalogue
from pipeline.simulator.payloads import payload_for

log = logging.getLogger("pipeline.simulator")

# One order's life, as (event type, aggregate type). Customer first, then the order's steps.
LIFECYCLE: tuple[tuple[str, str], ...] = (
    ("order.created", "order"),
    ("inventory.reserved", "inventory"),
    ("payment.completed", "payment"),
    ("invoice.issued", "invoice"),
    ("order.status_changed", "order"),
    ("shipment.created", "shipment"),
)


@dataclass
class SimulatorStats:
    written: int = 0
    rolled_back: int = 0
    late_commits: int = 0
    errors: int = 0
    committed_at: dict[str, float] = field(default_factory=dict)
    # event id → (event type, aggregate id, payload in JSON form) when ``keep_ledger``
    ledger: dict[str, tuple[str, str, dict[str, Any]]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass(frozen=True)
class SimulatorConfig:
    writers: int = 4
    rate: float = 200.0  # events/s over all writers; 0 = as fast as possible
    rollback_ratio: float = 0.02
    late_commit_ratio: float = 0.02
    late_commit_s: float = 0.3
    customers: int = 200
    max_events: int | None = None
    track_latency: bool = False
    keep_ledger: bool = False  # remember every committed event (tests compare targets with it)
    seed: int = 42


class ErpSimulator:
    def __init__(
        self,
        conninfo: str,
        schema: str,
        config: SimulatorConfig,
        catalogue: Catalogue | None = None,
    ) -> None:
        self.conninfo = conninfo
        self.schema = schema
        self.cfg = config
        self.catalogue = catalogue or Catalogue.load()
        self.stats = SimulatorStats()
        self._order_seq = 0
        self._seq_lock = threading.Lock()
        self._budget = threading.Semaphore(config.max_events) if config.max_events else None

    def run(self, stop: threading.Event) -> None:
        threads = [
            threading.Thread(
                target=self._writer, args=(i, stop), name=f"erp-writer-{i}", daemon=True
            )
            for i in range(self.cfg.writers)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def _next_order(self) -> str:
        with self._seq_lock:
            self._order_seq += 1
            return f"SO-{self._order_seq:07d}"

    def _take(self, n: int) -> int:
        """How many of ``n`` events the budget still allows."""
        if self._budget is None:
            return n
        got = 0
        while got < n and self._budget.acquire(blocking=False):
            got += 1
        return got

    def _writer(self, idx: int, stop: threading.Event) -> None:
        rng = random.Random(self.cfg.seed * 1000 + idx)
        per_writer = self.cfg.rate / self.cfg.writers if self.cfg.rate else 0.0
        next_at = time.monotonic()
        try:
            conn = psycopg.connect(self.conninfo)
        except psycopg.OperationalError as exc:
            log.error("simulator writer %d cannot connect: %s", idx, exc)
            self.stats.errors += 1
            return
        with conn:
            while not stop.is_set():
                steps = self._order_steps(rng)
                granted = self._take(len(steps))
                if granted == 0:
                    return
                for event_type, agg_type, agg_id in steps[:granted]:
                    if stop.is_set():
                        return
                    next_at = _paced(next_at, per_writer, stop)
                    self._one(conn, rng, event_type, agg_type, agg_id)

    def prepared_load(self, count: int) -> PreparedLoad:
        """``count`` events of whole order lifecycles, as :meth:`run` writes them, validated and
        encoded now, to be written later by :meth:`PreparedLoad.run` at this simulator's rate
        (each event its own transaction, no rollbacks or late commits): the latency benches'
        ERP, whose clock then times the writes alone. Connects the writers now."""
        return PreparedLoad(self, count)

    def _order_steps(self, rng: random.Random) -> list[tuple[str, str, str]]:
        order = self._next_order()
        steps: list[tuple[str, str, str]] = []
        if rng.random() < 0.3:
            cust = f"CUST-{1000 + rng.randrange(self.cfg.customers)}"
            steps.append(("customer.upserted", "customer", cust))
        steps += [(t, a, order) for t, a in LIFECYCLE]
        if rng.random() < 0.1:
            steps.append(("order.cancelled", "order", order))
        return steps

    def _one(
        self,
        conn: psycopg.Connection[Any],
        rng: random.Random,
        event_type: str,
        agg_type: str,
        agg_id: str,
    ) -> None:
        payload = payload_for(event_type, rng, aggregate_id=agg_id, now=dt.datetime.now(dt.UTC))
        event_id = str(uuid.uuid4())
        try:
            emit(
                conn,
                agg_type,
                agg_id,
                event_type,
                payload,
                event_id=event_id,
                schema=self.schema,
                catalogue=self.catalogue,
            )
            roll = rng.random()
            if roll < self.cfg.rollback_ratio:
                conn.rollback()
                with self.stats.lock:
                    self.stats.rolled_back += 1
                # the step must still happen: retry it so the order's story stays whole
                emit(
                    conn,
                    agg_type,
                    agg_id,
                    event_type,
                    payload,
                    schema=self.schema,
                    catalogue=self.catalogue,
                    event_id=event_id,
                )
            elif roll < self.cfg.rollback_ratio + self.cfg.late_commit_ratio:
                time.sleep(self.cfg.late_commit_s)  # hold the transaction open
                with self.stats.lock:
                    self.stats.late_commits += 1
            conn.commit()
            with self.stats.lock:
                self.stats.written += 1
                if self.cfg.track_latency:
                    self.stats.committed_at[event_id] = time.time()
                if self.cfg.keep_ledger:
                    self.stats.ledger[event_id] = (event_type, agg_id, payload)
        except psycopg.Error as exc:
            conn.rollback()
            with self.stats.lock:
                self.stats.errors += 1
            log.warning("simulator write failed (%s %s): %s", event_type, agg_id, exc)


def _paced(next_at: float, per_writer: float, stop: threading.Event) -> float:
    """Wait until the next write is due at ``per_writer`` events/s (0: at once); returns when
    the one after is due. A writer more than a second behind starts over from now instead of
    bursting to catch up."""
    if not per_writer:
        return next_at
    next_at += 1.0 / per_writer
    delay = next_at - time.monotonic()
    if delay > 0:
        stop.wait(delay)
    elif delay < -1.0:
        next_at = time.monotonic()
    return next_at


@dataclass(frozen=True)
class PreparedEvent:
    event_id: str
    query: sql.Composed
    params: tuple[Any, ...]


class PreparedLoad:
    """Events built ahead by :meth:`ErpSimulator.prepared_load`, one list per writer (a
    writer keeps an order's steps in order), each writer on an autocommit connection of its
    own: a write is one round trip, ``SELECT outbox_emit(…)`` committed by itself."""

    def __init__(self, sim: ErpSimulator, count: int) -> None:
        self.sim = sim
        writers = max(1, sim.cfg.writers)
        self._conns: list[psycopg.Connection[Any]] = []
        self._events: list[list[PreparedEvent]] = []
        try:
            for idx in range(writers):
                conn = psycopg.connect(sim.conninfo, autocommit=True)
                self._conns.append(conn)
                self._events.append(self._build(conn, idx, -(-count // writers)))
        except BaseException:
            self.close()
            raise

    def _build(self, conn: psycopg.Connection[Any], idx: int, count: int) -> list[PreparedEvent]:
        sim = self.sim
        rng = random.Random(sim.cfg.seed * 1000 + idx)
        out: list[PreparedEvent] = []
        while len(out) < count:
            for event_type, agg_type, agg_id in sim._order_steps(rng):
                payload = payload_for(event_type, rng, aggregate_id=agg_id,
                                      now=dt.datetime.now(dt.UTC))
                event_id = str(uuid.uuid4())
                query, params = emit_statement(conn, agg_type, agg_id, event_type, payload,
                                               event_id=event_id, schema=sim.schema,
                                               catalogue=sim.catalogue)
                out.append(PreparedEvent(event_id, query, params))
        return out[:count]

    def run(self, stop: threading.Event) -> None:
        """Write the events at the simulator's rate until ``stop`` (or none is left)."""
        threads = [threading.Thread(target=self._writer, args=(i, stop), daemon=True,
                                    name=f"erp-writer-{i}") for i in range(len(self._conns))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def _writer(self, idx: int, stop: threading.Event) -> None:
        sim, stats = self.sim, self.sim.stats
        conn = self._conns[idx]
        per_writer = sim.cfg.rate / len(self._conns) if sim.cfg.rate else 0.0
        next_at = time.monotonic()
        for ev in self._events[idx]:
            if stop.is_set():
                return
            next_at = _paced(next_at, per_writer, stop)
            try:
                conn.execute(ev.query, ev.params)
            except psycopg.Error as exc:
                with stats.lock:
                    stats.errors += 1
                log.warning("simulator write failed (event %s): %s", ev.event_id, exc)
                continue
            with stats.lock:
                stats.written += 1
                if sim.cfg.track_latency:
                    stats.committed_at[ev.event_id] = time.time()

    def close(self) -> None:
        for conn in self._conns:
            conn.close()
