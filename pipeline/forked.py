"""Work shared with forked child processes, for reads that one core cannot keep up with: each
child runs one task and hands its result back pickled (through an anonymous file, so that a
large result never blocks the child on a full pipe while this process is busy); this process
runs its own share meanwhile. A child's exception is raised here; a child that dies, or outlives
the deadline, is reaped and reported by what it was doing.

Fork (not spawn): a child starts in milliseconds with every module imported. What it may touch
is what it makes itself: a task opens its own Kafka client, never one of the parent's."""

from __future__ import annotations

import contextlib
import ctypes
import marshal
import os
import pickle
import select
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from typing import IO, Any

from pipeline.errors import PipelineError


def has_fork() -> bool:
    """The platform forks (POSIX)."""
    return hasattr(os, "fork")


def can_fork() -> bool:
    """Fork is there, and no other thread runs here (one could hold a lock at the fork, e.g.
    an OpenTelemetry exporter mid-request, that a child would then wait for forever)."""
    return has_fork() and threading.active_count() == 1


def cores() -> int:
    """The cores this process may use: those it may run on, fewer under a cgroup CPU quota
    (a container's CPU limit: the affinity still shows every core of the node)."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    quota = _cgroup_quota()
    return max(1, min(n, int(quota))) if quota is not None else n


def _cgroup_quota(root: str = "/sys/fs/cgroup") -> float | None:
    """The CPU quota in cores (cgroup v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``), None: none."""
    try:
        with open(f"{root}/cpu.max") as f:
            quota, period = f.read().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        with open(f"{root}/cpu/cpu.cfs_quota_us") as f:
            q = int(f.read())
        with open(f"{root}/cpu/cpu.cfs_period_us") as f:
            period_us = int(f.read())
        return None if q <= 0 else q / period_us
    except (OSError, ValueError):
        return None


class CannotShare(Exception):
    """The helpers could not be set up (no room for their results): do the work here."""


def run_forked(tasks: Sequence[Callable[[], Any]], here: Callable[[], None], *,
               timeout_s: float, what: str, alone: str) -> list[Any]:
    """``tasks[i]()`` each in a child process while ``here()`` runs in this one; the tasks'
    results in order. ``what`` names the work in errors (e.g. "reading erp.crm.dlq"),
    ``alone`` how to do it without helpers (e.g. "PIPELINE_DLQ_READERS=1"). Raises
    :class:`CannotShare` before any child starts when their results would have no room."""
    children: list[tuple[int, IO[bytes], int]] = []  # pid (0: reaped), result, "done" pipe
    parent = os.getpid()
    with contextlib.ExitStack() as files:
        try:
            outs = [files.enter_context(tempfile.TemporaryFile()) for _ in tasks]
        except OSError as exc:
            raise CannotShare(f"no temporary file for a helper's result ({exc})") from exc
        try:
            for task, file in zip(tasks, outs, strict=True):
                done_r, done_w = os.pipe()
                files.callback(os.close, done_r)
                try:
                    pid = os.fork()
                except BaseException:
                    os.close(done_w)
                    raise
                if pid == 0:  # the child: run, write the result, leave without cleanup
                    try:
                        _die_with(parent)
                        os.close(done_r)
                        _child(task, file, done_w)
                    finally:  # never unwind into the parent's frames (their cleanup is
                        os._exit(70)  # theirs: e.g. stopping an embedded broker)
                os.close(done_w)
                children.append((pid, file, done_r))
            here()
            deadline = time.monotonic() + timeout_s
            # a child's result is read as soon as it is written: its exit (the kernel tearing
            # down a large address space) overlaps this process reading the result
            results = []
            for i, (pid, out, done) in enumerate(children):
                status = _written(pid, done, deadline)
                if status is not None:  # ended (reaped) without a result, or killed
                    children[i] = (0, out, done)
                results.append(_result(out, status, what, i + 1, alone))
            for i, (pid, out, done) in enumerate(children):
                os.waitpid(pid, 0)
                children[i] = (0, out, done)
            return results
        finally:
            for pid, _file, _done in children:
                if pid:
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGKILL)
                        os.waitpid(pid, 0)


def _die_with(parent: int) -> None:
    """A child killed with its parent (Linux's PR_SET_PDEATHSIG): a parent that gets SIGTERM
    or loses its terminal leaves no helper reading on."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the call
        os._exit(1)


_OK_MARSHAL, _OK_PICKLE, _ERROR = b"m", b"p", b"e"
_UNWRITTEN = 71


def _child(task: Callable[[], Any], out: IO[bytes], done: int) -> None:
    status = 0
    try:
        try:
            result = task()
            try:  # marshal: plain data five times faster than pickle (no memo)
                out.write(_OK_MARSHAL + marshal.dumps(result))
            except ValueError:
                out.seek(0)
                out.truncate()
                out.write(_OK_PICKLE + pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL))
        except BaseException as exc:  # every failure goes back to the parent, whatever it is
            out.seek(0)
            out.truncate()
            try:
                out.write(_ERROR + pickle.dumps(exc, protocol=pickle.HIGHEST_PROTOCOL))
            except Exception as bad:  # an exception that does not pickle: its text then
                out.seek(0)
                out.truncate()
                out.write(_ERROR + pickle.dumps(PipelineError(
                    f"{type(exc).__name__}: {exc} ({type(bad).__name__} passing it on)")))
        out.flush()
        os.write(done, b"1")
    except BaseException:
        status = _UNWRITTEN  # the result could not be written (a full TMPDIR, say)
    finally:
        os._exit(status)  # no atexit handlers, no flushing of the parent's buffers


def _written(pid: int, done: int, deadline: float) -> int | None:
    """Waits for a child's result: None once it is written; else the child's wait status
    (it ended without one), or -1 when the deadline passed (the child is killed)."""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return -1
        ready, _, _ = select.select([done], [], [], min(left, 1.0))
        if ready:
            if os.read(done, 1):
                return None
            _, status = os.waitpid(pid, 0)  # the pipe closed unwritten: the child ended
            return status


def _result(out: IO[bytes], status: int | None, what: str, n: int, alone: str) -> Any:
    if status == -1:
        raise PipelineError(f"{what}: helper process {n} did not finish in time and was killed; "
                            f"run again, or with {alone} to work in this process alone")
    out.seek(0)
    kind = out.read(1)
    if status is not None or kind not in (_OK_MARSHAL, _OK_PICKLE, _ERROR):
        code = os.waitstatus_to_exitcode(status) if status is not None else 0
        how = f"signal {-code}" if code < 0 else f"exit {code}"
        why = (f" (it could not write its result to {tempfile.gettempdir()}: is it full?)"
               if code == _UNWRITTEN else "")
        raise PipelineError(
            f"{what}: helper process {n} ended ({how}) without a result{why}; run again, or "
            f"with {alone} to work in this process alone"
        )
    data = out.read()
    if kind == _OK_MARSHAL:
        return marshal.loads(data)
    try:
        value = pickle.loads(data)
    except Exception as exc:  # an exception whose class does not rebuild from its args
        raise PipelineError(f"{what}: helper process {n} failed, and its error could not be "
                            f"passed on ({type(exc).__name__}: {exc})") from None
    if kind == _ERROR:
        raise value
    return value
