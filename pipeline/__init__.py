"""ERP event pipeline: transactional outbox relay, Avro events on keyed Kafka partitions,
consumer workers with retry topics and a dead-letter topic."""

__version__ = "0.1.0"
