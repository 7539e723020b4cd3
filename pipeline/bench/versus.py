"""``pipeline bench relay --vs debezium``: this relay and Debezium side by side, same machine,
same PostgreSQL server, same broker, same payload, rounds alternated.

The protocol is the same for both systems, and it is Debezium's natural one: the system is
running and idle (warmed up), one transaction commits ``events`` outbox rows, and the figure is
``events / (last Kafka acknowledgement − commit)``. Each system has a database of its own on the
one server, so that no system decodes or sees the others' rows (a walsender skips other
databases' WAL records cheaply): the relay's database, Debezium with its defaults', Debezium
with ``poll.interval.ms=10``'s. Both producers: acks=all, idempotence, lz4, linger 5 ms.

What differs, plainly: the relay sends Avro (single-object encoding) with CloudEvents headers
and deletes each row once Kafka acknowledged it; Debezium (the outbox EventRouter, Connect
format, key and value as UTF-8 text) sends the jsonb payload as JSON text and never deletes a
row (its EventRouter ignores deletes; something else must remove rows). The relay is measured on
both kinds of rows: encoded by their writer (``pipeline.outbox.emit``: the relay moves bytes)
and jsonb only (SQL emitters: the relay parses and encodes).
"""

from __future__ import annotations

import statistics
import threading
import time
from typing import Any

import psycopg

from pipeline.bench.debezium import DebeziumRun, debezium_available, proc_cpu_s
from pipeline.config import Settings
from pipeline.db import database_url
from pipeline.embedded.postgres import scratch_database, with_database
from pipeline.outbox.migrations import install
from pipeline.relay.envelope import OutboxRow
from pipeline.relay.relay import Relay


def _relay_process(settings: Settings, shard: int, count: Any, last: Any, ready: Any,
                   stop: Any) -> None:
    """One relay shard, in a process of its own (as deployed: ``pipeline relay --shard N``),
    reporting acknowledged rows and the last acknowledgement's time through shared memory."""
    from pipeline.gcpolicy import tune_gc

    def observe(rows: list[OutboxRow], ack: float) -> None:
        with count.get_lock():
            count.value += len(rows)
            last.value = max(last.value, ack)

    relay = Relay(settings, shard, observer=observe)
    tune_gc()
    done = threading.Event()
    t = threading.Thread(target=relay.run, args=(done,), daemon=True)
    t.start()
    if relay.ready.wait(120):
        ready.set()
    stop.wait()
    done.set()
    t.join(60)


class RelayProcesses:
    """``shards`` relay processes over one database (``relay.shards`` = ``shards``)."""

    def __init__(self, settings: Settings, shards: int) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")  # no fork of a process with threads
        s = settings.model_copy(update={"relay": settings.relay.model_copy(
            update={"shards": shards})})
        self.count = ctx.Value("q", 0)
        self.last = ctx.Value("d", 0.0)
        self.stop = ctx.Event()
        self.ready = [ctx.Event() for _ in range(shards)]
        self.procs = [
            ctx.Process(target=_relay_process, daemon=True,
                        args=(s, i, self.count, self.last, self.ready[i], self.stop))
            for i in range(shards)
        ]

    def __enter__(self) -> RelayProcesses:
        for proc in self.procs:
            proc.start()
        for i, ready in enumerate(self.ready):
            if not ready.wait(180):
                self.__exit__(None, None, None)
                raise RuntimeError(f"relay shard {i} did not become a ready leader in 180 s")
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for proc in self.procs:
            proc.join(60)
            if proc.is_alive():
                proc.kill()

    def cpu_s(self) -> float:
        return _cpu([p.pid for p in self.procs if p.pid is not None])


def _relay_backends(conninfo: str) -> list[int]:
    with psycopg.connect(conninfo, autocommit=True) as conn:
        return [r[0] for r in conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name LIKE 'pipeline-relay%'"
        ).fetchall()]


def _cpu(pids: list[int]) -> float:
    return sum(c for p in pids if (c := proc_cpu_s(p)) is not None)


def _relay_round(
    url: str, schema: str, events: int, relays: RelayProcesses, *, encoded: bool
) -> dict[str, Any]:
    from pipeline.bench.relay import _prewrite

    goal = relays.count.value + events
    backends = _relay_backends(url)
    cpu0, pg0 = relays.cpu_s(), _cpu(backends)
    with psycopg.connect(url) as conn:
        _prewrite(conn, schema, events, encoded=encoded)  # commits
    committed = time.time()
    deadline = time.monotonic() + 600
    while relays.count.value < goal:
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"the relay acknowledged {relays.count.value - goal + events} of {events} "
                "events in 600 s; see its log lines above")
        time.sleep(0.002)
    seconds = relays.last.value - committed
    cpu, pg = relays.cpu_s() - cpu0, _cpu(backends) - pg0
    return {
        "events_per_s": events / seconds,
        "cpu_s_per_1000_events": cpu / events * 1000,
        "postgres_session_cpu_s_per_1000_events": pg / events * 1000,
    }


