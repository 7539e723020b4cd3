"""The pure parts of the Debezium bench (pipeline.bench.debezium): where JDBC connects for a libpq
conninfo, the engine and harness configuration, the properties file, and the /proc readings.
Nothing here starts Java or needs a database."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline.bench import debezium as dbz
from pipeline.bench.debezium import (
    PRODUCER,
    JdbcTarget,
    engine_properties,
    harness_properties,
    jdbc_target,
    properties_text,
)


@pytest.fixture(autouse=True)
def _no_libpq_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # libpq's environment defaults would leak a developer's setup into the derivation
    for key in ("PGHOST", "PGHOSTADDR", "PGPORT", "PGUSER", "PGDATABASE", "PGPASSWORD",
                "PGSSLMODE"):
        monkeypatch.delenv(key, raising=False)


# -- conninfo → JDBC ----------------------------------------------------------------------------


def test_socket_url_of_the_embedded_server_becomes_loopback_on_the_same_port() -> None:
    # what EmbeddedPostgres.url looks like: the socket directory as host, the port appended
    url = "postgresql://postgres:@/postgres?host=/tmp/pgserver-abc&port=54321"
    assert jdbc_target(url) == JdbcTarget("127.0.0.1", 54321, "postgres", "postgres")


def test_key_value_conninfo_with_a_socket_directory() -> None:
    t = jdbc_target("host=/var/run/postgresql port=5433 dbname=erp user=app")
    assert (t.host, t.port, t.dbname, t.user) == ("127.0.0.1", 5433, "erp", "app")


def test_tcp_host_password_and_sslmode_are_kept() -> None:
    t = jdbc_target("postgresql://app:s3cr%3Dt@db.example.com:6432/erp?sslmode=require")
    assert t == JdbcTarget("db.example.com", 6432, "erp", "app", "s3cr=t", "require")


def test_hostaddr_wins_and_the_first_of_several_hosts_is_taken() -> None:
    assert jdbc_target("host=db1,db2 port=5434,5435 user=u").host == "db1"
    assert jdbc_target("host=db1,db2 port=5434,5435 user=u").port == 5434
    assert jdbc_target("host=db.example hostaddr=10.0.0.7 user=u").host == "10.0.0.7"


def test_defaults_follow_libpq(monkeypatch: pytest.MonkeyPatch) -> None:
    # no host: libpq's default socket, so loopback for JDBC; port 5432; database = user
    assert jdbc_target("user=erp") == JdbcTarget("127.0.0.1", 5432, "erp", "erp")
    monkeypatch.setenv("PGPORT", "6543")
    monkeypatch.setenv("PGUSER", "envuser")
    assert jdbc_target("") == JdbcTarget("127.0.0.1", 6543, "envuser", "envuser")


def test_a_bad_port_says_so() -> None:
    with pytest.raises(ValueError, match="port"):
        jdbc_target("host=db port=x")


# -- engine configuration -----------------------------------------------------------------------


def _props(**kw: object) -> dict[str, str]:
    target = JdbcTarget("127.0.0.1", 5432, "erp", "postgres")
    args: dict[str, object] = {"schema": "pipeline", "topic_prefix": "bench_dbz",
                               "slot": "dbz_bench_1"}
    args.update(kw)
    return engine_properties(target, **args)  # type: ignore[arg-type]


def test_engine_streams_the_outbox_over_pgoutput_without_a_snapshot() -> None:
    p = _props()
    assert p["connector.class"] == "io.debezium.connector.postgresql.PostgresConnector"
    assert p["plugin.name"] == "pgoutput"
    assert p["slot.name"] == p["publication.name"] == "dbz_bench_1"
    assert p["publication.autocreate.mode"] == "filtered"
    assert p["slot.drop.on.stop"] == "true"
    assert p["snapshot.mode"] == "no_data"
    assert p["table.include.list"] == "pipeline\\.outbox"  # a regex: the dot is literal
    assert p["offset.storage"] == "org.apache.kafka.connect.storage.MemoryOffsetBackingStore"
    assert (p["database.hostname"], p["database.port"], p["database.dbname"]) == (
        "127.0.0.1", "5432", "erp")
    assert "database.password" not in p and "database.sslmode" not in p


def test_event_router_maps_the_projects_outbox_columns() -> None:
    p = _props()
    t = "transforms.outbox."
    assert p["transforms"] == "outbox"
    assert p[t + "type"] == "io.debezium.transforms.outbox.EventRouter"
    assert p[t + "table.field.event.id"] == "event_id"
    assert p[t + "table.field.event.key"] == "aggregate_id"
    assert p[t + "table.field.event.payload"] == "payload"
    assert p[t + "route.by.field"] == "aggregate_type"
    assert p[t + "route.topic.replacement"] == "bench_dbz.${routedByValue}"
    placed = dict(item.split(":header:") for item in
                  p[t + "table.fields.additional.placement"].split(","))
    assert placed == {"event_type": "ce_type", "aggregate_type": "erp_aggregate_type",
                      "aggregate_version": "erp_aggregate_version", "occurred_at": "ce_time",
                      "id": "erp_outbox_position"}


def test_poll_interval_is_debeziums_default_unless_given() -> None:
    assert "poll.interval.ms" not in _props()
    assert _props(poll_interval_ms=10)["poll.interval.ms"] == "10"
    with pytest.raises(ValueError, match="positive"):
        _props(poll_interval_ms=0)


def test_payload_column_is_the_jsonb_or_the_avro_bytes_emit_stored() -> None:
    key = "transforms.outbox.table.field.event.payload"
    assert _props()[key] == "payload"
    assert _props(payload_column="encoded")[key] == "encoded"
    with pytest.raises(ValueError, match="payload or encoded"):
        _props(payload_column="headers")


def test_password_and_sslmode_reach_the_connector() -> None:
    target = JdbcTarget("db", 5432, "erp", "app", "pw", "require")
    p = engine_properties(target, schema="pipeline", topic_prefix="x", slot="s")
    assert (p["database.password"], p["database.sslmode"]) == ("pw", "require")


def test_slot_names_postgresql_would_refuse_are_refused_here() -> None:
    with pytest.raises(ValueError, match="slot"):
        _props(slot="Bad-Slot")


def test_harness_properties_prefix_the_kafka_and_bench_keys() -> None:
    h = harness_properties({"name": "x"}, bootstrap="127.0.0.1:9092",
                           topics=["bench_dbz.order", "bench_dbz.bench_warmup"], partitions=3,
                           kafka={"security.protocol": "PLAINTEXT"})
    assert h["kafka.bootstrap.servers"] == "127.0.0.1:9092"
    assert h["kafka.security.protocol"] == "PLAINTEXT"
    assert h["producer.acks"] == "all"
    assert h["bench.topics"] == "bench_dbz.order,bench_dbz.bench_warmup"
    assert h["bench.topic.partitions"] == "3"
    assert h["bench.payload.column"] == "payload"
    assert h["name"] == "x"
    with pytest.raises(ValueError, match="may not start"):
        harness_properties({"kafka.x": "1"}, bootstrap="b", topics=[], partitions=1)


def test_producer_mirrors_the_relays_guarantees() -> None:
    from pipeline.config import load_config
    from pipeline.kafka.client import producer_config

    settings = load_config(Path(os.devnull),
                           overrides={"kafka": {"bootstrap_servers": "127.0.0.1:9"}})
    relay = producer_config(settings)
    assert PRODUCER["acks"] == relay["acks"] == "all"
    assert PRODUCER["enable.idempotence"] == str(relay["enable.idempotence"]).lower() == "true"
    assert PRODUCER["compression.type"] == relay["compression.type"]
    assert int(PRODUCER["linger.ms"]) == relay["linger.ms"]
    assert relay["message.timeout.ms"] == 0  # retry forever: the Java client's maximum timeout
    assert PRODUCER["delivery.timeout.ms"] == str(2**31 - 1)


# -- the properties file --------------------------------------------------------------------


def test_properties_text_escapes_what_java_properties_would_misread() -> None:
    text = properties_text({
        "a=b:c": " lead",
        "path": "C:\\dir",
        "multi": "one\ntwo",
        "pw": "pässwörd😀",
        "topic": "bench_dbz.${routedByValue}",
    })
    assert text.splitlines() == [
        "a\\=b\\:c=\\ lead",
        "path=C:\\\\dir",
        "multi=one\\ntwo",
        "pw=p\\u00e4ssw\\u00f6rd\\ud83d\\ude00",
        "topic=bench_dbz.${routedByValue}",
    ]
    text.encode("ascii")  # the harness reads it as UTF-8; ASCII is safe either way


# -- the protocol ---------------------------------------------------------------------------


def test_protocol_lines_are_parsed_and_other_output_kept_for_errors() -> None:
    run = dbz.DebeziumRun("host=/tmp port=5432", "127.0.0.1:9092", schema="pipeline")
    run._take("BENCH ACKED 120")
    run._take("BENCH REACHED 2001 1700000000123456")
    run._take("BENCH FAILED Kafka did not acknowledge a record: TimeoutException: x")
    run._take("a stray line from a library")
    got = [run._lines.get_nowait() for _ in range(3)]
    assert got == [("ACKED", ["120"]), ("REACHED", ["2001", "1700000000123456"]),
                   ("FAILED", ["Kafka did not acknowledge a record: TimeoutException: x"])]
    assert run._last_progress == 120
    assert list(run._other) == ["a stray line from a library"]
    assert not run.work_dir.exists(), "nothing is made before start()"


# -- /proc readings -------------------------------------------------------------------------

linux = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads Linux /proc")


@linux
def test_cpu_and_peak_rss_of_this_process() -> None:
    sum(i * i for i in range(200_000))  # some CPU to see
    cpu = dbz.proc_cpu_s(os.getpid())
    assert cpu is not None and cpu > 0
    rss = dbz.peak_rss_mb(os.getpid())
    assert rss is not None and rss > 1
    assert dbz.jit_cpu_s(os.getpid()) == 0.0  # a Python process has no HotSpot compiler


@linux
def test_a_gone_process_reads_as_none() -> None:
    assert dbz.proc_cpu_s(2**22 + 12345) is None
    assert dbz.peak_rss_mb(2**22 + 12345) is None
    assert dbz.jit_cpu_s(2**22 + 12345) is None


# -- per-event acknowledgements (latency) ---------------------------------------------------


def test_ack_lines_are_event_ids_with_epoch_seconds() -> None:
    got = dbz.parse_ack_lines([
        "ACK 0b6e5c2a-1f0e-4a57-9a43-5f2d3c1e9b01 1700000000123456",
        "",
        "ACK 7d1f2a3b-0000-4000-8000-000000000002 1700000000200000",
        "ACK 0b6e5c2a-1f0e-4a57-9a43-5f2d3c1e9b01 1700000009000000",  # redelivered: first kept
    ])
    assert got == {
        "0b6e5c2a-1f0e-4a57-9a43-5f2d3c1e9b01": pytest.approx(1700000000.123456, abs=1e-6),
        "7d1f2a3b-0000-4000-8000-000000000002": pytest.approx(1700000000.2, abs=1e-6),
    }


@pytest.mark.parametrize("bad", ["ACK only-an-id", "ACK id 12.5", "NACK id 1", "ACK a b 1"])
def test_a_malformed_ack_line_is_an_error(bad: str) -> None:
    with pytest.raises(ValueError, match="not an ACK"):
        dbz.parse_ack_lines([bad])


def test_tracking_and_dump_lines_are_protocol_lines() -> None:
    run = dbz.DebeziumRun("host=/tmp port=5432", "127.0.0.1:9092", schema="pipeline")
    run._take("BENCH TRACKING 10201")
    run._take("BENCH DUMPED 300 10501")
    run._take("BENCH UNTRACKED")
    got = [run._lines.get_nowait() for _ in range(3)]
    assert got == [("TRACKING", ["10201"]), ("DUMPED", ["300", "10501"]), ("UNTRACKED", [])]


class _FakeHarness:
    """The harness's side of TRACK / WAIT / DUMP, answering on the run's line queue: records
    are acknowledged by ``ack()``; a dump writes the kept ones as the Java harness does."""

    def __init__(self, run: dbz.DebeziumRun, acked: int) -> None:
        self.run, self.acked = run, acked
        self.kept: list[tuple[str, int]] = []
        self.sent: list[str] = []

    def ack(self, event_id: str, micros: int) -> None:
        self.acked += 1
        self.kept.append((event_id, micros))

    def __call__(self, line: str) -> None:
        self.sent.append(line)
        put = self.run._lines.put
        if line == "TRACK":
            self.kept.clear()
            put(("TRACKING", [str(self.acked)]))
        elif line.startswith("WAIT "):
            if self.acked >= int(line[5:]):
                put(("REACHED", [line[5:], "1"]))
        elif line.startswith("DUMP "):
            Path(line[5:]).write_text("".join(f"ACK {e} {t}\n" for e, t in self.kept))
            put(("DUMPED", [str(len(self.kept)), str(self.acked)]))
            self.kept.clear()


def test_ack_times_dumps_until_every_event_is_there(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    run = dbz.DebeziumRun("host=/tmp port=5432", "127.0.0.1:9092", schema="pipeline",
                          work_dir=tmp_path)
    run._acked = 500  # the warm-up's
    fake = _FakeHarness(run, acked=500)
    monkeypatch.setattr(run, "_send", fake)
    with pytest.raises(RuntimeError, match="track_acks"):
        run.ack_times(["a"], timeout_s=1)
    run.track_acks()
    fake.ack("a", 1_700_000_000_000_001)
    fake.ack("b", 1_700_000_000_500_000)
    fake.ack("x", 1_700_000_000_600_000)  # not asked for this time: kept for later
    got = run.ack_times(["a", "b"], timeout_s=5)
    assert got == {"a": pytest.approx(1_700_000_000.000001, abs=1e-6),
                   "b": pytest.approx(1_700_000_000.5, abs=1e-6)}
    assert run._acked == 503, "wait_acked's count includes the tracked acknowledgements"
    assert fake.sent[1] == "WAIT 502"  # the harness's count first, no dump while publishing
    assert run.ack_times(["x"], timeout_s=5) == {"x": pytest.approx(1_700_000_000.6, abs=1e-6)}
    # one never acknowledged: what there is, once the timeout passed
    fake.ack("c", 1_700_000_001_000_000)
    assert set(run.ack_times(["c", "never"], timeout_s=0.3)) == {"c"}
    assert not list(tmp_path.glob("acks-*")), "the dump files are removed"


def test_latency_figures_of_a_run() -> None:
    from pipeline.bench.erp_load import latency_figures

    committed = {f"e{i}": 100.0 + i / 100 for i in range(100)}
    acks = {e: c + (0.005 if i < 99 else 0.080) for i, (e, c) in enumerate(committed.items())}
    del acks["e0"]
    fig = latency_figures(committed, acks, written=100, rate=40, seconds=2.5)
    assert fig["written"] == 100 and fig["acknowledged"] == 99
    assert fig["achieved_rate"] == 40.0 and fig["rate_reached"] is True
    assert fig["p50"] == pytest.approx(5.0, abs=0.01)
    assert fig["max"] == pytest.approx(80.0, abs=0.01)
    assert latency_figures(committed, acks, written=100, rate=43, seconds=2.5)[
        "rate_reached"] is False  # 40/s is below 95 % of 43/s


def _run(p99: float, *, reached: bool = True, written: int = 1000,
         acknowledged: int = 1000) -> dict[str, object]:
    return {"written": written, "acknowledged": acknowledged, "achieved_rate": 1000.0,
            "rate_reached": reached, "p50": p99 / 2, "p99": p99, "max": p99 * 2,
            "cpu_s_per_1000_events": 0.5}


def test_latency_summary_takes_medians_and_sums() -> None:
    from pipeline.bench.versus import latency_summary

    s = latency_summary([_run(10), _run(30, reached=False), _run(12, acknowledged=990)])
    assert s["written"] == 3000 and s["acknowledged"] == 2990
    assert s["rate_reached"] is False
    assert s["latency_ms"] == {"p50": 6.0, "p99": 12.0, "max": 24.0}
    assert len(s["runs"]) == 3


def test_latency_verdict() -> None:
    from pipeline.bench.versus import latency_summary, latency_verdict

    def systems(relay: dict[str, object], dbz_p99: float = 40.0) -> dict[str, dict[str, object]]:
        return {"relay": latency_summary([relay]),
                "debezium_poll_10ms": latency_summary([_run(dbz_p99)])}

    assert latency_verdict(systems(_run(15)), rate=1000, relay_beats=True).startswith("PASS")
    short = latency_verdict(systems(_run(15, reached=False)), rate=1000, relay_beats=True)
    assert short.startswith("NOT A PASS") and "relay" in short
    lost = latency_verdict(systems(_run(15, acknowledged=999)), rate=1000, relay_beats=True)
    assert lost.startswith("NOT A PASS") and "not acknowledged" in lost
    slow = latency_verdict(systems(_run(25)), rate=1000, relay_beats=True)
    assert slow.startswith("NOT A PASS") and "above 20 ms" in slow
    beaten = latency_verdict(systems(_run(15), dbz_p99=12), rate=1000, relay_beats=False)
    assert beaten.startswith("NOT A PASS") and "not below Debezium" in beaten
    low = latency_verdict(systems(_run(15)), rate=100, relay_beats=True)
    assert low.startswith("measured at the asked rate") and "below the target" in low
