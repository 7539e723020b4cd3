"""No poison row stalls the relay: random rows written straight into the outbox table (as an
ERP's own SQL might), good ones among them, on a real PostgreSQL and a real broker. Every good
row is published, in order per aggregate; every other row reaches the outbox DLQ with its
payload exactly as PostgreSQL stored it and a reason; nothing is left behind.

And exact values end to end: money, big integers, tiny and huge numerics written by the ERP
are what a consumer decodes (typed events) or reads from the row image (captured rows)."""

from __future__ import annotations

import datetime as dt
import decimal
import json
import random
import uuid
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline import exactjson
from pipeline.config import Settings
from pipeline.relay.relay import Relay
from pipeline.schemas.catalogue import Catalogue
from pipeline.schemas.codec import Decoder
from tests.fixtures.relay import _url
from tests.integration.test_relay_bad_rows import drain, good_payload

pytestmark = pytest.mark.integration


def _junk(rng: random.Random) -> str:
    """A payload text PostgreSQL accepts as jsonb but that is no valid order.created."""
    kind = rng.randrange(9)
    if kind == 0:
        return rng.choice(["1e400", "-1e400", "1e-400", "18446744073709551617" * 3])
    if kind == 1:
        depth = rng.choice([50, 500, 5000])
        return "[" * depth + "1" + "]" * depth
    if kind == 2:
        return json.dumps(list(range(rng.choice([10_000, 100_000]))))
    if kind == 3:  # unusual Unicode: astral planes, combining marks, RTL, BOM, controls
        s = "".join(chr(rng.choice([0x1F600, 0x0301, 0x202E, 0xFEFF, 0x7, 0x10FFFF, 0xE000]))
                    for _ in range(50))
        return json.dumps({"order_id": s, "weird": s})
    if kind == 4:  # the right shape, wrong types
        p = good_payload("SO-X", rng.randrange(1000))
        p[rng.choice(list(p))] = rng.choice([[1, 2], {"a": 1}, True, 1e300, None, "x"])
        return json.dumps(p, default=str)
    if kind == 5:
        return rng.choice(['"just a string"', "42", "null", "[]", "true"])
    if kind == 6:  # money that does not fit decimal(18,2)
        p = good_payload("SO-X", rng.randrange(1000))
        p["total"] = "REPLACE"
        return json.dumps(p, default=str).replace('"REPLACE"', "99999999999999999999.999")
    if kind == 7:
        return json.dumps({"k" * 1000: "v" * 10_000})
    return json.dumps({"nested": {"deeper": [{"x": decimal.Decimal("1.5")}] * 3}}, default=str)


def _insert(conn: psycopg.Connection[Any], agg: str, event_type: str, payload_text: str
            ) -> tuple[int, str]:
    eid = str(uuid.uuid4())
    row = conn.execute(
        "SELECT pipeline.outbox_emit('order', %s, %s, %s::jsonb, '{}'::jsonb, %s::uuid)",
        (agg, event_type, payload_text, eid)).fetchone()
    assert row is not None
    got = conn.execute("SELECT id, payload::text FROM pipeline.outbox WHERE event_id = %s",
                       (eid,)).fetchone()
    assert got is not None
    return int(got[0]), str(got[1])


@pytest.mark.parametrize("seed", [1, 2])
def test_random_rows_never_stall_the_relay_and_every_good_one_is_published_in_order(
        installed: Settings, read_topic: Any, seed: int) -> None:
    rng = random.Random(seed)
    url = _url(installed)
    good: dict[str, list[int]] = {}  # aggregate → outbox ids, in order
    bad: dict[int, str] = {}  # outbox id → the payload text PostgreSQL stored
    with psycopg.connect(url, autocommit=True) as conn:
        for i in range(120):
            agg = f"SO-{rng.randrange(8)}"
            if rng.random() < 0.5:
                payload = good_payload(agg, i)
                rid, _ = _insert(conn, agg, "order.created", json.dumps(payload, default=str))
                good.setdefault(agg, []).append(rid)
            else:
                try:
                    rid, stored = _insert(conn, agg, "order.created", _junk(rng))
                except psycopg.Error:
                    continue  # PostgreSQL itself refused it: never in the outbox
                bad[rid] = stored
    assert len(bad) > 30 and sum(map(len, good.values())) > 30

    relay = Relay(installed)
    drain(relay)
    assert relay.stats.published == sum(map(len, good.values()))
    assert relay.stats.dead_lettered == len(bad)
    with psycopg.connect(url) as conn:
        left = conn.execute("SELECT count(*) FROM pipeline.outbox").fetchone()
    assert left == (0,), "rows left behind in the outbox"

    events = read_topic(f"{installed.topics.prefix}.order",
                        expect=sum(map(len, good.values())))
    by_agg: dict[str, list[int]] = {}
    for r in sorted(events, key=lambda r: (r.partition, r.offset)):
        by_agg.setdefault(r.key.decode(), []).append(int(r.headers["erp_outbox_position"]))
    assert by_agg == good  # each aggregate's events in outbox order

    dlq = read_topic(installed.topics.outbox_dlq, expect=len(bad))
    assert sorted(int(r.headers["erp_outbox_position"]) for r in dlq) == sorted(bad)
    for r in dlq:
        rid = int(r.headers["erp_outbox_position"])
        assert r.headers["erp_error_message"], rid
        stored = r.value.decode()
        if '"payload_claim_check"' not in stored:  # inline (claim checks: test_relay_bad_rows)
            # the payload text, byte for byte as PostgreSQL stored it
            assert f'"payload":{bad[rid]}}}' in stored, rid


