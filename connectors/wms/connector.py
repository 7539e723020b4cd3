"""The WMS connector: ERP orders, reservations and shipments → the warehouse system's REST API
(described in ``connectors/wms/openapi.yaml``; ``connectors.wms.server`` is a reference
implementation). Every route can be overridden in configuration (``options.mapping``)."""

from __future__ import annotations

from typing import Any

from connectors.rest.connector import RestConnector

_LINES = {"$each": "payload.lines",
          "$item": {"line_no": "{line_no}", "sku": "{sku}", "qty": "{qty}"}}
# ERP order states → WMS order states
_STATUS = {"$map": "payload.to_status", "values": {"DRAFT": "OPEN", "CONFIRMED": "OPEN"},
           "default": "$same"}

DEFAULT_MAPPING: dict[str, dict[str, Any]] = {
    "order.created": {
        "method": "POST", "path": "/fulfilment-orders",
        "body": {"order_id": "{payload.order_id}", "customer": "{payload.customer}",
                 "lines": _LINES, "version": "{aggregate_version}"},
        "skip": [409],  # stale version: a newer state of the order is already there
    },
    "order.status_changed": {
        "method": "PUT", "path": "/fulfilment-orders/{payload.order_id}/status",
        "body": {"status": _STATUS, "version": "{aggregate_version}"},
        "skip": [409],
        "retry": [404],  # the order is not there yet (its creation is still on its way)
    },
    "order.cancelled": {
        "method": "POST", "path": "/fulfilment-orders/{payload.order_id}/cancel",
        "body": {"reason": "{payload.reason}", "version": "{aggregate_version}"},
        "skip": [409],
        "retry": [404],
    },
    "inventory.reserved": {
        "method": "POST", "path": "/reservations",
        "body": {"reservation_id": "{payload.reservation_id}", "order_id": "{payload.order_id}",
                 "sku": "{payload.sku}", "qty": "{payload.qty}",
                 "warehouse": "{payload.warehouse}"},
    },
    "inventory.released": {
        "method": "DELETE", "path": "/reservations/{payload.reservation_id}",
        "skip": [404],  # already released
    },
    "shipment.created": {
        "method": "POST", "path": "/fulfilment-orders/{payload.order_id}/shipments",
        "body": {"shipment_id": "{payload.shipment_id}", "carrier": "{payload.carrier}",
                 "tracking_number": "{payload.tracking_number}",
                 "lines": {"$each": "payload.lines", "$item": {"sku": "{sku}", "qty": "{qty}"}},
                 "version": "{aggregate_version}"},
        "skip": [409],
        "retry": [404],
    },
}


class WmsConnector(RestConnector):
    name = "wms"
    default_mapping = DEFAULT_MAPPING
