"""The outbox DLQ is a first-class DLQ: rows the relay could not publish are counted by
`pipeline status` (exit 1 over `status.max_dlq`), listed and shown as the stored row by
`pipeline dlq ls|show|stats`, corrected with `dlq edit` (numbers exact) and replayed into the
outbox with `dlq replay --group outbox`, after which the relay publishes them in order."""

from __future__ import annotations

import decimal
import json
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from pipeline.relay.relay import Relay
from pipeline.schemas.catalogue import Catalogue
from pipeline.schemas.codec import Decoder
from tests.conftest import make_settings
from tests.fixtures.relay import _url
from tests.fixtures.sink import cli
from tests.integration.test_relay_bad_rows import drain, good_payload, sql_emit

pytestmark = pytest.mark.integration


def _ok(r: Any) -> Any:
    assert r.returncode == 0, f"exit {r.returncode}: {r.stderr[-3000:]}"
    return r


def test_outbox_dead_letters_are_counted_listed_corrected_and_replayed_into_the_outbox(
        tmp_path: Path, database_url: str, kafka_bootstrap: str, topic_prefix: str,
        read_topic: Any) -> None:
    from pipeline.outbox.migrations import install

    s = make_settings(database_url, kafka_bootstrap, topic_prefix,
                      topics={"aggregate_types": ["order"]}, status={"max_dlq": 0,
                                                                     "require_leader": False})
    with psycopg.connect(database_url, autocommit=True) as conn:
        install(conn, "pipeline")
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump({
        "database": {"url": database_url}, "kafka": {"bootstrap_servers": kafka_bootstrap},
        "topics": {"prefix": topic_prefix, "aggregate_types": ["order"]},
        "status": {"max_dlq": 0, "require_leader": False}}))
    url = _url(s)
    bad = good_payload("SO-9", 3)
    bad["total"] = "12345678901234567.891"  # three decimals: not a decimal(18,2)
    sql_emit(url, "SO-9", "order.created", good_payload("SO-9", 1))
    row_id, event_id = sql_emit(url, "SO-9", "order.created", bad)
    sql_emit(url, "SO-9", "order.created", good_payload("SO-9", 2))
    drain(Relay(s))

    st = cli(config, "status", "--json")
    assert st.returncode == 1, st.stdout + st.stderr
    body = json.loads(st.stdout)
    assert body["outbox"]["dlq_depth"] == 1
    assert any(p.startswith("outbox: 1 rows dead-lettered") and "PayloadError" in p
               for p in body["problems"]), body["problems"]

    listed = json.loads(_ok(cli(config, "dlq", "ls", "--json")).stdout)  # every group
    mine = [x for x in listed if x["group"] == "outbox"]
    assert len(mine) == 1 and mine[0]["outbox_row"] == row_id
    assert mine[0]["event_id"] == event_id and mine[0]["error_class"] == "PayloadError"
    assert "total" in mine[0]["error_message"]
    text = _ok(cli(config, "dlq", "ls", "--group", "outbox")).stdout
    assert f"outbox row {row_id}" in text and "?[None]" not in text

    pos = mine[0]["position"]
    shown = json.loads(_ok(cli(config, "dlq", "show", "outbox", pos, "--json")).stdout)
    assert shown["payload_error"] is None
    assert shown["payload"]["event_id"] == event_id
    assert shown["payload"]["payload"]["total"] == "12345678901234567.891"
    stats = json.loads(_ok(cli(config, "dlq", "stats", "--group", "outbox", "--json")).stdout)
    assert "PayloadError" in json.dumps(stats)

    refused = cli(config, "dlq", "edit", "outbox", pos, "--set", "total=1.234")
    assert refused.returncode == 2 and "does not match its schema" in refused.stderr
    _ok(cli(config, "dlq", "edit", "outbox", pos, "--set", "total=99999999999999.99"))
    out = json.loads(_ok(cli(config, "dlq", "replay", "--group", "outbox", "--yes",
                             "--json")).stdout)
    assert out["sent"] == 1, out
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT event_id::text, aggregate_version, payload->>'total' "
                            "FROM pipeline.outbox").fetchall()
    assert rows == [(event_id, 4, "99999999999999.99")]  # after v1..v3, as a new version
    again = json.loads(_ok(cli(config, "dlq", "replay", "--group", "outbox", "--yes",
                               "--json")).stdout)
    assert again["sent"] == 0  # replayed once

    drain(Relay(s))
    events = read_topic(f"{topic_prefix}.order", expect=3)
    dec = Decoder(Catalogue.load())
    last = max(events, key=lambda r: r.offset)
    assert last.headers["ce_id"] == event_id
    assert dec.decode(last.value).value["total"] == decimal.Decimal("99999999999999.99")


def test_status_fails_in_one_line_when_the_outbox_is_not_installed(
        tmp_path: Path, database_url: str, kafka_bootstrap: str, topic_prefix: str) -> None:
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump({
        "database": {"url": database_url}, "kafka": {"bootstrap_servers": kafka_bootstrap},
        "topics": {"prefix": topic_prefix}, "workers": {}}))
    st = cli(config, "status")
    assert st.returncode == 1, st.stdout + st.stderr
    problems = [line for line in st.stdout.splitlines() if line.startswith("! ")]
    assert problems == ["! outbox: not installed in schema pipeline of the database "
                        "(`pipeline outbox install`)"], st.stdout
