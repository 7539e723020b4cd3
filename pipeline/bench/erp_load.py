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
# a latency bench's unmeasured round at the rate before the measured ones, in seconds (at most
# the measured rounds' length): the broker's JIT and the systems' first batches are not the
# steady state
WARMUP_S = 3.0


# ERP writer processes per this many events/s asked: a writer's event is one round trip of a
# statement built before the clock (~0.2 ms of CPU in psycopg), so one interpreter keeps up
# with ~2,000/s on this kind of machine; half of that leaves room for a slow second
RATE_PER_PROCESS = 1000
# events each writer process builds beyond rate x seconds (a writer never runs dry early)
_SPARE = 1.1


def simulate(conninfo: str, schema: str, rate: float, seconds: float, index: int, out: Any,
             go: Any) -> None:
    """Part of the ERP, in a process of its own (as in production: the relay does not share the
    ERP's interpreter): builds its events (:meth:`ErpSimulator.prepared_load`), says it is
    ready, waits for ``go``, writes at ``rate`` for ``seconds`` and sends back how many it
    wrote and each event's commit wall time."""
    sim = ErpSimulator(
        conninfo,
        schema,
        SimulatorConfig(
            writers=2, rate=rate, rollback_ratio=0.0, late_commit_ratio=0.0, track_latency=True,
            seed=42 + index,
        ),
    )
    sim._order_seq = index * 10_000_000  # orders of their own: SO-10000001… in the second
    load = sim.prepared_load(int(rate * seconds * _SPARE) + 100)
    try:
        out.send("ready")
        if not go.wait(120):
            return
        stop = threading.Event()
        t = threading.Thread(target=load.run, args=(stop,), daemon=True)
        t.start()
        time.sleep(seconds)
        stop.set()
        t.join(10)
    finally:
        load.close()
    out.send((sim.stats.written, dict(sim.stats.committed_at)))
    out.close()


def simulate_at(url: str, schema: str, rate: float, seconds: float
                ) -> tuple[int, dict[str, float]]:
    """The ERP simulator writing ``rate`` events/s for ``seconds`` into ``url``, one process
    per ``RATE_PER_PROCESS`` events/s asked, all starting together once every one has built
    its events; events written and each one's commit time (``time.time()``)."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")  # no fork of a process with librdkafka threads
    n_proc = max(1, -(-int(rate) // RATE_PER_PROCESS))
    go = ctx.Event()
    pipes, sims = [], []
    for i in range(n_proc):
        receive, send = ctx.Pipe(duplex=False)
        sim = ctx.Process(target=simulate,
                          args=(url, schema, rate / n_proc, seconds, i, send, go), daemon=True)
        sim.start()
        send.close()
        pipes.append(receive)
        sims.append(sim)
    written, committed_at = 0, {}
    try:
        for receive in pipes:
            try:
                ready = receive.poll(120) and receive.recv() == "ready"
            except EOFError:  # it died building its events: its traceback is above
                ready = False
            if not ready:
                raise RuntimeError("an ERP simulator process did not get ready in 120 s (it "
                                   "connects to the database and builds its events first)")
        go.set()
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
