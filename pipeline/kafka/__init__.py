"""Kafka adapters: librdkafka configuration, header names, topic management."""
