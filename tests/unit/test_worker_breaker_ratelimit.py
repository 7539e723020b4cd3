"""CircuitBreaker and TokenBucket, both with an injected clock."""

from __future__ import annotations

import random

import pytest

from pipeline.worker.breaker import CircuitBreaker
from pipeline.worker.ratelimit import TokenBucket

# -- circuit breaker ---------------------------------------------------------------------------


def _open(b: CircuitBreaker, now: float) -> None:
    for _ in range(b.threshold):
        b.failure(now)
    assert b.state == "open"


def test_new_breaker_is_closed_and_allows_calls() -> None:
    b = CircuitBreaker()
    assert b.state == "closed"
    assert not b.is_open
    assert all(b.allow(t) for t in (0.0, 1.0, 1e9))
    assert b.opens == 0


def test_opens_after_threshold_consecutive_failures() -> None:
    b = CircuitBreaker(threshold=3, probe_initial_s=2.0)
    b.failure(10.0)
    b.failure(11.0)
    assert b.state == "closed"
    assert b.allow(11.0)
    b.failure(12.0)
    assert b.state == "open"
    assert b.is_open
    assert b.opens == 1
    assert b.opened_at == 12.0
    assert b.next_probe_at == 14.0


def test_threshold_one_opens_on_first_failure() -> None:
    b = CircuitBreaker(threshold=1)
    b.failure(0.0)
    assert b.is_open


def test_success_resets_the_consecutive_count() -> None:
    b = CircuitBreaker(threshold=3)
    b.failure(0.0)
    b.failure(0.0)
    b.success()
    assert b.failures == 0
    b.failure(0.0)
    b.failure(0.0)
    assert b.state == "closed"
    b.failure(0.0)
    assert b.state == "open"


def test_open_breaker_refuses_calls_until_the_probe_is_due() -> None:
    b = CircuitBreaker(threshold=2, probe_initial_s=5.0)
    _open(b, 100.0)
    assert not b.allow(100.0)
    assert not b.allow(104.999)
    assert b.state == "open"
    assert b.allow(105.0)  # exactly due
    assert b.state == "half-open"
    assert b.is_open


def test_half_open_allows_exactly_one_probe() -> None:
    b = CircuitBreaker(threshold=1, probe_initial_s=1.0)
    _open(b, 0.0)
    assert b.allow(50.0)
    assert not b.allow(50.0)
    assert not b.allow(1000.0)  # still waiting for the probe's outcome
    assert b.state == "half-open"


def test_probe_success_closes_the_breaker() -> None:
    b = CircuitBreaker(threshold=2, probe_initial_s=1.0)
    _open(b, 0.0)
    assert b.allow(1.0)
    b.success()
    assert b.state == "closed"
    assert not b.is_open
    assert b.failures == 0
    assert b.allow(1.0)
    assert b.allow(1.0)


def test_probe_failure_reopens_with_doubling_backoff_up_to_the_max() -> None:
    b = CircuitBreaker(threshold=1, probe_initial_s=1.0, probe_max_s=10.0)
    now = 0.0
    b.failure(now)
    intervals = []
    for _ in range(7):
        due = b.next_probe_at
        intervals.append(due - now)
        assert not b.allow(due - 0.001)
        now = due
        assert b.allow(now)
        b.failure(now)
        assert b.state == "open"
    assert intervals == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0]
    assert b.opens == 1  # half-open → open is not a new opening


def test_backoff_restarts_after_the_breaker_closed() -> None:
    b = CircuitBreaker(threshold=1, probe_initial_s=1.0, probe_max_s=60.0)
    b.failure(0.0)
    for now in (1.0, 3.0, 7.0):  # probes fail: 1, 2, 4, then 8
        assert b.allow(now)
        b.failure(now)
    assert b.next_probe_at == 15.0
    assert b.allow(15.0)
    b.success()
    b.failure(100.0)
    assert b.state == "open"
    assert b.opens == 2
    assert b.opened_at == 100.0
    assert b.next_probe_at == 101.0
    assert b.allow(101.0)
    b.failure(101.0)
    assert b.next_probe_at == 103.0


def test_failures_while_open_do_not_delay_the_probe() -> None:
    # Calls that were already running when the breaker opened may still fail afterwards.
    b = CircuitBreaker(threshold=2, probe_initial_s=3.0)
    _open(b, 0.0)
    b.failure(1.0)
    b.failure(2.0)
    assert b.state == "open"
    assert b.next_probe_at == 3.0
    assert b.opens == 1
    assert b.allow(3.0)


def test_randomized_breaker_never_lets_two_probes_out_at_once() -> None:
    rng = random.Random(7)
    b = CircuitBreaker(threshold=3, probe_initial_s=0.5, probe_max_s=4.0)
    now = 0.0
    outstanding = 0
    probe_out = False
    for _ in range(20_000):
        now += rng.random() * 0.5
        if rng.random() < 0.5 or not outstanding:
            was = b.state
            allowed = b.allow(now)
            if was == "closed":
                assert allowed
            if allowed:
                outstanding += 1
                if b.state == "half-open":
                    assert was == "open"
                    assert not probe_out, "a second probe while one is outstanding"
                    probe_out = True
        else:
            outstanding -= 1
            if rng.random() < 0.7:
                b.failure(now)
            else:
                b.success()
            if b.state != "half-open":
                probe_out = False
        if b.state == "half-open":
            assert probe_out
        if b.state == "open":
            assert b.next_probe_at - now <= 4.0 + 1e-9
    assert b.opens > 0


