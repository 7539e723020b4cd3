"""The DLQ tool behind ``pipeline dlq``: read a group's dead letters, explain them, correct
them, and replay them to the group that failed them, once, in key order."""
