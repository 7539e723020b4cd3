"""The worker's handler threads: up to max_in_flight threads taking events from one queue.

Not :class:`concurrent.futures.ThreadPoolExecutor`: the loop never waits on a future (each
outcome comes back through the runtime's completion queue), and a ``Future`` per event is a
``threading.Condition`` made and thrown away, one more lock handed between two threads for
every call. Here an event is one ``SimpleQueue.put`` (C code) and the thread that takes it runs
it at once.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")

log = logging.getLogger("pipeline.worker")

_STOP = object()


class HandlerThreads(Generic[T]):
    """Up to ``size`` daemon threads running ``run(item)`` for every item submitted, in the
    order taken. ``run`` must not raise (the runtime's catches what a handler raises); if it does,
    the error is logged and the thread goes on."""

    def __init__(self, size: int, run: Callable[[T], None], name: str) -> None:
        if size < 1:
            raise ValueError("a worker needs at least one handler thread")
        self._size = size
        self._name = name
        self._run = run
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        # Threads are started as the work needs them, as ThreadPoolExecutor does: a new one
        # only when none is idle. Handlers keep per-thread resources (a database connection,
        # an HTTP pool), so a worker with 64 slots that needs 3 at a time keeps 3 threads,
        # not 64 connections.
        self._idle = threading.Semaphore(0)
        self._threads: list[threading.Thread] = []

    def submit(self, item: T) -> None:
        self._queue.put(item)
        if self._idle.acquire(blocking=False) or len(self._threads) >= self._size:
            return
        t = threading.Thread(target=self._serve, name=f"{self._name}-{len(self._threads)}",
                             daemon=True)
        self._threads.append(t)
        t.start()

    def _serve(self) -> None:
        take, run = self._queue.get, self._run
        idle = self._idle.release
        while (item := take()) is not _STOP:
            try:
                run(item)  # type: ignore[arg-type]
            except BaseException:
                log.exception("a handler thread's task failed outside the handler")
            idle()

    def shutdown(self, timeout_s: float = 0.0) -> list[T]:
        """Stop the threads once what they run now is done; the items not yet started are
        dropped and returned. Waits up to ``timeout_s`` for the threads to end."""
        dropped: list[T] = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP:
                dropped.append(item)  # type: ignore[arg-type]
        for _ in self._threads:
            self._queue.put(_STOP)
        if timeout_s > 0:
            for t in self._threads:
                t.join(timeout_s)
        return dropped

    @property
    def alive(self) -> int:
        return sum(t.is_alive() for t in self._threads)
