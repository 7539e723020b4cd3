-- The consumers' ledger (DESIGN decision 8): effectively-once apply for sinks in PostgreSQL.
-- A handler records the event in the same transaction as its own writes; a duplicate (after a
-- crash or a rebalance) or a stale version (older than one already applied) is then skipped.
CREATE TABLE IF NOT EXISTS {schema}.inbox (
    consumer_group text        NOT NULL,
    event_id       uuid        NOT NULL,
    aggregate_type text        NOT NULL,
    aggregate_id   text        NOT NULL,
    version        bigint      NOT NULL,
    applied_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer_group, event_id)
);

CREATE TABLE IF NOT EXISTS {schema}.inbox_versions (
    consumer_group text   NOT NULL,
    aggregate_type text   NOT NULL,
    aggregate_id   text   NOT NULL,
    version        bigint NOT NULL,
    PRIMARY KEY (consumer_group, aggregate_type, aggregate_id)
);