def _debezium_round(run: DebeziumRun, url: str, schema: str, events: int) -> dict[str, Any]:
    from pipeline.bench.relay import _prewrite

    run.begin()
    with psycopg.connect(url) as conn:
        _prewrite(conn, schema, events, encoded=False)
    got = run.wait_acked(events, committed_at=time.time())
    return {
        "events_per_s": got["events_per_s"],
        "cpu_s_per_1000_events": got["cpu_s_per_1000_events"],
        "postgres_session_cpu_s_per_1000_events": (
            got["postgres_debezium_cpu_s"] / events * 1000
            if got["postgres_debezium_cpu_s"] is not None else None),
        "jit_cpu_s": got["jit_cpu_s"],
        "peak_rss_mb": got["peak_rss_mb"],
        "producer": got["producer"],
        "engine": got["engine"],
    }


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def med(key: str) -> float | None:
        vals = [r[key] for r in runs if r.get(key) is not None]
        return statistics.median(vals) if vals else None

    out: dict[str, Any] = {
        "events_per_s": round(med("events_per_s") or 0),
        "runs_events_per_s": [round(r["events_per_s"]) for r in runs],
        "cpu_s_per_1000_events": _r(med("cpu_s_per_1000_events")),
        "postgres_session_cpu_s_per_1000_events": _r(
            med("postgres_session_cpu_s_per_1000_events")),
    }
    for extra in ("peak_rss_mb", "producer", "engine"):
        if extra in runs[-1]:
            out[extra] = runs[-1][extra]
    if "jit_cpu_s" in runs[-1]:
        out["jit_cpu_s_runs"] = [r["jit_cpu_s"] for r in runs]
    return out


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 4)


def _peak_rss_children(relays: RelayProcesses) -> float | None:
    """The largest relay process's peak resident set, MiB."""
    from pipeline.bench.debezium import peak_rss_mb

    got = [r for p in relays.procs if p.pid is not None and (r := peak_rss_mb(p.pid))]
    return round(max(got), 1) if got else None


def run_versus_debezium(
    s: Settings, *, events: int, repeat: int, shards: int = 1
) -> dict[str, Any]:
    """The side-by-side comparison on the (embedded or configured) server and broker of ``s``;
    ``s.database.url`` must be a superuser's (it makes the three databases)."""
    if not debezium_available():
        raise RuntimeError(
            "bench relay --vs debezium runs Debezium 3.6.1 on Java 17+ (with javac) and fetches "
            "it with Maven: apt-get install openjdk-17-jdk-headless maven"
        )
    admin = with_database(database_url(s), "postgres")
    schema = s.database.schema_name
    bootstrap = s.kafka.bootstrap_servers or ""
    prefix = s.topics.prefix
    with scratch_database(admin, "bench_relay") as relay_db, \
            scratch_database(admin, "bench_dbz_default") as dflt_db, \
            scratch_database(admin, "bench_dbz_tuned") as tuned_db:
        for url in (relay_db, dflt_db, tuned_db):
            with psycopg.connect(url) as conn:
                install(conn, schema)
        from pydantic import SecretStr

        rs = s.model_copy(update={"database": s.database.model_copy(
            update={"url": SecretStr(relay_db)})})
        with RelayProcesses(rs, shards) as relays:
            # warm-up, as Debezium's: both kinds of rows once, not measured
            _relay_round(relay_db, schema, events, relays, encoded=True)
            _relay_round(relay_db, schema, events, relays, encoded=False)
            parts = s.topics.partitions
            with DebeziumRun(dflt_db, bootstrap, schema=schema, partitions=parts,
                             topic_prefix=f"{prefix}_dbz_default", poll_interval_ms=None
                             ) as dflt, \
                    DebeziumRun(tuned_db, bootstrap, schema=schema, partitions=parts,
                                topic_prefix=f"{prefix}_dbz_tuned", poll_interval_ms=10
                                ) as tuned:
                rounds: dict[str, list[dict[str, Any]]] = {
                    "relay_encoded_rows": [], "relay_jsonb_rows": [],
                    "debezium_default": [], "debezium_poll_10ms": []}
                for _ in range(repeat):
                    rounds["relay_encoded_rows"].append(
                        _relay_round(relay_db, schema, events, relays, encoded=True))
                    rounds["relay_jsonb_rows"].append(
                        _relay_round(relay_db, schema, events, relays, encoded=False))
                    rounds["debezium_default"].append(
                        _debezium_round(dflt, dflt_db, schema, events))
                    rounds["debezium_poll_10ms"].append(
                        _debezium_round(tuned, tuned_db, schema, events))
            relay_rss = _peak_rss_children(relays)
    out: dict[str, Any] = {name: _summary(runs) for name, runs in rounds.items()}
    out["relay_encoded_rows"]["peak_rss_mb"] = relay_rss
    out["relay_shards"] = shards
    tuned_rate = out["debezium_poll_10ms"]["events_per_s"]
    dflt_rate = out["debezium_default"]["events_per_s"]
    for kind in ("relay_encoded_rows", "relay_jsonb_rows"):
        rate = out[kind]["events_per_s"]
        out[f"ratio_{kind}_to_debezium_poll_10ms"] = round(rate / tuned_rate, 3)
        out[f"ratio_{kind}_to_debezium_default"] = round(rate / dflt_rate, 3)
    out["events"] = events
    out["protocol"] = ("each system running and warmed up; one transaction commits the events; "
                       "events / (last acknowledgement - commit); medians of the runs")
    return out
