"""The Debezium side of ``pipeline bench relay --vs debezium``: the same outbox, streamed by
Debezium 3.6's embedded engine (pgoutput, the outbox EventRouter SMT) and published by a Java
KafkaProducer with the relay's delivery guarantees, measured the way the relay is.

* :func:`fetch_debezium` resolves ``pipeline/embedded/maven/debezium/pom.xml`` into
  ``~/.cache/erp-pipeline/debezium-3.6.1.Final/libs`` (``PIPELINE_CACHE_DIR`` moves the root), and
  the harness ``debezium/OutboxBench.java`` is compiled next to it on first use (again whenever
  the source changes); nothing lands in the work tree.
* :class:`DebeziumRun` starts the harness against a database and a broker, waits until the engine
  streams and has published (and been acknowledged for) a warm-up of its own, then lets the
  caller time N rows: :meth:`DebeziumRun.begin` before writing them, the caller commits, and
  :meth:`DebeziumRun.wait_acked` returns the figures once Kafka acknowledged all N.

Typical use (the caller owns the rows, as in ``pipeline bench relay``)::

    with DebeziumRun(conninfo, bootstrap, schema="pipeline", topic_prefix="bench_dbz") as run:
        run.begin()
        write_n_rows_and_commit()
        committed = time.time()
        figures = run.wait_acked(n, committed_at=committed)

Latency (``pipeline bench relay --vs debezium --rate R``) asks for each record's own
acknowledgement instead: :meth:`DebeziumRun.track_acks` before the rows are committed, then
:meth:`DebeziumRun.ack_times` with their event ids::

    run.track_acks()
    committed_at = write_rows_at_a_rate()  # {event_id: time.time() at its commit}
    acks = run.ack_times(committed_at, timeout_s=60)  # {event_id: time.time() of its ack}

Clocks: the harness reports acknowledgements as epoch microseconds (Java's wall clock)
and ``committed_at`` is the caller's :func:`time.time`; both read CLOCK_REALTIME of this machine.
CPU comes from ``/proc`` (Linux): the Java process's utime+stime, and PostgreSQL's as the server's
postmaster plus its children (with the time of children that exited meanwhile, which the
postmaster's cutime/cstime collects), when the server runs on this machine.

The Java process is started with :func:`~pipeline.embedded.jvm.die_with_parent`: it is killed
when the thread that entered the :class:`DebeziumRun` ends, so start it from a thread that
outlives the run (the main thread, as the bench does).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import queue
import random
import re
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from pipeline.embedded.jvm import cache_root, die_with_parent, fetch_jars, java_binary, stop_process

__all__ = [
    "DEBEZIUM_VERSION",
    "PRODUCER",
    "WARMUP_AGGREGATE",
    "DebeziumRun",
    "JdbcTarget",
    "compile_harness",
    "debezium_available",
    "engine_properties",
    "fetch_debezium",
    "harness_properties",
    "jdbc_target",
    "parse_ack_lines",
    "properties_text",
]

DEBEZIUM_VERSION = "3.6.1.Final"
POM = Path(__file__).resolve().parents[1] / "embedded" / "maven" / "debezium" / "pom.xml"
SOURCE = Path(__file__).resolve().parent / "debezium" / "OutboxBench.java"
MAIN_CLASS = "OutboxBench"
_MAIN_JAR = f"debezium-embedded-{DEBEZIUM_VERSION}.jar"
_CONNECTOR_JAR = f"debezium-connector-postgres-{DEBEZIUM_VERSION}.jar"

# The relay's producer (pipeline.kafka.client.producer_config, librdkafka) in Java client terms:
# idempotent, acks=all, lz4, 5 ms linger; librdkafka's batch.size default (1,000,000 bytes) since
# the Java default (16 KiB) would cap batches far below the relay's batch.num.messages=10000;
# message.timeout.ms=0 (retry forever) is delivery.timeout.ms at its maximum. Keyed records go
# to murmur2(key) % partitions in both clients (the relay's murmur2_random).
PRODUCER: dict[str, str] = {
    "acks": "all",
    "enable.idempotence": "true",
    "compression.type": "lz4",
    "linger.ms": "5",
    "batch.size": "1000000",
    "max.in.flight.requests.per.connection": "5",
    "delivery.timeout.ms": str(2**31 - 1),
}

# The project's outbox columns (migrations/0001_outbox.sql) as the EventRouter wants them; the
# extra columns become headers named like the relay's (pipeline.kafka.names) where one exists.
_ADDITIONAL_HEADERS = (
    "event_type:header:ce_type,"
    "aggregate_type:header:erp_aggregate_type,"
    "aggregate_version:header:erp_aggregate_version,"
    "occurred_at:header:ce_time,"
    "id:header:erp_outbox_position"
)

WARMUP_AGGREGATE = "bench_warmup"
WARMUP_ROUND = 10_000
JIT_QUIET = 0.15  # the compiler threads' share of a warm-up round's CPU that counts as warm


def debezium_home() -> Path:
    return cache_root() / f"debezium-{DEBEZIUM_VERSION}"


def debezium_libs() -> Path:
    return debezium_home() / "libs"


def javac_binary() -> str | None:
    """The ``javac`` of the JDK whose ``java`` :func:`java_binary` picked (a JRE has none), else
    the one on ``PATH``."""
    java = java_binary()
    if java is not None:
        beside = Path(os.path.realpath(java)).parent / "javac"
        if beside.is_file() and os.access(beside, os.X_OK):
            return str(beside)
    return shutil.which("javac")


def debezium_available() -> bool:
    """Java 17+ with its compiler, and Maven to fetch the jars (or the jars already fetched)."""
    if java_binary() is None or javac_binary() is None:
        return False
    return shutil.which("mvn") is not None or (debezium_libs() / _MAIN_JAR).is_file()


def fetch_debezium(*, quiet: bool = True) -> Path:
    """Resolve the Debezium jars from Maven Central into the cache (idempotent); their folder.
    Resolved into a staging folder renamed into place, so an interrupted download is never
    mistaken for a complete one."""
    libs = debezium_libs()
    if (libs / _MAIN_JAR).is_file() and (libs / _CONNECTOR_JAR).is_file():
        return libs
    if java_binary() is None or shutil.which("mvn") is None:
        raise RuntimeError(
            f"the Debezium bench fetches Debezium {DEBEZIUM_VERSION} with Maven and runs it on "
            "Java 17+: apt-get install openjdk-17-jdk-headless maven (Maven must reach Maven "
            f"Central), or copy a fetched {libs} from another machine"
        )
    fetch_jars(POM, libs, _CONNECTOR_JAR, f"Debezium {DEBEZIUM_VERSION}", quiet=quiet)
    return libs


def _source_hash() -> str:
    h = hashlib.sha256(SOURCE.read_bytes())
    h.update(DEBEZIUM_VERSION.encode())
    return h.hexdigest()[:16]


def compile_harness(libs: Path) -> Path:
    """``OutboxBench.class`` compiled against ``libs`` into ``classes-<hash of the source>``
    beside them (once per source version); that folder. Older versions' folders are removed."""
    home = libs.parent
    classes = home / f"classes-{_source_hash()}"
    if (classes / f"{MAIN_CLASS}.class").is_file():
        return classes
    javac = javac_binary()
    if javac is None:
        raise RuntimeError(
            "the Debezium bench harness is compiled at first use and needs javac (a JDK, not only "
            "a JRE): apt-get install openjdk-17-jdk-headless, or set JAVA_HOME to a JDK 17+"
        )
    staging = home / f".classes-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    done = subprocess.run(
        [javac, "-encoding", "UTF-8", "-proc:none", "-cp", f"{libs}/*", "-d", str(staging),
         str(SOURCE)],
        capture_output=True, text=True, check=False,
    )
    if done.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        raise RuntimeError(
            f"javac could not compile {SOURCE.name} against Debezium {DEBEZIUM_VERSION} in "
            f"{libs}: {(done.stderr or done.stdout)[-2000:].strip()} (a partial download? remove "
            f"{libs} and run again)"
        )
    try:
        staging.rename(classes)
    except OSError:  # compiled meanwhile by another process
        shutil.rmtree(staging, ignore_errors=True)
    for old in home.glob("classes-*"):
        if old != classes:
            shutil.rmtree(old, ignore_errors=True)
    return classes


