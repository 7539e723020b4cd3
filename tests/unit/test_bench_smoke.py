"""The bench smoke's verdict: a ratio under its floor, or one not measured, fails it."""

from __future__ import annotations

from pipeline.bench.smoke import check, load_floors


def test_every_floor_has_a_reason_and_is_half_of_the_ratio_it_was_set_from() -> None:
    import json

    from pipeline.bench.smoke import FLOORS

    doc = json.loads(FLOORS.read_text())
    for name, f in doc["floors"].items():
        assert f["why"], name
        assert abs(f["floor"] - f["today"] / 2) < 1e-3, name
    assert set(load_floors()) == {"relay_encoded_ratio", "relay_jsonb_ratio",
                                  "worker_noop_ratio", "bi_postgres_ratio"}


def test_a_ratio_below_its_floor_fails_naming_it() -> None:
    problems = check({"a": 0.05, "b": 0.5}, {"a": 0.1, "b": 0.2})
    assert len(problems) == 1
    assert problems[0].startswith("a: 0.0500 is below its floor 0.1")


def test_a_ratio_not_measured_fails() -> None:
    assert check({}, {"a": 0.1}) == ["a: not measured (floor 0.1)"]


def test_ratios_at_or_above_their_floors_pass() -> None:
    assert check({"a": 0.1, "b": 0.3}, {"a": 0.1, "b": 0.2}) == []
