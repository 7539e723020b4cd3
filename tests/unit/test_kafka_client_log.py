"""librdkafka's log lines through the project's logger (pipeline/kafka/client.py ClientLog):
structured, once per kind of line, then one reminder per interval with the repeat count and
what to check; never raw to stderr."""

from __future__ import annotations

import logging

import pytest

from pipeline.kafka.client import CLIENT_LOG, ClientLog, common_config
from tests.conftest import make_settings


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _refused(port: int, after_ms: int) -> str:
    return (f"127.0.0.1:{port}/bootstrap: Connect to ipv4#127.0.0.1:{port} failed: Connection "
            f"refused (after {after_ms}ms in state CONNECT)")


def test_a_repeating_line_is_written_once_then_reminded_with_its_count(
        caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    cl = ClientLog(every_s=60, clock=clock)
    caplog.set_level(logging.INFO, logger="pipeline.kafka.librdkafka")
    for i in range(120):  # two a second for a minute, as an idle client retries
        clock.t = i * 0.5
        cl.log(logging.ERROR, "%s [%s] %s", "FAIL", "rdkafka#producer-1", _refused(9092, i))
    clock.t = 61.0
    cl.log(logging.ERROR, "%s [%s] %s", "FAIL", "rdkafka#producer-1", _refused(9092, 3))
    lines = [r for r in caplog.records if r.name == "pipeline.kafka.librdkafka"]
    assert len(lines) == 2
    first, again = lines[0].getMessage(), lines[1].getMessage()
    assert "Connection refused" in first and "kafka.bootstrap_servers" in first
    assert "still" in again and "119 more time(s)" in again  # 120 lines: 1 written, 119 held
    assert lines[0].levelno == logging.ERROR
    assert lines[0].kafka_facility == "FAIL"  # type: ignore[attr-defined]


def test_different_kinds_of_lines_are_each_written(caplog: pytest.LogCaptureFixture) -> None:
    cl = ClientLog(every_s=60, clock=Clock())
    caplog.set_level(logging.INFO, logger="pipeline.kafka.librdkafka")
    cl.log(logging.ERROR, "%s [%s] %s", "FAIL", "c", _refused(9092, 0))
    cl.log(logging.ERROR, "%s [%s] %s", "FAIL", "c", "SASL authentication error: bad password")
    cl.log(logging.WARNING, "%s [%s] %s", "REQTMOUT", "c", "Timed out 1 in-flight requests")
    assert len([r for r in caplog.records if r.name == "pipeline.kafka.librdkafka"]) == 3
    assert "kafka.security_protocol" in caplog.records[1].getMessage()


def test_every_client_gets_the_logger(tmp_path: object) -> None:
    conf = common_config(make_settings(None, "127.0.0.1:1", "t"))  # type: ignore[arg-type]
    assert conf["logger"] is CLIENT_LOG
