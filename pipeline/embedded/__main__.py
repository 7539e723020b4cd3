"""``python -m pipeline.embedded fetch``: Apache Kafka's jars and Apicurio Registry into the
cache (``make kafka``); ``… kafka-available``: exit 0 when Apache Kafka can run here."""

from __future__ import annotations

import sys

from pipeline.embedded.kafka import fetch_kafka, kafka_available
from pipeline.embedded.registry import fetch_registry

if sys.argv[1:] == ["fetch"]:
    print(fetch_kafka())
    print(fetch_registry())
elif sys.argv[1:] == ["kafka-available"]:
    sys.exit(0 if kafka_available() else 1)
else:
    sys.exit("usage: python -m pipeline.embedded fetch|kafka-available")
