"""``pipeline status``: the whole pipeline on one screen, from the database and the broker alone
(no component has to be reachable): outbox backlog and leaders, and per consumer group its lag,
retry-tier depths, DLQ depth with the newest error, and parked keys. Thresholds from the
``status`` configuration decide the exit code."""

from __future__ import annotations

import datetime as dt
import json
import time
import urllib.request
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

from confluent_kafka import Consumer, KafkaException, TopicPartition

from pipeline.config import Settings
from pipeline.dlq.records import from_message
from pipeline.kafka import names
from pipeline.kafka.client import consumer_config, wrap_kafka_error
from pipeline.kafka.tail import read_to_end
from pipeline.outbox.engine import SlotState, mib
from pipeline.worker.ordering import KeyState

TP = tuple[str, int]


@dataclass
class TopicLag:
    topic: str
    records: int
    seconds: float  # age of the oldest record not consumed yet (0 when caught up)


@dataclass
class GroupStatus:
    group: str
    group_id: str
    lag: list[TopicLag] = field(default_factory=list)
    retry_depths: dict[int, int] = field(default_factory=dict)
    dlq_depth: int = 0
    dlq_newest: dict[str, Any] | None = None
    parked_keys: int = 0
    # keys whose head waited longer than the worker's stall_after_s: {key, head, waited_s,
    # followers}, the longest wait first
    stalled: list[dict[str, Any]] = field(default_factory=list)
    breaker: str | None = None  # from the worker's /readyz when its health_port is fixed

    @property
    def lag_records(self) -> int:
        return sum(t.records for t in self.lag)

    @property
    def lag_seconds(self) -> float:
        return max((t.seconds for t in self.lag), default=0.0)


@dataclass
class Status:
    at: str
    outbox: dict[str, Any] | None
    publish_rate_per_s: float | None
    groups: list[GroupStatus]
    problems: list[str]

    @property
    def healthy(self) -> bool:
        return not self.problems

    def as_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["healthy"] = self.healthy
        for g, gs in zip(d["groups"], self.groups, strict=True):
            g["lag_records"] = gs.lag_records
            g["lag_seconds"] = round(gs.lag_seconds, 1)
        return d


def collect(settings: Settings, groups: list[str] | None = None,
            rate_sample_s: float = 1.0) -> Status:
    outbox, rate = _outbox(settings, rate_sample_s)
    names = groups if groups else sorted(settings.workers)
    consumer = Consumer(consumer_config(settings, f"pipeline-status-{uuid.uuid4().hex[:8]}"))
    try:
        try:
            md = consumer.list_topics(timeout=settings.kafka.request_timeout_s)
        except KafkaException as exc:
            raise wrap_kafka_error(
                exc, f"reading topic metadata at {settings.kafka.bootstrap_servers} "
                "(is the broker up?)") from exc
        out = [_group(settings, consumer, md, name) for name in names]
        # the relay's DLQ: outbox rows it could not publish, counted like a group's
        depth, newest = _dlq(settings, consumer, md, settings.topics.outbox_dlq)
        if outbox is None:
            outbox = {"installed_version": None, "database": False}
        outbox["dlq_depth"], outbox["dlq_newest"] = depth, newest
    finally:
        consumer.close()
    status = Status(dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), outbox, rate, out, [])
    status.problems = problems(settings, status)
    return status


def _outbox(settings: Settings, sample_s: float) -> tuple[dict[str, Any] | None, float | None]:
    if not settings.database.url:
        return None, None
    from pipeline.db import connect
    from pipeline.outbox.status import outbox_status

    schema = settings.database.schema_name
    with connect(settings) as conn:
        first = outbox_status(conn, schema)
        rate = None
        if sample_s > 0 and first.installed_version is not None:
            time.sleep(sample_s)
            second = outbox_status(conn, schema)
            done = sum(s.published for s in second.shards) - sum(
                s.published for s in first.shards)
            rate = max(0.0, done / sample_s)
            first = second
    return first.as_json(), rate


