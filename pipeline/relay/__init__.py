"""The outbox relay: publishes outbox rows to Kafka, one leader per shard
(DESIGN decisions 2 and 4)."""
