"""The CRM connector: ERP customers and their orders, payments and invoices → the CRM's contacts
and timeline (running totals are the CRM's; ``connectors/crm/openapi.yaml``). Every route can
be overridden in configuration (``options.mapping``)."""

from __future__ import annotations

from typing import Any

from connectors.rest.connector import RestConnector


def _activity(kind: str, at: str, customer: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {"activity_id": "{event_id}", "kind": kind,
                            "order_id": "{payload.order_id}", "currency": "{payload.currency}",
                            "occurred_at": at}
    if customer:
        body["customer_id"] = customer
    return body


DEFAULT_MAPPING: dict[str, dict[str, Any]] = {
    "customer.upserted": {
        "method": "PUT", "path": "/contacts/{payload.customer_id}",
        "body": {"name": "{payload.name}", "email": "{payload.email}",
                 "country": "{payload.country}", "version": "{aggregate_version}"},
        "skip": [409],  # stale version
    },
    "order.created": {
        "method": "POST", "path": "/activities",
        "body": {**_activity("order_created", "{payload.created_at}", "{payload.customer}"),
                 "amount": "{payload.total}"},
    },
    "payment.completed": {
        "method": "POST", "path": "/activities",
        "body": {**_activity("payment_completed", "{payload.completed_at}", None),
                 "amount": "{payload.amount}"},
        # unknown order: its order.created has not reached the CRM yet. Only that 409: an
        # activity_conflict (same id, other content) is refused and dead-lettered.
        "retry": ["409:unknown_order"],
    },
    "invoice.issued": {
        "method": "POST", "path": "/activities",
        "body": {**_activity("invoice_issued", "{payload.issued_at}", "{payload.customer}"),
                 "amount": "{payload.amount}"},
    },
}


class CrmConnector(RestConnector):
    name = "crm"
    default_mapping = DEFAULT_MAPPING
