"""An embedded MariaDB server for the tests (and for trying the MariaDB path by hand).

It runs the ``mariadbd`` of Debian's ``mariadb-server`` package (``make mariadb`` installs it
where apt and root are available) on a data directory of its own, listening on a unix socket
and a free loopback port; root has no password. Nothing is installed into the work tree.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import IO

from pipeline.embedded.kafka import die_with_parent, free_port
from pipeline.errors import PipelineError

_SEARCH = ("/usr/sbin", "/usr/bin", "/usr/local/bin", "/usr/local/sbin")


def _binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for d in _SEARCH:
        p = Path(d) / name
        if p.exists():
            return str(p)
    return None


def mariadb_available() -> bool:
    return _binary("mariadbd") is not None and _binary("mariadb-install-db") is not None


class EmbeddedMariaDB:
    def __init__(self, datadir: Path, log_path: Path | None = None) -> None:
        self.datadir = datadir
        self.log_path = log_path or datadir.parent / "mariadb.log"
        self.socket = datadir.parent / "mysqld.sock"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def url(self, database: str = "") -> str:
        """A ``mysql://`` URL over the unix socket, as root."""
        return f"mysql://root@localhost/{database}?unix_socket={self.socket}"

    def tcp_url(self, database: str = "") -> str:
        return f"mysql://root@127.0.0.1:{self.port}/{database}"

    def start(self, timeout_s: float = 60.0) -> EmbeddedMariaDB:
        mariadbd, install_db = _binary("mariadbd"), _binary("mariadb-install-db")
        if mariadbd is None or install_db is None:
            raise PipelineError(
                "MariaDB is not installed here (no mariadbd): run `make mariadb` (installs "
                "Debian's mariadb-server), or point the tests at a server with "
                "PIPELINE_TEST_MARIADB_URL=mysql://user:pw@host:3306/"
            )
        user = ["--user=root"] if os.geteuid() == 0 else []
        self.datadir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        if not (self.datadir / "mysql").exists():
            done = subprocess.run(
                [install_db, "--no-defaults", f"--datadir={self.datadir}", *user,
                 "--auth-root-authentication-method=normal", "--skip-test-db"],
                stdout=self._log, stderr=subprocess.STDOUT, timeout=180, check=False,
            )
            if done.returncode != 0:
                raise PipelineError(
                    f"mariadb-install-db failed (exit {done.returncode}); see {self.log_path}")
        self.port = free_port()
        self.proc = subprocess.Popen(
            [mariadbd, "--no-defaults", f"--datadir={self.datadir}", f"--socket={self.socket}",
             f"--port={self.port}", "--bind-address=127.0.0.1", *user,
             f"--pid-file={self.datadir.parent / 'mariadb.pid'}",
             "--innodb-buffer-pool-size=256M", "--skip-name-resolve",
             "--character-set-server=utf8mb4", "--collation-server=utf8mb4_bin",
             "--max-connections=300"],
            stdout=self._log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent,
        )
        deadline = time.monotonic() + timeout_s
        from pipeline import mariadb

        while True:
            if self.proc.poll() is not None:
                raise PipelineError(
                    f"mariadbd exited with {self.proc.returncode} at start; see {self.log_path}")
            try:
                # a plain socket first: PyMySQL leaves its socket open when a connect fails
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                    probe.settimeout(2)
                    probe.connect(str(self.socket))
                mariadb.connect(self.url(), connect_timeout=2).close()
                return self
            except (OSError, PipelineError):
                if time.monotonic() > deadline:
                    self.stop()
                    raise PipelineError(
                        f"mariadbd did not answer within {timeout_s:.0f}s; see {self.log_path}"
                    ) from None
                time.sleep(0.2)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> EmbeddedMariaDB:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
