"""`pipeline worker` as real processes: kill -9 mid-batch, a rebalance between two workers, and
SIGTERM during a burst. Effects are counted in the PostgreSQL sink itself."""

from __future__ import annotations

import collections
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.connectors import applied_rows, make_events, publish
from tests.fixtures.processes import WorkerProcesses, sink_group
from tests.fixtures.relay import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def workers(tmp_path: Path, database_url: str, kafka_bootstrap: str, topic_prefix: str
            ) -> Iterator[WorkerProcesses]:
    w, _config = sink_group(tmp_path, database_url, kafka_bootstrap, topic_prefix,
                            partitions=4, options={"latency_s": 0.005}, retry_delays_s=[0.5],
                            max_in_flight=16)
    try:
        yield w
    finally:
        w.close()


def _check_sink(url: str, keys: int, per_key: int) -> None:
    rows = applied_rows(url)
    ids = collections.Counter(r[0] for r in rows)
    dup = [i for i, n in ids.items() if n > 1]
    assert not dup, f"{len(dup)} events applied twice"
    assert len(ids) == keys * per_key, f"{keys * per_key - len(ids)} events never applied"
    per = collections.defaultdict(list)
    for _e, key, version, _a in rows:
        per[key].append(version)
    bad = {k: v for k, v in per.items() if v != list(range(1, per_key + 1))}
    assert not bad, f"keys applied out of order: {dict(list(bad.items())[:3])}"


def test_kill_9_mid_batch_and_rebalance_lose_and_duplicate_nothing(
        workers: WorkerProcesses, database_url: str, kafka_bootstrap: str, topic_prefix: str):
    keys = [f"SO-{i:03d}" for i in range(50)]
    rows = make_events(keys, 20)  # 1,000 events
    a = workers.start()
    b = workers.start()
    publish(kafka_bootstrap, topic_prefix, rows[:500])
    wait_for(lambda: len(applied_rows(database_url)) >= 150, 60, "both workers applying")
    a.kill()  # kill -9 mid-batch: its partitions move to b (a rebalance)
    a.wait(10)
    publish(kafka_bootstrap, topic_prefix, rows[500:])
    c = workers.start()  # and another rebalance as c joins
    wait_for(lambda: len(applied_rows(database_url)) >= 1000, 90,
             "every event applied after the kill and the rebalances")
    time.sleep(1.0)  # anything redelivered after the last commit is absorbed by the ledger
    for p in (b, c):
        p.send_signal(signal.SIGTERM)
        assert p.wait(30) == 0, workers.log(p)[-2000:]
    _check_sink(database_url, 50, 20)
    assert "revoked" in workers.log(b) or "assigned" in workers.log(b)


def test_sigterm_during_a_burst_exits_0_and_loses_nothing(
        workers: WorkerProcesses, database_url: str, kafka_bootstrap: str, topic_prefix: str):
    keys = [f"SO-{i:03d}" for i in range(60)]
    rows = make_events(keys, 50)  # 3,000 events: a few seconds of work at 16 × 5 ms
    w = workers.start()
    publish(kafka_bootstrap, topic_prefix, rows)
    wait_for(lambda: len(applied_rows(database_url)) >= 100, 60, "the burst to be under way")
    w.send_signal(signal.SIGTERM)
    assert w.wait(30) == 0, workers.log(w)[-2000:]
    assert "stopped" in workers.log(w)
    done = len(applied_rows(database_url))
    assert done < 3000, "the burst finished before SIGTERM; the test proves nothing"
    w2 = workers.start()  # a new worker picks up exactly where the first committed
    wait_for(lambda: len(applied_rows(database_url)) >= 3000, 120, "the rest applied")
    time.sleep(1.0)
    w2.send_signal(signal.SIGTERM)
    assert w2.wait(30) == 0
    _check_sink(database_url, 60, 50)
