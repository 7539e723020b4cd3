"""The BI worker's targets: ``connectors.bi.postgres:PostgresTarget`` (typed tables and a raw
``events`` table, exactly once by positions stored in the same transaction) and
``connectors.bi.parquet:ParquetTarget`` (files by event type and date; needs the ``parquet``
extra, pyarrow)."""
