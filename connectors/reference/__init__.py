"""Shared machinery of the reference target servers (idempotency, version guard, faults)."""

from connectors.reference.server import (
    ApiError,
    Faults,
    Handler,
    ReferenceServer,
    Request,
    Response,
    Validator,
    not_found,
    run_cli,
)

__all__ = ["ApiError", "Faults", "Handler", "ReferenceServer", "Request", "Response",
           "Validator", "not_found", "run_cli"]
