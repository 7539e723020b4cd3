"""A reference WMS (warehouse management system): fulfilment orders, stock reservations and
shipments, behind the careful REST conventions of :mod:`connectors.reference.server`
(idempotency keys, version guard, validation details, fault injection). The API is described
in ``connectors/wms/openapi.yaml``.

Run it with ``python -m connectors.wms.server --port 8801``.

Rules a careful WMS keeps:

* An order's writes carry the ERP aggregate ``version``; one not newer than the order's is
  ``409 stale_version`` (checked before anything else about the order).
* ``DELIVERED`` and ``CANCELLED`` are final: moving such an order elsewhere, shipping it, or
  cancelling a delivered one is ``409 invalid_transition``.
* A shipment only ships SKUs of its order, never more than was ordered (``422``).
* A reservation is identified by ``reservation_id``: posting the same one again is a no-op
  (``200``), posting a different one under that id is ``409 conflict``, and a released
  reservation stays released (``409 reservation_released``); releasing twice is a no-op.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Sequence
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

ORDER_STATUSES = ("OPEN", "PICKING", "SHIPPED", "DELIVERED", "CANCELLED")
FINAL_STATUSES = frozenset({"DELIVERED", "CANCELLED"})

_ID = 200  # max length of identifiers


def _invalid_transition(order: dict[str, Any], to: str) -> ApiError:
    return ApiError(409, {"error": "invalid_transition", "from": order["status"], "to": to,
                          "current": order["version"]})


class WmsServer(ReferenceServer):
    """The reference WMS. State: ``orders`` and ``reservations`` (by id)."""

    name: ClassVar[str] = "wms"

    def routes(self) -> list[tuple[str, str, Handler]]:
        return [
            ("POST", "/fulfilment-orders", self.create_order),
            ("GET", "/fulfilment-orders", self.list_orders),
            ("GET", "/fulfilment-orders/{order_id}", self.get_order),
            ("PUT", "/fulfilment-orders/{order_id}/status", self.set_status),
            ("POST", "/fulfilment-orders/{order_id}/cancel", self.cancel_order),
            ("POST", "/fulfilment-orders/{order_id}/shipments", self.create_shipment),
            ("POST", "/reservations", self.create_reservation),
            ("GET", "/reservations", self.list_reservations),
            ("GET", "/reservations/{reservation_id}", self.get_reservation),
            ("DELETE", "/reservations/{reservation_id}", self.release_reservation),
        ]

    def reset_state(self) -> None:
        self.orders: dict[str, dict[str, Any]] = {}
        self.reservations: dict[str, dict[str, Any]] = {}
        self.shipments: dict[str, str] = {}  # shipment_id → order_id

    # -- helpers --------------------------------------------------------------------------

    def _order(self, order_id: str) -> dict[str, Any]:
        order = self.orders.get(order_id)
        if order is None:
            raise not_found()
        return order

    @staticmethod
    def _applied(order: dict[str, Any], version: int, action: str, **extra: Any) -> None:
        order["version"] = version
        order["history"].append(version)
        order["changes"].append({"version": version, "action": action,
                                 "status": order["status"], **extra})

    @staticmethod
    def _view(item: dict[str, Any]) -> dict[str, Any]:
        return copy.deepcopy(item)

    # -- fulfilment orders ----------------------------------------------------------------

    def create_order(self, req: Request) -> Response:
        data = req.json_object()
        v = Validator()
        order_id = v.string(data, "order_id", max_length=_ID)
        customer = v.string(data, "customer", max_length=_ID)
        version = v.version(data)
        lines: list[dict[str, Any]] = []
        seen: set[int] = set()
        for path, item in v.objects(data, "lines"):
            line_no = v.integer(item, "line_no", path)
            sku = v.string(item, "sku", path, max_length=_ID)
            qty = v.integer(item, "qty", path)
            if line_no is not None and line_no in seen:
                v.error(f"{path}.line_no", "must be unique within the order")
            if line_no is not None:
                seen.add(line_no)
            lines.append({"line_no": line_no, "sku": sku, "qty": qty})
        v.check()
        assert order_id is not None and version is not None
        existing = self.orders.get(order_id)
        if existing is not None:
            self.check_version(existing["version"], version)
            raise ApiError(409, {"error": "already_exists", "order_id": order_id,
                                 "current": existing["version"]})
        order: dict[str, Any] = {
            "order_id": order_id, "customer": customer, "status": "OPEN", "version": version,
            "lines": lines, "shipments": [], "cancel_reason": None,
            "history": [], "changes": [],
        }
        self._applied(order, version, "created")
        self.orders[order_id] = order
        return Response(201, self._view(order),
                        {"Location": f"/fulfilment-orders/{order_id}"})

    def list_orders(self, req: Request) -> Response:
        status = req.query.get("status")
        items = [self._view(o) for o in self.orders.values()
                 if status is None or o["status"] == status]
        return Response(200, {"items": items})

    def get_order(self, req: Request) -> Response:
        return Response(200, self._view(self._order(req.params["order_id"])))

    def set_status(self, req: Request) -> Response:
        data = req.json_object()
        v = Validator()
        status = v.choice(data, "status", ORDER_STATUSES)
        version = v.version(data)
        v.check()
        assert status is not None and version is not None
        order = self._order(req.params["order_id"])
        self.check_version(order["version"], version)
        if order["status"] in FINAL_STATUSES and status != order["status"]:
            raise _invalid_transition(order, status)
        previous = order["status"]
        order["status"] = status
        self._applied(order, version, "status", previous=previous)
        return Response(200, self._view(order))

    def cancel_order(self, req: Request) -> Response:
        data = req.json_object()
        v = Validator()
        reason = v.string(data, "reason", required=False, nullable=True, max_length=1000)
        version = v.version(data)
        v.check()
        assert version is not None
        order = self._order(req.params["order_id"])
        self.check_version(order["version"], version)
        if order["status"] == "DELIVERED":
            raise _invalid_transition(order, "CANCELLED")
        previous = order["status"]
        order["status"] = "CANCELLED"
        if order["cancel_reason"] is None:
            order["cancel_reason"] = reason
        self._applied(order, version, "cancelled", previous=previous, reason=reason)
        return Response(200, self._view(order))

    def create_shipment(self, req: Request) -> Response:
        data = req.json_object()
        v = Validator()
        shipment_id = v.string(data, "shipment_id", max_length=_ID)
        carrier = v.string(data, "carrier", max_length=_ID)
        tracking = v.string(data, "tracking_number", max_length=_ID)
        # A shipment is its own aggregate in the ERP: its version counts shipments, not order
        # changes, so it is recorded but never compared with the order's version.
        version = v.version(data) if "version" in data else None
        lines: list[tuple[str, str | None, int | None]] = []
        for path, item in v.objects(data, "lines"):
            lines.append((path, v.string(item, "sku", path, max_length=_ID),
                          v.integer(item, "qty", path)))
        v.check()
        assert shipment_id is not None
        order = self._order(req.params["order_id"])
        # what may still ship, per SKU
        open_qty: dict[str, int] = {}
        for line in order["lines"]:
            open_qty[line["sku"]] = open_qty.get(line["sku"], 0) + line["qty"]
        for shipment in order["shipments"]:
            for line in shipment["lines"]:
                open_qty[line["sku"]] = open_qty.get(line["sku"], 0) - line["qty"]
        for path, sku, qty in lines:
            assert sku is not None and qty is not None
            if sku not in open_qty:
                v.error(f"{path}.sku", "is not on the order")
            elif qty > open_qty[sku]:
                v.error(f"{path}.qty", f"exceeds the quantity still to ship ({open_qty[sku]})")
            else:
                open_qty[sku] -= qty
        v.check()
        if order["status"] in FINAL_STATUSES:
            raise _invalid_transition(order, "SHIPPED")
        if shipment_id in self.shipments:
            raise ApiError(409, {"error": "conflict", "message": "shipment_id already used",
                                 "shipment_id": shipment_id})
        shipment = {"shipment_id": shipment_id, "order_id": order["order_id"],
                    "carrier": carrier, "tracking_number": tracking,
                    "lines": [{"sku": sku, "qty": qty} for _, sku, qty in lines],
                    "version": version}
        self.shipments[shipment_id] = order["order_id"]
        order["shipments"].append(shipment)
        previous = order["status"]
        order["status"] = "SHIPPED"
        order["changes"].append({"version": order["version"], "action": "shipped",
                                 "status": "SHIPPED", "previous": previous,
                                 "shipment_id": shipment_id})
        return Response(201, {**self._view(shipment), "order_status": order["status"]},
                        {"Location": f"/fulfilment-orders/{order['order_id']}"})

    # -- reservations ---------------------------------------------------------------------

    def _reservation(self, reservation_id: str) -> dict[str, Any]:
        reservation = self.reservations.get(reservation_id)
        if reservation is None:
            raise not_found()
        return reservation

    def create_reservation(self, req: Request) -> Response:
        data = req.json_object()
        v = Validator()
        fields = {
            "reservation_id": v.string(data, "reservation_id", max_length=_ID),
            "order_id": v.string(data, "order_id", max_length=_ID),
            "sku": v.string(data, "sku", max_length=_ID),
            "qty": v.integer(data, "qty"),
            "warehouse": v.string(data, "warehouse", max_length=_ID),
        }
        v.check()
        reservation_id = str(fields["reservation_id"])
        existing = self.reservations.get(reservation_id)
        if existing is not None:
            if existing["status"] == "RELEASED":
                raise ApiError(409, {"error": "reservation_released",
                                     "reservation_id": reservation_id})
            if any(existing[k] != value for k, value in fields.items()):
                raise ApiError(409, {"error": "conflict",
                                     "message": "reservation_id holds a different reservation",
                                     "reservation_id": reservation_id})
            return Response(200, self._view(existing), applied=False)
        reservation = {**fields, "status": "ACTIVE"}
        self.reservations[reservation_id] = reservation
        return Response(201, self._view(reservation),
                        {"Location": f"/reservations/{reservation_id}"})

    def list_reservations(self, req: Request) -> Response:
        filters = {k: req.query[k] for k in ("order_id", "status", "sku", "warehouse")
                   if k in req.query}
        items = [self._view(r) for r in self.reservations.values()
                 if all(r[k] == value for k, value in filters.items())]
        return Response(200, {"items": items})

    def get_reservation(self, req: Request) -> Response:
        return Response(200, self._view(self._reservation(req.params["reservation_id"])))

    def release_reservation(self, req: Request) -> Response:
        reservation = self._reservation(req.params["reservation_id"])
        if reservation["status"] == "RELEASED":
            return Response(204, applied=False)
        reservation["status"] = "RELEASED"
        return Response(204)


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(WmsServer, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
