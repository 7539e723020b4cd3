"""pipeline.telemetry.FastHistogram serves what prometheus_client's Histogram would."""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from pipeline.telemetry import FastHistogram

BOUNDS = (0.001, 0.005, 0.01)
VALUES = (0.0005, 0.001, 0.003, 0.0101, 0.02, 7.0)


def _samples(text: str) -> set[str]:
    return {line for line in text.splitlines()
            if line and not line.startswith("#") and "_created" not in line}


def _norm(line: str) -> str:
    """The same sample whatever order its labels are written in."""
    name, _, rest = line.partition("{")
    labels, _, value = rest.partition("} ")
    return f"{name}{{{','.join(sorted(labels.split(',')))}}} {value}"


def test_its_exposition_matches_prometheus_clients_histogram() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    h = FastHistogram("x_duration_seconds", "doc", ("messaging.system", "outcome"), BOUNDS, ours)
    ref = Histogram("x_duration", "doc", ["messaging_system", "outcome"], unit="seconds",
                    buckets=BOUNDS, registry=theirs)
    for v in VALUES:
        h.record(v, {"messaging.system": "kafka", "outcome": "ok"})
        ref.labels("kafka", "ok").observe(v)
    h.record(0.002, {"outcome": "failed"})  # a missing attribute: an empty label
    ref.labels("", "failed").observe(0.002)
    assert {_norm(x) for x in _samples(generate_latest(ours).decode())} == {
        _norm(x) for x in _samples(generate_latest(theirs).decode())}
    text = generate_latest(ours).decode()
    assert 'x_duration_seconds_bucket{le="0.001",messaging_system="kafka",outcome="ok"} 2.0' in text
    assert 'x_duration_seconds_count{messaging_system="kafka",outcome="ok"} 6.0' in text


def test_no_observation_is_lost_between_threads() -> None:
    reg = CollectorRegistry()
    h = FastHistogram("y_seconds", "doc", ("g",), BOUNDS, reg)

    def hammer() -> None:
        for _ in range(20_000):
            h.record(0.002, {"g": "a"})

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert 'y_seconds_count{g="a"} 80000.0' in generate_latest(reg).decode()


def test_a_bound_series_records_what_record_does() -> None:
    by_call, by_bound = CollectorRegistry(), CollectorRegistry()
    attrs = {"messaging.system": "kafka", "outcome": "ok"}
    a = FastHistogram("x_duration_seconds", "doc", ("messaging.system", "outcome"), BOUNDS,
                      by_call)
    b = FastHistogram("x_duration_seconds", "doc", ("messaging.system", "outcome"), BOUNDS,
                      by_bound)
    record = b.bound(attrs)
    for v in VALUES:
        a.record(v, attrs)
        record(v)
    b.record(0.004, attrs)  # the same series whichever way it is reached
    a.record(0.004, attrs)
    assert _samples(generate_latest(by_call).decode()) == _samples(
        generate_latest(by_bound).decode())
