"""pipeline.forked: work shared with forked children, results handed back, every failure of a
child reported here by what it was doing, and no child left behind."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from pipeline import forked
from pipeline.errors import BrokerUnavailable, PipelineError

pytestmark = pytest.mark.skipif(not forked.can_fork(), reason="no fork on this platform")


def _no_children_left() -> bool:
    try:
        os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
        return True
    return False


def test_results_come_back_in_order_while_here_runs() -> None:
    ran: list[int] = []
    out = forked.run_forked([lambda: [1, (2, b"x")], lambda: {"k": [3]}],
                            lambda: ran.append(os.getpid()), timeout_s=30, what="adding up")
    assert out == [[1, (2, b"x")], {"k": [3]}]
    assert ran == [os.getpid()]  # here() ran in this process
    assert _no_children_left()


def test_a_result_marshal_cannot_carry_comes_back_pickled() -> None:
    (out,) = forked.run_forked([lambda: Path("/tmp/x")], lambda: None, timeout_s=30, what="w")
    assert out == Path("/tmp/x")


def test_a_childs_exception_is_raised_here_with_its_type_and_text() -> None:
    def fails() -> None:
        raise BrokerUnavailable("reading erp.sink.dlq: broker at 127.0.0.1:1 unreachable")

    with pytest.raises(BrokerUnavailable, match=r"127\.0\.0\.1:1 unreachable"):
        forked.run_forked([lambda: 1, fails], lambda: None, timeout_s=30, what="reading")
    assert _no_children_left()


def test_an_exception_that_does_not_pickle_is_passed_on_as_its_text() -> None:
    class Local(Exception):  # a local class: pickle cannot find it by name
        pass

    def fails() -> None:
        raise Local("the target said no")

    with pytest.raises(PipelineError, match="Local: the target said no"):
        forked.run_forked([fails], lambda: None, timeout_s=30, what="reading")


def test_a_child_killed_by_a_signal_is_named_and_what_to_do_said() -> None:
    def dies() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    with pytest.raises(PipelineError) as err:
        forked.run_forked([dies], lambda: None, timeout_s=30, what="reading erp.crm.dlq")
    text = str(err.value)
    assert "reading erp.crm.dlq: helper process 1 ended (signal 9) without a result" in text
    assert "taskset -c 0" in text
    assert _no_children_left()


def test_a_child_past_the_deadline_is_killed_and_reported() -> None:
    started = time.monotonic()
    with pytest.raises(PipelineError, match="helper process 1 did not finish in time"):
        forked.run_forked([lambda: time.sleep(30)], lambda: None, timeout_s=0.5, what="r")
    assert time.monotonic() - started < 10
    assert _no_children_left()


def test_when_here_fails_the_children_are_killed_and_reaped() -> None:
    def here() -> None:
        raise RuntimeError("this process's own share failed")

    started = time.monotonic()
    with pytest.raises(RuntimeError, match="own share failed"):
        forked.run_forked([lambda: time.sleep(30)], here, timeout_s=60, what="r")
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
            forked.run_forked([lambda: 1], lambda: None, timeout_s=30, what="r")
    finally:
        with log.open("a") as f:
            f.write(f"{os.getpid()}\n")
    assert log.read_text().split() == [str(os.getpid())]