def _group(settings: Settings, consumer: Consumer, md: Any, name: str) -> GroupStatus:
    wc = settings.worker_config(name)
    group = wc.group or name
    prefix = settings.topics.prefix
    gid = f"{prefix}.{group}"
    tiers = names.GroupTopics(prefix, group, wc.retry_delays_s)
    gs = GroupStatus(group, gid)
    lag = _lag(settings, gid, md, settings.event_topics(wc))
    gs.lag = [TopicLag(t, n, s) for t, (n, s) in sorted(lag.items())]
    retry = _lag(settings, gid, md, tiers.retry_topics)
    gs.retry_depths = {tiers.tier_of(t): n for t, (n, _s) in retry.items()}
    gs.dlq_depth, gs.dlq_newest = _dlq(settings, consumer, md, tiers.dlq_topic)
    gs.parked_keys, gs.stalled = _parked(settings, md, tiers.parked_topic, wc.stall_after)
    if wc.health_port:
        gs.breaker = _breaker(wc.health_port)
    return gs


def _lag(settings: Settings, group_id: str, md: Any, topics: list[str]
         ) -> dict[str, tuple[int, float]]:
    """Per topic: records after the group's committed offsets, and the age of the first."""
    parts = [TopicPartition(t, p) for t in topics if t in md.topics
             for p in md.topics[t].partitions]
    if not parts:
        return {}
    c = Consumer(consumer_config(settings, group_id, **{"enable.auto.commit": False}))
    timeout = settings.kafka.request_timeout_s
    out: dict[str, tuple[int, float]] = {t: (0, 0.0) for t in topics if t in md.topics}
    try:
        committed = c.committed(parts, timeout=timeout)
        behind: list[TopicPartition] = []
        for tp in committed:
            lo, hi = c.get_watermark_offsets(TopicPartition(tp.topic, tp.partition),
                                             timeout=timeout)
            start = tp.offset if tp.offset >= 0 else lo
            n = max(0, hi - max(start, lo))
            if n:
                behind.append(TopicPartition(tp.topic, tp.partition, max(start, lo)))
                records, age = out[tp.topic]
                out[tp.topic] = (records + n, age)
        for topic, ts in _first_timestamps(settings, behind):
            records, age = out[topic]
            out[topic] = (records, max(age, time.time() - ts / 1000))
    except KafkaException as exc:
        raise wrap_kafka_error(exc, f"reading the offsets of group {group_id}") from exc
    finally:
        c.close()
    return out


def _first_timestamps(settings: Settings, parts: list[TopicPartition]
                      ) -> list[tuple[str, int]]:
    """(topic, timestamp ms) of the record at each given offset."""
    if not parts:
        return []
    c = Consumer(consumer_config(settings, f"pipeline-status-{uuid.uuid4().hex[:8]}"))
    out = []
    try:
        c.assign(parts)
        want = {(p.topic, p.partition) for p in parts}
        deadline = time.monotonic() + settings.kafka.request_timeout_s
        while want and time.monotonic() < deadline:
            for m in c.consume(len(want), timeout=0.5):
                key = (str(m.topic()), int(m.partition() or 0))
                if m.error() is None and key in want:
                    want.discard(key)
                    out.append((key[0], int(m.timestamp()[1])))
                    c.pause([TopicPartition(*key)])
    finally:
        c.close()
    return out


def _dlq(settings: Settings, consumer: Consumer, md: Any, topic: str
         ) -> tuple[int, dict[str, Any] | None]:
    if topic not in md.topics:
        return 0, None
    depth, newest = 0, None
    for p in md.topics[topic].partitions:
        lo, hi = consumer.get_watermark_offsets(TopicPartition(topic, p),
                                                timeout=settings.kafka.request_timeout_s)
        depth += max(0, hi - lo)
    if depth:
        # Up to 10,000, the records are counted (a transactional writer's commit markers take
        # offsets too: the watermarks overcount); beyond, the watermarks are the figure.
        small = depth <= 10_000
        last = [from_message(m) for m in read_to_end(settings, [topic], last=None if small
                                                     else 1, timeout_s=30,
                                                     purpose="status-dlq")]
        if small:
            depth = len(last)
        if last:
            r = max(last, key=lambda r: r.timestamp_ms)
            newest = {"position": str(r.position), "at": r.when.isoformat(timespec="seconds"),
                      "event_type": r.event_type, "key": r.key_text,
                      "error_class": r.error_class,
                      "error_message": (r.error_message.splitlines() or [""])[0][:200]}
    return depth, newest


