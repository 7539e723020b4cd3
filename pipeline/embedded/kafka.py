"""Apache Kafka 4.4 in KRaft mode from Maven Central jars, for tests, ``pipeline up`` and
``pipeline bench`` on a machine that starts no service.

* ``make kafka`` (or :func:`fetch_kafka`) resolves ``maven/kafka/pom.xml`` into
  ``~/.cache/erp-pipeline/kafka-4.4.0/libs`` (``PIPELINE_CACHE_DIR`` moves the root); nothing is
  built and nothing lands in the work tree.
* :class:`KafkaCluster` starts one node (combined broker and controller) or several (a
  three-node cluster: replication factor 3, ``min.insync.replicas`` 2, for fault tests), each with
  formatted storage in a temporary directory, on free loopback ports. ``kill``/``start_node``
  take one node down with SIGKILL and bring it back on the same ports and data.
* An optional SASL_SSL listener with SCRAM-SHA-512 users and a certificate made by
  :func:`make_tls` (a CA of its own) proves the pipeline's authenticated path.

Production never uses this module.
"""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from pipeline.embedded.jvm import (
    cache_root,
    die_with_parent,
    fetch_jars,
    java_binary,
    stop_process,
)

__all__ = ["KafkaCluster", "ScramListener", "TlsFiles", "broker_kind", "cache_root",
           "die_with_parent", "fetch_kafka", "free_port", "java_binary", "kafka_available",
           "make_tls"]

KAFKA_VERSION = "4.4.0"
POM = Path(__file__).parent / "maven" / "kafka" / "pom.xml"
_MAIN_JAR = f"kafka_2.13-{KAFKA_VERSION}.jar"


def kafka_libs() -> Path:
    return cache_root() / f"kafka-{KAFKA_VERSION}" / "libs"


def kafka_available() -> bool:
    """Java 17+ is present and the Kafka jars are in the cache (``make kafka``)."""
    return java_binary() is not None and (kafka_libs() / _MAIN_JAR).is_file()


def fetch_kafka(*, quiet: bool = True) -> Path:
    """Resolve the Kafka jars from Maven Central into the cache (idempotent); their folder."""
    return fetch_jars(POM, kafka_libs(), _MAIN_JAR, f"Apache Kafka {KAFKA_VERSION}", quiet=quiet)


def broker_kind(choice: str | None = None) -> str:
    """``kafka`` or ``tansu``: ``choice`` (or ``PIPELINE_BROKER``), where ``auto`` (the default)
    means Apache Kafka when Java 17+ and its jars are present, else tansu."""
    choice = (choice or os.environ.get("PIPELINE_BROKER") or "auto").lower()
    if choice not in ("auto", "kafka", "tansu"):
        raise ValueError(f"broker must be auto, kafka or tansu, not {choice!r}")
    if choice == "auto":
        return "kafka" if kafka_available() else "tansu"
    if choice == "kafka" and not kafka_available():
        if java_binary() is None:
            raise RuntimeError("--broker kafka needs Java 17+ on PATH (or JAVA_HOME)")
        fetch_kafka()
    return choice


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class TlsFiles:
    """A CA and a server certificate for 127.0.0.1/localhost, as PEM files."""

    ca: Path  # the CA certificate clients trust (librdkafka ssl.ca.location)
    server: Path  # the server's private key and certificate chain (Kafka PEM keystore)


def make_tls(directory: Path) -> TlsFiles:
    """A CA of its own and a server certificate it signed (openssl), valid for 127.0.0.1."""
    directory.mkdir(parents=True, exist_ok=True)
    d = str(directory)

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
        "/CN=erp-pipeline test CA", "-keyout", "ca.key", "-out", "ca.pem")
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
        "-keyout", "server.key", "-out", "server.csr")
    (directory / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "2", "-extfile", "san.ext", "-out", "server.crt")
    # Kafka's PEM keystore wants an unencrypted PKCS#8 key followed by the chain.
    run("pkcs8", "-topk8", "-nocrypt", "-in", "server.key", "-out", "server.pk8")
    server = directory / "server.pem"
    server.write_text((directory / "server.pk8").read_text()
                      + (directory / "server.crt").read_text())
    return TlsFiles(ca=directory / "ca.pem", server=server)


