"""Every topic and record-header name the pipeline uses, in one place.

Topics (``<prefix>`` is ``topics.prefix``, ``<group>`` a worker's consumer group name):

======================================= ===================================================
``<prefix>.<aggregate_type>``            events, keyed by aggregate id (the relay writes them)
``<prefix>.outbox.dlq``                  outbox rows the relay could not publish as events
``<prefix>.<group>.retry.<n>``           a group's retry tier n (due-time ordered)
``<prefix>.<group>.dlq``                 a group's dead letters
``<prefix>.<group>.parked``              compacted: a group's keys with an event in the retry path
``<prefix>.<group>.dlq-replays``         compacted: what ``pipeline dlq replay`` already sent
======================================= ===================================================

A group's retry, DLQ and parked records go to the partition *number* of the event's own
partition (co-partitioned topics), so one member owns a key's events and its retry state.

Headers: the CloudEvents Kafka binding (binary mode) and ours on every event (DESIGN decision
7); on retry and dead-letter copies Spring Kafka's names and encodings, so tools built for Spring
retry topics can read and redrive them:

=============================== ==========================================================
``kafka_dlt-original-topic``     the topic the event was first consumed from (kept across hops)
``kafka_dlt-original-partition`` 4-byte big-endian int
``kafka_dlt-original-offset``    8-byte big-endian long
``kafka_dlt-original-timestamp`` 8-byte big-endian long (ms) of the original record
``kafka_dlt-original-consumer-group``
``kafka_dlt-exception-fqcn``     replaced on every hop (never piled up)
``kafka_dlt-exception-message``
``kafka_dlt-exception-stacktrace``
``retry_topic-attempts``         minimal big-endian int (Java BigInteger.toByteArray)
``retry_topic-backoff-timestamp`` due time in epoch ms, same encoding; absent on the DLQ
``retry_topic-original-timestamp`` time of the first failure (ms), kept across hops
=============================== ==========================================================
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# -- event headers (the relay) ------------------------------------------------------------------
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

# -- retry and dead-letter headers (Spring Kafka's) ----------------------------------------------
ORIGINAL_TOPIC = "kafka_dlt-original-topic"
ORIGINAL_PARTITION = "kafka_dlt-original-partition"
ORIGINAL_OFFSET = "kafka_dlt-original-offset"
ORIGINAL_TIMESTAMP = "kafka_dlt-original-timestamp"
ORIGINAL_GROUP = "kafka_dlt-original-consumer-group"
EXCEPTION_FQCN = "kafka_dlt-exception-fqcn"
EXCEPTION_MESSAGE = "kafka_dlt-exception-message"
EXCEPTION_STACKTRACE = "kafka_dlt-exception-stacktrace"
ATTEMPTS = "retry_topic-attempts"
BACKOFF_TIMESTAMP = "retry_topic-backoff-timestamp"
FIRST_FAILURE_TIMESTAMP = "retry_topic-original-timestamp"

# -- ours on retry and dead-letter copies ---------------------------------------------------------
BLOCKED_BY = "erp_blocked_by"  # the event id a strict-ordering follower waited behind
RETRY_TIER = "erp_retry_tier"
HOPS = "erp_hops"  # times the record went through the retry path (any tier, following too)
TARGET_ERROR_BODY = "erp_target_error_body"  # what the target answered, for the DLQ
DECODE_ERROR = "erp_decode_error"
# provenance, added by `pipeline dlq replay` (on what it sends) and `pipeline dlq edit` (on the
# corrected copy), so every hop can be traced back to the dead letter it came from
REPLAY_ID = "erp_replay_id"
REPLAY_OF = "erp_replay_dlq_position"  # "<dlq topic>/P:O" the replayed copy came from
REPLAYED_BY = "erp_replayed_by"
REPLAYED_AT = "erp_replayed_at"
EDIT_OF = "erp_dlq_edit_of"  # "P:O" of the original dead letter
EDITED_BY = "erp_dlq_edited_by"
EDITED_AT = "erp_dlq_edited_at"
CAPTURE = "erp_capture"  # set by the capture trigger: the table an outbox row came from


# -- topics --------------------------------------------------------------------------------------
def event_topic(prefix: str, aggregate_type: str) -> str:
    return f"{prefix}.{aggregate_type}"


def outbox_dlq_topic(prefix: str) -> str:
    return f"{prefix}.outbox.dlq"


DLQ_SUFFIX = ".dlq"


@dataclass(frozen=True)
class GroupTopics:
    """The topics of one consumer group: its retry path, DLQ and state topics."""

    prefix: str
    group: str
    delays_s: Sequence[float] = (1.0,)

    @property
    def group_id(self) -> str:
        return f"{self.prefix}.{self.group}"

    def retry_topic(self, tier: int) -> str:
        return f"{self.prefix}.{self.group}.retry.{tier}"

    @property
    def retry_topics(self) -> list[str]:
        return [self.retry_topic(i) for i in range(1, len(self.delays_s) + 1)]

    @property
    def replay_topic(self) -> str:
        """Where `pipeline dlq replay` sends events: the first tier, due at once."""
        return self.retry_topic(1)

    @property
    def dlq_topic(self) -> str:
        return f"{self.prefix}.{self.group}{DLQ_SUFFIX}"

    @property
    def parked_topic(self) -> str:
        return f"{self.prefix}.{self.group}.parked"

    @property
    def replays_topic(self) -> str:
        return f"{self.prefix}.{self.group}.dlq-replays"

    def tier_of(self, topic: str) -> int:
        """0 for a main topic, n for ``<prefix>.<group>.retry.<n>``."""
        base = f"{self.prefix}.{self.group}.retry."
        if topic.startswith(base) and topic[len(base) :].isdigit():
            return int(topic[len(base) :])
        return 0
