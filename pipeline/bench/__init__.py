"""Benchmarks behind ``pipeline bench``: each prints JSON figures with a baseline measured in
the same run (these machines are shared and noisy; compare within a run, quote medians)."""

from __future__ import annotations

import uuid

from pipeline.config import Settings


def scoped(settings: Settings) -> Settings:
    """The settings with a fresh topic prefix and the ``order`` aggregate only: a benchmark's
    topics never mix with another run's."""
    topics = settings.topics.model_copy(
        update={"prefix": f"bench{uuid.uuid4().hex[:6]}", "aggregate_types": ["order"]}
    )
    return settings.model_copy(update={"topics": topics})
