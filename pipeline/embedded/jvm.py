"""Java and Maven for the embedded servers (Apache Kafka, Apicurio Registry): finding a Java
17+, the cache outside the work tree that Maven fills, running a pom of ``maven/``, and child
processes that die with the process that started them and are stopped one way."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import uuid
from functools import cache
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("PIPELINE_CACHE_DIR") or Path.home() / ".cache" / "erp-pipeline")


@cache
def java_binary() -> str | None:
    """A ``java`` of version 17 or newer (``JAVA_HOME`` first, then ``PATH``), or None."""
    home = os.environ.get("JAVA_HOME")
    candidates = [str(Path(home) / "bin" / "java")] if home else []
    found = shutil.which("java")
    if found:
        candidates.append(found)
    for java in candidates:
        try:
            out = subprocess.run(
                [java, "-version"], capture_output=True, text=True, timeout=30, check=False
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        m = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
        if m:
            major = int(m.group(1)) if m.group(1) != "1" else int(m.group(2) or 0)
            if major >= 17:
                return java
    return None


def run_maven(pom: Path, args: list[str], produces: Path, what: str, *, quiet: bool) -> None:
    """``mvn -f pom args…``; raises RuntimeError (with Maven's last words) unless it exits 0
    and ``produces`` exists."""
    mvn = shutil.which("mvn")
    if mvn is None or java_binary() is None:
        raise RuntimeError(
            f"{what} needs Java 17+ and Maven reaching Maven Central (apt-get install "
            "openjdk-17-jre-headless maven); without them the embedded broker is tansu and the "
            "tests' Schema Registry a Python fixture"
        )
    cmd = [mvn, "-B", *(["-q"] if quiet else []), "-f", str(pom), *args]
    done = subprocess.run(cmd, capture_output=quiet, text=True, check=False)
    if done.returncode != 0 or not produces.exists():
        tail = ((done.stdout or "")[-2000:] + (done.stderr or "")[-2000:]) if quiet else ""
        raise RuntimeError(f"mvn could not fetch {what}: {tail.strip()}")


def fetch_jars(pom: Path, libs: Path, marker: str, what: str, *, quiet: bool) -> Path:
    """``pom``'s runtime jars copied by Maven into ``libs`` (idempotent: done when ``marker``,
    a jar's file name, is there). Resolved into a staging folder renamed into place, so an
    interrupted download is never mistaken for a complete one."""
    if (libs / marker).is_file():
        return libs
    libs.parent.mkdir(parents=True, exist_ok=True)
    staging = libs.parent / f".libs-{uuid.uuid4().hex[:8]}"
    try:
        run_maven(pom, ["dependency:copy-dependencies", f"-DoutputDirectory={staging}",
                        "-DincludeScope=runtime"], staging / marker, what, quiet=quiet)
    except RuntimeError:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    try:
        staging.rename(libs)
    except OSError:  # another process won the race (or a partial folder is in the way)
        if not (libs / marker).is_file():
            shutil.rmtree(libs, ignore_errors=True)
            staging.rename(libs)
        else:
            shutil.rmtree(staging, ignore_errors=True)
    return libs


def _load_prctl() -> object | None:
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


# Looked up here, in the parent: between fork and exec a child of a threaded process may only
# call what is async-signal-safe, and loading a library is not.
_PRCTL = _load_prctl()
_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In the child before exec: SIGKILL it when the thread that started it ends (for the
    fixtures and ``pipeline up``, their main thread), so a run killed by a signal leaves no
    broker behind (Linux only)."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGKILL)  # type: ignore[operator]


def stop_process(proc: subprocess.Popen[bytes] | None, grace_s: float) -> None:
    """SIGTERM the process group of ``proc`` (started with ``start_new_session``), SIGKILL it
    after ``grace_s``; nothing when it has already exited."""
    if proc is None or proc.poll() is not None:
        return
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 30.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait_s)
            return
        except subprocess.TimeoutExpired:
            continue
