"""What the worker does with an event: ``admit`` (may it run now, given its key's retry state)
and ``decide`` (what now, given the handler's outcome). Pure: no broker, no target."""

from __future__ import annotations

import random

import pytest

from pipeline.kafka.names import GroupTopics
from pipeline.worker import decide as d
from pipeline.worker.classify import PERMANENT, TRANSIENT
from pipeline.worker.ordering import KeyState, Ordering
from pipeline.worker.routing import Route

TIERS = GroupTopics("erp", "wms", (1.0, 10.0, 60.0))
DLQ = Route("erp.wms.dlq", 0, None)
NOW_MS = 1_764_227_700_123
KEY = "erp.order/42"


def _decide(outcome: str = d.FAILED, **kw: object) -> d.Action:
    args: dict[str, object] = {"kind": TRANSIENT, "attempt": 1, "tiers": TIERS, "now_ms": NOW_MS}
    args.update(kw)
    return d.decide(outcome, **args)  # type: ignore[arg-type]


def _admit(
    ordering: Ordering, event_id: str, *, replay: bool = False, attempts: int = 1, key: str = KEY
) -> d.Action:
    return d.admit(
        ordering, key, event_id, replay=replay, attempts=attempts, tiers=TIERS, now_ms=NOW_MS
    )


# -- decide: ok / skipped ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [None, TRANSIENT, PERMANENT])
@pytest.mark.parametrize("attempt", [1, 3, 7])
def test_ok_is_done_and_closes_the_breaker(kind: str | None, attempt: int) -> None:
    a = _decide(d.OK, kind=kind, attempt=attempt, retry_after_s=5.0)
    assert a.verb == d.DONE
    assert a.breaker == (d.SUCCESS,)
    assert a.applied is True
    assert a.route is None
    assert a.unless_open is False
    assert a.hold_s == 0.0
    assert a is d.APPLIED  # the worker settles an ok outcome with d.APPLIED without the call


@pytest.mark.parametrize("kind", [None, TRANSIENT, PERMANENT])
def test_skipped_is_done_without_a_call(kind: str | None) -> None:
    a = _decide(d.SKIPPED, kind=kind, attempt=2, retry_after_s=5.0, target_alive=True)
    assert a.verb == d.DONE
    assert a.breaker == (d.NO_CALL,)
    assert a.applied is False
    assert a.route is None
    assert d.SUCCESS not in a.breaker and d.FAILURE not in a.breaker


# -- decide: permanent ---------------------------------------------------------------------------


@pytest.mark.parametrize("attempt", [1, 2, 3, 4, 9])
def test_permanent_goes_to_the_dlq_at_once(attempt: int) -> None:
    a = _decide(kind=PERMANENT, attempt=attempt)
    assert a.verb == d.DEAD_LETTER
    assert a.route == DLQ
    assert a.route is not None and a.route.is_dlq
    assert a.attempts == attempt  # unchanged: a dead letter is not another attempt
    # the target answered (it refused the event): it is up
    assert a.breaker == (d.SUCCESS,)
    assert a.unless_open is False
    assert a.blocked_by is None


def test_permanent_with_retry_after_is_still_dead_lettered_not_held() -> None:
    a = _decide(kind=PERMANENT, attempt=1, retry_after_s=30.0)
    assert a.verb == d.DEAD_LETTER
    assert a.route == DLQ
    assert a.hold_s == 0.0


def test_permanent_dlq_topic_follows_the_group() -> None:
    other = GroupTopics("acme", "billing", (1.0,))
    a = d.decide(d.FAILED, kind=PERMANENT, attempt=1, tiers=other, now_ms=NOW_MS)
    assert a.route == Route("acme.billing.dlq", 0, None)


# -- decide: transient ---------------------------------------------------------------------------


@pytest.mark.parametrize(("attempt", "delay_ms"), [(1, 1_000), (2, 10_000), (3, 60_000)])
def test_transient_goes_to_the_tier_of_its_attempt(attempt: int, delay_ms: int) -> None:
    a = _decide(kind=TRANSIENT, attempt=attempt)
    assert a.verb == d.RETRY
    assert a.route == Route(f"erp.wms.retry.{attempt}", attempt, NOW_MS + delay_ms)
    assert a.attempts == attempt + 1
    assert a.breaker == (d.FAILURE,)
    assert a.unless_open is True
    assert a.hold_s == 0.0
    assert a.applied is False


def test_transient_due_time_rounds_fractional_delays_to_ms() -> None:
    tiers = GroupTopics("erp", "wms", (0.25, 1.5, 0.0004))
    due = [
        d.decide(d.FAILED, kind=TRANSIENT, attempt=n, tiers=tiers, now_ms=NOW_MS).route
        for n in (1, 2, 3)
    ]
    assert [r.due_ms for r in due if r is not None] == [NOW_MS + 250, NOW_MS + 1500, NOW_MS]


