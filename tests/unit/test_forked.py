"""pipeline.forked: work shared with forked children, results handed back, every failure of a
child reported here by what it was doing, and no child left behind."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from pipeline import forked
from pipeline.errors import BrokerUnavailable, PipelineError

pytestmark = pytest.mark.skipif(not forked.has_fork(), reason="no fork on this platform")


def _run(tasks: list[Any], here: Any, *, timeout_s: float, what: str) -> list[Any]:
    return forked.run_forked(tasks, here, timeout_s=timeout_s, what=what, alone="READERS=1")


_FORKED: list[int] = []  # the children run_forked made in this test


@pytest.fixture(autouse=True)
def _count_forks(monkeypatch: pytest.MonkeyPatch) -> None:
    _FORKED.clear()
    real = os.fork

    def fork() -> int:
        pid = real()
        if pid:
            _FORKED.append(pid)
        return pid

    monkeypatch.setattr(forked.os, "fork", fork)


def _no_children_left() -> bool:
    """Every child this test forked was reaped (the test process has other children: the
    brokers the integration fixtures start)."""
    assert _FORKED, "no child was forked"
    for pid in _FORKED:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            continue
        return False
    return True


def test_results_come_back_in_order_while_here_runs() -> None:
    ran: list[int] = []
    out = _run([lambda: [1, (2, b"x")], lambda: {"k": [3]}],
                            lambda: ran.append(os.getpid()), timeout_s=30, what="adding up")
    assert out == [[1, (2, b"x")], {"k": [3]}]
    assert ran == [os.getpid()]  # here() ran in this process
    assert _no_children_left()


def test_a_result_marshal_cannot_carry_comes_back_pickled() -> None:
    (out,) = _run([lambda: Path("/tmp/x")], lambda: None, timeout_s=30, what="w")
    assert out == Path("/tmp/x")


def test_a_childs_exception_is_raised_here_with_its_type_and_text() -> None:
    def fails() -> None:
        raise BrokerUnavailable("reading erp.sink.dlq: broker at 127.0.0.1:1 unreachable")

    with pytest.raises(BrokerUnavailable, match=r"127\.0\.0\.1:1 unreachable"):
        _run([lambda: 1, fails], lambda: None, timeout_s=30, what="reading")
    assert _no_children_left()


def test_an_exception_that_does_not_pickle_is_passed_on_as_its_text() -> None:
    class Local(Exception):  # a local class: pickle cannot find it by name
        pass

    def fails() -> None:
        raise Local("the target said no")

    with pytest.raises(PipelineError, match="Local: the target said no"):
        _run([fails], lambda: None, timeout_s=30, what="reading")


def test_a_child_killed_by_a_signal_is_named_and_what_to_do_said() -> None:
    def dies() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    with pytest.raises(PipelineError) as err:
        _run([dies], lambda: None, timeout_s=30, what="reading erp.crm.dlq")
    text = str(err.value)
    assert "reading erp.crm.dlq: helper process 1 ended (signal 9) without a result" in text
    assert "or with READERS=1 to work in this process alone" in text
    assert _no_children_left()


def test_a_child_past_the_deadline_is_killed_and_reported() -> None:
    started = time.monotonic()
    with pytest.raises(PipelineError, match="helper process 1 did not finish in time"):
        _run([lambda: time.sleep(30)], lambda: None, timeout_s=0.5, what="r")
    assert time.monotonic() - started < 10
    assert _no_children_left()


def test_when_here_fails_the_children_are_killed_and_reaped() -> None:
    def here() -> None:
        raise RuntimeError("this process's own share failed")

    started = time.monotonic()
    with pytest.raises(RuntimeError, match="own share failed"):
        _run([lambda: time.sleep(30)], here, timeout_s=60, what="r")
    assert time.monotonic() - started < 10
    assert _no_children_left()


def test_a_child_never_runs_the_callers_cleanup(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A child unwinding into the caller's frames would run their finally blocks (stopping an
    embedded broker, say, under the parent's feet): even a child whose own code fails before
    it can report leaves at once."""
    log = tmp_path / "cleanup.log"

    def broken(*_args: object) -> None:
        raise TypeError("the child's runner itself failed")

    monkeypatch.setattr(forked, "_child", broken)
    try:
        with pytest.raises(PipelineError, match=r"helper process 1 ended \(exit 70\)"):
            _run([lambda: 1], lambda: None, timeout_s=30, what="r")
    finally:
        with log.open("a") as f:
            f.write(f"{os.getpid()}\n")
    assert log.read_text().split() == [str(os.getpid())]


def test_no_room_for_results_is_said_before_any_child_starts(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def no_tmp(*_a: object, **_kw: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(forked.tempfile, "TemporaryFile", no_tmp)
    ran: list[int] = []
    with pytest.raises(forked.CannotShare, match="No space left on device"):
        _run([lambda: ran.append(1)], lambda: ran.append(2), timeout_s=30, what="r")
    assert ran == [] and _FORKED == []


class _KeywordOnly(Exception):
    def __init__(self, *, field: str) -> None:
        super().__init__(f"bad field {field}")


def test_an_error_that_cannot_be_rebuilt_here_is_still_reported() -> None:
    def fails() -> None:
        raise _KeywordOnly(field="amount")

    with pytest.raises(PipelineError, match="helper process 1 failed, and its error could not"):
        _run([fails], lambda: None, timeout_s=30, what="reading")


def test_no_fork_while_another_thread_runs() -> None:
    import threading

    assert forked.can_fork()
    stop = threading.Event()
    t = threading.Thread(target=stop.wait)
    t.start()
    try:
        assert not forked.can_fork()
    finally:
        stop.set()
        t.join()
    assert forked.can_fork()


def test_a_cgroup_cpu_quota_counts_as_the_cores_there_are(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert forked._cgroup_quota(str(tmp_path)) is None
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert forked._cgroup_quota(str(tmp_path)) == 1.5
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert forked._cgroup_quota(str(v1)) is None
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("50000\n")
    assert forked._cgroup_quota(str(v1)) == 0.5
    assert forked._cgroup_quota(str(tmp_path / "none")) is None
    assert forked.cores() >= 1


def test_a_helper_dies_with_its_parent(tmp_path: Path) -> None:
    """The parent killed outright (no cleanup of its own runs): its helper goes too."""
    pid_file = tmp_path / "helper.pid"
    code = (
        "import os, time, pathlib\n"
        "from pipeline import forked\n"
        f"p = pathlib.Path({str(pid_file)!r})\n"
        "def task():\n"
        "    p.write_text(str(os.getpid()))\n"
        "    time.sleep(60)\n"
        "forked.run_forked([task], lambda: time.sleep(60), timeout_s=120, what='r', alone='x')\n"
    )
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 20
        while not pid_file.exists() or not pid_file.read_text():
            assert time.monotonic() < deadline, "the helper never started"
            time.sleep(0.05)
        helper = int(pid_file.read_text())
        proc.kill()
        proc.wait(10)
        deadline = time.monotonic() + 10
        while _alive(helper):
            assert time.monotonic() < deadline, "the helper outlived its parent"
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait(10)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
