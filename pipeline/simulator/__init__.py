"""ERP activity simulator: realistic concurrent writers of outbox events."""