@pytest.mark.parametrize("attempt", [4, 5, 40])
def test_transient_after_the_last_tier_is_dead_lettered(attempt: int) -> None:
    a = _decide(kind=TRANSIENT, attempt=attempt)
    assert a.verb == d.DEAD_LETTER
    assert a.route == DLQ
    assert a.attempts == attempt
    assert a.breaker == (d.FAILURE,)
    # an outage must not walk events into the DLQ: held instead if this opened the breaker
    assert a.unless_open is True


@pytest.mark.parametrize("attempt", [1, 2, 3, 4])
def test_transient_from_a_live_target_does_not_count_as_a_failure(attempt: int) -> None:
    a = _decide(kind=TRANSIENT, attempt=attempt, target_alive=True)
    assert d.FAILURE not in a.breaker
    assert a.breaker == (d.SUCCESS,)
    # it still walks the tiers like any transient failure
    assert a.verb == (d.RETRY if attempt <= 3 else d.DEAD_LETTER)
    assert a.unless_open is True


@pytest.mark.parametrize("attempt", [1, 3, 4, 10])
def test_transient_with_retry_after_is_held_in_place(attempt: int) -> None:
    a = _decide(kind=TRANSIENT, attempt=attempt, retry_after_s=2.5)
    assert a.verb == d.HOLD
    assert a.hold_s == 2.5
    assert a.breaker == (d.NO_CALL,)
    assert a.route is None  # not a retry hop, not the DLQ (even after the last tier)
    assert a.unless_open is False


def test_retry_after_from_a_live_target_holds_without_failure() -> None:
    a = _decide(kind=TRANSIENT, attempt=1, retry_after_s=3, target_alive=True)
    assert a.verb == d.HOLD
    assert a.hold_s == 3.0
    assert isinstance(a.hold_s, float)
    assert d.FAILURE not in a.breaker
    assert a.breaker[-1] == d.NO_CALL


@pytest.mark.parametrize("retry_after", [None, 0, 0.0, -1.0])
def test_no_positive_retry_after_does_not_hold(retry_after: float | None) -> None:
    a = _decide(kind=TRANSIENT, attempt=1, retry_after_s=retry_after)
    assert a.verb == d.RETRY
    assert a.hold_s == 0.0
    assert a.route == Route("erp.wms.retry.1", 1, NOW_MS + 1_000)


# -- decide: property over tier layouts ----------------------------------------------------------


@pytest.mark.parametrize("seed", range(40))
def test_transient_routing_property(seed: int) -> None:
    """For any tier layout and any attempt 1..len(delays) a transient failure routes to tier
    ``attempt`` (never the DLQ); any attempt beyond the last tier always routes to the DLQ."""
    rnd = random.Random(seed)
    delays = tuple(round(rnd.uniform(0.0, 3600.0), 3) for _ in range(rnd.randint(1, 8)))
    tiers = GroupTopics("p", f"g{seed}", delays)
    now_ms = rnd.randint(0, 2**42)
    for attempt in range(1, len(delays) + 1):
        alive = rnd.random() < 0.3
        a = d.decide(
            d.FAILED,
            kind=TRANSIENT,
            attempt=attempt,
            tiers=tiers,
            now_ms=now_ms,
            target_alive=alive,
        )
        assert a.verb == d.RETRY, (delays, attempt)
        assert a.route is not None and not a.route.is_dlq
        assert a.route.topic == tiers.retry_topic(attempt) != tiers.dlq_topic
        assert a.route.tier == attempt
        assert a.route.due_ms == now_ms + round(delays[attempt - 1] * 1000)
        assert a.attempts == attempt + 1
    for attempt in range(len(delays) + 1, len(delays) + 1 + rnd.randint(1, 20)):
        a = d.decide(d.FAILED, kind=TRANSIENT, attempt=attempt, tiers=tiers, now_ms=now_ms)
        assert a.verb == d.DEAD_LETTER, (delays, attempt)
        assert a.route == Route(tiers.dlq_topic, 0, None)
        assert a.attempts == attempt


def test_no_tiers_means_a_transient_failure_is_dead_lettered() -> None:
    tiers = GroupTopics("erp", "wms", ())
    a = d.decide(d.FAILED, kind=TRANSIENT, attempt=1, tiers=tiers, now_ms=NOW_MS)
    assert a.verb == d.DEAD_LETTER
    assert a.route == DLQ


# -- admit: strict ordering ----------------------------------------------------------------------


