"""The BI worker writing Parquet files from a real broker: every event in exactly one file,
across a kill -9 mid-run, with no partial or temporary file left behind."""

from __future__ import annotations

import signal
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.config import Settings
from tests.conftest import make_settings
from tests.fixtures.connectors import make_events, publish
from tests.fixtures.relay import wait_for
from tests.fixtures.sink import cli, start_worker

pytestmark = pytest.mark.integration


def _event_ids(root: Path) -> Counter[str]:
    ids: Counter[str] = Counter()
    for f in root.glob("*/date=*/*.parquet"):
        ids.update(pq.read_table(f, columns=["_event_id"]).column("_event_id").to_pylist())
    return ids


def _leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".tmp-" in p.name]


@pytest.fixture
def parquet_worker(tmp_path: Path, database_url: str, kafka_bootstrap: str, topic_prefix: str
                   ) -> Iterator[tuple[Settings, Path, Path, list[subprocess.Popen[bytes]]]]:
    out = tmp_path / "lake"
    worker = {"connector": "connectors.bi.parquet:ParquetTarget",
              "options": {"path": str(out)}, "batch_size": 700, "batch_max_wait_s": 0.2,
              "session_timeout_ms": 6000, "shutdown_grace_s": 10}
    s = make_settings(database_url, kafka_bootstrap, topic_prefix,
                      topics={"aggregate_types": ["order"], "partitions": 3},
                      workers={"lake": worker})
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump({
        "database": {"url": database_url}, "kafka": {"bootstrap_servers": kafka_bootstrap},
        "topics": {"prefix": topic_prefix, "aggregate_types": ["order"], "partitions": 3},
        "workers": {"lake": worker}}))
    procs: list[subprocess.Popen[bytes]] = []
    yield s, out, config, procs
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait(10)


@pytest.mark.slow
def test_kill_9_mid_run_leaves_every_event_in_exactly_one_file(parquet_worker):
    s, out, config, procs = parquet_worker
    rows = (make_events([f"SO-{i}" for i in range(60)], 50)
            + make_events([f"SO-{i}" for i in range(60)], 10, "invoice.issued", seed=2))
    publish(str(s.kafka.bootstrap_servers), s.topics.prefix, rows)
    first = start_worker(config, "lake", procs)
    wait_for(lambda: sum(_event_ids(out).values()) >= 700, 90, "files being written")
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    assert sum(_event_ids(out).values()) < len(rows), "killed too late to test anything"
    second = start_worker(config, "lake", procs)
    wait_for(lambda: sum(_event_ids(out).values()) >= len(rows), 120, "every event in a file")
    second.send_signal(signal.SIGTERM)
    assert second.wait(30) == 0
    ids = _event_ids(out)
    assert {e for e, n in ids.items() if n > 1} == set(), "an event is in two files"
    assert set(ids) == {r.event_id for r in rows}
    assert _leftovers(out) == []
    tables = {p.name for p in out.iterdir() if not p.name.startswith("_")}
    assert tables == {"order_created", "invoice_issued"}
    # a file reads back with typed columns
    f = next(out.glob("invoice_issued/date=*/*.parquet"))
    t = pq.read_table(f)
    assert str(t.schema.field("amount").type) == "decimal128(18, 2)"
    assert f.name.startswith(f"{s.topics.prefix}.order+")


def test_backfill_from_the_beginning_rewrites_the_files(parquet_worker):
    s, out, config, _procs = parquet_worker
    rows = make_events([f"SO-{i}" for i in range(20)], 5)
    publish(str(s.kafka.bootstrap_servers), s.topics.prefix, rows)
    r = cli(config, "bi", "backfill", "--worker", "lake")
    assert r.returncode == 0, r.stderr[-2000:]
    assert Counter(_event_ids(out).values()) == Counter({1: len(rows)})
    for f in list(out.glob("order_created/date=*/*.parquet"))[:2]:
        f.unlink()  # files lost
    r = cli(config, "bi", "backfill", "--worker", "lake", "--from-beginning", "--yes")
    assert r.returncode == 0, r.stderr[-2000:]
    ids = _event_ids(out)
    assert set(ids) == {r.event_id for r in rows} and set(ids.values()) == {1}
