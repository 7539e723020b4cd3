"""Realistic ERP event payloads in *JSON form*, as an ERP writes them into a jsonb outbox column.

One pure function, :func:`payload_for`, builds the payload of any business event type of the
catalogue (``schemas/<event_type>/v<N>.avsc``).  The JSON form maps Avro types as follows:

* ``decimal`` (money)        -> string with exactly two decimals, e.g. ``"12.50"``
* ``timestamp-micros``       -> ISO-8601 string with microseconds and offset,
  e.g. ``"2026-11-27T07:15:00.123456+00:00"``
* ``date``                   -> ``"YYYY-MM-DD"``
* enum                       -> the symbol string
* optional (``["null", T]``) -> ``None`` or the JSON form of ``T``

``aggregate_id`` is the Kafka key of the event: the customer id (``"CUST-1001"``) for
``customer.upserted`` and the order id (``"SO-000123"``) for every other event type, so that all
events of one order land on the same partition in order.  The order's content (customer,
currency, lines, total) is derived deterministically from the order id, which keeps the
``order.created``, ``inventory.*``, ``payment.completed``, ``invoice.issued`` and
``shipment.created`` payloads of one order mutually consistent; ``rng`` drives everything else.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

__all__ = ["EVENT_TYPES", "ORDER_STATUSES", "PAYMENT_METHODS", "payload_for"]

EVENT_TYPES: tuple[str, ...] = (
    "customer.upserted",
    "order.created",
    "order.status_changed",
    "order.cancelled",
    "inventory.reserved",
    "inventory.released",
    "payment.completed",
    "invoice.issued",
    "shipment.created",
)

ORDER_STATUSES: tuple[str, ...] = (
    "DRAFT",
    "CONFIRMED",
    "PICKING",
    "SHIPPED",
    "DELIVERED",
    "CANCELLED",
)
PAYMENT_METHODS: tuple[str, ...] = ("CARD", "BANK_TRANSFER", "DIRECT_DEBIT", "PAYPAL", "CASH")

_CENT = Decimal("0.01")
_VAT_RATE = Decimal("0.19")

# Forward transitions of the order lifecycle (cancellation is its own event type).
_TRANSITIONS: tuple[tuple[str, str], ...] = (
    ("DRAFT", "CONFIRMED"),
    ("CONFIRMED", "PICKING"),
    ("PICKING", "SHIPPED"),
    ("SHIPPED", "DELIVERED"),
    ("CONFIRMED", "CANCELLED"),
)

_CATALOGUE: tuple[tuple[str, str], ...] = (
    ("A-01", "12.50"),
    ("A-02", "4.99"),
    ("A-17", "129.00"),
    ("B-03", "7.25"),
    ("B-11", "24.90"),
    ("C-05", "89.95"),
    ("C-08", "2.40"),
    ("D-20", "349.00"),
    ("E-42", "15.75"),
    ("F-09", "59.00"),
)
_CURRENCIES: tuple[tuple[str, str], ...] = (  # (currency, country)
    ("EUR", "DE"),
    ("EUR", "FR"),
    ("EUR", "NL"),
    ("EUR", "AT"),
    ("GBP", "GB"),
    ("CHF", "CH"),
    ("USD", "US"),
    ("SEK", "SE"),
)
_COMPANY_WORDS = (
    ("Nord", "Alpen", "Rhein", "Baltic", "Atlas", "Meridian", "Kestrel", "Lindqvist", "Orion"),
    ("Handel", "Logistics", "Components", "Werkzeuge", "Supply", "Trading", "Industrie"),
    ("GmbH", "AG", "Ltd", "SAS", "BV", "AB", "Inc"),
)
_NOTES = (
    "Deliver to loading dock B",
    "Call before delivery",
    "Partial delivery accepted",
    "Urgent - customer line down",
    "Use PO 4711 on invoice",
)
_CANCEL_REASONS = (
    "customer request",
    "payment failed",
    "out of stock",
    "duplicate order",
    "credit limit exceeded",
)
_WAREHOUSES = ("WH-BER", "WH-HAM", "WH-MUC", "WH-RTM")
_CARRIERS = ("DHL", "UPS", "DPD", "GLS", "FEDEX")


@dataclass(frozen=True)
class _Line:
    line_no: int
    sku: str
    qty: int
    unit_price: Decimal


@dataclass(frozen=True)
class _Order:
    order_id: str
    customer: str
    currency: str
    lines: tuple[_Line, ...]

    @property
    def number(self) -> str:
        """The numeric/opaque part of the order id, reused for derived document ids."""
        return self.order_id.split("-", 1)[-1]

    @property
    def total(self) -> Decimal:
        return sum((line.unit_price * line.qty for line in self.lines), Decimal("0.00"))


def _money(value: Decimal) -> str:
    return str(value.quantize(_CENT, rounding=ROUND_HALF_UP))


def _ts(moment: datetime) -> str:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


def _date(day: date) -> str:
    return day.isoformat()


def _order(order_id: str) -> _Order:
    """Deterministic order content for ``order_id`` (stable across processes and runs)."""
    r = random.Random(f"order:{order_id}")
    customer = f"CUST-{r.randint(1001, 1999)}"
    currency, _country = _customer_profile(customer)
    n_lines = r.choices((1, 2, 3, 4, 5), weights=(15, 25, 35, 15, 10))[0]
    articles = r.sample(_CATALOGUE, n_lines)
    lines = tuple(
        _Line(line_no=i, sku=sku, qty=r.choice((1, 1, 2, 3, 5, 10, 12)), unit_price=Decimal(p))
        for i, (sku, p) in enumerate(articles, start=1)
    )
    return _Order(order_id=order_id, customer=customer, currency=currency, lines=lines)


def _customer_profile(customer_id: str) -> tuple[str, str]:
    """Deterministic (currency, country) of a customer, shared by all its orders."""
    return random.Random(f"customer:{customer_id}").choice(_CURRENCIES)


def _customer_upserted(rng: random.Random, customer_id: str, now: datetime) -> dict[str, Any]:
    currency, country = _customer_profile(customer_id)
    r = random.Random(f"customer-name:{customer_id}")
    name = " ".join(r.choice(words) for words in _COMPANY_WORDS)
    domain = name.split()[0].lower()
    email = f"orders@{domain}.example" if rng.random() < 0.8 else None
    credit = Decimal(rng.choice((5_000, 10_000, 25_000, 50_000, 100_000)))
    return {
        "customer_id": customer_id,
        "name": name,
        "email": email,
        "country": country,
        "credit_limit": _money(credit) if rng.random() < 0.7 else None,
        "currency": currency,
        "updated_at": _ts(now),
    }


def _order_created(rng: random.Random, order: _Order, now: datetime) -> dict[str, Any]:
    return {
        "order_id": order.order_id,
        "customer": order.customer,
        "lines": [
            {
                "line_no": line.line_no,
                "sku": line.sku,
                "qty": line.qty,
                "unit_price": _money(line.unit_price),
            }
            for line in order.lines
        ],
        "currency": order.currency,
        "total": _money(order.total),
        "created_at": _ts(now),
        "note": rng.choice(_NOTES) if rng.random() < 0.2 else None,
    }


def _order_status_changed(rng: random.Random, order: _Order, now: datetime) -> dict[str, Any]:
    from_status, to_status = rng.choice(_TRANSITIONS)
    return {
        "order_id": order.order_id,
        "from_status": from_status,
        "to_status": to_status,
        "changed_at": _ts(now),
    }


def _order_cancelled(rng: random.Random, order: _Order, now: datetime) -> dict[str, Any]:
    return {
        "order_id": order.order_id,
        "reason": rng.choice(_CANCEL_REASONS),
        "cancelled_at": _ts(now),
    }


def _inventory(rng: random.Random, order: _Order, now: datetime) -> dict[str, Any]:
    line = rng.choice(order.lines)
    warehouse = random.Random(f"warehouse:{order.order_id}").choice(_WAREHOUSES)
    return {
        "reservation_id": f"RES-{order.number}-{line.line_no}",
        "order_id": order.order_id,
        "sku": line.sku,
        "qty": line.qty,
        "warehouse": warehouse,
        "at": _ts(now),
    }


def _payment_completed(rng: random.Random, order: _Order, now: datetime) -> dict[str, Any]:
    return {
        "payment_id": f"PAY-{order.number}",
        "order_id": order.order_id,
        "amount": _money(order.total),
        "currency": order.currency,
        "method": rng.choices(PAYMENT_METHODS, weights=(40, 30, 15, 12, 3))[0],
        "completed_at": _ts(now),
    }


def _invoice_issued(rng: random.Random, order: _Order, now: datetime) -> dict[str, Any]:
    gross = order.total
    tax = gross - (gross / (1 + _VAT_RATE)).quantize(_CENT, rounding=ROUND_HALF_UP)
    issued = now if now.tzinfo is not None else now.replace(tzinfo=UTC)
    due = issued.astimezone(UTC).date() + timedelta(days=rng.choice((14, 30, 30, 60)))
    return {
        "invoice_id": f"INV-{order.number}",
        "order_id": order.order_id,
        "customer": order.customer,
        "amount": _money(gross),
        "tax": _money(tax),
        "currency": order.currency,
        "issued_at": _ts(now),
        "due_date": _date(due),
    }


def _shipment_created(rng: random.Random, order: _Order, now: datetime) -> dict[str, Any]:
    carrier = rng.choice(_CARRIERS)
    tracking = f"{carrier[:2]}{rng.randrange(10**11, 10**12)}"
    return {
        "shipment_id": f"SHP-{order.number}",
        "order_id": order.order_id,
        "carrier": carrier,
        "tracking_number": tracking,
        "lines": [{"sku": line.sku, "qty": line.qty} for line in order.lines],
        "shipped_at": _ts(now),
    }


_OrderBuilder = Callable[[random.Random, _Order, datetime], dict[str, Any]]

_ORDER_BUILDERS: dict[str, _OrderBuilder] = {
    "order.created": _order_created,
    "order.status_changed": _order_status_changed,
    "order.cancelled": _order_cancelled,
    "inventory.reserved": _inventory,
    "inventory.released": _inventory,
    "payment.completed": _payment_completed,
    "invoice.issued": _invoice_issued,
    "shipment.created": _shipment_created,
}


def payload_for(
    event_type: str, rng: random.Random, *, aggregate_id: str, now: datetime
) -> dict[str, Any]:
    """Build the JSON-form payload of one ``event_type`` event.

    ``aggregate_id`` is the customer id for ``customer.upserted`` and the order id for all other
    event types; ``now`` becomes the event's timestamp (naive datetimes are taken as UTC).
    Raises ``ValueError`` for an event type outside :data:`EVENT_TYPES`.
    """
    if event_type == "customer.upserted":
        return _customer_upserted(rng, aggregate_id, now)
    builder = _ORDER_BUILDERS.get(event_type)
    if builder is None:
        raise ValueError(f"unknown event type {event_type!r}; expected one of {EVENT_TYPES}")
    return builder(rng, _order(aggregate_id), now)