# -- token bucket ------------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [None, 0])
def test_no_rate_means_no_limit(rate: float | None) -> None:
    tb = TokenBucket(rate)
    assert all(tb.take(0.0) == 0.0 for _ in range(10_000))


def test_default_burst_is_the_rate_per_second() -> None:
    tb = TokenBucket(5)
    assert tb.capacity == 5
    assert [tb.take(0.0) for _ in range(5)] == [0.0] * 5
    assert tb.take(0.0) == pytest.approx(0.2)


def test_explicit_burst() -> None:
    tb = TokenBucket(10, burst=3)
    assert [tb.take(0.0) for _ in range(3)] == [0.0] * 3
    assert tb.take(0.0) == pytest.approx(0.1)


def test_fractional_rate_has_a_burst_of_one() -> None:
    tb = TokenBucket(0.5)
    assert tb.capacity == 1
    assert tb.take(0.0) == 0.0
    assert tb.take(0.0) == pytest.approx(2.0)
    assert tb.take(1.0) == pytest.approx(1.0)
    assert tb.take(2.0) == pytest.approx(0.0, abs=1e-9)


def test_waiting_the_returned_time_lets_the_call_go() -> None:
    tb = TokenBucket(4, burst=1)
    now = 1000.0
    assert tb.take(now) == 0.0
    wait = tb.take(now)
    assert wait == pytest.approx(0.25)
    assert tb.take(now + wait) == pytest.approx(0.0, abs=1e-9)


def test_a_refused_take_does_not_consume_a_token() -> None:
    tb = TokenBucket(1, burst=1)
    assert tb.take(0.0) == 0.0
    for _ in range(5):
        assert tb.take(0.5) == pytest.approx(0.5)
    assert tb.take(1.0) == pytest.approx(0.0, abs=1e-9)


def test_refill_is_capped_at_the_burst() -> None:
    tb = TokenBucket(10, burst=2)
    tb.take(0.0)
    tb.take(0.0)
    # A long idle period refills only up to the burst.
    assert [tb.take(3600.0) for _ in range(2)] == [0.0, 0.0]
    assert tb.take(3600.0) == pytest.approx(0.1)


def test_hold_until_blocks_until_the_given_time() -> None:
    tb = TokenBucket(100)
    tb.hold_until(50.0)
    assert tb.take(10.0) == pytest.approx(40.0)
    assert tb.take(49.5) == pytest.approx(0.5)
    assert tb.take(50.0) == 0.0


def test_hold_until_applies_without_a_rate_limit() -> None:
    tb = TokenBucket(None)
    tb.hold_until(5.0)
    assert tb.take(1.0) == pytest.approx(4.0)
    assert tb.take(5.0) == 0.0


def test_hold_until_never_shortens_an_earlier_hold() -> None:
    tb = TokenBucket(None)
    tb.hold_until(30.0)
    tb.hold_until(10.0)
    assert tb.blocked_until == 30.0
    assert tb.take(20.0) == pytest.approx(10.0)
    tb.hold_until(40.0)
    assert tb.take(20.0) == pytest.approx(20.0)


def test_hold_does_not_consume_tokens() -> None:
    tb = TokenBucket(1, burst=2)
    tb.hold_until(1.0)
    for _ in range(10):
        assert tb.take(0.0) > 0
    assert [tb.take(1.0), tb.take(1.0)] == [0.0, 0.0]


@pytest.mark.parametrize("seed", range(10))
def test_randomized_rate_is_never_exceeded(seed: int) -> None:
    rng = random.Random(seed)
    rate = rng.choice([0.5, 1.0, 3.0, 10.0, 25.0])
    burst = rng.choice([None, 1, 2, 7])
    tb = TokenBucket(rate, burst)
    capacity = burst if burst is not None else max(1, int(rate))
    now = 0.0
    granted: list[float] = []
    for _ in range(3000):
        now += rng.expovariate(rate * 2)
        if tb.take(now) == 0.0:
            granted.append(now)
    assert granted
    # Over any window starting at a grant, calls ≤ burst + rate × window.
    for i, start in enumerate(granted):
        for j in range(i, min(len(granted), i + 50)):
            window = granted[j] - start
            assert j - i + 1 <= capacity + rate * window + 1e-6


def test_cancelled_probe_is_given_again_at_once() -> None:
    b = CircuitBreaker(threshold=1, probe_initial_s=5.0)
    b.failure(100.0)
    assert not b.allow(101.0)
    assert b.allow(105.0) and b.state == "half-open"
    assert not b.allow(105.0)  # one probe at a time
    b.cancel_probe(105.0)  # the slot went to an event that never reached the target
    assert b.state == "open"
    assert b.allow(105.0) and b.state == "half-open"
    b.success()
    assert b.state == "closed" and b.allow(105.0)
