"""The ERP's load in the latency benches: simulator processes writing at a rate, and the
figures of one run (commit → Kafka acknowledgement per event)."""

from __future__ import annotations

import threading
import time
from typing import Any

from pipeline.simulator.erp import ErpSimulator, SimulatorConfig


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


# a latency figure taken below this share of the asked rate is not a pass: it was measured
# under less load than asked
RATE_REACHED_MIN = 0.95


# ERP writer processes per 500 events/s asked: one interpreter commits ~700/s on this kind of
# machine (each commit is two round trips, and a round trip costs ~60 µs of CPU in psycopg)
RATE_PER_PROCESS = 500


def simulate(
    conninfo: str, schema: str, rate: float, seconds: float, index: int, out: Any
) -> None:
    """Part of the ERP, in a process of its own (as in production: the relay does not share the
    ERP's interpreter); sends back each event's commit wall time."""
    sim = ErpSimulator(
        conninfo,
        schema,
        SimulatorConfig(
            writers=2, rate=rate, rollback_ratio=0.0, late_commit_ratio=0.0, track_latency=True,
            seed=42 + index,
        ),
    )
    sim._order_seq = index * 10_000_000  # orders of their own: SO-10000001… in the second
    stop = threading.Event()
    t = threading.Thread(target=sim.run, args=(stop,), daemon=True)
    t.start()
    time.sleep(seconds)
    stop.set()
    t.join(10)
    out.send((sim.stats.written, dict(sim.stats.committed_at)))
    out.close()


def simulate_at(url: str, schema: str, rate: float, seconds: float
                ) -> tuple[int, dict[str, float]]:
    """The ERP simulator writing ``rate`` events/s for ``seconds`` into ``url``, one process
    per ``RATE_PER_PROCESS`` events/s asked; events written and each one's commit time
    (``time.time()``)."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")  # no fork of a process with librdkafka threads
    n_proc = max(1, -(-int(rate) // RATE_PER_PROCESS))
    pipes, sims = [], []
    for i in range(n_proc):
        receive, send = ctx.Pipe(duplex=False)
        sim = ctx.Process(target=simulate, args=(url, schema, rate / n_proc, seconds, i, send),
                          daemon=True)
        sim.start()
        send.close()
        pipes.append(receive)
        sims.append(sim)
    written, committed_at = 0, {}
    try:
        for receive, sim in zip(pipes, sims, strict=True):
            if not receive.poll(seconds + 120):
                raise RuntimeError("an ERP simulator process sent no figures")
            n, times = receive.recv()
            written += n
            committed_at.update(times)
            sim.join(30)
    finally:
        for sim in sims:
            if sim.is_alive():
                sim.kill()
    return written, committed_at


def latency_figures(committed_at: dict[str, float], acks: dict[str, float], *, written: int,
                    rate: float, seconds: float) -> dict[str, Any]:
    """One run's figures: commit -> acknowledgement in ms over the events acknowledged
    (``acknowledged`` of ``written``), the rate the writers reached and whether it is within
    ``RATE_REACHED_MIN`` of the asked one."""
    lat = [(acks[e] - c) * 1000 for e, c in committed_at.items() if e in acks]
    reached = written / seconds
    return {
        "written": written,
        "acknowledged": len(lat),
        "achieved_rate": round(reached, 1),
        "rate_reached": reached >= RATE_REACHED_MIN * rate,
        "p50": round(percentile(lat, 0.50), 2),
        "p99": round(percentile(lat, 0.99), 2),
        "max": round(max(lat) if lat else float("nan"), 2),
    }
