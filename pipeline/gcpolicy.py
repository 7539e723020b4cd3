"""The garbage collector's policy for the pipeline's processes.

The relay, the workers and the DLQ tool allocate many short-lived containers per event
(decoded payloads, header lists, records); with CPython's default thresholds (700 allocations
between young collections) a collection runs every few events, and each full one walks every
object the process ever imported. Measured on the relay (2 cores, 30,000 events): 17 % less CPU
per event with the policy below. Reference cycles are still collected, just less often; memory
held by garbage between collections is bounded by the larger young generation (tens of MB at
most).
"""

from __future__ import annotations

import gc

# young generation: collections every 50,000 net allocations instead of 700
_THRESHOLDS = (50_000, 20, 50)


def tune_gc() -> None:
    """Move everything alive now (modules, the configuration) out of the collector's sight
    for good, and collect the young generation less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*_THRESHOLDS)
