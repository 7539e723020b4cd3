"""A consumer group's dead letters on the broker: the DLQ topic, the record of what was already
replayed (a compacted topic, so replays are idempotent across machines and operators), and
where a replay goes (the group's first retry tier: only that group sees the event again)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from pipeline.config import Settings
from pipeline.dlq.records import DlqRecord, Position, from_message
from pipeline.errors import UsageError
from pipeline.kafka import names
from pipeline.kafka.client import admin_config, wrap_kafka_error
from pipeline.kafka.tail import read_to_end
from pipeline.kafka.topics import TopicSpec, apply_topics

_SUFFIX = names.DLQ_SUFFIX
_NOT_WORKER_GROUPS = {"outbox"}  # the relay's DLQ holds outbox rows, not events


def topic_names(settings: Settings) -> set[str]:
    admin = AdminClient(admin_config(settings))
    try:
        md = admin.list_topics(timeout=settings.kafka.request_timeout_s)
    except KafkaException as exc:
        raise wrap_kafka_error(
            exc, f"listing topics at {settings.kafka.bootstrap_servers} (is the broker up?)", admin
        ) from exc
    return set(md.topics)


def dlq_groups(settings: Settings, topics: set[str] | None = None) -> list[str]:
    """Groups that have a dead-letter topic ``<prefix>.<group>.dlq``."""
    prefix = f"{settings.topics.prefix}."
    names = topic_names(settings) if topics is None else topics
    out = []
    for t in names:
        if t.startswith(prefix) and t.endswith(_SUFFIX):
            group = t[len(prefix) : -len(_SUFFIX)]
            if group and "." not in group:
                out.append(group)
    # the relay's (outbox rows it could not publish) last: a first-class DLQ like the others
    return sorted(out, key=lambda g: (g in _NOT_WORKER_GROUPS, g))


class GroupDlq:
    """The dead letters of one group."""

    def __init__(self, settings: Settings, group: str, topics: set[str] | None = None) -> None:
        self.settings = settings
        self.group = group
        prefix = settings.topics.prefix
        gt = names.GroupTopics(prefix, group)
        self.topic = gt.dlq_topic
        self.replays_topic = gt.replays_topic
        # a replay goes to the first tier, whatever the group's delays
        self.retry_topic = gt.replay_topic
        # where a replay goes: the outbox DLQ's rows back into the outbox table
        self.replay_target = (
            f"{settings.database.schema_name}.outbox (through outbox_emit)"
            if group in _NOT_WORKER_GROUPS else self.retry_topic
        )
        existing = topic_names(settings) if topics is None else topics
        if self.topic not in existing:
            known = ", ".join(dlq_groups(settings, existing)) or "none yet"
            raise UsageError(
                f"no dead-letter topic {self.topic}: is {group!r} a worker group? groups with "
                f"a DLQ under prefix {prefix!r}: {known}"
            )
        self._records: list[DlqRecord] | None = None

    def records(self) -> list[DlqRecord]:
        if self._records is None:
            self._records = [
                from_message(m)
                for m in read_to_end(self.settings, [self.topic], timeout_s=120,
                                     purpose=f"dlq-{self.group}")
            ]
            self._records.sort(key=lambda r: (r.position.partition, r.position.offset))
        return self._records

    def partitions(self) -> list[int]:
        admin = AdminClient(admin_config(self.settings))
        md = admin.list_topics(self.topic, timeout=self.settings.kafka.request_timeout_s)
        return sorted(md.topics[self.topic].partitions)

    def get(self, position: str) -> DlqRecord:
        pos = Position.parse(position, self.partitions())
        for r in self.records():
            if r.position == pos:
                return r
        offsets = [r.position.offset for r in self.records()
                   if r.position.partition == pos.partition]
        span = f"{min(offsets)}..{max(offsets)}" if offsets else "none"
        raise UsageError(
            f"no record at {pos} in {self.topic} (offsets in partition {pos.partition}: {span}); "
            "`pipeline dlq ls --group " + self.group + "` lists them"
        )

    def blocked_behind(self, event_id: str | None) -> list[DlqRecord]:
        if not event_id:
            return []
        return [r for r in self.records() if r.blocked_by == event_id]

    # -- replay bookkeeping ----------------------------------------------------------------------
    def ensure_replays_topic(self) -> None:
        t = self.settings.topics
        apply_topics(
            AdminClient(admin_config(self.settings)),
            [
                TopicSpec(self.replays_topic, 1, t.replication_factor,
                          t.compacted_config),
                TopicSpec(self.retry_topic, t.partitions, t.replication_factor, dict(t.config)),
            ],
            timeout_s=self.settings.kafka.request_timeout_s,
            create_only=True,
        )

    def replayed(self) -> dict[str, dict[str, Any]]:
        """DLQ position → the latest replay record of it (``{}`` when none)."""
        out: dict[str, dict[str, Any]] = {}
        for m in read_to_end(self.settings, [self.replays_topic], timeout_s=60,
                             purpose=f"dlq-replays-{self.group}"):
            key = (m.key() or b"").decode()
            value = m.value()
            if value is None:
                out.pop(key, None)
            else:
                try:
                    out[key] = json.loads(value)
                except ValueError:
                    continue
        return out


def iter_groups(settings: Settings, group: str | None) -> Iterator[GroupDlq]:
    names = topic_names(settings)
    groups = [group] if group else dlq_groups(settings, names)
    for g in groups:
        yield GroupDlq(settings, g, names)