def _parked(settings: Settings, md: Any, topic: str, stall_after_s: float
            ) -> tuple[int, list[dict[str, Any]]]:
    """Parked keys, and the stalled ones among them (read from the states the workers write)."""
    if topic not in md.topics:
        return 0, []
    latest: dict[bytes, bytes | None] = {}
    for m in read_to_end(settings, [topic], timeout_s=30, purpose="status-parked"):
        latest[m.key() or b""] = m.value()
    now_ms = int(time.time() * 1000)
    stalled: list[dict[str, Any]] = []
    for key, value in latest.items():
        if value is None:
            continue
        try:
            st = KeyState.from_json(value)
        except (ValueError, KeyError, TypeError):
            continue
        waited = st.waited_ms(now_ms) / 1000
        if st.blocked_by is None and waited > stall_after_s:
            stalled.append({"key": key.decode(errors="replace"), "head": st.head,
                            "waited_s": round(waited), "followers": len(st.followers)})
    stalled.sort(key=lambda x: -int(x["waited_s"]))
    return sum(v is not None for v in latest.values()), stalled


def _breaker(port: int) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
            body = json.loads(r.read())
    except OSError as exc:
        body = getattr(exc, "read", lambda: b"")()
        try:
            body = json.loads(body) if body else {}
        except ValueError:
            return None
    state = body.get("breaker") if isinstance(body, dict) else None
    return str(state) if state else None


def problems(settings: Settings, st: Status) -> list[str]:
    c = settings.status
    out = []
    ob = st.outbox
    if ob is not None and ob.get("installed_version") is None and ob.get("database", True):
        out.append(f"outbox: not installed in schema {settings.database.schema_name} of the "
                   "database (`pipeline outbox install`)")
    if ob is not None and c.max_dlq is not None and ob.get("dlq_depth", 0) > c.max_dlq:
        newest = ob.get("dlq_newest") or {}
        out.append(f"outbox: {ob['dlq_depth']} rows dead-lettered by the relay (status.max_dlq "
                   f"{c.max_dlq}), newest {newest.get('error_class', '?')}: "
                   f"{newest.get('error_message', '')}; `pipeline dlq ls --group outbox`")
    if ob is not None and ob.get("installed_version") is not None:
        age = ob.get("oldest_unpublished_age_s") or 0.0
        if c.max_backlog_age_s is not None and age > c.max_backlog_age_s:
            out.append(f"outbox: oldest unpublished event is {age:.0f}s old "
                       f"(status.max_backlog_age_s {c.max_backlog_age_s:g})")
        if c.max_backlog_rows is not None and ob["backlog_rows"] > c.max_backlog_rows:
            out.append(f"outbox: {ob['backlog_rows']} rows not published "
                       f"(status.max_backlog_rows {c.max_backlog_rows})")
        for slot in ob.get("slots", []):
            if not slot["exists"]:
                out.append(f"relay: replication slot {slot['slot_name']} of shard "
                           f"{slot['shard']} is missing (dropped outside the pipeline?): "
                           "outbox_emit writes rows until its relay makes it again")
            elif (c.max_slot_retained_bytes is not None
                  and (slot["retained_bytes"] or 0) > c.max_slot_retained_bytes):
                out.append(f"relay: replication slot {slot['slot_name']} holds back "
                           f"{mib(slot['retained_bytes'])} of WAL, {mib(slot['lag_bytes'])} "
                           f"not yet read (status.max_slot_retained_bytes "
                           f"{mib(c.max_slot_retained_bytes)}): start or fix the relay of "
                           f"shard {slot['shard']}; docs/operations.md#walslotretainingwal")
        if c.require_leader:
            fresh = {s["shard"] for s in ob["shards"] if s["heartbeat_age_s"] < 30}
            missing = [k for k in range(settings.relay.shards) if k not in fresh]
            if missing:
                out.append(f"relay: no leader with a fresh heartbeat for shard(s) "
                           f"{', '.join(map(str, missing))} (start `pipeline relay`)")
    for g in st.groups:
        if c.max_lag_records is not None and g.lag_records > c.max_lag_records:
            out.append(f"{g.group}: {g.lag_records} records behind "
                       f"(status.max_lag_records {c.max_lag_records})")
        if c.max_lag_s is not None and g.lag_seconds > c.max_lag_s:
            out.append(f"{g.group}: oldest unconsumed record is {g.lag_seconds:.0f}s old "
                       f"(status.max_lag_s {c.max_lag_s:g})")
        if c.max_dlq is not None and g.dlq_depth > c.max_dlq:
            out.append(f"{g.group}: {g.dlq_depth} dead letters (status.max_dlq {c.max_dlq}); "
                       f"`pipeline dlq ls --group {g.group}`")
        if g.stalled:
            worst = g.stalled[0]
            out.append(f"{g.group}: {len(g.stalled)} key(s) stalled, e.g. {worst['key']}: head "
                       f"event {worst['head']} waiting {worst['waited_s']}s with "
                       f"{worst['followers']} behind it; check the target and the worker's "
                       f"logs for that event id")
        if g.breaker == "open":
            out.append(f"{g.group}: circuit breaker open (its target is down)")
    return out


