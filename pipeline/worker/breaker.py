"""Circuit breaker (pure, clock injected): after ``threshold`` consecutive transient failures
the target is considered down; the worker pauses consumption, probes with exponential backoff,
and closes the breaker on the first success. States: closed → open → half-open → closed."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class CircuitBreaker:
    threshold: int = 5
    probe_initial_s: float = 1.0
    probe_max_s: float = 30.0
    state: str = "closed"  # closed | open | half-open
    failures: int = 0
    opened_at: float = 0.0
    next_probe_at: float = 0.0
    _backoff: float = 0.0
    opens: int = 0

    def allow(self, now: float) -> bool:
        """May a call go to the target now? In open state, one probe when it is due."""
        if self.state == "closed":
            return True
        if self.state == "open" and now >= self.next_probe_at:
            self.state = "half-open"
            return True
        return False

    def cancel_probe(self, now: float) -> None:
        """The probe slot went to an event that did not reach the target: probe again now."""
        if self.state == "half-open":
            self.state = "open"
            self.next_probe_at = now

    def success(self) -> None:
        self.state = "closed"
        self.failures = 0
        self._backoff = 0.0

    def failure(self, now: float) -> None:
        """A transient failure (permanent ones say nothing about the target's health)."""
        self.failures += 1
        if self.state == "half-open":
            self._backoff = min(self.probe_max_s, max(self.probe_initial_s, self._backoff * 2))
            self.state = "open"
            self.next_probe_at = now + self._backoff
        elif self.state == "closed" and self.failures >= self.threshold:
            self.state = "open"
            self.opens += 1
            self.opened_at = now
            self._backoff = self.probe_initial_s
            self.next_probe_at = now + self._backoff

    @property
    def is_open(self) -> bool:
        return self.state != "closed"
