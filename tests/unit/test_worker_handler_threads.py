"""The worker's handler threads (pipeline/worker/handlers.py)."""

from __future__ import annotations

import threading
import time

import pytest

from pipeline.worker.handlers import HandlerThreads


def test_every_item_runs_once_and_the_threads_run_side_by_side() -> None:
    ran: list[int] = []
    lock = threading.Lock()
    together = threading.Barrier(4)

    def run(i: int) -> None:
        if i < 4:
            together.wait(5)  # four at once: only if four threads take items concurrently
        with lock:
            ran.append(i)

    pool: HandlerThreads[int] = HandlerThreads(4, run, "t")
    for i in range(200):
        pool.submit(i)
    deadline = time.monotonic() + 10
    while len(ran) < 200 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sorted(ran) == list(range(200))
    pool.shutdown(timeout_s=5)
    assert pool.alive == 0


def test_a_task_that_raises_is_logged_and_the_thread_goes_on(caplog) -> None:  # type: ignore[no-untyped-def]
    done = threading.Event()

    def run(i: int) -> None:
        if i == 0:
            raise RuntimeError("boom")
        done.set()

    pool: HandlerThreads[int] = HandlerThreads(1, run, "t")
    pool.submit(0)
    pool.submit(1)
    assert done.wait(5)
    pool.shutdown(timeout_s=5)
    assert "failed outside the handler" in caplog.text


def test_shutdown_hands_back_what_had_not_started() -> None:
    release = threading.Event()
    started = threading.Event()

    def run(i: int) -> None:
        started.set()
        release.wait(5)

    pool: HandlerThreads[int] = HandlerThreads(1, run, "t")
    for i in range(5):
        pool.submit(i)
    assert started.wait(5)
    dropped = pool.shutdown()
    release.set()
    assert dropped == [1, 2, 3, 4]
    pool_threads_end = time.monotonic() + 5
    while pool.alive and time.monotonic() < pool_threads_end:
        time.sleep(0.01)
    assert pool.alive == 0


def test_no_threads_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one handler thread"):
        HandlerThreads(0, print, "t")


def test_threads_are_started_only_as_the_work_needs_them() -> None:
    """One item at a time on a pool of 64 keeps one thread (handlers hold per-thread
    connections: 64 threads taking turns would open 64)."""
    names: set[str] = set()
    done = threading.Semaphore(0)

    def run(i: int) -> None:
        names.add(threading.current_thread().name)
        done.release()

    pool: HandlerThreads[int] = HandlerThreads(64, run, "t")
    for i in range(50):
        pool.submit(i)
        assert done.acquire(timeout=5)
        time.sleep(0.001)  # the thread is idle again before the next item comes
    pool.shutdown(timeout_s=5)
    assert len(names) <= 2
