"""The outbox write side: installation, the ``emit()`` helper and capture triggers."""

from pipeline.outbox.emit import emit

__all__ = ["emit"]
