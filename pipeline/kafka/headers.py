"""Record header names (DESIGN decision 7: CloudEvents Kafka binding, binary mode, plus ours)."""

from __future__ import annotations

CE_SPECVERSION = "ce_specversion"
CE_ID = "ce_id"
CE_TYPE = "ce_type"
CE_SOURCE = "ce_source"
CE_SUBJECT = "ce_subject"
CE_TIME = "ce_time"
CONTENT_TYPE = "content-type"
TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
AGGREGATE_TYPE = "erp_aggregate_type"
AGGREGATE_VERSION = "erp_aggregate_version"
OUTBOX_POSITION = "erp_outbox_position"
CLAIM_CHECK = "erp_claim_check"
# Outbox dead letters (bad rows the relay could not publish as events).
ERROR_CLASS = "erp_error_class"
ERROR_MESSAGE = "erp_error_message"

AVRO_CONTENT_TYPE = "application/avro"
SPECVERSION = "1.0"
