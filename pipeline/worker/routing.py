"""Where a failed record goes next, and the headers it carries there (pure).

The header names and their encodings (Spring Kafka's, so tools built for Spring retry topics can
read and redrive our records) are listed in :mod:`pipeline.kafka.names`.
"""

from __future__ import annotations

import struct
import traceback
from collections.abc import Iterable
from dataclasses import dataclass

from pipeline.kafka.names import (
    ATTEMPTS,
    BACKOFF_TIMESTAMP,
    BLOCKED_BY,
    DECODE_ERROR,
    EXCEPTION_FQCN,
    EXCEPTION_MESSAGE,
    EXCEPTION_STACKTRACE,
    FIRST_FAILURE_TIMESTAMP,
    HOPS,
    ORIGINAL_GROUP,
    ORIGINAL_OFFSET,
    ORIGINAL_PARTITION,
    ORIGINAL_TIMESTAMP,
    ORIGINAL_TOPIC,
    RETRY_TIER,
    TARGET_ERROR_BODY,
    GroupTopics,
)

_PER_HOP = (
    EXCEPTION_FQCN,
    EXCEPTION_MESSAGE,
    EXCEPTION_STACKTRACE,
    ATTEMPTS,
    BACKOFF_TIMESTAMP,
    BLOCKED_BY,
    RETRY_TIER,
    TARGET_ERROR_BODY,
    DECODE_ERROR,
    HOPS,
)

Headers = list[tuple[str, bytes]]


def big_int(n: int) -> bytes:
    """Java's BigInteger.toByteArray(): minimal two's-complement big-endian."""
    bits = n.bit_length() if n >= 0 else (~n).bit_length()
    return n.to_bytes(bits // 8 + 1, "big", signed=True)


def read_int(value: bytes | str | None) -> int | None:
    """An integer header as Spring Kafka writes it: big-endian two's complement (at most 8
    bytes). Older Spring versions wrote the backoff timestamp as decimal text (13 digits for
    epoch ms): a longer all-digit value is read as text."""
    if value is None:
        return None
    if isinstance(value, str):
        value = value.encode()
    if not value:
        return None
    if len(value) > 8 and value.isdigit():
        return int(value)
    return int.from_bytes(value, "big", signed=True)


@dataclass(frozen=True)
class Route:
    topic: str
    tier: int  # 0 = DLQ
    due_ms: int | None

    @property
    def is_dlq(self) -> bool:
        return self.tier == 0


def route_failure(tiers: GroupTopics, kind: str, failures: int, now_ms: int) -> Route:
    """``failures`` counts this one: after the first failure, tier 1; after the last tier's, the
    DLQ. Permanent failures go to the DLQ at once."""
    if kind == "transient" and failures <= len(tiers.delays_s):
        due = now_ms + round(tiers.delays_s[failures - 1] * 1000)
        return Route(tiers.retry_topic(failures), failures, due)
    return Route(tiers.dlq_topic, 0, None)


def failure_headers(
    headers: Iterable[tuple[str, bytes | str | None]],
    *,
    topic: str,
    partition: int,
    offset: int,
    timestamp_ms: int,
    group: str,
    error: BaseException | None,
    attempts: int,
    route: Route,
    now_ms: int,
    blocked_by: str | None = None,
    decode_error: str | None = None,
) -> Headers:
    """The headers of a record sent to a retry tier or the DLQ: the event's own headers kept,
    the original position kept from the first hop, the exception headers replaced."""
    kept: Headers = []
    present: set[str] = set()
    hops = 0
    for name, value in headers:
        if name == HOPS:
            hops = read_int(value) or 0
        if name in _PER_HOP:
            continue
        b = value if isinstance(value, bytes) else (value or "").encode()
        kept.append((name, b))
        present.add(name)
    if ORIGINAL_TOPIC not in present:
        kept += [
            (ORIGINAL_TOPIC, topic.encode()),
            (ORIGINAL_PARTITION, struct.pack(">i", partition)),
            (ORIGINAL_OFFSET, struct.pack(">q", offset)),
            (ORIGINAL_TIMESTAMP, struct.pack(">q", timestamp_ms)),
            (ORIGINAL_GROUP, group.encode()),
        ]
    if FIRST_FAILURE_TIMESTAMP not in present:
        kept.append((FIRST_FAILURE_TIMESTAMP, big_int(now_ms)))
    if error is not None:
        cls = type(error)
        kept += [
            (EXCEPTION_FQCN, f"{cls.__module__}.{cls.__qualname__}".encode()),
            (EXCEPTION_MESSAGE, str(error)[:4000].encode()),
            (EXCEPTION_STACKTRACE, "".join(traceback.format_exception(error))[-8000:].encode()),
        ]
        body = getattr(error, "target_error_body", None)
        if body:
            kept.append((TARGET_ERROR_BODY, str(body)[:8000].encode()))
    kept.append((ATTEMPTS, big_int(attempts)))
    kept.append((HOPS, big_int(hops + 1)))
    if route.due_ms is not None:
        kept.append((BACKOFF_TIMESTAMP, big_int(route.due_ms)))
        kept.append((RETRY_TIER, str(route.tier).encode()))
    if blocked_by:
        kept.append((BLOCKED_BY, blocked_by.encode()))
    if decode_error:
        kept.append((DECODE_ERROR, decode_error[:4000].encode()))
    return kept
