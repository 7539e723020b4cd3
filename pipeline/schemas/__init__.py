"""Avro schema catalogue, codecs and compatibility checks."""
