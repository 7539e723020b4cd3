"""The consumer worker runtime every connector runs on (DESIGN decisions 8 and 9): key-ordered
concurrency, offsets committed at the highest contiguous completed offset, retry tiers, a
dead-letter topic, ordering under retry, a circuit breaker and a rate limit per target."""

from pipeline.worker.connector import Connector, Event, on

__all__ = ["Connector", "Event", "on"]