@dataclass(frozen=True)
class ScramListener:
    """A SASL_SSL listener whose SCRAM-SHA-512 users are created when storage is formatted."""

    users: dict[str, str]
    tls: TlsFiles
    mechanism: str = "SCRAM-SHA-512"


@dataclass
class _Node:
    node_id: int
    port: int
    controller_port: int
    sasl_port: int | None
    dir: Path
    proc: subprocess.Popen[bytes] | None = None
    log: IO[bytes] | None = field(default=None, repr=False)


_LOG4J2 = """\
status = warn
appender.file.type = File
appender.file.name = file
appender.file.fileName = {dir}/server.log
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = {level}
rootLogger.appenderRef.file.ref = file
"""


class KafkaCluster:
    """``with KafkaCluster(nodes=3) as k: k.bootstrap``. Each node is broker and controller."""

    def __init__(
        self,
        nodes: int = 1,
        *,
        base_dir: Path | None = None,
        scram: ScramListener | None = None,
        config: dict[str, str] | None = None,
        heap: str = "1g",
        port: int | None = None,
    ) -> None:
        if nodes < 1:
            raise ValueError("a cluster needs at least one node")
        self._own_dir = base_dir is None
        self.base_dir = base_dir or Path(tempfile.mkdtemp(prefix="pipeline-kafka-"))
        self.scram = scram
        self.extra = dict(config or {})
        self.heap = heap
        self.cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        self.nodes = [
            _Node(i, port if (port and i == 1) else free_port(), free_port(),
                  free_port() if scram else None, self.base_dir / f"node-{i}")
            for i in range(1, nodes + 1)
        ]
        self._formatted = False

    # -- addresses ---------------------------------------------------------------------------
    @property
    def bootstrap(self) -> str:
        """The PLAINTEXT listeners of every node."""
        return ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    @property
    def sasl_bootstrap(self) -> str:
        """The SASL_SSL listeners (with ``scram``)."""
        if self.scram is None:
            raise RuntimeError("this cluster has no SASL listener")
        return ",".join(f"127.0.0.1:{n.sasl_port}" for n in self.nodes)

    def node(self, node_id: int) -> _Node:
        return self.nodes[node_id - 1]

    def log_paths(self) -> list[Path]:
        return [n.dir / "server.log" for n in self.nodes]

    # -- configuration -------------------------------------------------------------------------
    def _properties(self, n: _Node) -> dict[str, str]:
        count = len(self.nodes)
        isr = "2" if count >= 3 else "1"
        listeners = [f"PLAINTEXT://127.0.0.1:{n.port}", f"CONTROLLER://127.0.0.1:{n.controller_port}"]
        advertised = [f"PLAINTEXT://127.0.0.1:{n.port}"]
        protocols = ["PLAINTEXT:PLAINTEXT", "CONTROLLER:PLAINTEXT"]
        props = {
            "process.roles": "broker,controller",
            "node.id": str(n.node_id),
            "controller.quorum.voters": ",".join(
                f"{m.node_id}@127.0.0.1:{m.controller_port}" for m in self.nodes
            ),
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "log.dirs": str(n.dir / "data"),
            "num.partitions": "1",
            "default.replication.factor": str(count),
            "min.insync.replicas": isr,
            "offsets.topic.replication.factor": str(count),
            "offsets.topic.num.partitions": "10",
            "transaction.state.log.replication.factor": str(count),
            "transaction.state.log.min.isr": isr,
            "transaction.state.log.num.partitions": "10",
            "share.coordinator.state.topic.replication.factor": str(count),
            "share.coordinator.state.topic.min.isr": isr,
            "group.initial.rebalance.delay.ms": "0",
            # KIP-848 groups: a dead member's partitions move after 10 s (default 45 s), as
            # a classic group's do with the workers' session_timeout_ms
            "group.consumer.min.session.timeout.ms": "6000",
            "group.consumer.session.timeout.ms": "10000",
            "group.consumer.min.heartbeat.interval.ms": "500",
            "group.consumer.heartbeat.interval.ms": "1000",
            # the compaction tests need the cleaner to look often (default 15 s)
            "log.cleaner.backoff.ms": "500",
            "num.network.threads": "2",
            "num.io.threads": "4",
            "auto.create.topics.enable": "true",
            "delete.topic.enable": "true",
        }
        if self.scram is not None and n.sasl_port is not None:
            listeners.append(f"SASL_SSL://127.0.0.1:{n.sasl_port}")
            advertised.append(f"SASL_SSL://127.0.0.1:{n.sasl_port}")
            protocols.append("SASL_SSL:SASL_SSL")
            mech = self.scram.mechanism.lower()
            props.update({
                "sasl.enabled.mechanisms": self.scram.mechanism,
                f"listener.name.sasl_ssl.{mech}.sasl.jaas.config":
                    "org.apache.kafka.common.security.scram.ScramLoginModule required;",
                "listener.name.sasl_ssl.ssl.keystore.type": "PEM",
                "listener.name.sasl_ssl.ssl.keystore.location": str(self.scram.tls.server),
                "listener.name.sasl_ssl.ssl.truststore.type": "PEM",
                "listener.name.sasl_ssl.ssl.truststore.location": str(self.scram.tls.ca),
            })
        props["listeners"] = ",".join(listeners)
        props["advertised.listeners"] = ",".join(advertised)
        props["listener.security.protocol.map"] = ",".join(protocols)
        props.update(self.extra)
        return props

    def _write_config(self, n: _Node) -> Path:
        n.dir.mkdir(parents=True, exist_ok=True)
        path = n.dir / "server.properties"
        path.write_text("".join(f"{k}={v}\n" for k, v in self._properties(n).items()))
        level = os.environ.get("PIPELINE_KAFKA_LOG_LEVEL", "WARN")
        (n.dir / "log4j2.properties").write_text(_LOG4J2.format(dir=n.dir, level=level))
        return path

    def _java(self, n: _Node, main: str, *args: str) -> list[str]:
        java = java_binary()
        if java is None:
            raise RuntimeError("Apache Kafka needs Java 17+ on PATH (or JAVA_HOME)")
        if not (kafka_libs() / _MAIN_JAR).is_file():
            raise RuntimeError(
                f"the Apache Kafka {KAFKA_VERSION} jars are not in {kafka_libs()}: run `make kafka`"
            )
        return [
            java, f"-Xmx{self.heap}", "-Xms128m", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20",
            "-XX:+ExitOnOutOfMemoryError", "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={n.dir / 'log4j2.properties'}",
            "-cp", f"{kafka_libs()}/*", main, *args,
        ]

    def _format(self) -> None:
        for n in self.nodes:
            config = self._write_config(n)
            # "=": a random id may begin with "-", which argparse would take for an option
            args = ["format", f"--cluster-id={self.cluster_id}", "-c", str(config),
                    "--ignore-formatted"]
            if self.scram is not None:
                for user, password in self.scram.users.items():
                    args += ["--add-scram",
                             f"{self.scram.mechanism}=[name={user},password={password}]"]
            done = subprocess.run(self._java(n, "kafka.tools.StorageTool", *args),
                                  capture_output=True, text=True, timeout=120, check=False)
            if done.returncode != 0:
                raise RuntimeError(
                    f"formatting Kafka storage of node {n.node_id} failed: "
                    f"{(done.stderr or done.stdout).strip()[-2000:]}"
                )
        self._formatted = True

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self, timeout_s: float = 90.0) -> KafkaCluster:
        if not self._formatted:
            self._format()
        for n in self.nodes:
            self._launch(n)
        try:
            self.wait_ready(timeout_s)
        except BaseException:
            self.stop(keep_files=True)  # the logs the error points to stay
            raise
        return self

    def _launch(self, n: _Node) -> None:
        if n.proc is not None and n.proc.poll() is None:
            return
        n.log = open(n.dir / "stdout.log", "ab")  # noqa: SIM115
        n.proc = subprocess.Popen(
            self._java(n, "kafka.Kafka", str(n.dir / "server.properties")),
            stdout=n.log, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=die_with_parent,
        )

    def wait_ready(self, timeout_s: float = 90.0, *, brokers: int | None = None) -> None:
        """Until every running node is registered with the controller (metadata names it)."""
        from confluent_kafka.admin import AdminClient

        want = brokers if brokers is not None else sum(
            1 for n in self.nodes if n.proc is not None and n.proc.poll() is None
        )
        live = [n for n in self.nodes if n.proc is not None]
        deadline = time.monotonic() + timeout_s
        boot = ",".join(f"127.0.0.1:{n.port}" for n in live)
        admin = AdminClient({"bootstrap.servers": boot, "socket.connection.setup.timeout.ms": 2000,
                             "logger": _quiet_logger()})
        seen = 0
        while time.monotonic() < deadline:
            for n in live:
                if n.proc is not None and n.proc.poll() is not None:
                    raise RuntimeError(
                        f"Kafka node {n.node_id} exited with code {n.proc.returncode} on start; "
                        f"see {n.dir / 'server.log'} and {n.dir / 'stdout.log'}"
                    )
            try:
                seen = len(admin.list_topics(timeout=2).brokers)
                if seen >= want:
                    return
            except Exception:
                pass
            time.sleep(0.2)
        raise RuntimeError(
            f"Kafka cluster on {boot} had {seen} of {want} brokers after {timeout_s:.0f}s; "
            f"see {self.base_dir}/node-*/server.log"
        )

    def pause(self) -> None:
        """Freeze every node (SIGSTOP): a broker that accepts connections and answers nothing."""
        for n in self.nodes:
            if n.proc is not None and n.proc.poll() is None:
                os.killpg(n.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        for n in self.nodes:
            if n.proc is not None and n.proc.poll() is None:
                os.killpg(n.proc.pid, signal.SIGCONT)

    def kill(self, node_id: int) -> None:
        """SIGKILL one node (its data stays for :meth:`start_node`)."""
        n = self.node(node_id)
        if n.proc is not None and n.proc.poll() is None:
            os.killpg(n.proc.pid, signal.SIGKILL)
            n.proc.wait(30)
        self._close_log(n)

    def start_node(self, node_id: int, timeout_s: float = 90.0) -> None:
        """Bring a stopped or killed node back (same ports and data); returns once it serves."""
        from confluent_kafka.admin import AdminClient

        n = self.node(node_id)
        self._launch(n)
        admin = AdminClient({"bootstrap.servers": f"127.0.0.1:{n.port}",
                             "socket.connection.setup.timeout.ms": 2000,
                             "logger": _quiet_logger()})
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if n.proc is None or n.proc.poll() is not None:
                raise RuntimeError(f"Kafka node {node_id} exited on restart; see {n.dir}")
            try:
                if node_id in admin.list_topics(timeout=2).brokers:
                    return
            except Exception:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"Kafka node {node_id} did not serve in {timeout_s:.0f}s; see {n.dir}")

    def stop_node(self, node_id: int) -> None:
        n = self.node(node_id)
        stop_process(n.proc, 30)
        self._close_log(n)

    def _close_log(self, n: _Node) -> None:
        n.proc = None
        if n.log is not None:
            n.log.close()
            n.log = None

    def stop(self, *, keep_files: bool = False) -> None:
        # SIGTERM all at once: a node shutting down alone waits for a controller quorum that
        # the others' shutdown is taking away. A paused node is woken first to hear it.
        for n in self.nodes:
            if n.proc is not None and n.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(n.proc.pid, signal.SIGCONT)
                n.proc.terminate()
        deadline = time.monotonic() + 20
        for n in self.nodes:
            if n.proc is None:
                continue
            try:
                n.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(n.proc.pid, signal.SIGKILL)
                n.proc.wait(30)
            self._close_log(n)
        if self._own_dir and not keep_files:  # a later start() formats afresh, empty
            shutil.rmtree(self.base_dir, ignore_errors=True)
            self._formatted = False

    def reset(self) -> None:
        """Drop every node's data (logs stay): the next :meth:`start` formats an empty cluster."""
        for n in self.nodes:
            shutil.rmtree(n.dir / "data", ignore_errors=True)
        self.cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        self._formatted = False

    def __enter__(self) -> KafkaCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _quiet_logger() -> Any:
    import logging

    quiet = logging.getLogger("pipeline.embedded.kafka.client")
    quiet.setLevel(logging.CRITICAL + 1)
    quiet.propagate = False
    return quiet