# -- configuration (pure) ---------------------------------------------------------------------


@dataclass(frozen=True)
class JdbcTarget:
    """Where the JDBC driver connects: libpq's conninfo, minus what JDBC cannot do (sockets)."""

    host: str
    port: int
    dbname: str
    user: str
    password: str | None = None
    sslmode: str | None = None


def jdbc_target(conninfo: str, *, default_user: str | None = None) -> JdbcTarget:
    """The host, port, database and user of a libpq conninfo (URL or ``key=value``) for JDBC.

    JDBC cannot use a Unix socket: a host that is a socket directory (begins with ``/``, or is
    absent, which libpq reads as the default socket) becomes 127.0.0.1 on the same port — the
    embedded PostgreSQL listens on both (``EmbeddedPostgres.tcp_url``). ``hostaddr`` wins over
    ``host`` as in libpq; of several hosts the first is taken. The user defaults like libpq's
    (``PGUSER``, then the login name), the database to the user.
    """
    params = {k: v for k, v in conninfo_to_dict(conninfo).items() if v not in (None, "")}
    env = os.environ
    hostaddr = str(params.get("hostaddr") or env.get("PGHOSTADDR") or "").split(",")[0].strip()
    host = str(params.get("host") or env.get("PGHOST") or "").split(",")[0].strip()
    if hostaddr:
        host = hostaddr
    if not host or host.startswith("/") or host.startswith("@"):
        host = "127.0.0.1"
    port_text = str(params.get("port") or env.get("PGPORT") or "5432").split(",")[0].strip()
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"the database URL's port is not a number: {port_text!r}") from None
    user = str(params.get("user") or env.get("PGUSER") or default_user or _login_name())
    dbname = str(params.get("dbname") or env.get("PGDATABASE") or user)
    password = params.get("password") or env.get("PGPASSWORD")
    sslmode = params.get("sslmode") or env.get("PGSSLMODE")
    return JdbcTarget(host, port, dbname, user, str(password) if password else None,
                      str(sslmode) if sslmode else None)


def _login_name() -> str:
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "postgres"


