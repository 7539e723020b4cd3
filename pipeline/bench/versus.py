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

With ``--rate R --seconds S`` (:func:`run_latency_versus_debezium`) the figure is latency
instead: each system running and warmed up on its database, the ERP simulator commits R
events/s for S seconds into it (systems in turn), and each event's Kafka acknowledgement minus
its commit gives p50/p99/max — the relay's from its observer (its batch's acknowledgement, per
event id, shipped back from the shard processes), Debezium's from the harness's producer
callback per record (``DebeziumRun.track_acks``/``ack_times``). Debezium runs with
``poll.interval.ms=10`` and with its default. A run below 95 % of R is not a pass.
"""

from __future__ import annotations

import functools
import statistics
import threading
import time
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from typing import Any, Protocol

import psycopg

from pipeline.bench.debezium import (
    DebeziumRun,
    debezium_available,
    postmaster_of,
    proc_cpu_s,
    server_cpu_s,
)
from pipeline.bench.erp_load import WARMUP_S, latency_figures, simulate_at
from pipeline.config import Settings
from pipeline.db import database_url
from pipeline.embedded.postgres import scratch_database, with_database
from pipeline.outbox.migrations import install
from pipeline.relay.envelope import OutboxRow
from pipeline.relay.relay import Relay


def _relay_process(settings: Settings, shard: int, count: Any, last: Any, ready: Any,
                   stop: Any, control: Any = None) -> None:
    """One relay shard, in a process of its own (as deployed: ``pipeline relay --shard N``),
    reporting acknowledged rows and the last acknowledgement's time through shared memory.

    ``control`` (a pipe's end) answers the parent: ``"track"`` keeps from now on each
    acknowledged row's event id with its batch's acknowledgement time (``"tracking"`` back),
    ``"acks"`` sends what was kept since (``{event_id: time.time()}``) and forgets it."""
    from pipeline.gcpolicy import tune_gc

    lock = threading.Lock()
    kept: list[dict[str, float] | None] = [None]  # while tracking: {event_id: ack}

    def observe(rows: list[OutboxRow], ack: float) -> None:
        with count.get_lock():
            count.value += len(rows)
            last.value = max(last.value, ack)
        if kept[0] is not None:
            with lock:
                into = kept[0]
                if into is not None:
                    for r in rows:
                        into.setdefault(r.event_id, ack)

    relay = Relay(settings, shard, observer=observe)
    tune_gc()
    done = threading.Event()
    t = threading.Thread(target=relay.run, args=(done,), daemon=True)
    t.start()
    if relay.ready.wait(120):
        ready.set()
    while control is not None and not stop.is_set():
        try:
            if not control.poll(0.1):
                continue
            cmd = control.recv()
        except (EOFError, OSError):  # the parent went away
            break
        if cmd == "track":
            with lock:
                kept[0] = {}
            control.send("tracking")
        elif cmd == "acks":
            with lock:
                got = kept[0] if kept[0] is not None else {}
                if kept[0] is not None:
                    kept[0] = {}
            control.send(got)
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
        pipes = [ctx.Pipe() for _ in range(shards)]
        self._controls = [mine for mine, _ in pipes]
        self.procs = [
            ctx.Process(target=_relay_process, daemon=True,
                        args=(s, i, self.count, self.last, self.ready[i], self.stop, theirs))
            for i, (_, theirs) in enumerate(pipes)
        ]
        self._ack_log: dict[str, float] = {}  # sent by the shards, not yet asked for
        self._tracked_from: int | None = None  # the count when tracking started

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

    def track_acks(self) -> None:
        """From now on every shard keeps each acknowledged row's event id with its batch's
        acknowledgement time (the relay observer's), for :meth:`ack_times`; whatever was kept
        before is forgotten. Returns once all shards confirmed."""
        for control in self._controls:
            control.send("track")
        for i, control in enumerate(self._controls):
            if not control.poll(30) or control.recv() != "tracking":
                raise RuntimeError(f"relay shard {i} did not start tracking acknowledgements")
        self._ack_log.clear()
        self._tracked_from = self.count.value

    def ack_times(self, event_ids: Iterable[str], timeout_s: float = 60.0) -> dict[str, float]:
        """``{event_id: time.time() of its Kafka acknowledgement}`` for ``event_ids``, once all
        were acknowledged or ``timeout_s`` passed (then those acknowledged only). Needs
        :meth:`track_acks` before the rows were committed. The shards are asked only once
        their shared count says enough rows were acknowledged since (or at the timeout), so
        that asking takes no CPU from a relay still publishing the measured rows; those
        returned are forgotten, others kept for a later call."""
        if self._tracked_from is None:
            raise RuntimeError("ack_times() needs track_acks() before the rows were committed")
        want = set(event_ids)
        deadline = time.monotonic() + timeout_s
        goal = self._tracked_from + len(want)
        while self.count.value < goal and time.monotonic() < deadline:
            time.sleep(0.002)
        while True:
            for control in self._controls:
                control.send("acks")
            for i, control in enumerate(self._controls):
                if not control.poll(60):
                    raise RuntimeError(f"relay shard {i} did not send its acknowledgements")
                for event_id, at in control.recv().items():
                    self._ack_log.setdefault(event_id, at)
            if want.issubset(self._ack_log) or time.monotonic() >= deadline:
                break
            time.sleep(0.1)
        got = {e: self._ack_log.pop(e) for e in want if e in self._ack_log}
        self._tracked_from += len(got)
        return got


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


# -- latency: commit -> acknowledgement at a rate ------------------------------------------------

# the target (14): p99 commit -> acknowledgement at most this at 1,000 events/s reached
TARGET_P99_MS = 20.0
TARGET_RATE = 1000
ACK_TIMEOUT_S = 60.0  # after the writers stopped, how long every written event may take


class _Acknowledger(Protocol):
    """What a latency round needs of a system: :class:`RelayProcesses` and
    :class:`~pipeline.bench.debezium.DebeziumRun` both."""

    def track_acks(self) -> None: ...

    def ack_times(self, event_ids: Iterable[str], timeout_s: float = ...) -> dict[str, float]:
        ...


def _java_cpu_s(run: DebeziumRun) -> float | None:
    return proc_cpu_s(run.pid) if run.pid is not None else None


def _latency_round(system: _Acknowledger, cpu: Callable[[], float | None], url: str,
                   schema: str, rate: float, seconds: float, postmaster: int | None
                   ) -> dict[str, Any]:
    """One measured interval; with the CPU the system (``cpu``) and the whole PostgreSQL
    server (the simulator's sessions too, the same for every system) spent per 1,000 events,
    to see what took the CPU when the simulator fell short of the rate on a small machine."""
    def server() -> float | None:
        return server_cpu_s(postmaster) if postmaster is not None else None

    system.track_acks()
    cpu0, pg0 = cpu(), server()
    written, committed_at = simulate_at(url, schema, rate, seconds)
    acks = system.ack_times(committed_at, ACK_TIMEOUT_S)
    cpu1, pg1 = cpu(), server()
    out = latency_figures(committed_at, acks, written=written, rate=rate, seconds=seconds)
    out["cpu_s_per_1000_events"] = (
        round((cpu1 - cpu0) / written * 1000, 4)
        if cpu0 is not None and cpu1 is not None and written else None)
    out["postgres_cpu_s_per_1000_events"] = (
        round((pg1 - pg0) / written * 1000, 4)
        if pg0 is not None and pg1 is not None and written else None)
    return out


def latency_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """A system's runs: events written and acknowledged in all, the median reached rate,
    whether every run reached the rate, the medians of p50/p99/max (ms), the runs."""
    def med(key: str) -> float:
        return round(float(statistics.median(r[key] for r in runs)), 2)

    def med_or_none(key: str) -> float | None:
        vals = [r[key] for r in runs if r.get(key) is not None]
        return round(statistics.median(vals), 4) if vals else None

    return {
        "written": sum(r["written"] for r in runs),
        "acknowledged": sum(r["acknowledged"] for r in runs),
        "achieved_rate": round(statistics.median(r["achieved_rate"] for r in runs), 1),
        "rate_reached": all(r["rate_reached"] for r in runs),
        "latency_ms": {"p50": med("p50"), "p99": med("p99"), "max": med("max")},
        "cpu_s_per_1000_events": med_or_none("cpu_s_per_1000_events"),
        "postgres_cpu_s_per_1000_events": med_or_none("postgres_cpu_s_per_1000_events"),
        "runs": runs,
    }


def latency_verdict(systems: dict[str, dict[str, Any]], *, rate: int,
                    relay_beats: bool) -> str:
    """NOT A PASS when some run of some system fell below ``RATE_REACHED_MIN`` of the rate
    (its latency is a lighter load's), when some written event was not acknowledged, or, at
    the target's rate, when the relay's p99 is above ``TARGET_P99_MS`` or not below tuned
    Debezium's; PASS when it meets the issue's target; else (a lower rate) what was measured."""
    from pipeline.bench.erp_load import RATE_REACHED_MIN

    short = [name for name, sys in systems.items() if not sys["rate_reached"]]
    if short:
        return (f"NOT A PASS: the ERP simulator reached less than {RATE_REACHED_MIN:.0%} of "
                f"{rate}/s in some run of {', '.join(short)} (see runs); those latencies are "
                "of a lighter load")
    lost = [name for name, sys in systems.items() if sys["acknowledged"] < sys["written"]]
    if lost:
        return (f"NOT A PASS: written events were not acknowledged within {ACK_TIMEOUT_S:.0f} s "
                f"by {', '.join(lost)} (see runs)")
    relay_p99 = systems["relay"]["latency_ms"]["p99"]
    tuned_p99 = systems["debezium_poll_10ms"]["latency_ms"]["p99"]
    misses = []
    if relay_p99 > TARGET_P99_MS:
        misses.append(f"the relay's p99 {relay_p99} ms is above {TARGET_P99_MS:.0f} ms")
    if not relay_beats:
        misses.append(f"the relay's p99 {relay_p99} ms is not below Debezium "
                      f"(poll.interval.ms=10)'s {tuned_p99} ms")
    if rate < TARGET_RATE:
        return (f"measured at the asked rate, {rate}/s, below the target's {TARGET_RATE}/s: "
                f"relay p99 {relay_p99} ms, Debezium (poll.interval.ms=10) p99 {tuned_p99} ms")
    if misses:
        return f"NOT A PASS: measured at the asked rate, {rate}/s, but " + "; ".join(misses)
    return (f"PASS: at {rate}/s reached, the relay's p99 {relay_p99} ms is at most "
            f"{TARGET_P99_MS:.0f} ms and below Debezium (poll.interval.ms=10)'s {tuned_p99} ms")


def run_latency_versus_debezium(
    s: Settings, *, rate: int, seconds: float, repeat: int, shards: int = 1,
    debezium_default: bool = True, debezium_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Commit -> Kafka acknowledgement latency at ``rate`` events/s, the relay (``shards``
    processes) and Debezium (``poll.interval.ms=10``, and with ``debezium_default`` its default
    500 ms too) side by side on the (embedded or configured) server and broker of ``s``, each on
    a database of its own; ``s.database.url`` must be a superuser's (it makes the databases).

    Every system is started and warmed up first (Debezium until its JIT is quiet, then each
    system one unmeasured round of ``min(seconds, WARMUP_S)`` s at the rate), then each repeat
    runs the ERP simulator (its events built before the clock by
    ``pipeline.outbox.emit.emit_statement``: jsonb and Avro bytes per row, each event its own
    transaction; the EventRouter publishes the jsonb) for ``seconds`` at ``rate`` into each
    system's database in turn. A system's acknowledgement time of an event: the relay
    observer's of its batch (after Kafka acknowledged every record of it, and the transaction
    committed when transactional), Debezium's producer callback of that record.
    ``debezium_options`` are more keyword arguments of each
    :class:`~pipeline.bench.debezium.DebeziumRun` (a test's shorter warm-up)."""
    if not debezium_available():
        raise RuntimeError(
            "bench relay --vs debezium runs Debezium 3.6.1 on Java 17+ (with javac) and fetches "
            "it with Maven: apt-get install openjdk-17-jdk-headless maven"
        )
    if rate <= 0 or seconds <= 0 or repeat <= 0:
        raise ValueError("rate, seconds and repeat must be positive")
    from pydantic import SecretStr

    admin = with_database(database_url(s), "postgres")
    schema = s.database.schema_name
    bootstrap = s.kafka.bootstrap_servers or ""
    prefix = s.topics.prefix
    kinds = list(s.topics.aggregate_types)  # the simulator's topics exist before the clock runs
    names = ["relay", "debezium_poll_10ms"] + (["debezium_default"] if debezium_default else [])
    with ExitStack() as stack:
        dbs = {name: stack.enter_context(scratch_database(admin, f"bench_lat_{name}"))
               for name in names}
        for url in dbs.values():
            with psycopg.connect(url) as conn:
                install(conn, schema)
        rs = s.model_copy(update={"database": s.database.model_copy(
            update={"url": SecretStr(dbs["relay"])})})
        relays = stack.enter_context(RelayProcesses(rs, shards))
        systems: dict[str, tuple[_Acknowledger, Callable[[], float | None]]] = {
            "relay": (relays, relays.cpu_s)}
        runs_dbz: dict[str, DebeziumRun] = {}
        for name in names[1:]:
            run = stack.enter_context(DebeziumRun(
                dbs[name], bootstrap, schema=schema, partitions=s.topics.partitions,
                topic_prefix=f"{prefix}_{name.replace('debezium', 'dbz')}_lat",
                poll_interval_ms=10 if name == "debezium_poll_10ms" else None,
                topics_for=kinds, **(debezium_options or {})))
            runs_dbz[name] = run
            systems[name] = (run, functools.partial(_java_cpu_s, run))
        with psycopg.connect(dbs["relay"], autocommit=True) as conn:
            postmaster = postmaster_of(conn)  # None: the server is not on this machine
        for name, (system, cpu) in systems.items():  # warm-up at the rate, not measured
            _latency_round(system, cpu, dbs[name], schema, rate, min(seconds, WARMUP_S), postmaster)
        rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
        for i in range(repeat):
            # the systems in turn, the first one rotating: no system is always measured
            # right after the same other one
            for name in names[i % len(names):] + names[:i % len(names)]:
                system, cpu = systems[name]
                rounds[name].append(_latency_round(system, cpu, dbs[name], schema, rate,
                                                   seconds, postmaster))
        engines = {name: run.engine_info() for name, run in runs_dbz.items()}
        warmups = {name: dict(run.warmup) for name, run in runs_dbz.items()}
        relay_rss = _peak_rss_children(relays)
    out: dict[str, Any] = {"rate": rate, "seconds": seconds, "repeat": repeat,
                           "relay_shards": shards}
    summaries = {name: latency_summary(runs) for name, runs in rounds.items()}
    summaries["relay"]["peak_rss_mb"] = relay_rss
    for name in names[1:]:
        summaries[name]["engine"] = engines[name]
        summaries[name]["warmup"] = warmups[name]
    out.update(summaries)
    relay_p99 = summaries["relay"]["latency_ms"]["p99"]
    beats = relay_p99 < summaries["debezium_poll_10ms"]["latency_ms"]["p99"]
    out["relay_beats_debezium_p99"] = beats  # Debezium at poll.interval.ms=10
    if debezium_default:
        out["relay_beats_debezium_default_p99"] = (
            relay_p99 < summaries["debezium_default"]["latency_ms"]["p99"])
    out["rate_reached"] = all(summ["rate_reached"] for summ in summaries.values())
    out["verdict"] = latency_verdict(summaries, rate=rate, relay_beats=beats)
    out["target"] = {"p99_ms": TARGET_P99_MS, "rate": TARGET_RATE,
                     "met": out["verdict"].startswith("PASS")}
    # Debezium's producer is idempotent, not transactional: the relay with transactions off
    # is the like-for-like setting (on: one Kafka transaction per batch, exactly once)
    out["relay_transactions"] = s.kafka.transactions
    out["protocol"] = (
        "each system running and warmed up, on a database of its own; the ERP simulator commits "
        f"{rate} events/s for {seconds} s into it, systems in turn; latency = Kafka "
        "acknowledgement - commit per event (the relay: its batch's acknowledgement; Debezium: "
        "the record's producer callback); p50/p99/max are medians of the runs")
    return out
