"""``pipeline up``: the whole pipeline in one command (see :mod:`pipeline.up`)."""

from __future__ import annotations

import logging
import time
from typing import Any

import click

from pipeline import logs
from pipeline.cli import Context, pass_ctx
from pipeline.cli.relay import stop_on_signals


@click.command("up")
@click.option("--rate", type=float, default=200.0, show_default=True,
              help="simulated ERP events per second (0 = as fast as possible)")
@click.option("--writers", type=int, default=4, show_default=True,
              help="concurrent simulated ERP writers")
@click.option("--duration", type=float, default=None,
              help="stop after this many seconds [default: until Ctrl-C]")
@click.option("--components", default=None,
              help="comma-separated subset: simulator, relay and worker names "
                   "[default: all; with a configured database, the simulator only if named]")
@click.option("--no-simulator", is_flag=True, help="no simulated ERP activity")
@click.option("--no-faults", is_flag=True,
              help="embedded reference servers without injected failures")
@click.option("--broker", type=click.Choice(["auto", "kafka", "tansu"]), default="auto",
              show_default=True,
              help="the embedded broker when none is configured: Apache Kafka (needs Java 17+; "
                   "auto when its jars are there, `make kafka`) or tansu")
@pass_ctx
def run(ctx: Context, rate: float, writers: int, duration: float | None,
        components: str | None, no_simulator: bool, no_faults: bool, broker: str) -> None:
    """Run everything — ERP simulator, relay, WMS/CRM/BI workers (and reference WMS/CRM servers
    when none are configured) — with a live view; Ctrl-C stops and prints a verdict: events
    written, published, applied per target, dead-lettered, lost, applied twice, out of order."""
    from contextlib import ExitStack

    import psycopg

    from connectors.crm.server import CrmServer
    from connectors.wms.server import WmsServer
    from pipeline.db import database_url
    from pipeline.embedded.stack import local_stack
    from pipeline.errors import PipelineError
    from pipeline.kafka.client import silence_client_logs
    from pipeline.kafka.topics import ensure_topics
    from pipeline.outbox.migrations import install
    from pipeline.up import (
        DEMO_WORKERS,
        Supervisor,
        Tracker,
        demo_workers,
        parse_components,
        preflight,
    )

    settings = ctx.settings
    # the live view is the output; the components' logs only for errors (or what is asked)
    logs.setup("up", "ERROR" if settings.log.level in ("INFO", "WARNING") else settings.log.level,
               settings.log.format)
    silence_client_logs()
    log = logging.getLogger("pipeline.up")
    embedded_db = settings.database.url is None
    # no workers configured on embedded servers: the demo workers and their reference targets;
    # with a configured database and cluster nothing embedded starts
    demo = not settings.workers and (embedded_db or not settings.kafka.bootstrap_servers)
    worker_names = list(DEMO_WORKERS) if demo else sorted(settings.workers)
    if not demo and not settings.workers:
        click.echo("no workers configured (workers.NAME.connector): running the relay only")
    chosen = parse_components(components, worker_names,
                              simulator=(embedded_db and not no_simulator))
    if no_simulator and "simulator" in chosen:
        chosen.remove("simulator")
    stop = stop_on_signals()
    notes = []
    if embedded_db:
        notes.append("local PostgreSQL (fresh database; pgserver when none answers)")
    if not settings.kafka.bootstrap_servers:
        notes.append("embedded broker")
    click.echo(f"starting {', '.join(chosen)} on {', '.join(notes) or 'the configured servers'} …")
    with ExitStack() as stack:
        used: dict[str, str] = {}
        try:
            s = stack.enter_context(local_stack(settings, fresh_database=embedded_db,
                                                broker=broker, used=used))
        except RuntimeError as exc:  # an embedded server that cannot start says why
            click.echo(f"error: {exc}", err=True)
            raise SystemExit(1) from exc
        faults = demo and not no_faults
        if demo:
            wms = stack.enter_context(WmsServer(seed=1, error_rate=0.03 if faults else 0.0,
                                                error_status=503))
            crm = stack.enter_context(CrmServer(seed=2, error_rate=0.004 if faults else 0.0,
                                                error_status=422))
            s = s.model_copy(update={"workers": demo_workers(s, wms.url, crm.url)})
            click.echo(f"reference WMS {wms.url}, CRM {crm.url}"
                       + (" (injected: 3 % WMS 503s → retries, 0.4 % CRM 422s → DLQ)"
                          if faults else ""))
        problems = preflight(s, chosen)
        if problems:
            for p in problems:
                click.echo(f"error: {p}", err=True)
            raise SystemExit(1)
        url = database_url(s)
        schema = s.database.schema_name
        with psycopg.connect(url, autocommit=True) as conn:
            install(conn, schema)
        ensure_topics(s, list(s.topics.aggregate_types))
        click.echo(f"database: {used.get('database', 'configured')}")
        click.echo(f"broker: {used.get('broker') or f'configured ({s.kafka.bootstrap_servers})'}")
        click.echo(f"ready: topics {s.topics.prefix}.*; Ctrl-C to stop")
        sup = Supervisor()
        trackers: dict[str, Tracker] = {}
        runners: dict[str, Any] = {}
        sim = relay = None
        if "relay" in chosen:
            from pipeline.relay.relay import Relay

            relay = Relay(s)
            sup.start("relay", relay.run)
        for name in [c for c in chosen if c in s.workers]:
            runners[name] = _worker(s, name, trackers)
            sup.start(name, runners[name].run)
        if "simulator" in chosen:
            from pipeline.simulator.erp import ErpSimulator, SimulatorConfig

            sim = ErpSimulator(url, schema, SimulatorConfig(writers=writers, rate=rate,
                                                            keep_ledger=True))
            sup.start("simulator", sim.run)
        started = time.monotonic()
        view = _LiveView(s, sim, relay, runners, trackers, url, schema)
        while not stop.wait(2.0):
            click.echo(view.line(time.monotonic() - started))
            for name in sup.dead():
                click.echo(f"! {name} stopped: {sup.errors.get(name)!r}", err=True)
                sup.threads[name][1].set()
            if duration is not None and time.monotonic() - started >= duration:
                break
        click.echo("stopping: the simulator first, then draining the relay and the workers …")
        sup.stop("simulator", 15)
        view.drain(timeout_s=45)
        for name in [*runners, "relay"]:
            sup.stop(name, 60)
        try:
            ok = view.verdict(click.echo, sup.errors)
        except PipelineError as exc:
            log.error("could not verify: %s", exc)
            ok = False
        if not ok:
            raise SystemExit(1)