def test_key_without_state_runs() -> None:
    o = Ordering()
    assert _admit(o, "e1") == d.Action(d.RUN)
    assert o.keys == {}  # admitting does not park anything


def test_event_behind_a_retried_head_follows_it_to_tier_one() -> None:
    o = Ordering()
    o.retrying(KEY, "head")
    a = _admit(o, "e2", attempts=3)
    assert a.verb == d.FOLLOW_HEAD
    assert a.route == Route("erp.wms.retry.1", 1, NOW_MS + 1_000)
    assert a.attempts == 3  # a follower has not been tried: attempts unchanged
    assert a.blocked_by == "head"
    assert a.breaker == ()
    assert o.keys[KEY].followers == ["e2"]


def test_follower_routes_to_tier_one_whatever_its_attempt() -> None:
    o = Ordering()
    o.retrying(KEY, "head")
    for attempts in (1, 2, 3, 4, 8):
        a = _admit(o, f"e{attempts}", attempts=attempts)
        assert a.verb == d.FOLLOW_HEAD
        assert a.route is not None and a.route.tier == 1
        assert a.attempts == attempts


def test_the_head_itself_runs() -> None:
    o = Ordering()
    o.retrying(KEY, "head")
    _admit(o, "e2")
    assert _admit(o, "head", attempts=2) == d.Action(d.RUN)


def test_other_keys_are_not_held_behind_a_head() -> None:
    o = Ordering()
    o.retrying(KEY, "head")
    assert _admit(o, "x1", key="erp.order/43") == d.Action(d.RUN)


def test_event_of_a_blocked_key_is_dead_lettered_with_the_blocker() -> None:
    o = Ordering()
    o.retrying(KEY, "head")
    o.dead_lettered(KEY, "head")
    a = _admit(o, "e3", attempts=2)
    assert a.verb == d.DEAD_LETTER
    assert a.route == DLQ
    assert a.blocked_by == "head"
    assert a.attempts == 2
    assert a.breaker == ()


def test_queued_follower_of_a_blocked_key_is_dead_lettered_too() -> None:
    o = Ordering()
    o.retrying(KEY, "head")
    assert _admit(o, "e2").verb == d.FOLLOW_HEAD
    o.dead_lettered(KEY, "head")
    a = _admit(o, "e2")
    assert a.verb == d.DEAD_LETTER
    assert a.blocked_by == "head"


def test_the_blocking_event_without_replay_is_dead_lettered_again() -> None:
    o = Ordering()
    o.retrying(KEY, "head")
    o.dead_lettered(KEY, "head")
    a = _admit(o, "head", replay=False)
    assert a.verb == d.DEAD_LETTER
    assert a.blocked_by == "head"


def test_replay_of_the_blocking_event_runs_and_heads_the_key() -> None:
    o = Ordering()
    o.retrying(KEY, "head")
    o.dead_lettered(KEY, "head")
    assert _admit(o, "head", replay=True) == d.Action(d.RUN)
    assert o.keys[KEY].head == "head"
    assert o.keys[KEY].blocked_by is None
    # the key is headed by the replayed event again: later events follow it, not the DLQ
    a = _admit(o, "e4", replay=True)
    assert a.verb == d.FOLLOW_HEAD
    assert a.blocked_by == "head"


def test_replay_of_a_non_blocking_event_does_not_unblock_the_key() -> None:
    o = Ordering()
    o.retrying(KEY, "head")
    o.dead_lettered(KEY, "head")
    a = _admit(o, "e3", replay=True)
    assert a.verb == d.DEAD_LETTER
    assert a.blocked_by == "head"
    assert o.keys[KEY].blocked_by == "head"


def test_replay_of_an_event_with_no_key_state_just_runs() -> None:
    o = Ordering()
    assert _admit(o, "e1", replay=True) == d.Action(d.RUN)
    assert o.keys == {}


# -- admit: relaxed ordering ---------------------------------------------------------------------


def test_relaxed_ordering_always_runs() -> None:
    o = Ordering(strict=False)
    o.retrying(KEY, "head")
    o.dead_lettered(KEY, "head")
    for eid in ("e2", "head", "e3"):
        assert _admit(o, eid) == d.Action(d.RUN)


@pytest.mark.parametrize(
    "state", [KeyState("head", ["e2"]), KeyState("head", ["e2"], blocked_by="head")]
)
def test_relaxed_ordering_runs_even_with_loaded_key_state(state: KeyState) -> None:
    o = Ordering(strict=False)
    o.load(KEY, state)
    assert _admit(o, "e2") == d.Action(d.RUN)
    assert _admit(o, "e9") == d.Action(d.RUN)
