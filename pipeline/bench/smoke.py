"""``pipeline bench smoke``: the short benches CI runs against regressions.

One embedded stack, then the relay (both kinds of rows), the worker's no-op throughput and the
BI sink, each a few seconds and each as a ratio to its baseline measured in the same run. A
ratio below its floor (``floors.json`` beside this module: half of the ratio measured when it
was set, with its reason) fails the smoke.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.config import Settings
from pipeline.embedded.stack import local_stack

FLOORS = Path(__file__).with_name("floors.json")


def load_floors(path: Path = FLOORS) -> dict[str, float]:
    doc = json.loads(path.read_text())
    return {name: float(f["floor"]) for name, f in doc["floors"].items()}


def check(ratios: dict[str, float], floors: dict[str, float]) -> list[str]:
    """What fell below its floor, in words (empty: every ratio is at or above its floor). A
    ratio the smoke did not measure is a failure too: a guard that silently skips guards
    nothing."""
    problems = []
    for name, floor in sorted(floors.items()):
        got = ratios.get(name)
        if got is None:
            problems.append(f"{name}: not measured (floor {floor})")
        elif got < floor:
            problems.append(
                f"{name}: {got:.4f} is below its floor {floor} (half of the ratio when the "
                f"floor was set): something made this part at least twice as slow; see "
                f"{FLOORS.name} for what the ratio compares"
            )
    return problems


def run_smoke(settings: Settings, *, events: int = 5000) -> dict[str, Any]:
    from pipeline.bench.bi import run_bi_bench
    from pipeline.bench.relay import run_relay_bench
    from pipeline.bench.worker import run_worker_bench

    with local_stack(settings) as s:
        relay = run_relay_bench(s, events=events, rate=None, seconds=0, repeat=1)
        worker = run_worker_bench(s, events=events * 4, repeat=1, noop_only=True)
        bi = run_bi_bench(s, events=events, repeat=1, batch_size=1000, parquet=False)
    ratios = {
        "relay_encoded_ratio": relay["ratio_to_baseline"],
        "relay_jsonb_ratio": relay["jsonb_ratio_to_baseline"],
        "worker_noop_ratio": worker["noop"]["ratio_to_baseline"],
        "bi_postgres_ratio": bi["postgres_vs_baseline"],
    }
    floors = load_floors()
    problems = check(ratios, floors)
    return {
        "ratios": ratios,
        "floors": floors,
        "passed": not problems,
        "problems": problems,
        "figures": {"relay": relay, "worker": worker, "bi": bi},
    }