def _worker(s: Any, name: str, trackers: dict[str, Any]) -> Any:
    from pipeline.sink import is_batch_target
    from pipeline.sink.runtime import SinkWorker
    from pipeline.up import Tracker
    from pipeline.worker.connector import load_connector
    from pipeline.worker.runtime import Worker

    wc = s.workers[name]
    obj = load_connector(wc.connector, wc.options)
    if is_batch_target(obj):
        return SinkWorker(s, name, obj)  # type: ignore[arg-type]
    trackers[name] = Tracker(name)
    return Worker(s, name, obj, observer=trackers[name].observe)


class _LiveView:
    def __init__(self, s: Any, sim: Any, relay: Any, runners: dict[str, Any],
                 trackers: dict[str, Any], url: str, schema: str) -> None:
        self.s, self.sim, self.relay = s, sim, relay
        self.runners, self.trackers = runners, trackers
        self.url, self.schema = url, schema
        self.last: dict[str, tuple[float, int]] = {}

    def _rate(self, key: str, value: int) -> float:
        now = time.monotonic()
        t0, v0 = self.last.get(key, (now, value))
        self.last[key] = (now, value)
        return (value - v0) / (now - t0) if now > t0 else 0.0

    def _done(self, name: str) -> int:
        r = self.runners[name]
        if name in self.trackers:
            return int(self.trackers[name].handled + r.stats.dead_lettered_total)
        return int(r.stats.landed + r.stats.dead_lettered_total)

    def line(self, elapsed: float) -> str:
        from pipeline.up import percentile

        parts = [f"[{elapsed:5.0f}s]"]
        if self.sim is not None:
            parts.append(f"written {self.sim.stats.written}")
        if self.relay is not None:
            pub = self.relay.stats.published
            parts.append(f"published {pub} ({self._rate('relay', pub):.0f}/s)")
        for name, r in self.runners.items():
            lag = int(sum(v for v, _a in getattr(r, "_lag", [])))
            retried = sum(getattr(r.stats, "retried", {}).values())
            parts.append(f"| {name} {self._done(name)} lag {lag} retry {retried} "
                         f"dlq {r.stats.dead_lettered_total}")
        lat = [x for t in self.trackers.values() for x in list(t.latencies)]
        p50, p99 = percentile(lat, 0.5), percentile(lat, 0.99)
        if p50 is not None and p99 is not None:
            parts.append(f"| latency p50 {p50 * 1000:.0f}ms p99 {p99 * 1000:.0f}ms")
        return " ".join(parts)

    def drain(self, timeout_s: float) -> None:
        """Wait until the relay published the backlog and every worker handled every written
        event (applied, skipped or dead-lettered), or ``timeout_s``."""
        import psycopg

        from pipeline.outbox.status import outbox_status

        written = self.sim.stats.written if self.sim is not None else None
        deadline = time.monotonic() + timeout_s
        with psycopg.connect(self.url, autocommit=True) as conn:
            while time.monotonic() < deadline:
                backlog = outbox_status(conn, self.schema).backlog_rows
                behind = [n for n in self.runners
                          if written is not None and self._done(n) < written]
                if backlog == 0 and not behind:
                    return
                time.sleep(0.5)

    def verdict(self, echo: Any, errors: dict[str, BaseException]) -> bool:
        import psycopg

        from pipeline.outbox.status import outbox_status
        from pipeline.verify import verify_topics

        with psycopg.connect(self.url, autocommit=True) as conn:
            backlog = outbox_status(conn, self.schema).backlog_rows
        ledger = set(self.sim.stats.ledger) if self.sim is not None else None
        written = len(ledger) if ledger is not None else None
        report = verify_topics(self.s)
        rows: list[tuple[str, Any]] = [
            ("events written (committed)", written if written is not None else "-"),
            ("rolled back (never sent)", self.sim.stats.rolled_back if self.sim else "-"),
        ]
        ok = report.duplicates == 0 and report.order_violations == 0
        if self.relay is not None:
            lost = None if written is None else written - report.records - backlog
            ok = ok and not lost
            rows += [("published", self.relay.stats.published),
                     ("dead lettered by the relay", self.relay.stats.dead_lettered),
                     ("still in outbox", backlog), ("in Kafka", report.records),
                     ("duplicates in Kafka", report.duplicates),
                     ("order violations", report.order_violations),
                     ("lost", lost if lost is not None else "-")]
        for name, r in self.runners.items():
            dlq = r.stats.dead_lettered_total
            if name in self.trackers:
                t = self.trackers[name]
                seen = set(t.applied) | t.skipped
                missing = len(ledger - seen) if ledger is not None else 0
                t_lost: int | str = max(0, missing - dlq) if ledger is not None else "-"
                rows += [(f"{name} applied", len(t.applied)), (f"{name} skipped", len(t.skipped)),
                         (f"{name} retried", sum(r.stats.retried.values())),
                         (f"{name} dead lettered", dlq), (f"{name} applied twice", t.twice),
                         (f"{name} order violations", t.order_violations),
                         (f"{name} lost", t_lost)]
                ok = ok and t.twice == 0 and t.order_violations == 0 and t_lost in (0, "-")
            else:
                landed, dupes, missing = self._bi_counts(r, ledger)
                b_lost: int | str = max(0, missing - dlq) if ledger is not None else "-"
                rows += [(f"{name} landed", landed), (f"{name} dead lettered", dlq),
                         (f"{name} landed twice", dupes), (f"{name} lost", b_lost)]
                ok = ok and dupes == 0 and b_lost in (0, "-")
        ok = ok and not errors
        echo("")
        echo("summary")
        for key, value in rows:
            echo(f"  {key:<30} {value}")
        for name, exc in errors.items():
            echo(f"  ! {name} failed: {exc!r}")
        for example in report.examples:
            echo(f"  ! {example}")
        echo(f"verdict: {'OK' if ok else 'FAILED'}")
        return ok

    def _bi_counts(self, r: Any, ledger: set[str] | None) -> tuple[int, int, int]:
        import psycopg
        from psycopg import sql

        schema = getattr(r.target, "schema", "bi")
        try:
            with psycopg.connect(self.url, autocommit=True) as conn:
                ids = [row[0] for row in conn.execute(
                    sql.SQL("SELECT event_id FROM {}").format(sql.Identifier(schema, "events"))
                ).fetchall()]
        except psycopg.Error:
            return 0, 0, len(ledger or ())
        landed = set(ids)
        missing = len(ledger - landed) if ledger is not None else 0
        return len(landed), len(ids) - len(landed), missing


COMMANDS = [run]
