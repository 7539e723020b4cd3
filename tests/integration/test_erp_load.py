"""The latency benches' ERP (``pipeline.bench.erp_load``): events built before the clock, then
written at the asked rate, each its own committed transaction, into a real PostgreSQL; and the
plain latency bench, warmed up, giving every written event an acknowledgement time."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import psycopg
import pytest
import yaml

from pipeline.bench.erp_load import simulate_at
from pipeline.config import Settings
from pipeline.simulator.erp import LIFECYCLE
from tests.fixtures.sink import cli

pytestmark = pytest.mark.integration


def test_prepared_load_writes_every_event_at_the_rate_in_order(installed: Settings) -> None:
    url = installed.database.url.get_secret_value()  # type: ignore[union-attr]
    schema = installed.database.schema_name
    written, committed_at = simulate_at(url, schema, rate=200, seconds=1.5)

    assert 0.9 * 300 <= written <= 300 + 5, written  # the rate, not a burst
    assert len(committed_at) == written
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            f"SELECT event_id::text, aggregate_type, aggregate_id, aggregate_version, event_type,"
            f" encoded IS NOT NULL FROM {schema}.outbox ORDER BY id").fetchall()
    # every event acknowledged as committed is in the outbox, and nothing else is
    assert {r[0] for r in rows} == set(committed_at)
    assert all(r[5] for r in rows), "every event carries the Avro bytes emit() stores"
    # one writer keeps an order's steps in their order: versions follow the lifecycle
    rank = {t: i for i, (t, _a) in enumerate(LIFECYCLE)}
    steps: dict[tuple[str, str], list[tuple[int, str]]] = defaultdict(list)
    for _e, agg_type, agg_id, version, event_type, _enc in rows:
        if agg_type == "order" and event_type in rank:
            steps[(agg_type, agg_id)].append((version, event_type))
    assert steps
    for key, seen in steps.items():
        by_version = [rank[t] for _v, t in sorted(seen)]
        assert by_version == sorted(by_version), (key, seen)


def test_latency_bench_measures_every_event_after_a_warm_up(
        tmp_path: Path, database_url: str, kafka_bootstrap: str, topic_prefix: str) -> None:
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump({"database": {"url": database_url},
                                      "kafka": {"bootstrap_servers": kafka_bootstrap},
                                      "topics": {"prefix": topic_prefix}}))
    r = cli(config, "bench", "relay", "--rate", "200", "--seconds", "2", "--repeat", "1",
            "--transactions", "off", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert out["mode"] == "latency"
    (run,) = out["runs"]
    # the warm-up's events are not measured: only the measured round's, every one acknowledged
    assert 0.9 * 400 <= run["written"] <= 400 + 5, run
    assert run["acknowledged"] == run["written"]
    lat = out["latency_ms"]
    assert 0 < lat["p50"] <= lat["p99"] <= lat["max"] < 10_000, lat


def test_a_simulator_that_cannot_reach_the_database_is_named_not_waited_for() -> None:
    # port 1 on loopback: refused at once; the child dies building its events
    with pytest.raises(RuntimeError, match="did not get ready"):
        simulate_at("postgresql://postgres@127.0.0.1:1/none?connect_timeout=2", "pipeline",
                    rate=100, seconds=1)
