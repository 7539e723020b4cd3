"""The Java interop contract (issue 11): data teams read the event topics from Java, Spark and
Flink with nothing but kafka-clients and Apache Avro.

The pipeline publishes events of several types (money as Avro decimals) through its own path
(``pipeline.outbox.emit`` + the relay); then a Java consumer (``tests/interop/java``, built with
Maven into ``~/.cache/erp-pipeline/java-interop/target``) reads every topic from the beginning
and checks, per record, that Java's default partitioner puts the key in the same partition, that
Avro's ``BinaryMessageDecoder`` (single-object encoding, CRC-64-AVRO fingerprints computed by
Java's ``SchemaNormalization``) or the registry's schema id (Confluent framing, resolved over
HTTP) decodes the value, and that the CloudEvents headers are there and agree with the key. The
test then compares what Java decoded with the payloads Python wrote.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import json
import os
import random
import shutil
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pipeline.config import Settings
from pipeline.outbox.emit import emit
from pipeline.outbox.migrations import install
from pipeline.relay.relay import Relay
from pipeline.schemas.catalogue import default_catalogue_path
from pipeline.simulator.erp import LIFECYCLE
from pipeline.simulator.payloads import payload_for
from tests.conftest import make_settings
from tests.fixtures.registry import Registry as SchemaRegistry
from tests.fixtures.relay import outbox_count, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.kafka_only]

PROJECT = Path(__file__).resolve().parents[1] / "interop" / "java"
MAIN_CLASS = "com.erp.pipeline.interop.InteropConsumer"

# (event type, aggregate type) of one order's life, as the simulator writes it
ORDER_EVENTS = LIFECYCLE
# decimal values whose encodings are easy to get wrong: zero, a sign byte needed (1.28 → 0x0080),
# negative, one cent, the precision's limit (18 digits), a 0x7fff/0x8000 boundary
EDGE_AMOUNTS = ("0.00", "1.28", "-1.28", "0.01", "-0.01", "327.67", "327.68", "-327.68",
                "9999999999999999.99", "-9999999999999999.99")
# the money fields of each event type (paths into the payload; [] = every element)
MONEY_FIELDS: dict[str, set[str]] = {
    "order.created": {"total", "lines[].unit_price"},
    "payment.completed": {"amount"},
    "invoice.issued": {"amount", "tax"},
    "customer.upserted": {"credit_limit"},
}


# Found by this test and fixed: the pipeline wrote a negative decimal whose unscaled value is
# -2^(8k-1) (-1.28 → -128, -327.68 → -32768 …) with a redundant sign byte (ff80 where Java's
# BigInteger.toByteArray, and so Avro's DecimalConversion, writes 80).
def _sign_extended(v: str) -> bool:
    """A decimal string the pipeline encodes with a redundant 0xff sign byte (scale 2)."""
    try:
        n = int(Decimal(v).scaleb(2))
    except ArithmeticError:
        return False
    return n < 0 and (-n).bit_count() == 1 and (-n).bit_length() % 8 == 0


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def _cache_root() -> Path:
    return Path(os.environ.get("PIPELINE_CACHE_DIR") or Path.home() / ".cache" / "erp-pipeline")


def _sources_digest() -> str:
    h = hashlib.sha256()
    for f in sorted([PROJECT / "pom.xml", *(PROJECT / "src").rglob("*")]):
        if f.is_file():
            h.update(str(f.relative_to(PROJECT)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def _mvn_package(mvn: str, build_dir: Path, offline: bool) -> subprocess.CompletedProcess[str]:
    cmd = [mvn, "-B", "-q", "-Dstyle.color=never", f"-Dinterop.build.dir={build_dir}",
           "-f", str(PROJECT / "pom.xml"), "package"]
    if offline:
        cmd.insert(1, "-o")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=540, check=False)


def _classpath_ok(build_dir: Path, jar: Path) -> bool:
    cp_file = build_dir / "classpath.txt"
    if not jar.is_file() or not cp_file.is_file():
        return False
    return all(Path(p).is_file() for p in cp_file.read_text().strip().split(os.pathsep) if p)


@dataclass(frozen=True)
class JavaConsumer:
    java: str
    classpath: str
    build_s: float
    built: bool  # False: the cached build was up to date and Maven did not run

    def run(self, bootstrap: str, topics: list[str], expected: int, schemas: Path,
            registry: str | None = None) -> subprocess.CompletedProcess[str]:
        cmd = [self.java, "-cp", self.classpath, MAIN_CLASS, "--bootstrap", bootstrap,
               "--topics", ",".join(topics), "--expected", str(expected),
               "--schemas", str(schemas), "--timeout-s", "90"]
        if registry is not None:
            cmd += ["--registry", registry]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)


@pytest.fixture(scope="session")
def java_consumer() -> JavaConsumer:
    """The interop consumer, built once (Maven, offline first: a second run neither recompiles
    nor reaches the network); skipped when Maven is missing."""
    from pipeline.embedded.kafka import java_binary

    java = java_binary()
    mvn = shutil.which("mvn")
    if java is None or mvn is None:
        pytest.skip("needs Java 17+ and Maven (mvn) for the Java interop consumer")
    root = _cache_root() / "java-interop"
    build_dir = root / "target"
    root.mkdir(parents=True, exist_ok=True)
    jar = build_dir / "java-interop-1.0.0.jar"
    stamp = build_dir / "sources.sha256"
    start = time.monotonic()
    built = False
    with open(root / ".build.lock", "w") as lock:  # parallel sessions share the build dir
        fcntl.flock(lock, fcntl.LOCK_EX)
        digest = _sources_digest()
        fresh = stamp.is_file() and stamp.read_text().strip() == digest
        if not (fresh and _classpath_ok(build_dir, jar)):
            built = True
            stamp.unlink(missing_ok=True)
            proc = _mvn_package(mvn, build_dir, offline=True)
            if proc.returncode != 0:  # dependencies or plugins not in ~/.m2 yet
                proc = _mvn_package(mvn, build_dir, offline=False)
            if proc.returncode != 0:
                pytest.fail(f"mvn package of {PROJECT} failed ({proc.returncode}):\n"
                            f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
            assert _classpath_ok(build_dir, jar), f"the build left no {jar} / classpath.txt"
            stamp.write_text(digest + "\n")
    classpath = os.pathsep.join([str(jar), (build_dir / "classpath.txt").read_text().strip()])
    return JavaConsumer(java, classpath, time.monotonic() - start, built)


@dataclass
class Emitted:
    """What the test wrote: event id → (event type, aggregate type, key, payload)."""

    events: dict[str, tuple[str, str, str, dict[str, Any]]]

    @property
    def aggregate_types(self) -> set[str]:
        return {agg for _, agg, _, _ in self.events.values()}


def _emit_events(url: str) -> Emitted:
    rng = random.Random(11)
    now = dt.datetime.now(dt.UTC)
    events: dict[str, tuple[str, str, str, dict[str, Any]]] = {}

    def put(conn: psycopg.Connection[Any], etype: str, agg: str, key: str,
            payload: dict[str, Any]) -> None:
        eid = f"00000000-0000-4000-8000-{len(events) + 1:012d}"
        emit(conn, agg, key, etype, payload, event_id=eid)
        events[eid] = (etype, agg, key, payload)

    with psycopg.connect(url) as conn:
        for c in range(6):
            key = f"CUST-{1100 + c}"
            for _ in range(2):
                put(conn, "customer.upserted", "customer", key,
                    payload_for("customer.upserted", rng, aggregate_id=key, now=now))
        for o in range(12):
            key = f"SO-{o + 1:06d}"
            for etype, agg in ORDER_EVENTS:
                put(conn, etype, agg, key, payload_for(etype, rng, aggregate_id=key, now=now))
            if o % 4 == 0:
                put(conn, "inventory.released", "inventory", key,
                    payload_for("inventory.released", rng, aggregate_id=key, now=now))
                put(conn, "order.cancelled", "order", key,
                    payload_for("order.cancelled", rng, aggregate_id=key, now=now))
        for i, amount in enumerate(EDGE_AMOUNTS):
            key = f"SO-9{i:05d}"
            payload = payload_for("payment.completed", rng, aggregate_id=key, now=now)
            put(conn, "payment.completed", "payment", key, {**payload, "amount": amount})
            order = payload_for("order.created", rng, aggregate_id=key, now=now)
            order["lines"][0]["unit_price"] = amount
            put(conn, "order.created", "order", key, {**order, "total": amount})
        conn.commit()
    return Emitted(events)


def _relay_until_empty(settings: Settings) -> float:
    assert settings.database.url is not None
    url = settings.database.url.get_secret_value()
    stop = threading.Event()
    relay = Relay(settings)
    t = threading.Thread(target=relay.run, args=(stop,), daemon=True)
    t.start()
    try:
        return wait_for(lambda: outbox_count(url) == 0, 90, "the relay to drain the outbox",
                        interval_s=0.2)
    finally:
        stop.set()
        t.join(30)
        assert not t.is_alive(), "the relay did not stop"


def _parse_output(stdout: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    lines = [json.loads(line, parse_float=Decimal) for line in stdout.splitlines()
             if line.startswith("{")]
    assert lines and "summary" in lines[-1], f"no summary line in the Java output:\n{stdout}"
    return lines[:-1], lines[-1]["summary"]


def _instant(text: str) -> dt.datetime | None:
    try:
        t = dt.datetime.fromisoformat(text)
    except ValueError:
        return None
    return t if t.tzinfo is not None else None


def _compare(java: Any, py: Any, path: str, money: list[str], problems: list[str]) -> None:
    """Java's decoded value against the JSON-form payload Python emitted: decimals compared as
    strings (``"12.50"``, scale included), timestamp-micros as instants, the rest exactly."""
    if isinstance(py, dict):
        if not isinstance(java, dict) or set(java) != set(py):
            problems.append(f"{path}: Java {java!r} vs Python {py!r}")
            return
        for k in py:
            _compare(java[k], py[k], f"{path}.{k}" if path else k, money, problems)
    elif isinstance(py, list):
        if not isinstance(java, list) or len(java) != len(py):
            problems.append(f"{path}: Java {java!r} vs Python {py!r}")
            return
        for j, p in zip(java, py, strict=True):
            _compare(j, p, f"{path}[]", money, problems)
    elif isinstance(java, Decimal):
        money.append(path)
        if str(java) != py:
            problems.append(f"{path}: decimal: Java {java} vs Python {py!r}")
    elif isinstance(java, str) and isinstance(py, str) and java != py:
        tj, tp = _instant(java), _instant(py)
        if tj is None or tp is None or tj != tp:
            problems.append(f"{path}: Java {java!r} vs Python {py!r}")
    elif not isinstance(java, str) and java != py:
        problems.append(f"{path}: Java {java!r} vs Python {py!r}")


def _check_java_run(proc: subprocess.CompletedProcess[str], emitted: Emitted, prefix: str,
                    partitions: int, wire_form: str) -> dict[str, Any]:
    assert proc.returncode == 0, (f"the Java consumer exited {proc.returncode}:\n"
                                  f"{proc.stderr[-6000:]}\n--- stdout tail ---\n"
                                  f"{proc.stdout[-3000:]}")
    records, summary = _parse_output(proc.stdout)
    assert summary["ok"] is True and summary["records"] == len(emitted.events), summary
    assert len(records) == len(emitted.events)
    seen = Counter(r["ce_id"] for r in records)
    twice = sorted(i for i, n in seen.items() if n > 1)
    assert not twice, f"{len(twice)} events read more than once by Java: {twice[:5]}"
    missing = set(emitted.events) - set(seen)
    extra = set(seen) - set(emitted.events)
    assert not missing, f"{len(missing)} emitted events Java never read: {sorted(missing)[:5]}"
    assert not extra, f"Java read {len(extra)} events the test did not emit: {sorted(extra)[:5]}"

    problems: list[str] = []
    money: dict[str, set[str]] = {}
    partitions_seen: dict[str, set[int]] = {}
    byte_diffs: list[str] = []
    for r in records:
        etype, agg, key, payload = emitted.events[r["ce_id"]]
        where = f"{r['topic']}-{r['partition']}@{r['offset']} {etype} {key}"
        assert r["topic"] == f"{prefix}.{agg}", where
        assert (r["key"], r["ce_type"]) == (key, etype), where
        assert r["content_type"] == "application/avro", where
        assert r["wire_form"] == wire_form, where
        partitions_seen.setdefault(r["topic"], set()).add(r["partition"])
        paths: list[str] = []
        found: list[str] = []
        _compare(r["record"], payload, "", paths, found)
        problems += [f"{where}: {p}" for p in found]
        money.setdefault(etype, set()).update(paths)
        if not r["reencodes_identically"]:
            byte_diffs.append(where)
            problems.append(f"{where}: Java's re-encoding of the decoded record differs "
                            f"from the pipeline's bytes")
    assert not problems, f"{len(problems)} disagreements:\n" + "\n".join(problems[:30])
    types = {etype for etype, _, _, _ in emitted.events.values()}
    for etype, fields in MONEY_FIELDS.items():
        if etype in types:  # every money field was compared (a decimal reached Python)
            assert money.get(etype, set()) == fields, (etype, money.get(etype))
    # the keys spread: Java's partition check ran against more than one partition
    order_parts = partitions_seen[f"{prefix}.order"]
    assert len(order_parts) == partitions, f"order keys landed in partitions {order_parts} only"
    summary["byte_diffs"] = byte_diffs
    return summary


def _publish_and_read(settings: Settings, consumer: JavaConsumer,
                      emit_events: Callable[[str], Emitted], wire_form: str,
                      registry: str | None = None) -> dict[str, Any]:
    assert settings.topics.partitions == 3  # keys spread, so the partition check means something
    assert settings.database.url is not None
    emitted = emit_events(settings.database.url.get_secret_value())
    relay_s = _relay_until_empty(settings)
    topics = sorted(settings.topics.event_topic(a) for a in emitted.aggregate_types)
    start = time.monotonic()
    proc = consumer.run(str(settings.kafka.bootstrap_servers), topics, len(emitted.events),
                        settings.schemas.path or default_catalogue_path(), registry=registry)
    java_s = time.monotonic() - start
    summary = _check_java_run(proc, emitted, settings.topics.prefix, 3, wire_form)
    build = (f"built in {consumer.build_s:.1f}s" if consumer.built
             else f"cached build ({consumer.build_s:.2f}s)")
    print(f"\njava interop ({wire_form}): {summary['records']} records, {build}, relay "
          f"{relay_s:.1f}s, java {java_s:.1f}s, byte differences: "
          f"{len(summary['byte_diffs'])}")
    return summary


def _install(settings: Settings) -> None:
    assert settings.database.url is not None
    with psycopg.connect(settings.database.url.get_secret_value(), autocommit=True) as conn:
        install(conn, settings.database.schema_name)


def test_java_reads_single_object_events(installed: Settings, java_consumer: JavaConsumer
                                         ) -> None:
    summary = _publish_and_read(installed, java_consumer, _emit_events, "single-object")
    assert set(summary["per_type"]) >= set(MONEY_FIELDS)


def test_java_reads_registry_framed_events(database_url: str, kafka_bootstrap: str,
                                           topic_prefix: str, schema_registry: SchemaRegistry,
                                           java_consumer: JavaConsumer) -> None:
    s = make_settings(database_url, kafka_bootstrap, topic_prefix,
                      schema_registry={"url": schema_registry.url})
    _install(s)
    _publish_and_read(s, java_consumer, _emit_events, "confluent", registry=schema_registry.url)
    assert [x for x in schema_registry.subjects() if x.startswith(f"{topic_prefix}.")], \
        "the relay registered no schema"


def _emit_sign_extended(url: str) -> Emitted:
    rng = random.Random(13)
    now = dt.datetime.now(dt.UTC)
    events: dict[str, tuple[str, str, str, dict[str, Any]]] = {}
    with psycopg.connect(url) as conn:
        for i, amount in enumerate(a for a in EDGE_AMOUNTS if _sign_extended(a)):
            for k in range(3):  # three keys each, so that every partition holds some
                key = f"SO-8{i:02d}{k:03d}"
                order = payload_for("order.created", rng, aggregate_id=key, now=now)
                eid = f"00000000-0000-4000-8001-{len(events) + 1:012d}"
                payload = {**order, "total": amount}
                emit(conn, "order", key, "order.created", payload, event_id=eid)
                events[eid] = ("order.created", "order", key, payload)
        conn.commit()
    return Emitted(events)


def test_java_reencodes_negative_decimals_to_the_same_bytes(installed: Settings,
                                                            java_consumer: JavaConsumer) -> None:
    summary = _publish_and_read(installed, java_consumer, _emit_sign_extended, "single-object")
    assert not summary["byte_diffs"], (
        f"{len(summary['byte_diffs'])} records: Java re-encodes the same value to other "
        f"bytes: {summary['byte_diffs'][:3]}")


def _produce_tampered(bootstrap: str, topic: str, case: str) -> None:
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

    from pipeline.schemas.catalogue import Catalogue
    from pipeline.schemas.codec import Encoder

    admin = AdminClient({"bootstrap.servers": bootstrap})
    for fut in admin.create_topics([NewTopic(topic, 3, 1)]).values():
        fut.result(30)
    key = "SO-000042"
    payload = payload_for("payment.completed", random.Random(1), aggregate_id=key,
                          now=dt.datetime.now(dt.UTC))
    value = Encoder(Catalogue.load()).encode("payment.completed", payload, topic=topic).value
    headers = {"ce_specversion": "1.0", "ce_id": "00000000-0000-4000-8000-000000000001",
               "ce_type": "payment.completed", "ce_source": "test", "ce_subject": key,
               "ce_time": "2026-01-01T00:00:00.000000+00:00", "content-type": "application/avro"}
    if case == "fingerprint":  # a schema Java does not know (one bit of the fingerprint flipped)
        value = value[:2] + bytes([value[2] ^ 1]) + value[3:]
    if case == "subject":
        headers["ce_subject"] = "SO-000043"
    producer = Producer({"bootstrap.servers": bootstrap, "partitioner": "murmur2_random"})
    # wrong partition: the same record in every partition, so two of them are misplaced
    for partition in (0, 1, 2) if case == "partition" else (None,):
        kw: dict[str, Any] = {} if partition is None else {"partition": partition}
        producer.produce(topic, value, key.encode(), headers=list(headers.items()), **kw)
    assert producer.flush(30) == 0


@pytest.mark.parametrize(("case", "message"), [
    ("partition", "Java's default partitioner"),
    ("fingerprint", "BinaryMessageDecoder failed for fingerprint"),
    ("subject", "ce_subject SO-000043 differs from the key SO-000042"),
])
def test_java_consumer_rejects_a_broken_contract(kafka_bootstrap: str, topic_prefix: str,
                                                 java_consumer: JavaConsumer, case: str,
                                                 message: str) -> None:
    """The checker is not vacuous: a misplaced key, an unknown fingerprint and a ce_subject
    that is not the key each fail the Java run with a message saying so."""
    topic = f"{topic_prefix}.bad"
    _produce_tampered(kafka_bootstrap, topic, case)
    proc = java_consumer.run(kafka_bootstrap, [topic], 3 if case == "partition" else 1,
                             default_catalogue_path())
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "INTEROP FAILURE" in proc.stderr and message in proc.stderr, proc.stderr
