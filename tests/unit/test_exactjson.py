"""Exact JSON (pipeline/exactjson.py) and the relay's reading of stored outbox rows: no number
passes through a binary float between the outbox's jsonb text and the Avro record."""

from __future__ import annotations

import decimal
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import exactjson
from pipeline.errors import PayloadError
from pipeline.relay.envelope import OutboxRow, build_record, dead_letter_record, row_json
from pipeline.schemas.catalogue import Catalogue
from pipeline.schemas.codec import Decoder, Encoder, row_change_payload

CAT = Catalogue.load()

# numbers as an ERP writes them into jsonb: numeric text of any size and scale
_digits = st.text("0123456789", min_size=1, max_size=40).map(lambda s: s.lstrip("0") or "0")
number_text = st.builds(
    lambda sign, whole, frac, exp: f"{sign}{whole}{'.' + frac if frac else ''}{exp}",
    st.sampled_from(["", "-"]),
    _digits,
    st.one_of(st.just(""), st.text("0123456789", min_size=1, max_size=30)),
    st.one_of(st.just(""), st.integers(-500, 500).map(lambda e: f"e{e}")),
)


@given(number_text)
def test_every_number_text_reads_and_writes_back_to_the_same_value(text: str) -> None:
    got = exactjson.loads(text)
    assert not isinstance(got, float)
    if "." in text or "e" in text:
        assert got == decimal.Decimal(text) and str(got) == str(decimal.Decimal(text))
    else:
        assert got == int(text)
    again = exactjson.loads(exactjson.dumps(got))
    assert again == got
    if isinstance(got, decimal.Decimal) and ("." in str(got) or "E" in str(got)):
        assert str(again) == str(got)  # 140.00 stays 140.00, 1E+400 stays 1E+400


@pytest.mark.parametrize(("text", "want"), [
    ("99999999999999.99", "99999999999999.99"),
    ("140.00", "140.00"),
    ("18446744073709551617", "18446744073709551617"),
    ("1e400", "1E+400"),
    ("-0.000000000000000000000000001", "-1E-27"),
])
def test_the_values_floats_lose_are_kept(text: str, want: str) -> None:
    assert str(exactjson.loads(text)) == want
    assert json.loads(text) != exactjson.loads(text) or "e" not in text  # floats did lose them


json_value = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(10**30), 10**30),
              number_text.map(decimal.Decimal), st.text()),
    lambda kids: st.one_of(st.lists(kids, max_size=5),
                           st.dictionaries(st.text(max_size=8), kids, max_size=5)),
    max_leaves=25,
)


@given(json_value)
def test_documents_round_trip_exactly(doc: object) -> None:
    text = exactjson.dumps(doc)
    assert exactjson.loads(text) == doc
    assert json.loads(text, parse_float=decimal.Decimal) == doc  # standard JSON, too


@pytest.mark.parametrize("bad", ["NaN", "Infinity", "[1,", "{\"a\": }", "[" * 100_000,
                                 b"\xff\xfe"])
def test_unreadable_text_is_a_json_error_never_a_crash(bad: str | bytes) -> None:
    with pytest.raises(exactjson.JsonError):
        exactjson.loads(bad)


# -- the relay's rows ----------------------------------------------------------------------------
def _row(payload_text: str, event_type: str = "order.created", headers: str = "{}") -> OutboxRow:
    return OutboxRow.from_stored(7, "0b1d2c3e-0000-4000-8000-000000000007", "order", "SO-1", 1,
                                 event_type, payload_text, headers,
                                 "2026-12-01T10:00:00+00:00")


def _order(total: str) -> str:
    return (
        '{"order_id": "SO-1", "customer": "C-1", "currency": "EUR",'
        ' "created_at": "2026-12-01T10:00:00+00:00", "total": ' + total + ', "lines": []}'
    )


def test_a_stored_decimal_reaches_the_consumer_with_every_digit() -> None:
    enc = Encoder(CAT)
    sv = CAT.writer("order.created")
    fields = {f["name"]: f for f in sv.parsed["fields"]}
    assert "total" in fields, "order.created has a total"
    row = _row(_order("99999999.99"))
    rec = build_record(row, enc, topic="erp.order", source="/erp", max_inline_bytes=1 << 20,
                       max_payload_bytes=1 << 24)
    got = Decoder(CAT).decode(rec.value).value  # type: ignore[union-attr]
    assert got["total"] == decimal.Decimal("99999999.99")
    assert str(got["total"]) == "99999999.99"


def test_a_decimal_over_its_precision_names_the_field_and_the_dlq_keeps_the_text() -> None:
    row = _row(_order("9999999999999999999999.99"))
    with pytest.raises(PayloadError, match="total"):
        build_record(row, Encoder(CAT), topic="erp.order", source="/erp",
                     max_inline_bytes=1 << 20, max_payload_bytes=1 << 24)
    rec, _claim = dead_letter_record(row, PayloadError("x", event_type="order.created"),
                                     topic="erp.outbox.dlq", source="/erp",
                                     max_inline_bytes=1 << 20)
    assert b'"total": 9999999999999999999999.99' in rec.value  # as stored, not 1e+22


def test_an_unreadable_stored_payload_is_dead_lettered_with_its_text() -> None:
    row = _row("[" * 100_000 + "]" * 100_000)  # deeper than any parser's stack
    assert row.unreadable and "nested too deeply" in row.unreadable
    with pytest.raises(PayloadError, match=r"outbox row 7 .*cannot be read"):
        build_record(row, Encoder(CAT), topic="erp.order", source="/erp",
                     max_inline_bytes=1 << 30, max_payload_bytes=1 << 30)
    assert row_json(row).endswith('"payload":' + row.payload_text + "}")  # type: ignore[operator]


def test_row_change_images_keep_numerics_as_written() -> None:
    payload = exactjson.loads(
        '{"table": "public.sale_order", "operation": "UPDATE", "key": "7",'
        ' "row": {"id": 7, "amount_total": 99999999999999.99, "qty": 140.00,'
        ' "big": 18446744073709551617, "tiny": 1e-30},'
        ' "old_row": {"id": 7, "amount_total": 1e400}}')
    out = row_change_payload(payload, "sale_order.updated")
    assert out["row"] == ('{"id":7,"amount_total":99999999999999.99,"qty":140.00,'
                          '"big":18446744073709551617,"tiny":1E-30}')
    assert out["old_row"] == '{"id":7,"amount_total":1E+400}'


@settings(max_examples=200)
@given(st.decimals(allow_nan=False, allow_infinity=False, places=2,
                   min_value=decimal.Decimal("-9999999999999999.99"),
                   max_value=decimal.Decimal("9999999999999999.99")))
def test_any_money_amount_of_the_schema_s_precision_arrives_exact(amount: decimal.Decimal
                                                                   ) -> None:
    sv = CAT.writer("order.created")
    total = next(f for f in sv.parsed["fields"] if f["name"] == "total")
    precision = total["type"]["precision"]
    if len(amount.as_tuple().digits) > precision:
        return
    row = _row(_order(str(amount)))
    rec = build_record(row, Encoder(CAT), topic="erp.order", source="/erp",
                       max_inline_bytes=1 << 20, max_payload_bytes=1 << 24)
    got = Decoder(CAT).decode(rec.value).value  # type: ignore[union-attr]
    assert got["total"] == amount
