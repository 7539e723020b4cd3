"""``pipeline bench …`` prints its JSON figures, with the broker they were measured on (tiny
sizes: this checks the commands, docs/benchmarks.md has the figures)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.fixtures.sink import cli

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("args", [
    # more than the relay's warm-up batch (2,000), which is not timed
    ["relay", "--events", "4000", "--repeat", "1"],
    ["relay", "--events", "4000", "--repeat", "1", "--transactions", "off"],
    ["dlq", "--records", "300", "--repeat", "1"],
    ["relay", "--vs", "mariadb", "--events", "4000", "--repeat", "1"],
])
def test_bench_prints_json_with_the_broker(args: list[str], tmp_path: Path, database_url: str,
                                           kafka_bootstrap: str, topic_prefix: str) -> None:
    if "mariadb" in args:
        from tests.fixtures.mariadb import require_mariadb

        require_mariadb()
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump({"database": {"url": database_url},
                                      "kafka": {"bootstrap_servers": kafka_bootstrap},
                                      "topics": {"prefix": topic_prefix}}))
    r = cli(config, "bench", *args, "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert out["broker_kind"] == "configured"
    if "mariadb" in args:
        assert out["mode"] == "versus-mariadb"
        assert out["postgresql"]["events_per_s"] > 0 and out["mariadb"]["events_per_s"] > 0
        assert out["mariadb_vs_postgresql"] > 0
    elif args[0] == "relay":
        assert out["events_per_s"] > 0
        assert out["transactions"] == ("off" if "off" in args else "auto")
    else:
        assert out["replay_events_per_s_median"] > 0
