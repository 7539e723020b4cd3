"""A reference CRM: contacts with a timeline of activities (orders, payments, invoices) and
running totals kept server-side, behind the careful REST conventions of
:mod:`connectors.reference.server` (idempotency keys, version guard, validation details, fault
injection). The API is described in ``connectors/crm/openapi.yaml``.

Run it with ``python -m connectors.crm.server --port 8802``.

Rules a careful CRM keeps:

* ``PUT /contacts/{id}`` carries the ERP aggregate ``version``; one not newer than the contact's
  is ``409 stale_version``. A contact is created by its first PUT or its first activity (then
  without a name until the PUT arrives).
* Activities are identified by ``activity_id``: the same activity again is answered ``200`` with
  the stored one and counted once; different content under that id is ``409 activity_conflict``.
* A ``payment_completed`` without ``customer_id`` is filed under the customer of the order's
  ``order_created`` activity; before that activity is known it is ``409 unknown_order`` (not
  stored under the idempotency key: the caller retries later).
* Totals: ``lifetime_value`` (payments), ``invoiced`` (invoices), ``open_orders`` (orders),
  ``activity_count``; money as decimal strings with two places, in the contact's ``currency``
  (the first activity's): another currency is refused (``422``).
"""

from __future__ import annotations

import copy
import datetime as dt
import sys
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation
from typing import Any, ClassVar

from connectors.reference.server import (
    ApiError,
    Handler,
    ReferenceServer,
    Request,
    Response,
    Validator,
    not_found,
    run_cli,
)

ACTIVITY_KINDS = ("order_created", "payment_completed", "invoice_issued")
NEEDS_CUSTOMER = frozenset({"order_created", "invoice_issued"})
CENT = Decimal("0.01")
_ID = 200
_AMOUNT = r"-?[0-9]{1,16}(\.[0-9]{1,8})?"


def money(value: Decimal) -> str:
    return str(value.quantize(CENT))


