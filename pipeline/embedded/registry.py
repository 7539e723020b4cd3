"""Apicurio Registry 3 as an embedded, Confluent-compatible Schema Registry, for tests and
``pipeline up`` on a machine that starts no service.

* :func:`fetch_registry` runs ``maven/apicurio/pom.xml``, which unpacks Apicurio's own Quarkus
  distribution (the ``all`` tar.gz of ``io.apicurio:apicurio-registry-app`` on Maven Central)
  into ``~/.cache/erp-pipeline/apicurio-3.0.9/`` (``PIPELINE_CACHE_DIR`` moves the root); nothing
  is built and nothing lands in the work tree.
* :class:`EmbeddedRegistry` runs it on Java 17+ with Apicurio 3's default storage (SQL on an
  in-memory H2: each start is empty), on a free loopback port, with a global BACKWARD
  compatibility rule, so registering an incompatible schema is refused with HTTP 409 as
  Confluent's registry does. :attr:`EmbeddedRegistry.url` is the Confluent API
  (``/apis/ccompat/v7``), what ``SchemaRegistryClient`` and the pipeline's settings take.

Production never uses this module.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO

from pipeline.embedded.jvm import (
    cache_root,
    die_with_parent,
    java_binary,
    run_maven,
    stop_process,
)
from pipeline.embedded.kafka import free_port

APICURIO_VERSION = "3.0.9"
POM = Path(__file__).parent / "maven" / "apicurio" / "pom.xml"
_RUNNER = f"apicurio-registry-app-{APICURIO_VERSION}-runner.jar"
CCOMPAT_PATH = "/apis/ccompat/v7"
COMPATIBILITY_LEVELS = (
    "NONE",
    "BACKWARD",
    "BACKWARD_TRANSITIVE",
    "FORWARD",
    "FORWARD_TRANSITIVE",
    "FULL",
    "FULL_TRANSITIVE",
)


def registry_home() -> Path:
    """Where :func:`fetch_registry` unpacks Apicurio (its runner jar and ``lib/``)."""
    return cache_root() / f"apicurio-{APICURIO_VERSION}"


def registry_available() -> bool:
    """Java 17+ is present and Apicurio is in the cache (:func:`fetch_registry`)."""
    return java_binary() is not None and (registry_home() / _RUNNER).is_file()


def fetch_registry(*, quiet: bool = True) -> Path:
    """Unpack Apicurio Registry from Maven Central into the cache (idempotent); its folder."""
    home = registry_home()
    if (home / _RUNNER).is_file() and (home / "lib").is_dir():
        return home
    run_maven(POM, ["process-resources", f"-Dpipeline.cache.dir={cache_root()}"],
              home / _RUNNER, f"Apicurio Registry {APICURIO_VERSION}", quiet=quiet)
    return home


class EmbeddedRegistry:
    """``with EmbeddedRegistry() as r: r.url``: Apicurio Registry on ``127.0.0.1:port`` with
    in-memory storage and a global compatibility rule (``BACKWARD`` unless told; ``None`` sets
    none). ``stop``/``start`` keep the port, but the storage starts empty again."""

    def __init__(
        self,
        port: int | None = None,
        log_path: Path | None = None,
        *,
        compatibility: str | None = "BACKWARD",
        heap: str = "512m",
    ) -> None:
        if compatibility is not None and compatibility not in COMPATIBILITY_LEVELS:
            raise ValueError(f"compatibility must be one of {COMPATIBILITY_LEVELS}")
        self.port = port or free_port()
        self.log_path = log_path
        self.compatibility = compatibility
        self.heap = heap
        self.proc: subprocess.Popen[bytes] | None = None
        self.startup_s: float | None = None  # seconds from launch to ready, of the last start
        self._log: IO[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """The Confluent-compatible API, for ``SchemaRegistryClient({"url": ...})``."""
        return self.base_url + CCOMPAT_PATH

    def command(self) -> list[str]:
        java = java_binary()
        if java is None:
            raise RuntimeError("the embedded Apicurio Registry needs Java 17+ on PATH or JAVA_HOME")
        props = {
            "quarkus.http.host": "127.0.0.1",
            "quarkus.http.port": str(self.port),
            "apicurio.storage.kind": "sql",
            "apicurio.storage.sql.kind": "h2",
            # smaller H2 connection pool than the default 20 to 100: tests are not a load
            "apicurio.datasource.jdbc.initial-size": "2",
            "apicurio.datasource.jdbc.min-size": "2",
            "apicurio.datasource.jdbc.max-size": "20",
            "quarkus.http.cors": "false",
        }
        if self.compatibility is not None:
            # the default global rule: in force from the first request
            props["apicurio.rules.global.compatibility"] = self.compatibility
        return [
            java,
            f"-Xmx{self.heap}",
            "-XX:+UseSerialGC",
            "-XX:TieredStopAtLevel=1",
            "-Djava.net.preferIPv4Stack=true",
            *(f"-D{k}={v}" for k, v in props.items()),
            "-jar",
            str(registry_home() / _RUNNER),
        ]

    def start(self, timeout_s: float = 120.0) -> EmbeddedRegistry:
        if not (registry_home() / _RUNNER).is_file():
            fetch_registry()
        cmd = self.command()
        began = time.monotonic()
        self._log = open(self.log_path, "ab") if self.log_path else None  # noqa: SIM115
        self.proc = subprocess.Popen(
            cmd,
            cwd=registry_home(),
            stdin=subprocess.DEVNULL,
            stdout=self._log or subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        deadline = began + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.stop()
                raise RuntimeError(
                    f"Apicurio Registry exited with code {code} on start"
                    + (f"; see {self.log_path}" if self.log_path else "")
                )
            if self._ready():
                break
            time.sleep(0.25)
        else:
            self.stop()
            raise RuntimeError(
                f"Apicurio Registry was not ready on {self.base_url} in {timeout_s}s"
                + (f"; see {self.log_path}" if self.log_path else "")
            )
        if self.compatibility is not None:
            self._store_global_rule(self.compatibility)
        self.startup_s = time.monotonic() - began
        return self

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.base_url + "/health/ready", timeout=2) as resp:
                return int(resp.status) == 200
        except (OSError, urllib.error.URLError):
            return False

    def _store_global_rule(self, level: str) -> None:
        """Store the global rule too (v3 admin API), so that the Confluent API's ``GET /config``
        reports it: PUT updates the rule (the default one counts), POST creates it."""
        rules = self.base_url + "/apis/registry/v3/admin/rules"
        body = json.dumps({"ruleType": "COMPATIBILITY", "config": level}).encode()
        for method, url in (("PUT", rules + "/COMPATIBILITY"), ("POST", rules)):
            req = urllib.request.Request(
                url, data=body, method=method, headers={"Content-Type": "application/json"}
            )
            try:
                with urllib.request.urlopen(req, timeout=10):
                    return
            except urllib.error.HTTPError as exc:
                if exc.code != 404:
                    self.stop()
                    raise RuntimeError(
                        f"Apicurio Registry refused the global {level} rule: HTTP {exc.code}"
                    ) from exc
                exc.close()
            except OSError as exc:
                self.stop()
                raise RuntimeError(f"Apicurio Registry did not answer {url}: {exc}") from exc
        self.stop()
        raise RuntimeError(f"Apicurio Registry has no admin rules API at {rules}")

    def stop(self) -> None:
        stop_process(self.proc, 15)
        self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> EmbeddedRegistry:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()
