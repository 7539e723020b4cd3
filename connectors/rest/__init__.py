"""REST connectors: one HTTP client and one configurable event → API-call mapping, with the
WMS and CRM default mappings on top (``connectors.wms``, ``connectors.crm``)."""

from connectors.rest.client import RestTarget, TargetError, TargetRefused
from connectors.rest.connector import RestConnector

__all__ = ["RestConnector", "RestTarget", "TargetError", "TargetRefused"]