class CrmServer(ReferenceServer):
    """The reference CRM. State: ``contacts`` and ``activities`` (by id)."""

    name: ClassVar[str] = "crm"
    extra_stats: ClassVar[tuple[str, ...]] = ("unknown_order",)

    def routes(self) -> list[tuple[str, str, Handler]]:
        return [
            ("PUT", "/contacts/{customer_id}", self.put_contact),
            ("GET", "/contacts", self.list_contacts),
            ("GET", "/contacts/{customer_id}", self.get_contact),
            ("POST", "/activities", self.create_activity),
            ("GET", "/activities", self.list_activities),
            ("GET", "/activities/{activity_id}", self.get_activity),
        ]

    def reset_state(self) -> None:
        self.contacts: dict[str, dict[str, Any]] = {}
        self.activities: dict[str, dict[str, Any]] = {}
        self.order_customer: dict[str, str] = {}  # order_id → customer_id (order_created)

    # -- contacts -------------------------------------------------------------------------

    def _contact(self, customer_id: str) -> dict[str, Any]:
        contact = self.contacts.get(customer_id)
        if contact is None:
            contact = {
                "customer_id": customer_id, "name": None, "email": None, "country": None,
                "version": None, "currency": None,
                "_lifetime_value": Decimal(0), "_invoiced": Decimal(0), "_orders": set(),
                "activity_count": 0, "timeline": [],
            }
            self.contacts[customer_id] = contact
        return contact

    @staticmethod
    def _view(contact: dict[str, Any]) -> dict[str, Any]:
        return {
            "customer_id": contact["customer_id"], "name": contact["name"],
            "email": contact["email"], "country": contact["country"],
            "version": contact["version"], "currency": contact["currency"],
            "lifetime_value": money(contact["_lifetime_value"]),
            "open_orders": len(contact["_orders"]),
            "invoiced": money(contact["_invoiced"]),
            "activity_count": contact["activity_count"],
            "timeline": copy.deepcopy(contact["timeline"]),
        }

    def put_contact(self, req: Request) -> Response:
        data = req.json_object()
        customer_id = req.params["customer_id"]
        v = Validator()
        if len(customer_id) > _ID:
            v.error("customer_id", f"must be at most {_ID} characters")
        name = v.string(data, "name", max_length=500)
        email = v.string(data, "email", required=False, nullable=True, max_length=320,
                         pattern=r"[^@\s]+@[^@\s]+",
                         pattern_message="must be an e-mail address or null")
        country = v.string(data, "country", pattern="[A-Z]{2}",
                           pattern_message="must be an ISO 3166-1 alpha-2 code, e.g. DE")
        version = v.version(data)
        v.check()
        assert version is not None
        existing = self.contacts.get(customer_id)
        self.check_version(existing["version"] if existing else None, version)
        contact = self._contact(customer_id)
        contact.update(name=name, email=email, country=country, version=version)
        return Response(200, self._view(contact))

    def list_contacts(self, req: Request) -> Response:
        return Response(200, {"items": [self._view(c) for c in self.contacts.values()]})

    def get_contact(self, req: Request) -> Response:
        contact = self.contacts.get(req.params["customer_id"])
        if contact is None:
            raise not_found()
        return Response(200, self._view(contact))

    # -- activities -----------------------------------------------------------------------

    def create_activity(self, req: Request) -> Response:
        data = req.json_object()
        v = Validator()
        activity_id = v.string(data, "activity_id", max_length=_ID)
        kind = v.choice(data, "kind", ACTIVITY_KINDS)
        order_id = v.string(data, "order_id", max_length=_ID)
        customer_id = v.string(data, "customer_id", max_length=_ID,
                               required=kind in NEEDS_CUSTOMER,
                               nullable=kind not in NEEDS_CUSTOMER)
        amount = self._amount(v, data)
        currency = v.string(data, "currency", pattern="[A-Z]{3}",
                            pattern_message="must be an ISO 4217 code, e.g. EUR")
        occurred_at = v.string(data, "occurred_at", max_length=64)
        if occurred_at is not None:
            try:
                dt.datetime.fromisoformat(occurred_at)
            except ValueError:
                v.error("occurred_at", "must be an ISO-8601 timestamp")
        v.check()
        assert activity_id is not None and kind is not None and order_id is not None
        assert amount is not None

        content = {"kind": kind, "order_id": order_id, "amount": money(amount),
                   "currency": currency, "occurred_at": occurred_at}
        stored = self.activities.get(activity_id)
        if stored is not None:
            same = all(stored[k] == value for k, value in content.items())
            if customer_id is not None and stored["customer_id"] != customer_id:
                same = False
            if not same:
                raise ApiError(409, {"error": "activity_conflict", "activity_id": activity_id,
                                     "message": "activity_id holds a different activity"})
            return Response(200, copy.deepcopy(stored), applied=False)

        if customer_id is None:  # payment_completed: the customer of the order
            customer_id = self.order_customer.get(order_id)
            if customer_id is None:
                raise ApiError(409, {"error": "unknown_order", "order_id": order_id},
                               counter="unknown_order")
        if kind == "order_created":
            known = self.order_customer.get(order_id)
            if known is not None and known != customer_id:
                raise ApiError(409, {"error": "conflict", "order_id": order_id,
                                     "message": f"order belongs to customer {known}"})
        contact = self.contacts.get(customer_id)
        if contact is not None and contact["currency"] not in (None, currency):
            v.error("currency", f"contact totals are kept in {contact['currency']}")
            v.check()

        contact = self._contact(customer_id)
        activity = {"activity_id": activity_id, "customer_id": customer_id, **content}
        self.activities[activity_id] = activity
        contact["currency"] = currency
        contact["activity_count"] += 1
        contact["timeline"].append(copy.deepcopy(activity))
        if kind == "order_created":
            self.order_customer[order_id] = customer_id
            contact["_orders"].add(order_id)
        elif kind == "payment_completed":
            contact["_lifetime_value"] += amount
        else:
            contact["_invoiced"] += amount
        return Response(201, copy.deepcopy(activity),
                        {"Location": f"/activities/{activity_id}"})

    @staticmethod
    def _amount(v: Validator, data: dict[str, Any]) -> Decimal | None:
        text = v.string(data, "amount", max_length=32, pattern=_AMOUNT,
                        pattern_message='must be a decimal string, e.g. "12.50"')
        if text is None:
            return None
        try:
            value = Decimal(text)
        except InvalidOperation:  # pragma: no cover - the pattern rules it out
            v.error("amount", 'must be a decimal string, e.g. "12.50"')
            return None
        if value != value.quantize(CENT):
            v.error("amount", "must have at most 2 decimal places")
            return None
        return value

    def list_activities(self, req: Request) -> Response:
        filters = {k: req.query[k] for k in ("order_id", "customer_id", "kind")
                   if k in req.query}
        items = [copy.deepcopy(a) for a in self.activities.values()
                 if all(a[k] == value for k, value in filters.items())]
        return Response(200, {"items": items})

    def get_activity(self, req: Request) -> Response:
        activity = self.activities.get(req.params["activity_id"])
        if activity is None:
            raise not_found()
        return Response(200, copy.deepcopy(activity))


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(CrmServer, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