def render(st: Status) -> list[str]:
    """The one-screen text form."""
    lines = [f"pipeline status at {st.at}: " + ("OK" if st.healthy else "ATTENTION")]
    ob = st.outbox
    if ob is None or ob.get("database") is False:
        lines.append("outbox   (database.url not set)")
    elif ob.get("installed_version") is None:
        lines.append("outbox   not installed (`pipeline outbox install`)")
    else:
        age = ob.get("oldest_unpublished_age_s")
        rate = f", publishing {st.publish_rate_per_s:.0f}/s" if st.publish_rate_per_s else ""
        engine = " (engine wal: events in the WAL are not rows)" \
            if ob.get("engine") == "wal" else ""
        lines.append(f"outbox   backlog {ob['backlog_rows']} rows, oldest "
                     f"{'-' if age is None else f'{age:.1f}s'}{rate}{engine}")
        for s in ob["shards"]:
            lines.append(f"  shard {s['shard']}: leader {s['leader']}, heartbeat "
                         f"{s['heartbeat_age_s']:.0f}s ago, published {s['published']}")
        for slot in ob.get("slots", []):
            lines.append(f"  {SlotState(**slot).line()}")
    if ob is not None and ob.get("dlq_depth"):
        newest = ob.get("dlq_newest") or {}
        lines.append(f"  outbox dlq: {ob['dlq_depth']} rows, newest "
                     f"{newest.get('error_class', '?')}: {newest.get('error_message', '')[:60]}")
    lines.append("")
    lines.append(f"{'GROUP':<12} {'LAG':>8} {'LAG_S':>7} {'RETRY':>10} {'DLQ':>6} "
                 f"{'PARKED':>6} {'BREAKER':<9} NEWEST ERROR")
    for g in st.groups:
        retry = "/".join(str(g.retry_depths.get(t, 0)) for t in sorted(g.retry_depths)) or "-"
        newest = (f"{g.dlq_newest['error_class']}: {g.dlq_newest['error_message']}"
                  if g.dlq_newest else "")
        lines.append(f"{g.group:<12} {g.lag_records:>8} {g.lag_seconds:>7.0f} {retry:>10} "
                     f"{g.dlq_depth:>6} {g.parked_keys:>6} {g.breaker or '?':<9} "
                     f"{newest[:60]}")
    for p in st.problems:
        lines.append(f"! {p}")
    return lines
