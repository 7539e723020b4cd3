"""``pipeline dlq`` against a real broker: a worker dead-letters a mix of events (several error
classes, several keys, a strict-ordering chain); ls/stats/show report them with each filter;
edit refuses an invalid correction and writes a valid one; replay --dry-run sends nothing;
replay applies each event once and in key order; a second replay sends nothing; --rate holds."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from pipeline.config import Settings
from pipeline.outbox.migrations import install
from pipeline.schemas.catalogue import Catalogue
from pipeline.schemas.codec import Decoder
from pipeline.worker.runtime import Worker
from tests.conftest import make_settings
from tests.fixtures.connectors import SinkConnector, applied_rows, make_events, publish
from tests.fixtures.relay import _url, wait_for
from tests.fixtures.sink import cli

pytestmark = pytest.mark.integration


def _json(r: Any) -> Any:
    assert r.returncode == 0, f"exit {r.returncode}: {r.stderr[-3000:]}"
    return json.loads(r.stdout)


@pytest.fixture
def stage(tmp_path: Path, database_url: str, kafka_bootstrap: str, topic_prefix: str
          ) -> Iterator[tuple[Settings, Path, SinkConnector, list[Any]]]:
    worker = {"connector": "tests.fixtures.connectors:SinkConnector", "retry_delays_s": [0.3],
              "session_timeout_ms": 6000, "commit_interval_s": 0.2, "shutdown_grace_s": 5}
    s = make_settings(database_url, kafka_bootstrap, topic_prefix,
                      topics={"aggregate_types": ["order"], "partitions": 3},
                      workers={"sink": worker})
    with psycopg.connect(database_url, autocommit=True) as conn:
        install(conn, "pipeline")
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump({
        "database": {"url": database_url}, "kafka": {"bootstrap_servers": kafka_bootstrap},
        "topics": {"prefix": topic_prefix, "aggregate_types": ["order"], "partitions": 3},
        "workers": {"sink": worker}}))
    plain = make_events(["A", "B", "C"], 1, seed=1)
    chain = make_events(["K"], 3, seed=2)  # K v1 fails for good; v2, v3 wait behind it
    extra = make_events([f"R{i}" for i in range(40)], 1, "payment.completed", seed=3)
    a, b, c = plain
    script = {a.event_id: ["permanent"], b.event_id: ["permanent"],
              c.event_id: ["transient", "transient"],
              chain[0].event_id: ["transient", "transient"],
              **{r.event_id: ["permanent"] for r in extra}}
    sink = SinkConnector(_url(s), script=script)
    w = Worker(s, "sink", sink)
    stop = threading.Event()
    t = threading.Thread(target=w.run, args=(stop,), daemon=True)
    t.start()
    try:
        rows = plain + chain + extra
        publish(kafka_bootstrap, topic_prefix, rows)
        wait_for(lambda: w.stats.dead_lettered_total == 46, 90, "46 dead letters")
        yield s, config, sink, rows
    finally:
        stop.set()
        t.join(60)


def test_inspect_edit_and_replay_the_dead_letters(stage, read_topic):
    s, config, _sink, rows = stage
    prefix = s.topics.prefix
    a, _b, c, k1, k2, k3 = rows[:6]
    ids = {r.event_id: r for r in rows}

    # -- ls and its filters ----------------------------------------------------------------
    everything = _json(cli(config, "dlq", "ls", "--group", "sink", "--json"))
    assert len(everything) == 46
    first = everything[0]
    assert set(first) >= {"group", "position", "age_s", "original_topic", "original_partition",
                          "original_offset", "key", "event_type", "attempts", "error_class",
                          "error_message", "event_id"}
    by_id = {e["event_id"]: e for e in everything}
    assert by_id[a.event_id]["error_class"] == "PermanentError"
    assert by_id[c.event_id]["error_class"] == "TransientError"
    assert by_id[c.event_id]["attempts"] == 2
    assert by_id[k2.event_id]["error_class"] == "BlockedByDeadLetter"
    assert by_id[k2.event_id]["blocked_by"] == k1.event_id
    assert by_id[a.event_id]["original_topic"] == f"{prefix}.order"

    def ls(*args: str) -> list[dict[str, Any]]:
        return _json(cli(config, "dlq", "ls", "--group", "sink", "--json", *args))  # type: ignore[no-any-return]

    assert {e["event_id"] for e in ls("--key", "K")} == {k1.event_id, k2.event_id, k3.event_id}
    assert len(ls("--error", "TransientError")) == 2
    assert len(ls("--error", "pipeline.errors.PermanentError")) == 42
    assert len(ls("--type", "order.created")) == 6
    assert len(ls("--topic", f"{prefix}.order")) == 46 and ls("--topic", "nope") == []
    assert len(ls("--since", "1h")) == 46 and ls("--until", "1h") == []
    assert len(ls("--header", "ce_source=/erp/outbox")) == 46
    assert len(ls("--limit", "5")) == 5

    table = cli(config, "dlq", "ls", "--group", "sink", "--type", "order.created")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:3] == ["POS", "AGE", "ORIGINAL"] and len(lines) == 7
    assert max(len(line) for line in lines) <= 80

    # -- stats ----------------------------------------------------------------------------
    stats = _json(cli(config, "dlq", "stats", "--group", "sink", "--by", "error", "--json"))
    counts = {g["error"]: g["count"] for g in stats[0]["groups"]}
    assert counts == {"PermanentError": 42, "TransientError": 2, "BlockedByDeadLetter": 2}
    by_type = _json(cli(config, "dlq", "stats", "--group", "sink", "--by", "type", "--json"))
    assert {g["type"]: g["count"] for g in by_type[0]["groups"]} == {
        "payment.completed": 40, "order.created": 6}

    # -- show -----------------------------------------------------------------------------
    k1_pos = by_id[k1.event_id]["position"]
    shown = _json(cli(config, "dlq", "show", "sink", k1_pos, "--json"))
    assert shown["payload"]["order_id"] == k1.payload["order_id"]
    assert sorted(shown["blocked_behind"]) == sorted(by_id[e.event_id]["position"]
                                                     for e in (k2, k3))
    assert "TransientError" in shown["stacktrace"]
    a_shown = _json(cli(config, "dlq", "show", "sink", by_id[a.event_id]["position"], "--json"))
    assert '"unprocessable"' in a_shown["target_error_body"]
    text = cli(config, "dlq", "show", "sink", k1_pos)
    assert "blocked behind it" in text.stdout and "stack trace:" in text.stdout

    # -- bad input: one line, exit 2 ------------------------------------------------------
    for args, needle in ((["ls", "--group", "nope"], "no dead-letter topic"),
                         (["show", "sink", "0:999999"], "no record at 0:999999"),
                         (["show", "sink", "x:y"], "bad DLQ position"),
                         (["ls", "--group", "sink", "--since", "yesterday"], "bad time"),
                         (["ls", "--group", "sink", "--header", "novalue"], "bad --header"),
                         (["replay", "--group", "sink", "--rate", "fast"], "bad --rate")):
        r = cli(config, "dlq", *args)
        assert r.returncode == 2, (args, r.returncode, r.stderr)
        err = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert len(err) == 1 and needle in err[0], (args, err)

    # -- edit: invalid refused, valid written beside the original -------------------------
    a_pos = by_id[a.event_id]["position"]
    bad = cli(config, "dlq", "edit", "sink", a_pos, "--set", "total=abc")
    assert bad.returncode == 2 and "total" in bad.stderr and "nothing was written" in bad.stderr
    assert len(ls()) == 46
    good = _json(cli(config, "dlq", "edit", "sink", a_pos, "--set", "note=fixed by on-call",
                     "--json"))
    assert good["original"] == a_pos and good["payload"]["note"] == "fixed by on-call"
    assert len(ls()) == 47

    # -- replay: dry run sends nothing ----------------------------------------------------
    retry_topic = f"{prefix}.sink.retry.1"
    before = len(read_topic(retry_topic, timeout_s=10))
    dry = _json(cli(config, "dlq", "replay", "--group", "sink", "--type", "order.created",
                    "--dry-run", "--json"))
    assert dry["to_send"] == 6 and dry["sent"] == 0 and dry["superseded_by_edit"] == 1
    assert len(read_topic(retry_topic, timeout_s=10)) == before

    # -- replay with a rate ---------------------------------------------------------------
    paced = _json(cli(config, "dlq", "replay", "--group", "sink", "--type", "payment.completed",
                      "--rate", "20/s", "--yes", "--json"))
    assert paced["sent"] == 40
    sent = [m for m in read_topic(retry_topic, timeout_s=20)
            if m.headers.get("erp_replay_id") == paced["replay_id"]]
    assert len(sent) == 40
    span_s = (max(m.timestamp for m in sent) - min(m.timestamp for m in sent)) / 1000
    assert abs(39 / span_s - 20) <= 2, f"{39 / span_s:.1f}/s against --rate 20/s"

    # -- replay of the rest: the handler works now (its script is used up) ----------------
    done = _json(cli(config, "dlq", "replay", "--group", "sink", "--key", "K", "--json"))
    assert done["sent"] == 3
    rest = _json(cli(config, "dlq", "replay", "--group", "sink", "--yes", "--json"))
    assert rest["sent"] == 3 and rest["already_replayed"] == 43  # A (edited), B, C
    url = _url(s)
    wait_for(lambda: {r[0] for r in applied_rows(url)} >= set(ids), 60, "every event applied")
    applied = applied_rows(url)
    assert sorted(r[0] for r in applied) == sorted(ids)  # each exactly once
    assert [r[2] for r in applied if r[1] == "K"] == [1, 2, 3]  # the chain in key order
    # A travelled as its correction, with provenance
    a_copy = [m for m in read_topic(retry_topic, timeout_s=10)
              if m.headers.get("ce_id") == a.event_id and "erp_replay_id" in m.headers]
    assert len(a_copy) == 1
    assert a_copy[0].headers["erp_replay_dlq_position"] == f"{prefix}.sink.dlq/{a_pos}"
    assert Decoder(Catalogue.load()).decode(a_copy[0].value).value["note"] == "fixed by on-call"
    # -- a second replay sends nothing ----------------------------------------------------
    again = _json(cli(config, "dlq", "replay", "--group", "sink", "--yes", "--json"))
    assert again["sent"] == 0 and again["to_send"] == 0


def test_an_unreachable_broker_is_one_line_and_exit_1(tmp_path: Path) -> None:
    from pipeline.embedded.broker import free_port

    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump({
        "kafka": {"bootstrap_servers": f"127.0.0.1:{free_port()}", "request_timeout_s": 2},
        "topics": {"prefix": "nowhere"}}))
    for args in (["ls"], ["stats", "--group", "wms"], ["replay", "--group", "wms", "--dry-run"]):
        r = cli(config, "dlq", *args)
        assert r.returncode == 1, (args, r.returncode, r.stderr[-2000:])
        err = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert len(err) == 1 and err[0].startswith("error: "), (args, r.stderr[-2000:])
        assert "is the broker up?" in err[0]
