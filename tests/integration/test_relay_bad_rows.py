"""Bad outbox rows on a real PostgreSQL and a real broker: each kind is dead-lettered to
``<prefix>.outbox.dlq`` (or claim-checked, or halts the relay when configured so) while the good
rows around it are published, and nothing is lost.

Bad rows are written with the SQL function ``pipeline.outbox_emit`` (which does not validate),
as an ERP writing straight into the outbox would.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import random
import uuid
from typing import Any

import psycopg
import pytest

from pipeline.claimcheck import TableClaimStore, claim_store
from pipeline.config import Settings
from pipeline.errors import DecodeError, PayloadError, SchemaError
from pipeline.outbox import emit
from pipeline.outbox.migrations import install
from pipeline.relay.relay import Relay, RelayHalted
from pipeline.schemas.catalogue import Catalogue
from pipeline.schemas.codec import Decoder
from pipeline.simulator.payloads import payload_for
from tests.conftest import make_settings
from tests.fixtures.kafka import Rec
from tests.fixtures.relay import _url

pytestmark = pytest.mark.integration

NOW = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)



def good_payload(order_id: str, seed: int = 1) -> dict[str, Any]:
    return payload_for("order.created", random.Random(seed), aggregate_id=order_id, now=NOW)


def sql_emit(url: str, aggregate_id: str, event_type: str, payload: Any) -> tuple[int, str]:
    """One committed row written by the unvalidating SQL function: (outbox id, event id)."""
    event_id = str(uuid.uuid4())
    with psycopg.connect(url) as conn:
        conn.execute(
            "SELECT pipeline.outbox_emit('order', %s, %s, %s::jsonb, '{}'::jsonb, %s::uuid)",
            (aggregate_id, event_type, json.dumps(payload), event_id),
        )
        row = conn.execute("SELECT id FROM pipeline.outbox WHERE event_id = %s::uuid",
                           (event_id,)).fetchone()
        conn.commit()
    assert row is not None
    return int(row[0]), event_id


def outbox_ids(url: str) -> list[int]:
    with psycopg.connect(url, autocommit=True) as conn:
        return [r[0] for r in conn.execute("SELECT id FROM pipeline.outbox ORDER BY id")]


def drain(relay: Relay) -> int:
    """Lead and publish until the outbox is empty (bounded), then release everything."""
    relay.store.connect()
    try:
        assert relay.store.try_lead()
        total = 0
        for _ in range(100):
            n = relay.step()
            if n == 0:
                break
            total += n
        else:
            pytest.fail("the relay never emptied the outbox")
        return total
    finally:
        relay._shutdown()


def positions(recs: list[Rec]) -> list[int]:
    return sorted(int(r.headers["erp_outbox_position"]) for r in recs)


def check_dead_letter(rec: Rec, *, row_id: int, event_id: str, event_type: str,
                      aggregate_id: str, payload: Any, error_class: str,
                      settings: Settings) -> str:
    """Common checks of an outbox DLQ record; returns the error message header."""
    hdrs = rec.headers
    assert hdrs["ce_id"] == event_id
    assert hdrs["erp_outbox_position"] == str(row_id)
    assert hdrs["ce_type"] == event_type
    assert hdrs["ce_subject"] == aggregate_id
    assert hdrs["erp_error_class"] == error_class
    assert hdrs["content-type"] == "application/json"
    assert rec.key == aggregate_id.encode()
    assert rec.value
    row = json.loads(rec.value)
    assert row["id"] == row_id
    assert row["event_id"] == event_id
    assert row["event_type"] == event_type
    assert row["aggregate_type"] == "order"
    assert row["aggregate_id"] == aggregate_id
    assert row["aggregate_version"] >= 1
    if "payload" in row:
        assert row["payload"] == payload
    else:
        # a row too large to travel inline: its full JSON is in the claim-check store
        ref = row["payload_claim_check"]
        assert ref["store"] == "table"
        assert hdrs["erp_claim_check"] == "table"
        store = TableClaimStore(_url(settings), settings.database.schema_name)
        try:
            full = json.loads(store.get(ref["ref"]))
        finally:
            store.close()
        assert full["id"] == row_id
        assert full["event_id"] == event_id
        assert full["payload"] == payload
    message = hdrs["erp_error_message"]
    assert message
    return message


def run_with_bad_row(settings: Settings, read_topic, event_type: str, payload: Any
                     ) -> tuple[Rec, int, str, Relay]:
    """good, bad, good: the good ones are published around the dead-lettered one."""
    url = _url(settings)
    before_id, _ = sql_emit(url, "SO-GOOD", "order.created", good_payload("SO-GOOD", 1))
    bad_id, bad_event = sql_emit(url, "SO-BAD", event_type, payload)
    after_id, _ = sql_emit(url, "SO-GOOD", "order.created", good_payload("SO-GOOD", 2))
    assert before_id < bad_id < after_id

    relay = Relay(settings)
    assert drain(relay) == 3
    assert relay.stats.published == 2
    assert relay.stats.dead_lettered == 1
    assert outbox_ids(url) == [], "the bad row (or a good one) is still in the outbox"

    events = read_topic(f"{settings.topics.prefix}.order", expect=2)
    assert positions(events) == [before_id, after_id]
    assert [r.headers["erp_aggregate_version"] for r in sorted(events, key=lambda r: r.offset)] \
        == ["1", "2"]
    dlq = read_topic(settings.topics.outbox_dlq, expect=1)
    return dlq[0], bad_id, bad_event, relay


# -- (a) unknown event type ------------------------------------------------------------------
def test_unknown_event_type_goes_to_outbox_dlq(installed: Settings, read_topic):
    payload = good_payload("SO-BAD")
    rec, row_id, event_id, relay = run_with_bad_row(installed, read_topic, "order.exploded",
                                                    payload)
    message = check_dead_letter(rec, row_id=row_id, event_id=event_id,
                                event_type="order.exploded", aggregate_id="SO-BAD",
                                payload=payload, error_class="pipeline.errors.SchemaError",
                                settings=installed)
    assert "order.exploded" in message
    assert "unknown event type" in message
    assert relay.stats.dead_letter_reasons == {"SchemaError": 1}


# -- (b) payload not matching its schema -----------------------------------------------------
def _missing_customer() -> tuple[dict[str, Any], str]:
    p = good_payload("SO-BAD")
    del p["customer"]
    return p, "customer"


def _wrong_qty_type() -> tuple[dict[str, Any], str]:
    p = good_payload("SO-BAD")
    p["lines"][0]["qty"] = "three"
    return p, "lines[0].qty"


def _wrong_total_type() -> tuple[dict[str, Any], str]:
    p = good_payload("SO-BAD")
    p["total"] = {"amount": 12}
    return p, "total"


@pytest.mark.parametrize("make", [_missing_customer, _wrong_qty_type, _wrong_total_type],
                         ids=["missing-required-field", "wrong-type-nested", "wrong-type-decimal"])
def test_payload_not_matching_schema_goes_to_outbox_dlq(installed: Settings, read_topic, make):
    payload, field_path = make()
    rec, row_id, event_id, _ = run_with_bad_row(installed, read_topic, "order.created", payload)
    message = check_dead_letter(rec, row_id=row_id, event_id=event_id,
                                event_type="order.created", aggregate_id="SO-BAD",
                                payload=payload, error_class="pipeline.errors.PayloadError",
                                settings=installed)
    assert field_path in message, f"the message does not name {field_path}: {message}"
    assert "order.created" in message


# -- (c) payload over relay.max_payload_bytes ------------------------------------------------
@pytest.fixture
def small_limits(database_url: str, kafka_bootstrap: str, topic_prefix: str) -> Settings:
    s = make_settings(database_url, kafka_bootstrap, topic_prefix,
                      relay={"max_payload_bytes": 2048, "max_inline_bytes": 1024})
    with psycopg.connect(_url(s), autocommit=True) as conn:
        install(conn, s.database.schema_name)
    return s


def test_payload_over_max_payload_bytes_goes_to_outbox_dlq(small_limits: Settings, read_topic):
    payload = good_payload("SO-BAD")
    payload["note"] = "x" * 3000
    rec, row_id, event_id, _ = run_with_bad_row(small_limits, read_topic, "order.created",
                                                payload)
    message = check_dead_letter(rec, row_id=row_id, event_id=event_id,
                                event_type="order.created", aggregate_id="SO-BAD",
                                payload=payload, error_class="pipeline.errors.PayloadTooLarge",
                                settings=small_limits)
    assert "max_payload_bytes=2048" in message
    assert event_id in message


def test_record_the_broker_refuses_as_too_large_goes_to_outbox_dlq(
        database_url: str, kafka_bootstrap: str, topic_prefix: str, read_topic):
    # The producer's own limit stands in for a broker's: the record is refused before sending.
    s = make_settings(database_url, kafka_bootstrap, topic_prefix,
                      kafka={"producer": {"message.max.bytes": 1500}},
                      relay={"max_inline_bytes": 64 * 1024})
    with psycopg.connect(database_url, autocommit=True) as conn:
        install(conn, s.database.schema_name)
    payload = good_payload("SO-BAD")
    payload["note"] = "y" * 3000
    rec, row_id, event_id, _ = run_with_bad_row(s, read_topic, "order.created", payload)
    message = check_dead_letter(rec, row_id=row_id, event_id=event_id,
                                event_type="order.created", aggregate_id="SO-BAD",
                                payload=payload, error_class="pipeline.errors.PayloadTooLarge",
                                settings=s)
    assert "Kafka refused event" in message and "message.max.bytes" in message
    # the dead letter itself travels small: its row went to the claim-check store
    assert "erp_claim_check" in rec.headers


# -- (d) payload between max_inline_bytes and max_payload_bytes: claim check -----------------
def test_payload_over_max_inline_bytes_travels_by_claim_check(small_limits: Settings,
                                                              read_topic):
    url = _url(small_limits)
    big = good_payload("SO-BIG")
    big["note"] = "n" * 1300  # ~1.4 KB encoded: over 1024, under 2048
    before_id, _ = sql_emit(url, "SO-BIG", "order.created", good_payload("SO-BIG", 1))
    big_id, big_event = sql_emit(url, "SO-BIG", "order.created", big)
    after_id, _ = sql_emit(url, "SO-BIG", "order.created", good_payload("SO-BIG", 2))

    relay = Relay(small_limits)
    assert drain(relay) == 3
    assert relay.stats.published == 3
    assert relay.stats.claim_checked == 1
    assert relay.stats.dead_lettered == 0
    assert outbox_ids(url) == []
    assert read_topic(small_limits.topics.outbox_dlq) == []

    recs = sorted(read_topic(f"{small_limits.topics.prefix}.order", expect=3),
                  key=lambda r: r.offset)
    assert positions(recs) == [before_id, big_id, after_id]
    assert [r.headers["erp_aggregate_version"] for r in recs] == ["1", "2", "3"]
    assert len({r.partition for r in recs}) == 1
    claimed = [r for r in recs if "erp_claim_check" in r.headers]
    assert len(claimed) == 1
    rec = claimed[0]
    assert rec.headers["erp_outbox_position"] == str(big_id)
    assert rec.headers["ce_id"] == big_event
    assert rec.headers["ce_type"] == "order.created"
    assert rec.headers["erp_claim_check"] == "table"

    dec = Decoder(Catalogue.load())
    ref = dec.decode(rec.value)
    assert ref.event_type == "pipeline.claim_check"
    assert ref.value["event_type"] == "order.created"
    assert ref.value["store"] == "table"
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT event_id::text, body FROM pipeline.claim_check WHERE ref = %s",
                           (ref.value["ref"],)).fetchone()
    assert row is not None, f"claim-check ref {ref.value['ref']} not in pipeline.claim_check"
    event_id, body = row[0], bytes(row[1])
    assert event_id == big_event
    assert ref.value["size_bytes"] == len(body)
    assert 1024 < len(body) <= 2048
    assert ref.value["sha256"] == hashlib.sha256(body).hexdigest()
    original = dec.decode(body)
    assert original.event_type == "order.created"
    assert original.value["order_id"] == "SO-BIG"
    assert original.value["note"] == big["note"]
    assert original.value["customer"] == big["customer"]
    assert [line["sku"] for line in original.value["lines"]] == \
        [line["sku"] for line in big["lines"]]
    # the inline neighbours decode as themselves
    for r in recs:
        if r is not rec:
            assert dec.decode(r.value).event_type == "order.created"
    # a consumer's decoder with the configured store resolves the reference transparently
    store = claim_store(small_limits)
    try:
        resolved = Decoder(Catalogue.load(), claims=store).decode(rec.value)
    finally:
        store.close()
    assert resolved.event_type == "order.created"
    assert resolved.value["note"] == big["note"]
    # a tampered body is refused, not decoded
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("UPDATE pipeline.claim_check SET body = body || '\\x00'::bytea "
                     "WHERE ref = %s", (ref.value["ref"],))
    store = claim_store(small_limits)
    try:
        with pytest.raises(DecodeError, match="does not match its reference"):
            Decoder(Catalogue.load(), claims=store).decode(rec.value)
    finally:
        store.close()


# -- (e) relay.on_invalid: halt --------------------------------------------------------------
def _halt_settings(database_url: str, kafka_bootstrap: str, topic_prefix: str,
                   **relay: Any) -> Settings:
    settings = make_settings(database_url, kafka_bootstrap, topic_prefix,
                             relay={"on_invalid": "halt", **relay})
    with psycopg.connect(_url(settings), autocommit=True) as conn:
        install(conn, settings.database.schema_name)
    return settings


def test_on_invalid_halt_stops_and_keeps_the_bad_row(database_url: str, kafka_bootstrap: str,
                                                     topic_prefix: str, read_topic):
    settings = _halt_settings(database_url, kafka_bootstrap, topic_prefix)
    url = _url(settings)
    before_id, _ = sql_emit(url, "SO-GOOD", "order.created", good_payload("SO-GOOD", 1))
    bad_payload = good_payload("SO-BAD")
    del bad_payload["customer"]
    bad_id, bad_event = sql_emit(url, "SO-BAD", "order.created", bad_payload)
    after_id, _ = sql_emit(url, "SO-GOOD", "order.created", good_payload("SO-GOOD", 2))

    relay = Relay(settings)
    relay.store.connect()
    try:
        assert relay.store.try_lead()
        with pytest.raises(RelayHalted) as exc_info:
            relay.step()
    finally:
        relay._shutdown()
    message = str(exc_info.value)
    assert bad_event in message
    assert "customer" in message
    assert f"outbox id {bad_id}" in message

    assert relay.stats.dead_lettered == 0
    left = outbox_ids(url)
    assert bad_id in left, "the bad row was removed from the outbox"
    # nothing lost: every row is either still in the outbox or on its topic
    published = read_topic(f"{settings.topics.prefix}.order")
    assert sorted(left + positions(published)) == [before_id, bad_id, after_id]
    assert bad_id not in positions(published)
    assert read_topic(settings.topics.outbox_dlq) == []


def test_halted_relay_does_not_skip_past_the_bad_row(database_url: str, kafka_bootstrap: str,
                                                     topic_prefix: str, read_topic):
    """A second ``step()`` after RelayHalted must halt again on the same row, never publish
    the rows behind it (that would put v3 of the aggregate on Kafka before v1 and v2)."""
    settings = _halt_settings(database_url, kafka_bootstrap, topic_prefix, batch_size=2)
    url = _url(settings)
    bad_payload = good_payload("SO-A")
    bad_payload["lines"][0]["qty"] = "three"
    ids = [sql_emit(url, "SO-A", "order.created", good_payload("SO-A", 1))[0]]
    bad_id, bad_event = sql_emit(url, "SO-A", "order.created", bad_payload)
    ids.append(bad_id)
    for seed in (2, 3, 4):
        ids.append(sql_emit(url, "SO-A", "order.created", good_payload("SO-A", seed))[0])

    relay = Relay(settings)
    relay.store.connect()
    outcomes: list[str] = []
    try:
        assert relay.store.try_lead()
        for _ in range(3):
            try:
                outcomes.append(f"published {relay.step()}")
            except RelayHalted as exc:
                assert bad_event in str(exc)
                outcomes.append("halted")
    finally:
        relay._shutdown()
    published = read_topic(f"{settings.topics.prefix}.order")
    assert outcomes == ["halted"] * 3, (
        f"step() after RelayHalted did not halt again: {outcomes}; published positions "
        f"{positions(published)} while the bad row {bad_id} is still in the outbox"
    )
    assert positions(published) == []
    assert outbox_ids(url) == ids


# -- (f) emit() validates in the writer's transaction ----------------------------------------
@pytest.mark.parametrize("make", [_missing_customer, _wrong_qty_type],
                         ids=["missing-required-field", "wrong-type-nested"])
def test_emit_refuses_invalid_payload(installed: Settings, make):
    payload, field_path = make()
    url = _url(installed)
    with psycopg.connect(url) as conn:
        emit(conn, "order", "SO-OK", "order.created", good_payload("SO-OK"))
        with pytest.raises(PayloadError) as exc_info:
            emit(conn, "order", "SO-BAD", "order.created", payload)
        assert exc_info.value.path == field_path
        assert field_path in str(exc_info.value)
        assert exc_info.value.event_type == "order.created"
        # the bad event was refused before anything reached the outbox
        assert conn.execute("SELECT aggregate_id FROM pipeline.outbox").fetchall() == \
            [("SO-OK",)]
        conn.rollback()
    with psycopg.connect(url, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM pipeline.outbox").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM pipeline.aggregate_versions").fetchone() == (0,)


def test_emit_refuses_unknown_event_type(installed: Settings):
    url = _url(installed)
    with psycopg.connect(url) as conn:
        with pytest.raises(SchemaError, match=r"order\.exploded"):
            emit(conn, "order", "SO-1", "order.exploded", good_payload("SO-1"))
        conn.rollback()
        assert conn.execute("SELECT count(*) FROM pipeline.outbox").fetchone() == (0,)
