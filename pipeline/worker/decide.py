"""What the worker does with an event (pure): when it arrives, and when its handler returned.

``admit`` answers "may it run now?" from the key's retry state (strict ordering); ``decide``
answers "what now?" from the handler's outcome. Both return an :class:`Action`; the worker loop
only carries actions out (routes a copy, holds the event, marks the offset done) and keeps no
rule of its own, so every rule is tested here without a broker.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.kafka.names import GroupTopics
from pipeline.worker.classify import TRANSIENT
from pipeline.worker.ordering import BLOCKED, FOLLOW, Ordering
from pipeline.worker.routing import Route, route_failure

OK, SKIPPED, FAILED = "ok", "skipped", "failed"

# verbs
RUN = "run"  # call the handler
DONE = "done"  # finished: the offset may be committed
HOLD = "hold"  # keep it here and call again later (breaker open, or the target said when)
RETRY = "retry"  # copy to a retry tier
FOLLOW_HEAD = "follow"  # copy to tier 1 behind the key's head, attempts unchanged
DEAD_LETTER = "dead-letter"  # copy to the DLQ

# breaker effects
SUCCESS, FAILURE, NO_CALL = "success", "failure", "no-call"


@dataclass(frozen=True)
class Action:
    verb: str
    route: Route | None = None
    attempts: int = 1  # the attempts header of the copy
    blocked_by: str | None = None  # the event id the event waits behind / was blocked by
    hold_s: float = 0.0  # HOLD for this long (the target's Retry-After); 0: until the breaker
    breaker: tuple[str, ...] = ()  # what the outcome tells the circuit breaker, in order
    unless_open: bool = False  # RETRY: after the breaker counted the failure, HOLD if open
    applied: bool = False  # DONE: the handler ran (else: skipped, no handler)


# the outcomes of nearly every event: one object each, not one per event
APPLIED = Action(DONE, breaker=(SUCCESS,), applied=True)
SKIPPED_DONE = Action(DONE, breaker=(NO_CALL,))
RUN_NOW = Action(RUN)


def admit(
    ordering: Ordering,
    key: str,
    event_id: str,
    *,
    replay: bool,
    attempts: int,
    tiers: GroupTopics,
    now_ms: int,
) -> Action:
    """May this event run now? A replayed event that blocked its key heads it again first."""
    if replay:
        ordering.replayed(key, event_id)
    verdict, ref = ordering.admit(key, event_id)
    if verdict == FOLLOW:
        route = route_failure(tiers, TRANSIENT, 1, now_ms)
        # no retry tiers (a state from an older configuration): nowhere to wait but the DLQ
        verb = DEAD_LETTER if route.is_dlq else FOLLOW_HEAD
        return Action(verb, route, attempts=attempts, blocked_by=ref)
    if verdict == BLOCKED:
        return Action(DEAD_LETTER, Route(tiers.dlq_topic, 0, None), attempts, blocked_by=ref)
    return RUN_NOW


def decide(
    outcome: str,
    *,
    kind: str | None,
    attempt: int,
    tiers: GroupTopics,
    now_ms: int,
    retry_after_s: float | None = None,
    target_alive: bool = False,
) -> Action:
    """The action for a handler's outcome.

    * ok → done (the breaker closes); skipped (no handler) → done, no call was made;
    * a refusal (permanent) → the DLQ at once; the target answered, so it is up;
    * transient with Retry-After → held that long, in place (not a retry hop);
    * transient → the next tier, or the DLQ after the last; it counts against the breaker unless
      the target answered ("not yet"), and is held in place instead when that opened the breaker
      (an outage must not walk events down the tiers into the DLQ).
    """
    if outcome == OK:
        return APPLIED
    if outcome == SKIPPED:
        return SKIPPED_DONE
    answered = (SUCCESS,) if kind != TRANSIENT or target_alive else ()
    if kind == TRANSIENT:
        if retry_after_s is not None and retry_after_s > 0:
            return Action(HOLD, hold_s=float(retry_after_s), breaker=(*answered, NO_CALL))
        route = route_failure(tiers, kind, attempt, now_ms)
        effect = answered if target_alive else (FAILURE,)
        if route.is_dlq:
            return Action(DEAD_LETTER, route, attempt, breaker=effect, unless_open=True)
        return Action(RETRY, route, attempt + 1, breaker=effect, unless_open=True)
    return Action(DEAD_LETTER, Route(tiers.dlq_topic, 0, None), attempt, breaker=answered)
