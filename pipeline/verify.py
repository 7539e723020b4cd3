"""Reads the event topics back and checks the pipeline's promises: every event once, each
key's versions in order without gaps. Used by ``pipeline up``'s verdict."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.config import Settings
from pipeline.kafka import names
from pipeline.kafka.tail import read_to_end


@dataclass
class VerifyReport:
    records: int = 0
    duplicates: int = 0
    order_violations: int = 0
    keys: int = 0
    examples: list[str] = field(default_factory=list)


def verify_topics(
    settings: Settings, written_ids: set[str] | None = None, timeout_s: float = 60.0
) -> VerifyReport:
    topics = [settings.topics.event_topic(a) for a in settings.topics.aggregate_types]
    report = VerifyReport()
    seen: set[bytes] = set()
    last: dict[tuple[str, bytes], int] = {}
    src = settings.relay.source.encode()
    for m in read_to_end(settings, topics, timeout_s=timeout_s, purpose="verify"):
        hd = {i[0]: i[1] if isinstance(i[1], bytes) else b"" for i in m.headers() or []}
        if hd.get(names.CE_SOURCE) != src:
            continue
        report.records += 1
        ce_id = hd.get(names.CE_ID, b"")
        if ce_id in seen:
            report.duplicates += 1
            _example(report, f"duplicate event {ce_id.decode()}")
        seen.add(ce_id)
        key = (str(m.topic()), m.key() or b"")
        version = int(hd.get(names.AGGREGATE_VERSION, b"0"))
        prev = last.get(key)
        if prev is not None and version != prev + 1:
            report.order_violations += 1
            _example(report, f"{key[0]} key {key[1].decode()}: v{version} after v{prev}")
        last[key] = version
    report.keys = len(last)
    return report


def _example(report: VerifyReport, text: str) -> None:
    if len(report.examples) < 10:
        report.examples.append(text)