def test_money_and_big_numbers_arrive_exact_through_a_typed_event(
        installed: Settings, read_topic: Any) -> None:
    url = _url(installed)
    amounts = ["99999999999999.99", "140.00", "0.01", "-0.10", "1234567890123456.78"]
    with psycopg.connect(url, autocommit=True) as conn:
        for i, a in enumerate(amounts):
            p = good_payload(f"SO-{i}", i)
            text = json.dumps(p, default=str)
            text = text.replace(json.dumps(p["total"], default=str), a)
            _insert(conn, f"SO-{i}", "order.created", text)
    relay = Relay(installed)
    drain(relay)
    events = read_topic(f"{installed.topics.prefix}.order", expect=len(amounts))
    dec = Decoder(Catalogue.load())
    got = {r.key.decode(): dec.decode(r.value).value["total"] for r in events}
    assert {k: str(v) for k, v in got.items()} == {f"SO-{i}": a for i, a in enumerate(amounts)}


def test_captured_numerics_keep_every_digit_in_the_row_image(
        installed: Settings, read_topic: Any) -> None:
    from pipeline.outbox.capture import CaptureSpec, install_capture

    url = _url(installed)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE sale_order (id int PRIMARY KEY, amount_total numeric(16,2),"
                     " qty numeric, big numeric, f double precision, n bigint)")
        install_capture(conn, CaptureSpec("public.sale_order", "order", ("id",)), "pipeline",
                        Catalogue.load())
        conn.execute("INSERT INTO sale_order VALUES (1, 99999999999999.99, 140.00, "
                     "18446744073709551617, 0.1, 9223372036854775807)")
        conn.execute("INSERT INTO sale_order VALUES (2, 0.01, 1e-30, 1e400, 1e308, -1)")
        want = {r[0]: r[1] for r in conn.execute(
            "SELECT id::text, to_jsonb(s)::text FROM sale_order s")}
    relay = Relay(installed)
    drain(relay)
    events = read_topic(f"{installed.topics.prefix}.order", expect=2)
    dec = Decoder(Catalogue.load())
    for r in events:
        body = dec.decode(r.value).value
        row, stored = exactjson.loads(body["row"]), exactjson.loads(want[body["key"]])
        assert row == stored, body["key"]
        # as PostgreSQL wrote them: 99999999999999.99, 140.00, 1e400's 401 digits …
        assert {k: str(v) for k, v in row.items()} == {k: str(v) for k, v in stored.items()}


# -- property: what the ERP wrote is what a consumer reads -----------------------------------
_numeric = st.decimals(allow_nan=False, allow_infinity=False, places=None).filter(
    lambda d: abs(d.adjusted()) < 120)
_erp_row = st.tuples(
    _numeric,
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False, width=64),
    st.datetimes(min_value=dt.datetime(1, 1, 2), max_value=dt.datetime(9999, 12, 30),
                 timezones=st.just(dt.UTC)),
    st.dates(),
    st.binary(max_size=64),
    st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-(10**20), 10**20),
                           _numeric, st.text(alphabet=st.characters(blacklist_categories=(
                               "Cs",), blacklist_characters="\x00"), max_size=10)),
                 lambda k: st.lists(k, max_size=3) | st.dictionaries(
                     st.text(alphabet="abcxyz", max_size=4), k, max_size=3), max_leaves=8),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
            max_size=40),
)


@settings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(_erp_row, min_size=1, max_size=15))
def test_property_captured_rows_reach_the_consumer_as_postgresql_stored_them(
        installed: Settings, read_topic: Any, rows: list[tuple[Any, ...]]) -> None:
    from pipeline.outbox.capture import CaptureSpec, install_capture

    url = _url(installed)
    table = f"erp_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, n numeric, b bigint, "
                     "f double precision, t timestamptz, d date, raw bytea, j jsonb, s text)")
        install_capture(conn, CaptureSpec(table, "order"), "pipeline", Catalogue.load())
        for i, r in enumerate(rows):
            conn.execute(f"INSERT INTO {table} VALUES (%s, %s, %s, %s, %s, %s, %s, %s::jsonb, "
                         "%s)", (i, *r[:6], exactjson.dumps(r[6]), r[7]))
        stored = {str(i): exactjson.loads(t) for i, t in conn.execute(
            f"SELECT id, to_jsonb(x)::text FROM {table} x")}
    before = len(read_topic(f"{installed.topics.prefix}.order"))
    drain(Relay(installed))
    events = read_topic(f"{installed.topics.prefix}.order", expect=before + len(rows))
    dec = Decoder(Catalogue.load())
    got = {}
    for r in events:
        body = dec.decode(r.value).value
        if body["table"].endswith(table):
            got[body["key"]] = exactjson.loads(body["row"])
    for key, want in stored.items():
        row = got[key]
        import base64

        raw = bytes.fromhex(want.pop("raw")[2:]) if want.get("raw") else None
        assert (base64.b64decode(row.pop("raw")) if row.get("raw") is not None else None) == raw
        assert row == want, key  # numerics, bigints, floats, times, json, text: as stored
