"""Batch sinks: consumers that land events in bulk into a store that keeps its own consumed
positions in the same write, so each event lands exactly once (the BI worker)."""

from pipeline.sink.target import Batch, BatchTarget, PositionConflict, Rejected, is_batch_target

__all__ = ["Batch", "BatchTarget", "PositionConflict", "Rejected", "is_batch_target"]
