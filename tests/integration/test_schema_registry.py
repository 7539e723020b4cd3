"""With a Schema Registry configured: Confluent wire format, TopicRecordNameStrategy subjects,
and `schemas check` against the registry's latest versions. The registry is a small
Confluent-compatible HTTP server (tests/fixtures/registry.py) reached over a real socket."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import psycopg
import pytest
from click.testing import CliRunner
from confluent_kafka.schema_registry import SchemaRegistryClient

from pipeline.cli import main
from pipeline.outbox import emit
from pipeline.outbox.migrations import install
from pipeline.relay.relay import Relay
from pipeline.schemas.catalogue import Catalogue
from pipeline.schemas.codec import Decoder
from pipeline.simulator.payloads import payload_for
from tests.conftest import make_settings
from tests.fixtures.registry import Registry as SchemaRegistry

pytestmark = pytest.mark.integration


def test_relay_publishes_confluent_framed_events_decodable_by_the_registry(
        database_url: str, kafka_bootstrap: str, topic_prefix: str,
        schema_registry: SchemaRegistry, read_topic, request: pytest.FixtureRequest):
    import datetime as dt
    import random

    s = make_settings(database_url, kafka_bootstrap, topic_prefix,
                      schema_registry={"url": schema_registry.url})
    with psycopg.connect(database_url, autocommit=True) as conn:
        install(conn, "pipeline")
    rng = random.Random(5)
    with psycopg.connect(database_url) as conn:
        for i in range(6):
            agg = "order" if i % 2 else "customer"
            etype = "order.created" if agg == "order" else "customer.upserted"
            key = f"K-{i}"
            emit(conn, agg, key, etype, payload_for(etype, rng, aggregate_id=key,
                                                     now=dt.datetime.now(dt.UTC)))
        conn.commit()
    _publish_all(Relay(s))

    subjects = [x for x in schema_registry.subjects() if x.startswith(f"{topic_prefix}.")]
    assert subjects == [f"{topic_prefix}.customer-erp.customer.CustomerUpserted",
                        f"{topic_prefix}.order-erp.order.OrderCreated"]
    client = SchemaRegistryClient({"url": schema_registry.url})
    decoder = Decoder(Catalogue.load(), client)
    request.addfinalizer(client.close)
    for topic, etype in ((f"{topic_prefix}.order", "order.created"),
                         (f"{topic_prefix}.customer", "customer.upserted")):
        recs = read_topic(topic, expect=3)
        for r in recs:
            assert r.value[0] == 0  # Confluent magic byte
            (sid,) = struct.unpack(">I", r.value[1:5])
            subject = f"{topic}-{Catalogue.load().writer(etype).fullname}"
            assert sid in schema_registry.ids(subject)
            ev = decoder.decode(r.value)
            assert ev.event_type == etype and ev.wire_form == "confluent"


def test_schemas_check_against_the_registry_names_the_incompatible_field(
        tmp_path: Path, schema_registry: SchemaRegistry):
    cat = Catalogue.load()
    sv = cat.writer("order.cancelled")
    # the registry holds a version with a field our catalogue has since dropped a default for
    registered = json.loads(json.dumps(sv.raw))
    from confluent_kafka.schema_registry import Schema

    subject = f"erp.order-{sv.fullname}"
    with SchemaRegistryClient({"url": schema_registry.url}) as client:
        client.register_schema(subject, Schema(json.dumps(registered), "AVRO"))
    # a local catalogue whose order.cancelled adds a required field
    local = tmp_path / "schemas"
    (local / "order.cancelled").mkdir(parents=True)
    changed = json.loads(json.dumps(sv.raw))
    changed["fields"].append({"name": "approved_by", "type": "string", "doc": "who approved"})
    (local / "order.cancelled" / "v1.avsc").write_text(json.dumps(changed))

    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
    env["PIPELINE_SCHEMA_REGISTRY__URL"] = schema_registry.url
    result = CliRunner().invoke(main, ["--config", os.devnull, "schemas", "check",
                                       "--path", str(local)], env=env)
    assert result.exit_code == 1, result.output
    assert "INCOMPATIBLE" in result.output
    assert f"registry subject {subject}" in result.output
    assert "approved_by" in result.output


def _publish_all(relay: Relay) -> None:
    relay.store.connect()
    assert relay.store.try_lead()
    while relay.step():
        pass
    relay._drain(10)
    relay.store.close()
    relay.encoder.close()


def test_registry_refusing_a_schema_dead_letters_the_event(
        database_url: str, kafka_bootstrap: str, topic_prefix: str,
        schema_registry: SchemaRegistry, read_topic):
    from confluent_kafka.schema_registry import Schema

    s = make_settings(database_url, kafka_bootstrap, topic_prefix,
                      schema_registry={"url": schema_registry.url})
    sv = Catalogue.load().writer("order.cancelled")
    # The subject already holds a schema with a field ours lacks a default for.
    older = json.loads(json.dumps(sv.raw))
    older["fields"] = [f for f in older["fields"] if f["name"] != "reason"]
    with SchemaRegistryClient({"url": schema_registry.url}) as ours_needs:
        ours_needs.register_schema(f"{topic_prefix}.order-{sv.fullname}",
                                   Schema(json.dumps(older), "AVRO"))
    with psycopg.connect(database_url, autocommit=True) as conn:
        install(conn, "pipeline")
    with psycopg.connect(database_url) as conn:
        emit(conn, "order", "SO-9", "order.cancelled",
             {"order_id": "SO-9", "reason": "customer request",
              "cancelled_at": "2026-11-27T08:00:00+00:00"})
        conn.commit()
    relay = Relay(s)
    _publish_all(relay)
    assert relay.stats.dead_lettered == 1
    dlq = read_topic(s.topics.outbox_dlq, expect=1)
    msg = dlq[0].headers["erp_error_message"]
    assert dlq[0].headers["erp_error_class"] == "pipeline.errors.SchemaError"
    assert "HTTP 409" in msg and "reason" in msg, msg


def test_registry_unreachable_relay_waits_and_loses_nothing(
        database_url: str, kafka_bootstrap: str, topic_prefix: str, caplog):
    import threading

    from pipeline.embedded.broker import free_port
    from tests.fixtures.relay import outbox_count, wait_for

    port = free_port()
    s = make_settings(database_url, kafka_bootstrap, topic_prefix,
                      schema_registry={"url": f"http://127.0.0.1:{port}"})
    with psycopg.connect(database_url, autocommit=True) as conn:
        install(conn, "pipeline")
    with psycopg.connect(database_url) as conn:
        emit(conn, "order", "SO-1", "order.cancelled",
             {"order_id": "SO-1", "reason": "r", "cancelled_at": "2026-11-27T08:00:00+00:00"})
        conn.commit()
    relay = Relay(s)
    stop = threading.Event()
    t = threading.Thread(target=relay.run, args=(stop,), daemon=True)
    t.start()
    try:
        with caplog.at_level("WARNING", logger="pipeline.relay"):
            wait_for(lambda: "Schema Registry unavailable" in caplog.text, 30,
                     "the relay to report the registry outage")
        assert outbox_count(database_url) == 1
        assert relay.stats.dead_lettered == 0
    finally:
        stop.set()
        t.join(30)
