"""``pipeline bench …``: benchmarks that print JSON figures."""

from __future__ import annotations

import json
import os
from typing import Any

import click

from pipeline.cli import Context, pass_ctx


@click.group("bench")
@click.option("--broker", type=click.Choice(["auto", "kafka", "tansu"]), default=None,
              help="the embedded broker when none is configured [default: auto: Apache Kafka "
                   "where Java 17+ and its jars are present, else tansu]")
def bench(broker: str | None) -> None:
    """Benchmarks (JSON figures, each with a baseline measured in the same run)."""
    if broker is not None:
        os.environ["PIPELINE_BROKER"] = broker  # read by every embedded broker this run starts


def _echo(ctx: Context, result: dict[str, Any], as_json: bool) -> None:
    """The figures, with the broker they were measured on."""
    if ctx.settings.kafka.bootstrap_servers:
        result["broker_kind"] = "configured"
    else:
        from pipeline.embedded.kafka import broker_kind

        result["broker_kind"] = broker_kind()
    click.echo(json.dumps(result, indent=None if as_json else 2))


@bench.command("relay")
@click.option(
    "--events",
    type=int,
    default=50_000,
    show_default=True,
    help="throughput mode: drain this many pre-written events",
)
@click.option("--rate", type=int, default=None, help="latency mode: write events at this rate")
@click.option(
    "--seconds", type=float, default=20.0, show_default=True, help="latency mode duration"
)
@click.option(
    "--repeat",
    type=int,
    default=3,
    show_default=True,
    help="runs of each measurement; the median is reported",
)
@click.option("--transactions", type=click.Choice(["auto", "on", "off"]), default=None,
              help="the relay's Kafka transactions [default: kafka.transactions]")
@click.option("--vs", type=click.Choice(["debezium", "mariadb", "wal"]), default=None,
              help="side by side with Debezium 3.6.1 (embedded engine, pgoutput, outbox "
                   "EventRouter) on the same server and broker, needs Java 17+ and Maven; "
                   "mariadb: the relay on a MariaDB outbox beside the PostgreSQL one; wal: "
                   "the WAL engine (relay.engine: wal) beside the polling one")
@click.option("--shards", type=int, default=1, show_default=True,
              help="with --vs: relay shards, one process each (relay.shards)")
@click.option("--json", "as_json", is_flag=True, help="JSON only (the default output is JSON too)")
@pass_ctx
def relay_cmd(
    ctx: Context, events: int, rate: int | None, seconds: float, repeat: int,
    transactions: str | None, vs: str | None, shards: int, as_json: bool
) -> None:
    """Relay throughput (events/s) or latency at a fixed rate, ERP commit → Kafka ack."""
    from pipeline.bench.relay import run_relay_bench

    settings = ctx.settings
    if transactions is not None:
        settings = settings.model_copy(update={
            "kafka": settings.kafka.model_copy(update={"transactions": transactions})})
    result = run_relay_bench(settings, events=events, rate=rate, seconds=seconds, repeat=repeat,
                             vs=vs, shards=shards)
    result["transactions"] = settings.kafka.transactions
    _echo(ctx, result, as_json)


@bench.command("worker")
@click.option(
    "--events",
    type=int,
    default=100_000,
    show_default=True,
    help="events for the no-op throughput run",
)
@click.option("--repeat", type=int, default=3, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="JSON only (the default output is JSON too)")
@pass_ctx
def worker_cmd(ctx: Context, events: int, repeat: int, as_json: bool) -> None:
    """Worker throughput (no-op handler), slow-target concurrency speed-up, retry overhead."""
    from pipeline.bench.worker import run_worker_bench

    result = run_worker_bench(ctx.settings, events=events, repeat=repeat)
    _echo(ctx, result, as_json)


@bench.command("wms")
@click.option("--events", type=int, default=5000, show_default=True)
@click.option(
    "--latency-ms",
    type=float,
    default=20.0,
    show_default=True,
    help="the reference WMS's answer time",
)
@click.option("--max-in-flight", type=int, default=64, show_default=True)
@click.option("--repeat", type=int, default=3, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="JSON only (the default output is JSON too)")
@pass_ctx
def wms_cmd(
    ctx: Context, events: int, latency_ms: float, max_in_flight: int, repeat: int,
    as_json: bool,
) -> None:
    """Events/s through the WMS connector against the reference WMS with a given latency."""
    from pipeline.bench.worker import run_wms_bench

    result = run_wms_bench(
        ctx.settings, events=events, latency_ms=latency_ms, max_in_flight=max_in_flight,
        repeat=repeat,
    )
    _echo(ctx, result, as_json)


@bench.command("bi")
@click.option("--events", type=int, default=50_000, show_default=True)
@click.option("--repeat", type=int, default=3, show_default=True)
@click.option("--batch-size", type=int, default=5000, show_default=True)
@click.option(
    "--parquet/--no-parquet", default=True, show_default=True, help="also the Parquet target"
)
@click.option("--json", "as_json", is_flag=True, help="JSON only (the default output is JSON too)")
@pass_ctx
def bi_cmd(
    ctx: Context, events: int, repeat: int, batch_size: int, parquet: bool, as_json: bool
) -> None:
    """Events/s landed exactly once into PostgreSQL (and Parquet), against a plain COPY of the
    same rows measured in the same run."""
    from pipeline.bench.bi import run_bi_bench

    result = run_bi_bench(
        ctx.settings, events=events, repeat=repeat, batch_size=batch_size, parquet=parquet
    )
    _echo(ctx, result, as_json)


@bench.command("dlq")
@click.option("--records", type=int, default=100_000, show_default=True)
@click.option("--repeat", type=int, default=3, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="JSON only (the default output is JSON too)")
@pass_ctx
def dlq_cmd(ctx: Context, records: int, repeat: int, as_json: bool) -> None:
    """`dlq ls` over a large DLQ (seconds) and unthrottled replay throughput (events/s), against
    a bare producer writing the same records."""
    from pipeline.bench.dlq import run_dlq_bench

    result = run_dlq_bench(ctx.settings, records=records, repeat=repeat)
    _echo(ctx, result, as_json)


@bench.command("smoke")
@click.option("--events", type=int, default=5000, show_default=True,
              help="events per part (the worker reads four times as many)")
@click.option("--json", "as_json", is_flag=True, help="JSON only (the default output is JSON too)")
@pass_ctx
def smoke_cmd(ctx: Context, events: int, as_json: bool) -> None:
    """The short relay, worker and BI benches CI runs: exits 1 when a ratio to its same-run
    baseline falls below its floor (pipeline/bench/floors.json)."""
    from pipeline.bench.smoke import run_smoke

    result = run_smoke(ctx.settings, events=events)
    _echo(ctx, result, as_json)
    if not result["passed"]:
        for problem in result["problems"]:
            click.echo(f"bench smoke: {problem}", err=True)
        raise SystemExit(1)


COMMANDS = [bench]
