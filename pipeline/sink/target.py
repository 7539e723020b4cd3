"""What a batch target implements (``connectors.bi`` has PostgreSQL and Parquet).

A batch target stores, with every batch it lands and in the same atomic write, the position
(next offset) of each partition it consumed. The sink runtime seeks to those positions when it
is assigned partitions, so nothing is landed twice and nothing is skipped, without a lookup per
row. A write names, per partition, the position it expects to replace: a target that finds
another one there (a second instance landed the partition meanwhile, or a backfill reset it)
raises :class:`PositionConflict` and writes nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from pipeline.errors import PipelineError
from pipeline.worker.connector import Event

if TYPE_CHECKING:
    from pipeline.config import Settings

TP = tuple[str, int]


@dataclass(frozen=True)
class Rejected:
    """An event a target cannot land (a value its store refuses): dead-lettered instead."""

    event: Event
    error: BaseException


@dataclass
class Batch:
    """Events of several partitions, and the positions they move each partition from and to.

    ``positions[tp] = (expected, new)``: ``expected`` is the stored position the batch starts
    from (None: none stored yet), ``new`` the position after its last record. Records that could
    not be decoded are not in ``events`` but their offsets are covered by ``new``."""

    events: list[Event]
    positions: dict[TP, tuple[int | None, int]]
    consumer: str  # the consumer group the positions belong to
    undecodable: int = 0
    rejected: list[Rejected] = field(default_factory=list)  # filled by the target


# Called by a target after its rows are written and before they are committed, with the
# events it rejected: the runtime dead-letters them (and waits for Kafka's ack), so a rejected
# event is never lost; if that fails the target must not commit.
BeforeCommit = Callable[[Sequence[Rejected]], None]


class PositionConflict(PipelineError):
    """The stored position of a partition is not the one the batch expected."""

    def __init__(self, message: str, tps: Sequence[TP]) -> None:
        super().__init__(message)
        self.tps = list(tps)


@runtime_checkable
class BatchTarget(Protocol):
    name: str

    def open(self, settings: Settings, consumer: str) -> None:
        """Connect and create what is missing (tables, folders)."""

    def positions(self, consumer: str, tps: Sequence[TP]) -> dict[TP, int | None]:
        """The stored next offset of each partition (None: nothing landed yet)."""

    def write(self, batch: Batch, before_commit: BeforeCommit) -> None:
        """Land the batch and its positions atomically; raise PositionConflict (nothing
        written) or TransientError (nothing written, or everything: a retry finds the new
        positions stored and treats the batch as landed)."""

    def reset(self, consumer: str) -> None:
        """Forget everything landed for this consumer (data and positions): a backfill."""

    def close(self) -> None: ...


def is_batch_target(obj: object) -> bool:
    return all(callable(getattr(obj, m, None)) for m in ("open", "positions", "write", "reset"))