def engine_properties(
    target: JdbcTarget,
    *,
    schema: str,
    topic_prefix: str,
    slot: str,
    poll_interval_ms: int | None = None,
    payload_column: str = "payload",
) -> dict[str, str]:
    """The embedded engine's and the connector's configuration: pgoutput on a slot and a
    publication of ``slot``'s name (made for this run, filtered to ``<schema>.outbox``), nothing
    snapshotted (the rows come after streaming started), offsets in memory (a run never resumes),
    and the EventRouter mapped to the project's outbox columns, routing to
    ``<topic_prefix>.<aggregate_type>``. ``poll_interval_ms`` None keeps Debezium's default,
    500 ms: how long a poll of the change queue waits to fill a batch (``max.batch.size``,
    2048) before it hands over fewer records — so the last partial batch of a burst waits up to
    that long, which a throughput run of N events sees once. ``payload_column`` is what becomes
    the record's value: ``payload`` (the jsonb, as JSON text) or ``encoded`` (the Avro bytes
    ``pipeline.outbox.emit()`` stored, which the relay passes through as they are; every row
    must then carry them)."""
    if payload_column not in ("payload", "encoded"):
        raise ValueError(f"payload_column is payload or encoded, not {payload_column!r}")
    if not re.fullmatch(r"[a-z0-9_]{1,63}", slot):
        raise ValueError(f"a replication slot name is 1-63 of [a-z0-9_], not {slot!r}")
    props: dict[str, str] = {
        "name": f"bench-{slot}",
        "connector.class": "io.debezium.connector.postgresql.PostgresConnector",
        "offset.storage": "org.apache.kafka.connect.storage.MemoryOffsetBackingStore",
        "offset.flush.interval.ms": "10000",
        "database.hostname": target.host,
        "database.port": str(target.port),
        "database.user": target.user,
        "database.dbname": target.dbname,
        "topic.prefix": slot,  # the connector's own topic names; the EventRouter reroutes
        "plugin.name": "pgoutput",
        "slot.name": slot,
        "slot.drop.on.stop": "true",
        "publication.name": slot,
        "publication.autocreate.mode": "filtered",
        "table.include.list": f"{re.escape(schema)}\\.outbox",
        "snapshot.mode": "no_data",
        "transforms": "outbox",
        "transforms.outbox.type": "io.debezium.transforms.outbox.EventRouter",
        "transforms.outbox.table.field.event.id": "event_id",
        "transforms.outbox.table.field.event.key": "aggregate_id",
        "transforms.outbox.table.field.event.type": "event_type",
        "transforms.outbox.table.field.event.payload": payload_column,
        "transforms.outbox.route.by.field": "aggregate_type",
        "transforms.outbox.route.topic.replacement": f"{topic_prefix}.${{routedByValue}}",
        "transforms.outbox.table.fields.additional.placement": _ADDITIONAL_HEADERS,
        # the relay deletes what it published: a delete is not an event (the SMT drops deletes
        # and their tombstones anyway; an update would be logged and skipped, not fail the run)
        "transforms.outbox.table.op.invalid.behavior": "warn",
    }
    if target.password is not None:
        props["database.password"] = target.password
    if target.sslmode is not None:
        props["database.sslmode"] = target.sslmode
    if poll_interval_ms is not None:
        if poll_interval_ms <= 0:
            raise ValueError(f"poll_interval_ms must be positive, not {poll_interval_ms}")
        props["poll.interval.ms"] = str(poll_interval_ms)
    return props


def harness_properties(
    engine: Mapping[str, str],
    *,
    bootstrap: str,
    topics: Iterable[str],
    partitions: int,
    producer: Mapping[str, str] = PRODUCER,
    kafka: Mapping[str, str] | None = None,
    payload_column: str = "payload",
) -> dict[str, str]:
    """The whole file the harness reads: ``kafka.*`` for its producer and admin client (bootstrap,
    security), ``producer.*``, ``bench.*`` (topics created up front with ``partitions``) and the
    engine's keys as they are."""
    out = {f"kafka.{k}": v for k, v in {"bootstrap.servers": bootstrap,
                                        "client.id": "debezium-bench", **(kafka or {})}.items()}
    out.update({f"producer.{k}": v for k, v in producer.items()})
    out["bench.topics"] = ",".join(topics)
    out["bench.topic.partitions"] = str(partitions)
    out["bench.payload.column"] = payload_column
    clash = [k for k in engine if k.startswith(("kafka.", "producer.", "bench."))]
    if clash:
        raise ValueError(f"engine keys may not start with kafka./producer./bench.: {clash}")
    out.update(engine)
    return out


_CONTROL = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\f": "\\f"}


def _escape(text: str, *, key: bool) -> str:
    """One key or value in ``java.util.Properties`` syntax: backslash escapes, ``=``/``:``/``#``/
    ``!``/space in a key, a value's leading space, anything outside printable ASCII as \\uXXXX
    (UTF-16 units)."""
    out = []
    for i, ch in enumerate(text):
        if ch in _CONTROL:
            out.append(_CONTROL[ch])
        elif (key and ch in "=:#! ") or (ch == " " and i == 0):
            out.append("\\" + ch)
        elif not " " <= ch <= "~":
            units = ch.encode("utf-16-be")
            out.extend(f"\\u{units[j]:02x}{units[j + 1]:02x}" for j in range(0, len(units), 2))
        else:
            out.append(ch)
    return "".join(out)


def properties_text(props: Mapping[str, str]) -> str:
    """``java.util.Properties`` text (ASCII, escaped: a password may hold any character)."""
    return "".join(f"{_escape(k, key=True)}={_escape(v, key=False)}\n"
                   for k, v in props.items())


_LOG4J2 = """\
status = warn
appender.file.type = File
appender.file.name = file
appender.file.fileName = {log}
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = %d{{ISO8601}} %-5p [%t] %c{{1}}: %m%n
rootLogger.level = warn
rootLogger.appenderRef.file.ref = file
logger.debezium.name = io.debezium
logger.debezium.level = info
"""


# -- CPU and memory from /proc ------------------------------------------------------------------

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) is in parentheses and may hold spaces
    return raw[raw.rindex(")") + 2:].split()


def proc_cpu_s(pid: int, *, with_children: bool = False) -> float | None:
    """utime+stime of ``pid`` (all its threads), plus its waited-for children's with
    ``with_children``; None when it is gone or not visible."""
    f = _stat_fields(pid)
    if f is None:
        return None
    # after the name: state(0) ppid(1) ... utime(11) stime(12) cutime(13) cstime(14)
    ticks = int(f[11]) + int(f[12]) + ((int(f[13]) + int(f[14])) if with_children else 0)
    return ticks / _TICKS


def peak_rss_mb(pid: int) -> float | None:
    """VmHWM (the resident set's high-water mark) of ``pid`` in MiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def jit_cpu_s(pid: int) -> float | None:
    """CPU of ``pid``'s HotSpot compiler threads (``C1/C2 CompilerThreadN``): how much of the
    process's time still goes to compiling rather than running."""
    total = 0
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return None
    for t in tasks:
        try:
            if not (t / "comm").read_text().startswith(("C1 Compiler", "C2 Compiler")):
                continue
            raw = (t / "stat").read_text()
        except OSError:  # the thread ended
            continue
        f = raw[raw.rindex(")") + 2:].split()
        total += int(f[11]) + int(f[12])
    return total / _TICKS


