"""Apicurio Registry 3 (pipeline.embedded.registry), fetched from Maven Central and run on a
loopback port, answers confluent-kafka's SchemaRegistryClient as Confluent's registry would:
register, by id, latest version, and BACKWARD compatibility enforced with HTTP 409."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.error import SchemaRegistryError

from pipeline.embedded.registry import (
    EmbeddedRegistry,
    fetch_registry,
    java_binary,
    registry_available,
)

pytestmark = pytest.mark.integration

ORDER: dict[str, Any] = {
    "type": "record",
    "name": "OrderCancelled",
    "namespace": "erp.order",
    "fields": [
        {"name": "order_id", "type": "string"},
        {"name": "reason", "type": "string"},
    ],
}


def _with_field(field: dict[str, Any]) -> str:
    changed = json.loads(json.dumps(ORDER))
    changed["fields"].append(field)
    return json.dumps(changed)


@pytest.fixture(scope="module")
def apicurio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRegistry]:
    if java_binary() is None:
        pytest.skip("Apicurio Registry needs Java 17+ (JAVA_HOME or java on PATH)")
    if not registry_available():
        fetch_registry()
    log = Path(tmp_path_factory.mktemp("apicurio")) / "apicurio.log"
    with EmbeddedRegistry(log_path=log) as reg:
        yield reg


@pytest.fixture
def client(apicurio: EmbeddedRegistry) -> Iterator[SchemaRegistryClient]:
    with SchemaRegistryClient({"url": apicurio.url}) as c:
        yield c


@pytest.fixture
def subject() -> str:
    return f"erp.order-erp.order.OrderCancelled-{uuid.uuid4().hex[:8]}"


def test_url_is_the_confluent_api_on_loopback(apicurio: EmbeddedRegistry) -> None:
    assert apicurio.url == f"http://127.0.0.1:{apicurio.port}/apis/ccompat/v7"
    assert apicurio.startup_s is not None and apicurio.startup_s < 120


def test_register_then_get_by_id_and_latest(client: SchemaRegistryClient, subject: str) -> None:
    sid = client.register_schema(subject, Schema(json.dumps(ORDER), "AVRO"))
    got = client.get_schema(sid)
    assert json.loads(got.schema_str or "null") == ORDER
    latest = client.get_latest_version(subject)
    assert latest.schema_id == sid and latest.version == 1 and latest.subject == subject
    assert json.loads(latest.schema.schema_str or "null") == ORDER
    # the same schema again is the same id, no new version
    assert client.register_schema(subject, Schema(json.dumps(ORDER), "AVRO")) == sid
    assert client.get_latest_version(subject).version == 1


def test_backward_incompatible_version_is_refused_with_409(
    client: SchemaRegistryClient, subject: str
) -> None:
    client.register_schema(subject, Schema(json.dumps(ORDER), "AVRO"))
    required = _with_field({"name": "approved_by", "type": "string"})
    with pytest.raises(SchemaRegistryError) as err:
        client.register_schema(subject, Schema(required, "AVRO"))
    assert err.value.http_status_code == 409
    assert "approved_by" in err.value.error_message
    assert client.get_latest_version(subject).version == 1


def test_backward_compatible_version_is_accepted(
    client: SchemaRegistryClient, subject: str
) -> None:
    first = client.register_schema(subject, Schema(json.dumps(ORDER), "AVRO"))
    optional = _with_field({"name": "approved_by", "type": "string", "default": "n/a"})
    second = client.register_schema(subject, Schema(optional, "AVRO"))
    assert second != first
    latest = client.get_latest_version(subject)
    assert latest.version == 2 and latest.schema_id == second
    assert json.loads(client.get_schema(first).schema_str or "null") == ORDER


def test_global_compatibility_is_reported_backward(apicurio: EmbeddedRegistry) -> None:
    import urllib.request

    with urllib.request.urlopen(apicurio.url + "/config", timeout=10) as resp:
        assert json.load(resp)["compatibilityLevel"] == "BACKWARD"
