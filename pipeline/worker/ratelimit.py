"""Token bucket (pure, clock injected) per target, and ``Retry-After`` honoured by holding the
bucket until the given time."""

from __future__ import annotations


class TokenBucket:
    def __init__(self, rate_per_s: float | None, burst: int | None = None) -> None:
        self.rate = rate_per_s
        self.capacity = float(burst if burst is not None else max(1, int(rate_per_s or 1)))
        self.tokens = self.capacity
        self.updated: float | None = None
        self.blocked_until = 0.0

    def _refill(self, now: float) -> None:
        if self.updated is not None and self.rate:
            self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now

    def take(self, now: float) -> float:
        """0 when a call may go now (a token is taken), else seconds to wait."""
        if now < self.blocked_until:
            return self.blocked_until - now
        if not self.rate:
            return 0.0
        self._refill(now)
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate

    def hold_until(self, when: float) -> None:
        """The target said Retry-After: no calls before ``when``."""
        self.blocked_until = max(self.blocked_until, when)
