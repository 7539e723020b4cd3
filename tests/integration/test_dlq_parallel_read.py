"""A large DLQ listed (``pipeline dlq ls``) by helper processes (one per core, each an equal
share of the records) against a real broker: the cells worked out in the helpers are those of
the records one read in this process selects, in the same order, for every filter, with a
limit, for one partition cut in offset ranges and several partitions cut between and inside
them; PIPELINE_DLQ_READERS=1 reads here alone; a helper's failure reaches the caller by name
and the DLQ keeps every record."""

from __future__ import annotations

import datetime as dt
import os

import pytest
from confluent_kafka.admin import AdminClient

from pipeline import forked
from pipeline.bench.dlq import _dead_letters, _produce
from pipeline.config import Settings
from pipeline.dlq import store
from pipeline.dlq.records import DlqRecord, Filter, ls_cells
from pipeline.dlq.store import GroupDlq
from pipeline.errors import BrokerUnavailable, UsageError
from pipeline.kafka.client import admin_config
from pipeline.kafka.topics import TopicSpec, apply_topics
from tests.conftest import broker_kind, make_settings

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not forked.has_fork(), reason="no fork on this platform")]

N = 2400
NOW = dt.datetime.now(dt.UTC)


def _dlq(database_url: str, kafka_bootstrap: str, prefix: str, partitions: int) -> Settings:
    s = make_settings(database_url, kafka_bootstrap, prefix, topics={"partitions": partitions})
    apply_topics(AdminClient(admin_config(s)),
                 [TopicSpec(f"{prefix}.bench.dlq", partitions, 1, {})], create_only=True)
    _produce(s, f"{prefix}.bench.dlq", _dead_letters(N, prefix))
    return s


def _flat(recs: list[DlqRecord]) -> list[tuple[object, ...]]:
    return [(r.topic, r.position, r.timestamp_ms, r.key, r.value, r.headers) for r in recs]


def _readers(monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    """``n`` readers for any DLQ (1: this process alone), as its watermarks size it (tansu's
    lie low after a batched produce: its shares are then uneven, the last reader settling
    what the watermarks hid)."""
    monkeypatch.delenv(store.READERS_ENV, raising=False)
    monkeypatch.setattr(forked, "cores", lambda: n)
    monkeypatch.setattr(store, "_PARALLEL_FROM", 1)


@pytest.mark.tansu_smoke  # tansu's lying watermarks: the last reader settles what they hid
@pytest.mark.parametrize("partitions", [1, 3])
def test_helpers_read_what_one_reader_reads(monkeypatch: pytest.MonkeyPatch, database_url: str,
                                            kafka_bootstrap: str, topic_prefix: str,
                                            partitions: int) -> None:
    s = _dlq(database_url, kafka_bootstrap, topic_prefix, partitions)
    refused = Filter.build(error="TargetRefused")
    typed = Filter.build(event_type="order.created", key="SO-00007")

    _readers(monkeypatch, 1)
    assert GroupDlq(s, "bench")._spans() == [{}]
    alone = GroupDlq(s, "bench")
    everything = _flat(alone.records())
    assert len(everything) == N
    one = {"refused": _flat(GroupDlq(s, "bench").select(refused)),
           "typed": _flat(GroupDlq(s, "bench").select(typed)),
           "limit": _flat(GroupDlq(s, "bench").select(refused, 7))}
    listed = ls_cells(GroupDlq(s, "bench").select(refused), NOW)

    listed_typed = ls_cells(GroupDlq(s, "bench").select(typed), NOW)
    for readers in (2, 3):
        _readers(monkeypatch, readers)
        spans = GroupDlq(s, "bench")._spans()
        assert len(spans) == readers or (broker_kind() == "tansu" and len(spans) >= 1)
        assert GroupDlq(s, "bench").listing(refused, NOW) == listed
        assert GroupDlq(s, "bench").listing(typed, NOW) == listed_typed
        rows, errors = GroupDlq(s, "bench").listing(refused, NOW, limit=5)
        assert (rows, errors) == (listed[0][:5], listed[1][:5])
        # whole records are read here alone (they would pass through TMPDIR)
        assert _flat(GroupDlq(s, "bench").records()) == everything
        assert _flat(GroupDlq(s, "bench").select(refused, 7)) == one["limit"]
    monkeypatch.setenv(store.READERS_ENV, "1")
    assert GroupDlq(s, "bench")._spans() == [{}]
    assert GroupDlq(s, "bench").listing(refused, NOW) == listed
    monkeypatch.setenv(store.READERS_ENV, "two")
    with pytest.raises(UsageError, match="PIPELINE_DLQ_READERS='two': give a number of readers"):
        GroupDlq(s, "bench").listing(refused, NOW)
    assert len(one["refused"]) == N // 4 and len(one["limit"]) == 7
    assert len(one["typed"]) == N // 2000 + 1  # key SO-00007 recurs every 2,000 letters


def test_a_helpers_failure_reaches_the_caller_and_nothing_is_lost(
        monkeypatch: pytest.MonkeyPatch, database_url: str, kafka_bootstrap: str,
        topic_prefix: str) -> None:
    s = _dlq(database_url, kafka_bootstrap, topic_prefix, 3)
    parent = os.getpid()
    real_add = store._add

    def add_failing_in_helpers(*args: object, **kw: object) -> None:
        if os.getpid() != parent:
            raise BrokerUnavailable(f"dlq-bench: {topic_prefix}.bench.dlq went away mid-read")
        real_add(*args, **kw)  # type: ignore[arg-type]

    _readers(monkeypatch, 2)
    monkeypatch.setattr(store, "_add", add_failing_in_helpers)
    with pytest.raises(BrokerUnavailable, match=r"bench\.dlq went away mid-read"):
        GroupDlq(s, "bench").listing(Filter.build(error="TargetRefused"), NOW)
    monkeypatch.setattr(store, "_add", real_add)
    assert len(GroupDlq(s, "bench").records()) == N  # reading takes nothing away