def _java_and_jit(pid: int | None) -> tuple[float, float] | None:
    if pid is None:
        return None
    cpu, jit = proc_cpu_s(pid), jit_cpu_s(pid)
    return None if cpu is None or jit is None else (cpu, jit)


def _children(parent: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            f = _stat_fields(int(d.name))
            if f is not None and int(f[1]) == parent:
                out.append(int(d.name))
    return out


def server_cpu_s(postmaster: int) -> float | None:
    """PostgreSQL's CPU so far: the postmaster with its reaped children, plus its live
    children (backends, walsenders, background workers)."""
    base = proc_cpu_s(postmaster, with_children=True)
    if base is None:
        return None
    return base + sum(c for c in (proc_cpu_s(p) for p in _children(postmaster)) if c is not None)


def postmaster_of(conn: psycopg.Connection[Any]) -> int | None:
    """The postmaster of the server ``conn`` is on, when that server runs on this machine
    (the backend's parent, if it is a postgres process)."""
    row = conn.execute("SELECT pg_backend_pid()").fetchone()
    if row is None:
        return None
    f = _stat_fields(int(row[0]))
    if f is None:
        return None
    try:
        comm = Path(f"/proc/{row[0]}/comm").read_text().strip()
        parent_comm = Path(f"/proc/{f[1]}/comm").read_text().strip()
    except OSError:
        return None
    if "postgres" not in comm or "postgres" not in parent_comm:
        return None
    return int(f[1])


# -- the run ----------------------------------------------------------------------------------


@dataclass
class _Counters:
    at: float
    java: float
    jit: float  # of java, the JIT compiler threads'
    postgres: float | None  # the whole server
    sessions: dict[int, float]  # Debezium's own backends (pid: CPU so far)
    walsender: int | None  # which of them streams the slot


class DebeziumRun:
    """The harness against one database and broker, from start (streaming, warmed up) to a clean
    stop (slot and publication dropped, the warm-up rows deleted).

    ``conninfo`` is a libpq conninfo of a superuser or a role with REPLICATION that owns the
    outbox (the connector creates the publication); the server must run at
    ``wal_level=logical``. ``topics_for`` are the aggregate types whose topics
    (``<topic_prefix>.<type>``) are created up front with ``partitions`` partitions, so that the
    measured interval holds no topic creation. Before the run counts as ready it publishes
    warm-up rows of its own (aggregate type ``bench_warmup``, topic
    ``<topic_prefix>.bench_warmup``), at least ``warmup_events`` and at most
    ``warmup_max_events``, until the JIT compiler is quiet (see :meth:`_warm_up`): on a cold JVM
    the compiler threads take half the CPU and a first measurement would be the JIT's.
    ``poll_interval_ms`` is the connector's ``poll.interval.ms`` (None: Debezium's 500 ms; see
    :func:`engine_properties`).
    """

    def __init__(
        self,
        conninfo: str,
        bootstrap: str,
        *,
        schema: str,
        topic_prefix: str = "bench_dbz",
        poll_interval_ms: int | None = None,
        payload_column: str = "payload",
        topics_for: Iterable[str] = ("order",),
        partitions: int = 6,
        warmup_events: int = 10_000,
        warmup_max_events: int = 200_000,
        producer_overrides: Mapping[str, str] | None = None,
        kafka_properties: Mapping[str, str] | None = None,
        jvm_options: Iterable[str] = ("-Xmx1g", "-XX:+ExitOnOutOfMemoryError"),
        start_timeout_s: float = 180.0,
        work_dir: Path | None = None,
        quiet: bool = True,
    ) -> None:
        self.conninfo = conninfo
        self.bootstrap = bootstrap
        self.schema = schema
        self.topic_prefix = topic_prefix.rstrip(".")
        self.poll_interval_ms = poll_interval_ms
        self.payload_column = payload_column
        self.topics_for = list(topics_for)
        self.partitions = partitions
        self.warmup_events = warmup_events
        self.warmup_max_events = warmup_max_events
        self.warmup: dict[str, Any] = {}
        self.producer = {**PRODUCER, **(producer_overrides or {})}
        self.kafka_properties = dict(kafka_properties or {})
        self.jvm_options = list(jvm_options)
        self.start_timeout_s = start_timeout_s
        self.quiet = quiet
        self.slot = f"dbz_bench_{uuid.uuid4().hex[:10]}"
        self._own_dir = work_dir is None
        # made by start(), after the checks: a run refused up front leaves nothing behind
        self.work_dir = work_dir or Path(tempfile.gettempdir()) / f"debezium-bench-{self.slot}"
        self.log_path = self.work_dir / "debezium.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._stdout_log: IO[bytes] | None = None
        self._lines: queue.Queue[tuple[str, list[str]]] = queue.Queue()
        self._other: deque[str] = deque(maxlen=20)
        self._acked = 0  # cumulative acknowledgements the harness reported or was waited for
        self._last_progress = 0
        self._postmaster: int | None = None
        self._monitor: psycopg.Connection[Any] | None = None
        self._has_encoded = False
        self._counters: _Counters | None = None
        self._failed = False
        self._tracking = False
        self._tracked_from = 0  # the harness's count of acknowledgements when tracking began
        self._ack_log: dict[str, float] = {}  # dumped by the harness, not yet asked for

    # -- lifecycle ----------------------------------------------------------------------------

    def __enter__(self) -> DebeziumRun:
        try:
            self.start()
        except BaseException:
            self._failed = True
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None:
            self._failed = True
        self.close()

    def start(self) -> None:
        """Check the database, fetch and compile what is missing, start the harness, wait until
        it streams, then warm it up."""
        java = java_binary()
        if java is None:
            raise RuntimeError(
                "the Debezium bench needs Java 17+ on PATH (or JAVA_HOME): apt-get install "
                "openjdk-17-jdk-headless"
            )
        self._check_database()
        libs = fetch_debezium(quiet=self.quiet)
        classes = compile_harness(libs)
        target = jdbc_target(self.conninfo)
        engine = engine_properties(target, schema=self.schema, topic_prefix=self.topic_prefix,
                                   slot=self.slot, poll_interval_ms=self.poll_interval_ms,
                                   payload_column=self.payload_column)
        topics = [self.topic(t) for t in [*self.topics_for, WARMUP_AGGREGATE]]
        props = harness_properties(engine, bootstrap=self.bootstrap, topics=topics,
                                   partitions=self.partitions, producer=self.producer,
                                   kafka=self.kafka_properties,
                                   payload_column=self.payload_column)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        cfg = self.work_dir / "bench.properties"
        cfg.touch(mode=0o600)  # it may hold the database password
        cfg.write_text(properties_text(props), encoding="ascii")
        log4j = self.work_dir / "log4j2.properties"
        log4j.write_text(_LOG4J2.format(log=self.log_path))
        cmd = [java, *self.jvm_options, f"-Dlog4j2.configurationFile={log4j}",
               "-cp", f"{classes}{os.pathsep}{libs}/*", MAIN_CLASS, str(cfg)]
        self._stdout_log = open(self.work_dir / "stderr.log", "ab")  # noqa: SIM115
        self._proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stdout_log,
            start_new_session=True, preexec_fn=die_with_parent,
        )
        self._reader = threading.Thread(target=self._read, name="debezium-bench-stdout",
                                        daemon=True)
        self._reader.start()
        self._expect("TOPICS", self.start_timeout_s, "create its topics on " + self.bootstrap)
        self._expect("POLLING", self.start_timeout_s, "start streaming from PostgreSQL")
        self._wait_slot()
        self._warm_up()
        if self._postmaster is not None:
            self._monitor = psycopg.connect(self.conninfo, autocommit=True)
        self.begin()

    def close(self) -> None:
        """Stop the harness (the engine drops its slot on a clean stop), then drop whatever of
        the slot and publication is left, and delete the warm-up rows — so the next run, and
        the project's relay, start from a clean outbox."""
        if self._monitor is not None:
            with contextlib.suppress(psycopg.Error):
                self._monitor.close()
            self._monitor = None
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                with contextlib.suppress(OSError, ValueError):
                    assert proc.stdin is not None
                    proc.stdin.write(b"STOP\n")
                    proc.stdin.flush()
                    proc.stdin.close()
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    stop_process(proc, 10.0)
            if self._reader is not None:  # it reads to the end of the output first
                self._reader.join(10)
                self._reader = None
            if proc.stdout is not None:
                proc.stdout.close()
        if self._stdout_log is not None:
            self._stdout_log.close()
            self._stdout_log = None
        try:
            self._drop_slot_and_publication()
        finally:
            if self._own_dir and not self._failed:
                shutil.rmtree(self.work_dir, ignore_errors=True)

    # -- measuring ----------------------------------------------------------------------------

    def topic(self, aggregate_type: str) -> str:
        return f"{self.topic_prefix}.{aggregate_type}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def begin(self) -> float:
        """Start the measured interval's CPU accounting (Java and PostgreSQL); call it right
        before writing the rows. Returns ``time.time()``. Without it the interval starts when
        the run became ready or when the previous :meth:`wait_acked` returned."""
        self._counters = self._sample()
        return self._counters.at

    def wait_acked(
        self, n: int, *, committed_at: float, timeout_s: float = 600.0
    ) -> dict[str, Any]:
        """Wait until Kafka acknowledged ``n`` more records than before, then the figures:
        ``events``; ``seconds`` from ``committed_at`` (``time.time()`` at the commit) to the last
        acknowledgement; ``events_per_s``; ``cpu_s`` (Java, since :meth:`begin`) and
        ``cpu_s_per_1000_events``; ``peak_rss_mb`` (Java's VmHWM over its whole life);
        ``postgres_cpu_s`` and ``postgres_cpu_s_per_1000_events`` (the whole server: the
        backend that wrote the rows, WAL writing and Debezium's sessions),
        ``postgres_debezium_cpu_s`` (Debezium's own sessions only: what capture costs the
        database, the figure to set against the relay's SELECT/DELETE backend) and
        ``postgres_walsender_cpu_s`` (of those, the slot's walsender: decoding) — None when the
        server is not on this machine; ``total_cpu_s_per_1000_events`` (Java plus Debezium's
        sessions); ``jit_cpu_s`` (of ``cpu_s``, the JIT compiler threads': well above a tenth
        of it means the JVM was still warming up); ``cpu_interval_s`` (what the CPU figures
        span); ``warmup`` (events, rounds, the last round's JIT share); ``producer`` and
        ``engine``, the settings used."""
        if n <= 0:
            raise ValueError(f"n must be positive, not {n}")
        start = self._counters or self._sample()
        goal = self._acked + n
        last_ack = self._await(
            goal, timeout_s,
            f"publish the {n} events (are they committed, into {self.schema}.outbox?)")
        end = self._sample()
        self._acked = goal
        self._counters = end
        seconds = last_ack - committed_at
        java_cpu = end.java - start.java
        pg_cpu = _delta(end.postgres, start.postgres)
        # a session Debezium opened or closed meanwhile counts from its first or to its last
        # sample only; the walsender lives as long as the stream
        dbz = {p: c - start.sessions.get(p, c) for p, c in end.sessions.items()}
        dbz_cpu = sum(dbz.values()) if self._postmaster is not None and dbz else None
        wal_cpu = dbz.get(end.walsender) if end.walsender is not None else None
        pid = self.pid
        rss = peak_rss_mb(pid) if pid is not None else None
        return {
            "events": n,
            "seconds": round(seconds, 4),
            "events_per_s": round(n / seconds) if seconds > 0 else None,
            "cpu_s": round(java_cpu, 3),
            "cpu_s_per_1000_events": round(java_cpu / n * 1000, 4),
            "jit_cpu_s": round(end.jit - start.jit, 3),
            "peak_rss_mb": round(rss, 1) if rss is not None else None,
            "postgres_cpu_s": _round(pg_cpu, 3),
            "postgres_cpu_s_per_1000_events": _round(_per_1000(pg_cpu, n), 4),
            "postgres_debezium_cpu_s": _round(dbz_cpu, 3),
            "postgres_walsender_cpu_s": _round(wal_cpu, 3),
            "total_cpu_s_per_1000_events": _round(
                _per_1000(None if dbz_cpu is None else java_cpu + dbz_cpu, n), 4),
            "cpu_interval_s": round(end.at - start.at, 3),
            "warmup": dict(self.warmup),
            "producer": dict(self.producer),
            "engine": self.engine_info(),
        }

    def engine_info(self) -> dict[str, Any]:
        """What this run's engine is: Debezium's version, plugin, poll interval, payload column,
        record format and (first) topic."""
        return {
            "debezium": DEBEZIUM_VERSION,
            "plugin": "pgoutput",
            "poll_interval_ms": self.poll_interval_ms,  # None: Debezium's default, 500
            "payload_column": self.payload_column,
            "format": "Connect (SourceRecord): key and text as UTF-8, bytes as they are",
            "topic": self.topic(self.topics_for[0]) if self.topics_for else None,
        }

    def track_acks(self) -> None:
        """From now on the harness keeps each acknowledged record's event id (the outbox row's
        ``event_id``, which the EventRouter puts in the ``id`` header) with the time Kafka
        acknowledged it, for :meth:`ack_times`; whatever was kept before is forgotten. Returns
        once the harness confirmed, so rows committed afterwards are all tracked."""
        self._send("TRACK")
        self._tracked_from = int(self._expect("TRACKING", 30,
                                              "start tracking acknowledgements")[0])
        self._ack_log.clear()
        self._tracking = True

    def ack_times(self, event_ids: Iterable[str], timeout_s: float = 60.0) -> dict[str, float]:
        """``{event_id: time.time() of its Kafka acknowledgement}`` for ``event_ids``, once all
        of them were acknowledged or ``timeout_s`` passed (then only those acknowledged: compare
        the lengths). Needs :meth:`track_acks` before the rows were committed. The harness keeps
        the acknowledgements in memory and writes them to a file only when asked here (every
        0.1 s while some are missing), so the measured interval carries no extra output; those
        returned are forgotten, others are kept for a later call. Afterwards the run's count
        of acknowledgements includes these, so :meth:`wait_acked` goes on working."""
        if not self._tracking:
            raise RuntimeError("ack_times() needs track_acks() before the rows were committed")
        want = set(event_ids)
        deadline = time.monotonic() + timeout_s
        # the harness's count first (one line back), so that no dump runs while it is still
        # publishing the measured rows
        if want:
            self._reach(self._tracked_from + len(want), timeout_s)
        dumps = 0
        while True:
            path = self.work_dir / f"acks-{dumps}.txt"
            dumps += 1
            self._send(f"DUMP {path}")
            args = self._expect("DUMPED", 60, "write its acknowledgements")
            try:
                text = path.read_text(encoding="utf-8")
            finally:
                with contextlib.suppress(OSError):
                    path.unlink()
            for event_id, at in parse_ack_lines(text.splitlines()).items():
                self._ack_log.setdefault(event_id, at)  # a redelivery's later ack is not it
            self._acked = max(self._acked, int(args[1]))
            if want.issubset(self._ack_log) or time.monotonic() >= deadline:
                break
            time.sleep(0.1)
        got = {e: self._ack_log.pop(e) for e in want if e in self._ack_log}
        self._tracked_from += len(got)
        return got

    def untrack_acks(self) -> None:
        """Stop keeping acknowledgements (and forget those kept)."""
        self._send("UNTRACK")
        self._expect("UNTRACKED", 30, "stop tracking acknowledgements")
        self._ack_log.clear()
        self._tracking = False

    # -- internals ----------------------------------------------------------------------------

    def _check_database(self) -> None:
        """What the connector would fail on later with a JDBC stack trace, said plainly now."""
        try:
            conn = psycopg.connect(self.conninfo, autocommit=True, connect_timeout=10)
        except psycopg.OperationalError as exc:
            raise RuntimeError(f"the Debezium bench cannot connect to PostgreSQL: {exc}") from exc
        with conn:
            wal = conn.execute("SHOW wal_level").fetchone()
            if wal is None or wal[0] != "logical":
                raise RuntimeError(
                    f"PostgreSQL runs at wal_level={wal[0] if wal else '?'}; Debezium's pgoutput "
                    "needs wal_level=logical: set it in postgresql.conf (or ALTER SYSTEM SET "
                    "wal_level = logical) and restart the server (the embedded PostgreSQL "
                    "already runs so)"
                )
            role = conn.execute(
                "SELECT rolsuper OR rolreplication FROM pg_roles WHERE rolname = current_user"
            ).fetchone()
            if not role or not role[0]:
                raise RuntimeError(
                    "the database role has neither SUPERUSER nor REPLICATION, which Debezium "
                    "needs for its replication slot: ALTER ROLE <role> REPLICATION, or use a "
                    "superuser URL for the bench"
                )
            exists = conn.execute(
                "SELECT to_regclass(%s) IS NOT NULL", (f"{self.schema}.outbox",)
            ).fetchone()
            if not exists or not exists[0]:
                raise RuntimeError(
                    f"{self.schema}.outbox does not exist: install the outbox first "
                    "(pipeline.outbox.migrations.install, or `pipeline outbox install`)"
                )
            col = conn.execute(
                "SELECT count(*) FROM information_schema.columns WHERE table_schema = %s "
                "AND table_name = 'outbox' AND column_name = 'encoded'", (self.schema,)
            ).fetchone()
            self._has_encoded = bool(col and col[0])
            if self.payload_column == "encoded" and not self._has_encoded:
                raise RuntimeError(
                    f"{self.schema}.outbox has no encoded column to publish: bring the outbox "
                    "up to date (pipeline.outbox.migrations.install applies migration 0004), or "
                    "run with payload_column='payload'"
                )
            free = conn.execute(
                "SELECT current_setting('max_replication_slots')::int - count(*) "
                "FROM pg_replication_slots"
            ).fetchone()
            if free is not None and free[0] <= 0:
                raise RuntimeError(
                    "PostgreSQL has no free replication slot (max_replication_slots reached): "
                    "drop stale ones (SELECT pg_drop_replication_slot(slot_name) FROM "
                    "pg_replication_slots WHERE NOT active) or raise max_replication_slots"
                )
            self._postmaster = postmaster_of(conn)

    def _read(self) -> None:
        proc = self._proc
        if proc is None or proc.stdout is None:
            return
        try:
            for raw in proc.stdout:
                self._take(raw.decode("utf-8", "replace").rstrip("\n"))
        except (OSError, ValueError):  # the pipe closed under us: the run is over anyway
            pass
        self._lines.put(("EXIT", []))

    def _take(self, line: str) -> None:
        """One line of the harness's output: a protocol line (``BENCH <kind> <args>``) for the
        waiting side; anything else kept for the error message."""
        if not line.startswith("BENCH "):
            self._other.append(line)
            return
        body = line[6:]
        # a failure's message is one argument, spaces and all
        kind, *args = body.split(" ", 1) if body.startswith("FAILED") else body.split()
        if kind == "ACKED":
            self._last_progress = int(args[0])
        self._lines.put((kind, args))

    def _next(self, timeout_s: float, doing: str) -> tuple[str, list[str]]:
        try:
            kind, args = self._lines.get(timeout=timeout_s)
        except queue.Empty:
            return "TIMEOUT", []
        if kind == "FAILED":
            self._failed = True
            raise RuntimeError(
                f"the Debezium harness failed while waiting to {doing}: "
                f"{args[0] if args else ''}{self._log_hint()}"
            )
        if kind == "EXIT":
            self._failed = True
            code = self._proc.wait(10) if self._proc is not None else None
            raise RuntimeError(
                f"the Debezium harness exited (code {code}) while waiting to {doing}"
                f"{self._log_hint()}"
            )
        return kind, args

    def _expect(self, want: str, timeout_s: float, doing: str) -> list[str]:
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            kind, args = self._next(max(left, 0.0), doing) if left > 0 else ("TIMEOUT", [])
            if kind == want:
                return args
            if kind == "TIMEOUT":
                self._failed = True
                raise RuntimeError(
                    f"the Debezium harness did not {doing} within {timeout_s:.0f} s"
                    f"{self._log_hint()}"
                )

    def _send(self, line: str) -> None:
        proc = self._proc
        if proc is None or proc.stdin is None or proc.poll() is not None:
            raise RuntimeError(f"the Debezium harness is not running{self._log_hint()}")
        proc.stdin.write(line.encode() + b"\n")
        proc.stdin.flush()

    def _log_hint(self) -> str:
        """The harness's last errors, and where its whole log is (kept on failure)."""
        self._failed = True
        lines: list[str] = []
        with contextlib.suppress(OSError):
            text = self.log_path.read_text(errors="replace").splitlines()
            lines = [ln for ln in text if " ERROR " in ln or "Exception" in ln][-5:] or text[-5:]
        with contextlib.suppress(OSError):
            lines += (self.work_dir / "stderr.log").read_text(errors="replace").splitlines()[-5:]
        lines += list(self._other)[-3:]
        tail = "\n  ".join(ln[:400] for ln in lines)
        return f"; log {self.log_path}" + (f":\n  {tail}" if tail else "")

    def _wait_slot(self) -> None:
        """The engine polls once its task started, and the task creates the slot first: rows
        committed after this point are in the slot's stream."""
        deadline = time.monotonic() + 60
        with psycopg.connect(self.conninfo, autocommit=True) as conn:
            while time.monotonic() < deadline:
                row = conn.execute(
                    "SELECT active FROM pg_replication_slots WHERE slot_name = %s", (self.slot,)
                ).fetchone()
                if row is not None:
                    return
                time.sleep(0.05)
        raise RuntimeError(
            f"Debezium polls but its replication slot {self.slot} did not appear{self._log_hint()}"
        )

    def _warm_up(self) -> None:
        """Rounds of ``WARMUP_ROUND`` rows (transactions of 2,000, as a bench writes them) until
        the JIT is quiet: the HotSpot compiler threads spent at most ``JIT_QUIET`` of the
        process's CPU in the round, after at least ``warmup_events`` rows and at most
        ``warmup_max_events``. (Measured on 2 cores: Debezium and Kafka's hot paths take some
        80,000 events to compile; before that the compiler threads take half the CPU and
        the throughput is half or less.) Each round's rows are deleted again (deletes must
        produce no records), then one more row is written: once its record is acknowledged, the
        deletes before it were streamed too, so none of them lands in the measured interval.
        The outbox is vacuumed at the end."""
        from pipeline.simulator.payloads import payload_for

        event = payload_for("order.created", random.Random(1), aggregate_id="W-1",
                            now=dt.datetime.now(dt.UTC))
        payload = json.dumps(event, separators=(",", ":"))
        ident = sql.Identifier(self.schema)
        if self._has_encoded:  # as emit() writes rows: the Avro bytes beside the jsonb
            from pipeline.schemas.catalogue import Catalogue
            from pipeline.schemas.codec import Encoder

            encoded = Encoder(Catalogue.load()).encode("order.created", event, topic="").value
            insert = sql.SQL(
                "INSERT INTO {}.outbox (event_id, aggregate_type, aggregate_id, "
                "aggregate_version, event_type, payload, encoded) SELECT gen_random_uuid(), %s, "
                "'W-' || (i %% 50), i, 'bench.warmup', %s::jsonb, %s::bytea "
                "FROM generate_series(1, %s) i"
            ).format(ident)
            params: tuple[Any, ...] = (WARMUP_AGGREGATE, payload, encoded)
        else:
            insert = sql.SQL(
                "INSERT INTO {}.outbox (event_id, aggregate_type, aggregate_id, "
                "aggregate_version, event_type, payload) SELECT gen_random_uuid(), %s, "
                "'W-' || (i %% 50), i, 'bench.warmup', %s::jsonb FROM generate_series(1, %s) i"
            ).format(ident)
            params = (WARMUP_AGGREGATE, payload)
        delete = sql.SQL("DELETE FROM {}.outbox WHERE aggregate_type = %s").format(ident)
        pid = self.pid
        done = rounds = 0
        jit_share = 1.0
        with psycopg.connect(self.conninfo, autocommit=True) as conn:
            while True:
                n = min(WARMUP_ROUND, max(self.warmup_max_events - done - 1, 1))
                before = _java_and_jit(pid)
                for chunk in range(0, n, 2000):
                    conn.execute(insert, (*params, min(2000, n - chunk)))
                conn.execute(delete, (WARMUP_AGGREGATE,))
                conn.execute(insert, (*params, 1))
                self._await(self._acked + n + 1, self.start_timeout_s, "publish warm-up events")
                self._acked += n + 1
                done += n + 1
                rounds += 1
                after = _java_and_jit(pid)
                if before is not None and after is not None and after[0] > before[0]:
                    jit_share = (after[1] - before[1]) / (after[0] - before[0])
                if done >= self.warmup_events and (
                    jit_share <= JIT_QUIET or done >= self.warmup_max_events
                ):
                    break
            # the warm-up's dead rows, vacuumed now rather than by an autovacuum worker in the
            # measured interval (seen: 3 s of PostgreSQL CPU in a 1 s run)
            conn.execute(sql.SQL("VACUUM {}.outbox").format(ident))
        self.warmup = {"events": done, "rounds": rounds,
                       "last_round_jit_share": round(jit_share, 3)}

    def _reach(self, goal: int, timeout_s: float) -> bool:
        """Until the harness reports ``goal`` acknowledgements in all, or ``timeout_s`` passed
        (False; no error: the caller looks at what was acknowledged)."""
        self._send(f"WAIT {goal}")
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            kind, args = self._next(left, "acknowledge the tracked events")
            if kind == "REACHED" and int(args[0]) == goal:
                return True
        return False

    def _await(self, goal: int, timeout_s: float, doing: str) -> float:
        """Until the harness reports ``goal`` acknowledgements in all; the last one's time
        (epoch seconds)."""
        self._send(f"WAIT {goal}")
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(
                    f"Debezium did not {doing} within {timeout_s:.0f} s: "
                    f"{max(self._last_progress - self._acked, 0)} of {goal - self._acked} "
                    f"acknowledged{self._log_hint()}"
                )
            kind, args = self._next(left, doing)
            if kind == "REACHED" and int(args[0]) == goal:
                return int(args[1]) / 1e6

    def _debezium_sessions(self) -> tuple[list[int], int | None]:
        """Debezium's backends (it names them ``Debezium Streaming``, the walsender, and
        ``Debezium General``), asked on the monitor connection opened at start: a connection
        opened per sample would add a backend's start-up to the interval's PostgreSQL CPU."""
        conn = self._monitor
        if conn is None or self._postmaster is None:
            return [], None
        try:
            rows = conn.execute(
                "SELECT pid, backend_type = 'walsender' FROM pg_stat_activity "
                "WHERE application_name LIKE 'Debezium%%'"
            ).fetchall()
        except psycopg.Error:
            return [], None
        return [int(r[0]) for r in rows], next((int(r[0]) for r in rows if r[1]), None)

    def _sample(self) -> _Counters:
        at = time.time()
        pid = self.pid
        java = (proc_cpu_s(pid) if pid is not None else None) or 0.0
        jit = (jit_cpu_s(pid) if pid is not None else None) or 0.0
        postgres = server_cpu_s(self._postmaster) if self._postmaster is not None else None
        pids, walsender = self._debezium_sessions()
        sessions = {p: c for p in pids if (c := proc_cpu_s(p)) is not None}
        return _Counters(at, java, jit, postgres, sessions, walsender)

    def _drop_slot_and_publication(self) -> None:
        try:
            conn = psycopg.connect(self.conninfo, autocommit=True, connect_timeout=10)
        except psycopg.OperationalError:
            return
        with conn:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                row = conn.execute(
                    "SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s",
                    (self.slot,),
                ).fetchone()
                if row is None:
                    break
                if row[0] is None:
                    with contextlib.suppress(psycopg.Error):
                        conn.execute("SELECT pg_drop_replication_slot(%s)", (self.slot,))
                    continue
                if time.monotonic() > deadline - 20:  # the walsender outlived its client
                    conn.execute("SELECT pg_terminate_backend(%s)", (row[0],))
                time.sleep(0.2)
            conn.execute(sql.SQL("DROP PUBLICATION IF EXISTS {}").format(
                sql.Identifier(self.slot)))
            with contextlib.suppress(psycopg.Error):
                conn.execute(sql.SQL("DELETE FROM {}.outbox WHERE aggregate_type = %s").format(
                    sql.Identifier(self.schema)), (WARMUP_AGGREGATE,))


def parse_ack_lines(lines: Iterable[str]) -> dict[str, float]:
    """The harness's ``ACK <event_id> <epoch_us>`` lines as ``{event_id: epoch seconds}`` (the
    :func:`time.time` scale); of an id acknowledged twice (a redelivery) the first time is
    kept. Blank lines are skipped; anything else is an error (the file is written whole before
    the harness says DUMPED)."""
    out: dict[str, float] = {}
    for line in lines:
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 3 or parts[0] != "ACK" or not parts[2].isdigit():
            raise ValueError(f"not an ACK <event_id> <epoch_us> line: {line[:200]!r}")
        out.setdefault(parts[1], int(parts[2]) / 1e6)
    return out


def _delta(end: float | None, start: float | None) -> float | None:
    return None if end is None or start is None else end - start


def _per_1000(cpu_s: float | None, n: int) -> float | None:
    return None if cpu_s is None else cpu_s / n * 1000


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)
