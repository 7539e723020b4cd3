"""Connectors: the pipeline's WMS, CRM and BI targets."""
