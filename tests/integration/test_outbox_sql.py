"""The outbox's SQL side on a real PostgreSQL: migrations, outbox_emit, NOTIFY, capture triggers,
status figures and the Python emit() helper. Needs the database only (no broker)."""

from __future__ import annotations

import datetime as dt
import json
import random
import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from pipeline.errors import ConfigError, PayloadError, SchemaError
from pipeline.outbox import emit
from pipeline.outbox.capture import CaptureSpec, drop_capture, install_capture, validate_spec
from pipeline.outbox.migrations import install, installed_version, migrations
from pipeline.outbox.status import outbox_status
from pipeline.schemas.catalogue import Catalogue
from pipeline.simulator.payloads import payload_for

pytestmark = pytest.mark.integration

SCHEMA = "pipeline"
NOW = dt.datetime(2026, 11, 27, 7, 15, 0, 123456, tzinfo=dt.UTC)


@pytest.fixture(scope="module")
def catalogue() -> Catalogue:
    return Catalogue.load()


@pytest.fixture
def url(database_url: str) -> str:
    """A fresh database with the outbox installed."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        install(conn, SCHEMA)
    return database_url


@pytest.fixture
def conn(url: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(url, autocommit=True) as c:
        yield c


def sql_emit(c: psycopg.Connection[Any], agg_id: str, payload: Any = None,
             agg_type: str = "order", event_type: str = "order.created") -> int:
    row = c.execute(
        "SELECT pipeline.outbox_emit(%s, %s, %s, %s)",
        (agg_type, agg_id, event_type, Jsonb(payload if payload is not None else {"n": 1})),
    ).fetchone()
    assert row is not None
    return int(row[0])


def outbox_rows(c: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
    return c.execute(
        "SELECT aggregate_type, aggregate_id, aggregate_version, event_type, payload, headers "
        "FROM pipeline.outbox ORDER BY id"
    ).fetchall()


def count(c: psycopg.Connection[Any], table: str) -> int:
    row = c.execute(f"SELECT count(*) FROM pipeline.{table}").fetchone()
    assert row is not None
    return int(row[0])


# -- install -------------------------------------------------------------------------------------


def test_install_is_idempotent_and_recorded(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as c:
        assert installed_version(c, SCHEMA) is None
        first = install(c, SCHEMA)
        assert [(m.version, m.name) for m in first] == [(m.version, m.name) for m in migrations()]
        assert first[0].version == 1
        assert first[0].name == "outbox"
        assert install(c, SCHEMA) == []
        assert install(c, SCHEMA) == []
        recorded = c.execute(
            "SELECT version, name FROM pipeline.schema_migrations ORDER BY version"
        ).fetchall()
        assert recorded == [(m.version, m.name) for m in migrations()]
        assert installed_version(c, SCHEMA) == migrations()[-1].version
        tables = {r[0] for r in c.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'pipeline'"
        ).fetchall()}
        assert {"outbox", "aggregate_versions", "claim_check", "relay_state",
                "schema_migrations"} <= tables


def test_install_in_another_schema(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as c:
        assert install(c, "erp_outbox")
        assert installed_version(c, "erp_outbox") == migrations()[-1].version
        assert installed_version(c, SCHEMA) is None
        row = c.execute("SELECT erp_outbox.outbox_emit('order', 'A', 'order.created', '{}')"
                        ).fetchone()
        assert row == (1,)


def test_install_rejects_bad_schema_name(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as c, \
            pytest.raises(ValueError, match="invalid schema name 'Bad;drop'"):
        install(c, "Bad;drop")


def test_concurrent_installers_apply_each_migration_once(database_url: str) -> None:
    results: list[int] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            with psycopg.connect(database_url, autocommit=True) as c:
                results.append(len(install(c, SCHEMA)))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert sorted(results) == [0, 0, 0, len(migrations())]


# -- outbox_emit ---------------------------------------------------------------------------------


def test_versions_count_per_aggregate(conn: psycopg.Connection[Any]) -> None:
    assert [sql_emit(conn, "SO-1") for _ in range(3)] == [1, 2, 3]
    assert sql_emit(conn, "SO-2") == 1
    assert sql_emit(conn, "SO-1") == 4
    assert sql_emit(conn, "SO-2") == 2
    # same id, other aggregate type: its own sequence
    assert sql_emit(conn, "SO-1", agg_type="invoice", event_type="invoice.issued") == 1
    rows = outbox_rows(conn)
    assert [(r[0], r[1], r[2]) for r in rows] == [
        ("order", "SO-1", 1), ("order", "SO-1", 2), ("order", "SO-1", 3), ("order", "SO-2", 1),
        ("order", "SO-1", 4), ("order", "SO-2", 2), ("invoice", "SO-1", 1),
    ]
    assert rows[0][4] == {"n": 1}
    assert rows[0][5] == {}


def test_rolled_back_transaction_does_not_consume_a_version(url: str) -> None:
    with psycopg.connect(url) as c:
        assert sql_emit(c, "SO-1") == 1
        c.commit()
        assert sql_emit(c, "SO-1") == 2
        assert sql_emit(c, "SO-1") == 3
        c.rollback()
        assert sql_emit(c, "SO-1") == 2
        c.commit()
        assert sql_emit(c, "SO-9") == 1
        c.rollback()
        assert sql_emit(c, "SO-9") == 1
        c.commit()
        assert [(r[1], r[2]) for r in outbox_rows(c)] == [("SO-1", 1), ("SO-1", 2), ("SO-9", 1)]


@pytest.mark.parametrize("existing", [True, False], ids=["existing-aggregate", "new-aggregate"])
def test_concurrent_writers_of_one_aggregate_serialise(url: str, existing: bool) -> None:
    with psycopg.connect(url, autocommit=True) as setup:
        if existing:
            assert sql_emit(setup, "SO-1") == 1
    base = 1 if existing else 0
    with psycopg.connect(url) as a, psycopg.connect(url) as b:
        assert sql_emit(a, "SO-1") == base + 1  # A holds the aggregate until commit

        # B cannot get the aggregate while A's transaction is open
        b.execute("SET lock_timeout = '300ms'")
        with pytest.raises(psycopg.errors.LockNotAvailable):
            sql_emit(b, "SO-1")
        b.rollback()
        # … other aggregates are not blocked
        b.execute("SET lock_timeout = '2s'")
        assert sql_emit(b, "SO-2") == 1
        b.commit()

        # a blocked writer continues with the next version once A commits
        b.execute("SET lock_timeout = '10s'")
        result: dict[str, Any] = {}

        def writer() -> None:
            try:
                result["version"] = sql_emit(b, "SO-1")
                result["at"] = time.monotonic()
                b.commit()
            except BaseException as exc:  # pragma: no cover - reported below
                result["error"] = exc

        t = threading.Thread(target=writer)
        t.start()
        time.sleep(0.5)
        assert t.is_alive(), "second writer was not blocked by the first transaction"
        committed_at = time.monotonic()
        a.commit()
        t.join(5)
        assert not t.is_alive(), "second writer still blocked 5 s after the first committed"
        assert "error" not in result, result.get("error")
        assert result["version"] == base + 2
        assert result["at"] >= committed_at
    with psycopg.connect(url, autocommit=True) as c:
        assert [r[2] for r in outbox_rows(c) if r[1] == "SO-1"] == list(range(1, base + 3))


def test_empty_aggregate_id_is_rejected(conn: psycopg.Connection[Any]) -> None:
    with pytest.raises(psycopg.errors.InvalidParameterValue) as ei:
        sql_emit(conn, "")
    assert "outbox_emit: aggregate_id is empty (event type order.created)" in str(ei.value)
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="aggregate_id is empty"):
        conn.execute("SELECT pipeline.outbox_emit('order', NULL, 'order.created', '{}')")
    assert count(conn, "outbox") == 0
    assert count(conn, "aggregate_versions") == 0


def test_null_payload_is_rejected(conn: psycopg.Connection[Any]) -> None:
    with pytest.raises(psycopg.errors.InvalidParameterValue) as ei:
        conn.execute("SELECT pipeline.outbox_emit('order', 'SO-1', 'order.created', NULL)")
    assert ("outbox_emit: payload is null (event type order.created, aggregate SO-1)"
            in str(ei.value))
    assert count(conn, "outbox") == 0
    assert count(conn, "aggregate_versions") == 0


def test_bad_aggregate_type_and_empty_event_type_are_rejected(
    conn: psycopg.Connection[Any],
) -> None:
    with pytest.raises(psycopg.errors.CheckViolation):
        sql_emit(conn, "SO-1", agg_type="order type")
    with pytest.raises(psycopg.errors.CheckViolation):
        sql_emit(conn, "SO-1", event_type="")
    assert count(conn, "outbox") == 0


def test_event_id_is_kept_and_unique(conn: psycopg.Connection[Any]) -> None:
    eid = "3f2b8c1e-2d4a-4a8e-9b1c-5d6e7f8a9b0c"
    conn.execute("SELECT pipeline.outbox_emit('order', 'SO-1', 'order.created', '{}', '{}', %s)",
                 (eid,))
    row = conn.execute("SELECT event_id::text FROM pipeline.outbox").fetchone()
    assert row == (eid,)
    with pytest.raises(psycopg.errors.UniqueViolation):
        conn.execute(
            "SELECT pipeline.outbox_emit('order', 'SO-2', 'order.created', '{}', '{}', %s)",
            (eid,),
        )


# -- NOTIFY --------------------------------------------------------------------------------------


def test_commit_notifies_pipeline_outbox(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as listener, psycopg.connect(url) as writer:
        listener.execute("LISTEN pipeline_outbox")
        sql_emit(writer, "SO-1")
        sql_emit(writer, "SO-2")
        writer.commit()
        got = list(listener.notifies(timeout=2, stop_after=1))
        assert len(got) == 1
        assert got[0].channel == "pipeline_outbox"
        # identical notifications of one transaction fold into one
        assert list(listener.notifies(timeout=0.3)) == []


def test_rolled_back_emit_does_not_notify(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as listener, psycopg.connect(url) as writer:
        listener.execute("LISTEN pipeline_outbox")
        sql_emit(writer, "SO-1")
        writer.rollback()
        assert list(listener.notifies(timeout=0.5)) == []


# -- capture triggers ----------------------------------------------------------------------------

SPEC = CaptureSpec(table="sale_order", aggregate_type="order", key_columns=("id",))


@pytest.fixture
def sale_order(conn: psycopg.Connection[Any]) -> psycopg.Connection[Any]:
    conn.execute("CREATE TABLE sale_order (id int PRIMARY KEY, name text, amount numeric)")
    return conn


def test_capture_trigger_emits_row_changes(sale_order: psycopg.Connection[Any],
                                           catalogue: Catalogue) -> None:
    c = sale_order
    install_capture(c, SPEC, SCHEMA, catalogue)
    c.execute("INSERT INTO sale_order VALUES (1, 'first', 10.50)")
    c.execute("UPDATE sale_order SET name = 'renamed' WHERE id = 1")
    c.execute("UPDATE sale_order SET name = 'renamed' WHERE id = 1")  # no-op: no event
    c.execute("UPDATE sale_order SET amount = amount WHERE id = 1")  # no-op: no event
    c.execute("DELETE FROM sale_order WHERE id = 1")
    rows = outbox_rows(c)
    assert [(r[0], r[1], r[2], r[3]) for r in rows] == [
        ("order", "1", 1, "sale_order.created"),
        ("order", "1", 2, "sale_order.updated"),
        ("order", "1", 3, "sale_order.deleted"),
    ]
    created, updated, deleted = (r[4] for r in rows)
    assert created == {
        "table": "public.sale_order", "operation": "INSERT", "key": "1",
        "row": {"id": 1, "name": "first", "amount": 10.50}, "old_row": None,
    }
    assert updated == {
        "table": "public.sale_order", "operation": "UPDATE", "key": "1",
        "row": {"id": 1, "name": "renamed", "amount": 10.50},
        "old_row": {"id": 1, "name": "first", "amount": 10.50},
    }
    assert deleted == {
        "table": "public.sale_order", "operation": "DELETE", "key": "1",
        "row": None, "old_row": {"id": 1, "name": "renamed", "amount": 10.50},
    }
    assert all(r[5] == {"erp_capture": "public.sale_order"} for r in rows)


def test_captured_rows_encode_as_row_change(sale_order: psycopg.Connection[Any],
                                            catalogue: Catalogue) -> None:
    from pipeline.schemas.codec import Decoder, Encoder

    install_capture(sale_order, SPEC, SCHEMA, catalogue)
    sale_order.execute("INSERT INTO sale_order VALUES (5, 'x', 1.25)")
    (_, _, _, event_type, payload, headers), = outbox_rows(sale_order)
    enc = Encoder(catalogue).encode(event_type, payload, topic="erp.order", headers=headers)
    decoded = Decoder(catalogue).decode(enc.value)
    assert decoded.event_type == "pipeline.row_change"
    assert decoded.value["operation"] == "INSERT"
    assert decoded.value["key"] == "5"


def test_capture_selected_events_and_prefix(sale_order: psycopg.Connection[Any],
                                            catalogue: Catalogue) -> None:
    spec = CaptureSpec(table="public.sale_order", aggregate_type="sales", key_columns=("id",),
                       events=("insert", "delete"), event_type_prefix="so")
    install_capture(sale_order, spec, SCHEMA, catalogue)
    sale_order.execute("INSERT INTO sale_order VALUES (2, 'a', 1)")
    sale_order.execute("UPDATE sale_order SET name = 'b' WHERE id = 2")
    sale_order.execute("DELETE FROM sale_order WHERE id = 2")
    assert [(r[0], r[1], r[3]) for r in outbox_rows(sale_order)] == [
        ("sales", "2", "so.created"), ("sales", "2", "so.deleted"),
    ]


def test_capture_rolls_back_with_the_erp_transaction(url: str, catalogue: Catalogue) -> None:
    with psycopg.connect(url) as c:
        c.execute("CREATE TABLE sale_order (id int PRIMARY KEY, name text, amount numeric)")
        c.commit()
        install_capture(c, SPEC, SCHEMA, catalogue)
        c.commit()
        c.execute("INSERT INTO sale_order VALUES (1, 'x', 1)")
        c.rollback()
        c.execute("INSERT INTO sale_order VALUES (1, 'y', 1)")
        c.commit()
        rows = outbox_rows(c)
        assert [(r[1], r[2]) for r in rows] == [("1", 1)]
        assert rows[0][4]["row"]["name"] == "y"


def test_installing_capture_twice_replaces_the_trigger(sale_order: psycopg.Connection[Any],
                                                       catalogue: Catalogue) -> None:
    install_capture(sale_order, SPEC, SCHEMA, catalogue)
    install_capture(sale_order, SPEC, SCHEMA, catalogue)
    sale_order.execute("INSERT INTO sale_order VALUES (1, 'x', 1)")
    assert len(outbox_rows(sale_order)) == 1


def test_validate_spec_rejects_missing_table(conn: psycopg.Connection[Any],
                                             catalogue: Catalogue) -> None:
    spec = CaptureSpec(table="no_such_table", aggregate_type="order", key_columns=("id",))
    with pytest.raises(ConfigError) as ei:
        validate_spec(conn, spec, catalogue)
    assert str(ei.value) == "table no_such_table does not exist in this database"


def test_validate_spec_rejects_missing_key_column(sale_order: psycopg.Connection[Any],
                                                  catalogue: Catalogue) -> None:
    spec = CaptureSpec(table="sale_order", aggregate_type="order", key_columns=("code",))
    with pytest.raises(ConfigError) as ei:
        install_capture(sale_order, spec, SCHEMA, catalogue)
    assert str(ei.value) == (
        "table sale_order has no column(s) 'code' (columns: amount, id, name)")
    assert not _has_trigger(sale_order)


def test_validate_spec_rejects_prefix_clashing_with_catalogue(
    sale_order: psycopg.Connection[Any], catalogue: Catalogue
) -> None:
    spec = CaptureSpec(table="sale_order", aggregate_type="order", key_columns=("id",),
                       event_type_prefix="order")
    with pytest.raises(ConfigError) as ei:
        install_capture(sale_order, spec, SCHEMA, catalogue)
    msg = str(ei.value)
    assert "event type(s) order.created already have a dedicated schema" in msg
    assert "--event-type-prefix" in msg
    assert not _has_trigger(sale_order)


def test_validate_spec_rejects_unknown_events(sale_order: psycopg.Connection[Any],
                                              catalogue: Catalogue) -> None:
    spec = CaptureSpec(table="sale_order", aggregate_type="order", key_columns=("id",),
                       events=("insert", "upsert"))
    with pytest.raises(ConfigError,
                       match="--events must be a subset of insert,update,delete,truncate"):
        validate_spec(sale_order, spec, catalogue)


def test_capture_keys_composite_primary_keys_as_a_json_array(
        conn: psycopg.Connection[Any], catalogue: Catalogue) -> None:
    conn.execute("CREATE TABLE sale_order_line (order_id text, line_no int, qty numeric, "
                 "PRIMARY KEY (order_id, line_no))")
    got = install_capture(conn, CaptureSpec("sale_order_line", "order_line"), SCHEMA, catalogue)
    assert got.key_columns == ("order_id", "line_no")  # the primary key, in key order
    conn.execute("INSERT INTO sale_order_line VALUES ('SO,7\"', 3, 2.50)")
    conn.execute("DELETE FROM sale_order_line")
    rows = outbox_rows(conn)
    assert [r[1] for r in rows] == ['["SO,7\\"", "3"]'] * 2  # unambiguous, whatever it holds
    assert json.loads(rows[0][1]) == ['SO,7"', "3"]


def test_capture_refuses_a_key_that_can_be_null_and_leaves_no_trigger(
        sale_order: psycopg.Connection[Any], catalogue: Catalogue) -> None:
    with pytest.raises(ConfigError, match=r"key column\(s\) name of sale_order can be NULL"):
        install_capture(sale_order, CaptureSpec("sale_order", "order", ("name",)), SCHEMA,
                        catalogue)
    assert not _has_trigger(sale_order)
    sale_order.execute("INSERT INTO sale_order VALUES (1, NULL, 1)")  # the ERP goes on


@pytest.mark.parametrize("bad", ["crm.lead", "crm lead", "", "crm/lead"])
def test_capture_refuses_an_aggregate_type_the_outbox_would_refuse(
        sale_order: psycopg.Connection[Any], catalogue: Catalogue, bad: str) -> None:
    with pytest.raises(ConfigError, match=r"aggregate type .* is not allowed"):
        install_capture(sale_order, CaptureSpec("sale_order", bad), SCHEMA, catalogue)
    assert not _has_trigger(sale_order)
    sale_order.execute("INSERT INTO sale_order VALUES (1, 'x', 1)")


def test_capture_before_the_outbox_is_installed_says_what_to_run(
        database_url: str, catalogue: Catalogue) -> None:
    with psycopg.connect(database_url, autocommit=True) as c:
        c.execute("CREATE TABLE IF NOT EXISTS bare_order (id int PRIMARY KEY)")
        with pytest.raises(ConfigError, match="run `pipeline outbox install` first"):
            install_capture(c, CaptureSpec("bare_order", "order"), "not_installed", catalogue)


def test_truncate_is_an_event_and_bytea_travels_as_base64(
        conn: psycopg.Connection[Any], catalogue: Catalogue) -> None:
    from pipeline.schemas.codec import Decoder, Encoder

    conn.execute("CREATE TABLE doc (id int PRIMARY KEY, body bytea, note text)")
    got = install_capture(conn, CaptureSpec("doc", "document"), SCHEMA, catalogue)
    assert got.bytea_columns == ("body",)
    conn.execute("INSERT INTO doc VALUES (1, '\\x00ff10'::bytea, NULL)")
    conn.execute("TRUNCATE doc")
    rows = outbox_rows(conn)
    assert [r[3] for r in rows] == ["doc.created", "doc.truncated"]
    assert rows[0][4]["row"]["body"] == "AP8Q"  # base64 of 00 ff 10
    assert rows[1][1] == "*" and rows[1][4]["operation"] == "TRUNCATE"
    for _t, _k, _v, event_type, payload, headers in rows:
        enc = Encoder(catalogue).encode(event_type, payload, topic="erp.document",
                                        headers=headers)
        assert Decoder(catalogue).decode(enc.value).value["operation"] in ("INSERT",
                                                                           "TRUNCATE")


def test_a_captured_erp_write_fails_only_when_the_outbox_cannot_be_written(
        conn: psycopg.Connection[Any], catalogue: Catalogue) -> None:
    conn.execute("CREATE TABLE res_partner (id int PRIMARY KEY, name text, credit numeric(16,2),"
                 " image bytea, tags jsonb, born date)")
    install_capture(conn, CaptureSpec("res_partner", "customer"), SCHEMA, catalogue)
    odd = [
        (1, None, None, None, None, None),
        (2, "Zoë \u202e", Decimal("99999999999999.99"), b"\x00", '{"a": [1e400]}',
         "0001-01-01"),
        (3, "x" * 100_000, Decimal("-0.01"), b"", "null", "9999-12-31"),
    ]
    for row in odd:
        conn.execute("INSERT INTO res_partner VALUES (%s, %s, %s, %s, %s::jsonb, %s)", row)
    conn.execute("UPDATE res_partner SET name = coalesce(name, '') || '!'")
    conn.execute("DELETE FROM res_partner WHERE id = 3")
    assert len(outbox_rows(conn)) == 3 + 3 + 1
    # the outbox itself refusing a write is the one thing that fails the ERP's write
    conn.execute(f"ALTER TABLE {SCHEMA}.outbox ADD CONSTRAINT no_more CHECK (id < 0) NOT VALID")
    with pytest.raises(psycopg.errors.CheckViolation):
        conn.execute("INSERT INTO res_partner VALUES (9, 'y', 1, NULL, NULL, NULL)")
    conn.execute(f"ALTER TABLE {SCHEMA}.outbox DROP CONSTRAINT no_more")


def _has_trigger(c: psycopg.Connection[Any]) -> bool:
    return c.execute(
        "SELECT 1 FROM pg_trigger WHERE tgname = 'pipeline_capture_sale_order'"
    ).fetchone() is not None


def test_drop_capture(sale_order: psycopg.Connection[Any], catalogue: Catalogue) -> None:
    install_capture(sale_order, SPEC, SCHEMA, catalogue)
    assert _has_trigger(sale_order)
    assert drop_capture(sale_order, "sale_order") is True
    assert not _has_trigger(sale_order)
    sale_order.execute("INSERT INTO sale_order VALUES (1, 'x', 1)")
    assert outbox_rows(sale_order) == []
    assert drop_capture(sale_order, "sale_order") is False


# -- status --------------------------------------------------------------------------------------


def test_status_when_not_installed(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as c:
        st = outbox_status(c, SCHEMA)
    assert st.installed_version is None
    assert st.backlog_rows == 0
    assert st.oldest_unpublished_age_s is None
    assert st.shards == []


def test_status_backlog_and_oldest_age(conn: psycopg.Connection[Any]) -> None:
    st = outbox_status(conn, SCHEMA)
    assert st.installed_version == migrations()[-1].version
    assert st.backlog_rows == 0
    assert st.oldest_unpublished_age_s is None
    sql_emit(conn, "SO-1")
    time.sleep(0.3)
    sql_emit(conn, "SO-2")
    sql_emit(conn, "SO-1")
    st = outbox_status(conn, SCHEMA)
    assert st.backlog_rows == 3
    assert st.oldest_unpublished_age_s is not None
    assert 0.3 <= st.oldest_unpublished_age_s < 30
    assert st.shards == []
    js = st.as_json()
    assert js["backlog_rows"] == 3
    assert js["installed_version"] == migrations()[-1].version


def test_status_reports_relay_shards(conn: psycopg.Connection[Any]) -> None:
    conn.execute(
        "INSERT INTO pipeline.relay_state (shard, leader, since, last_publish, published, "
        "dead_lettered, heartbeat) VALUES (0, 'host:1', now() - interval '1 hour', now(), 12, 1, "
        "now() - interval '5 seconds')"
    )
    st = outbox_status(conn, SCHEMA)
    (s,) = st.shards
    assert (s.shard, s.leader, s.published, s.dead_lettered) == (0, "host:1", 12, 1)
    assert 4 < s.heartbeat_age_s < 60
    js = st.as_json()
    assert isinstance(js["shards"][0]["since"], str)


# -- emit() --------------------------------------------------------------------------------------


def test_emit_helper_validates_and_inserts(url: str, catalogue: Catalogue) -> None:
    rng = random.Random(5)
    with psycopg.connect(url) as c:
        p = payload_for("order.created", rng, aggregate_id="SO-000005", now=NOW)
        assert emit(c, "order", "SO-000005", "order.created", p,
                    headers={"x-tenant": "acme"}, catalogue=catalogue) == 1
        assert emit(c, "order", "SO-000005", "order.created", p) == 2
        c.commit()
        rows = outbox_rows(c)
    assert [(r[1], r[2], r[3]) for r in rows] == [("SO-000005", 1, "order.created"),
                                                 ("SO-000005", 2, "order.created")]
    assert rows[0][4] == p
    assert rows[0][5]["x-tenant"] == "acme"


def test_emit_with_invalid_payload_raises_and_inserts_nothing(url: str,
                                                              catalogue: Catalogue) -> None:
    p = payload_for("order.created", random.Random(1), aggregate_id="SO-000001", now=NOW)
    p["lines"][0]["qty"] = "three"
    with psycopg.connect(url) as c:
        with pytest.raises(PayloadError) as ei:
            emit(c, "order", "SO-000001", "order.created", p, catalogue=catalogue)
        assert ei.value.path == "lines[0].qty"
        assert "lines[0].qty: expected an integer" in str(ei.value)
        with pytest.raises(SchemaError, match=r"unknown event type 'order\.nope'"):
            emit(c, "order", "SO-000001", "order.nope", {})
        c.commit()
        assert count(c, "outbox") == 0
        assert count(c, "aggregate_versions") == 0
