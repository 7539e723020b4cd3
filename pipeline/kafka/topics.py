"""Create and reconcile topics from the configuration (``pipeline topics apply``).

Creates missing topics, raises partition counts that are below the configured number (never
lowers them: Kafka cannot, and keys would move), applies configured topic configs, and reports
drift it will not fix (more partitions than configured, replication factor differences).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaException
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AdminClient,
    ConfigResource,
    NewPartitions,
    NewTopic,
)

from pipeline.config import Settings
from pipeline.errors import BrokerUnavailable
from pipeline.kafka.client import admin_config, wrap_kafka_error


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    replication_factor: int
    config: dict[str, str] = field(default_factory=dict)


@dataclass
class TopicReport:
    name: str
    action: str  # created | partitions-raised | configured | unchanged | drift | would-…
    detail: str = ""


def desired_topics(settings: Settings, aggregate_types: list[str] | None = None) -> list[TopicSpec]:
    t = settings.topics
    specs = []
    for agg in aggregate_types if aggregate_types is not None else t.aggregate_types:
        o = t.overrides.get(agg)
        specs.append(
            TopicSpec(
                name=t.event_topic(agg),
                partitions=(o.partitions if o and o.partitions else t.partitions),
                replication_factor=t.replication_factor,
                config={**t.config, **(o.config if o else {})},
            )
        )
    specs.append(TopicSpec(t.outbox_dlq, 1, t.replication_factor, dict(t.config)))
    return specs


def _result(future: Any, doing: str) -> Any:
    try:
        return future.result()
    except KafkaException as exc:
        raise wrap_kafka_error(exc, doing) from exc


def apply_topics(
    admin: AdminClient,
    specs: list[TopicSpec],
    *,
    timeout_s: float = 10.0,
    dry_run: bool = False,
    create_only: bool = False,
) -> list[TopicReport]:
    try:
        md = admin.list_topics(timeout=timeout_s)
    except KafkaException as exc:
        raise wrap_kafka_error(exc, "listing topics", admin) from exc
    reports: list[TopicReport] = []
    missing = [s for s in specs if s.name not in md.topics]
    if missing and not dry_run:
        futures = admin.create_topics(
            [
                NewTopic(
                    s.name,
                    num_partitions=s.partitions,
                    replication_factor=s.replication_factor,
                    config=s.config,
                )
                for s in missing
            ],
            request_timeout=timeout_s,
        )
        for name, fut in futures.items():
            try:
                fut.result()
            except KafkaException as exc:
                if exc.args[0].code() != 36:  # TOPIC_ALREADY_EXISTS: created concurrently
                    raise wrap_kafka_error(exc, f"creating topic {name}") from exc
    if missing and not dry_run:
        _wait_for_leaders(admin, [s.name for s in missing], timeout_s)
    for s in missing:
        reports.append(
            TopicReport(
                s.name,
                "created" if not dry_run else "would-create",
                f"{s.partitions} partitions, rf {s.replication_factor}",
            )
        )
    for s in specs:
        if s.name not in md.topics or create_only:
            continue
        have = len(md.topics[s.name].partitions)
        if have < s.partitions:
            if not dry_run:
                _result(
                    admin.create_partitions([NewPartitions(s.name, s.partitions)])[s.name],
                    f"raising partitions of {s.name}",
                )
            reports.append(
                TopicReport(
                    s.name,
                    "partitions-raised" if not dry_run else "would-raise-partitions",
                    f"{have} -> {s.partitions} (keys written before now may map to other "
                    "partitions)",
                )
            )
        elif have > s.partitions:
            reports.append(
                TopicReport(
                    s.name,
                    "drift",
                    f"has {have} partitions, config says {s.partitions}; Kafka cannot lower it",
                )
            )
        else:
            reports.append(TopicReport(s.name, "unchanged", f"{have} partitions"))
        drift = _config_drift(admin, s, timeout_s)
        if drift:
            if not dry_run:
                try:
                    _alter_config(admin, s, timeout_s)
                    found = TopicReport(s.name, "configured", "; ".join(drift))
                except BrokerUnavailable as exc:
                    found = TopicReport(s.name, "drift", "; ".join(drift) + f" ({exc})")
            else:  # a real apply would change it: not a drift it leaves
                found = TopicReport(s.name, "would-configure", "; ".join(drift))
            # a partition report stays beside it: every difference is listed
            if reports[-1].action == "unchanged":
                reports[-1] = found
            else:
                reports.append(found)
    return reports


def _wait_for_leaders(admin: AdminClient, names: list[str], timeout_s: float) -> None:
    """Until every partition of the new topics has a leader (bounded): a real cluster elects
    them a moment after CreateTopics returns, and a read of offsets meanwhile is refused."""
    deadline = time.monotonic() + timeout_s
    pending = set(names)
    while pending and time.monotonic() < deadline:
        try:
            md = admin.list_topics(timeout=max(0.5, deadline - time.monotonic()))
        except KafkaException:
            return  # the caller's next request reports what is wrong
        for name in list(pending):
            t = md.topics.get(name)
            if t is not None and t.error is None and t.partitions and all(
                p.leader >= 0 and p.error is None for p in t.partitions.values()
            ):
                pending.discard(name)
        if pending:
            time.sleep(0.05)


def _config_drift(admin: AdminClient, s: TopicSpec, timeout_s: float) -> list[str]:
    if not s.config:
        return []
    res = ConfigResource(ConfigResource.Type.TOPIC, s.name)
    try:
        current = admin.describe_configs([res], request_timeout=timeout_s)[res].result()
    except KafkaException:
        return []  # brokers that cannot describe configs: nothing to compare
    drift = []
    for key, want in s.config.items():
        entry = current.get(key)
        have = entry.value if entry is not None else None
        if have != want:
            drift.append(f"{key}: {have} -> {want}")
    return drift


def _alter_config(admin: AdminClient, s: TopicSpec, timeout_s: float) -> None:
    from confluent_kafka.admin import (  # type: ignore[attr-defined]
        AlterConfigOpType,
        ConfigEntry,
    )

    res = ConfigResource(
        ConfigResource.Type.TOPIC,
        s.name,
        incremental_configs=[
            ConfigEntry(k, v, incremental_operation=AlterConfigOpType.SET)
            for k, v in s.config.items()
        ],
    )
    _result(
        admin.incremental_alter_configs([res], request_timeout=timeout_s)[res],
        f"configuring {s.name}",
    )


def ensure_topics(
    settings: Settings, aggregate_types: list[str], admin: AdminClient | None = None
) -> None:
    """Create the event topics of these aggregate types if missing (the relay calls this)."""
    admin = admin or AdminClient(admin_config(settings))
    apply_topics(
        admin,
        desired_topics(settings, aggregate_types),
        timeout_s=settings.kafka.request_timeout_s,
        create_only=True,
    )
