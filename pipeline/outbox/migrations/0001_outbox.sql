-- The transactional outbox (DESIGN decision 1). {schema} is replaced by the configured schema.
CREATE TABLE IF NOT EXISTS {schema}.outbox (
    id                bigserial PRIMARY KEY,
    event_id          uuid        NOT NULL UNIQUE,
    aggregate_type    text        NOT NULL CHECK (aggregate_type ~ '^[A-Za-z0-9_-]+$'),
    aggregate_id      text        NOT NULL CHECK (aggregate_id <> ''),
    aggregate_version bigint      NOT NULL,
    event_type        text        NOT NULL CHECK (event_type <> ''),
    payload           jsonb       NOT NULL,
    headers           jsonb       NOT NULL DEFAULT '{}',
    occurred_at       timestamptz NOT NULL DEFAULT clock_timestamp()
);
COMMENT ON TABLE {schema}.outbox IS
    'Events waiting for the relay; a row is deleted once Kafka acknowledged it.';

-- One row per aggregate: the last version handed out. outbox_emit locks it until commit, which
-- serialises the writers of one entity and makes versions gapless among committed events.
CREATE TABLE IF NOT EXISTS {schema}.aggregate_versions (
    aggregate_type text   NOT NULL,
    aggregate_id   text   NOT NULL,
    version        bigint NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id)
);

-- Payloads over relay.max_inline_bytes, referenced from the event (claim check).
CREATE TABLE IF NOT EXISTS {schema}.claim_check (
    ref        uuid        PRIMARY KEY,
    event_id   uuid        NOT NULL,
    body       bytea       NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- What the relay leaders report, for `pipeline outbox status`.
CREATE TABLE IF NOT EXISTS {schema}.relay_state (
    shard          int         PRIMARY KEY,
    leader         text        NOT NULL,
    since          timestamptz NOT NULL,
    last_publish   timestamptz,
    published      bigint      NOT NULL DEFAULT 0,
    dead_lettered  bigint      NOT NULL DEFAULT 0,
    heartbeat      timestamptz NOT NULL DEFAULT now()
);

CREATE OR REPLACE FUNCTION {schema}.outbox_emit(
    aggregate_type text,
    aggregate_id   text,
    event_type     text,
    payload        jsonb,
    headers        jsonb DEFAULT '{}',
    event_id       uuid  DEFAULT gen_random_uuid()
) RETURNS bigint
LANGUAGE plpgsql AS $fn$
#variable_conflict use_column
DECLARE
    v bigint;
BEGIN
    IF outbox_emit.aggregate_id IS NULL OR outbox_emit.aggregate_id = '' THEN
        RAISE EXCEPTION 'outbox_emit: aggregate_id is empty (event type %)', outbox_emit.event_type
            USING ERRCODE = '22023';
    END IF;
    IF outbox_emit.payload IS NULL THEN
        RAISE EXCEPTION 'outbox_emit: payload is null (event type %, aggregate %)',
            outbox_emit.event_type, outbox_emit.aggregate_id USING ERRCODE = '22023';
    END IF;
    INSERT INTO {schema}.aggregate_versions AS av (aggregate_type, aggregate_id, version)
    VALUES (outbox_emit.aggregate_type, outbox_emit.aggregate_id, 1)
    ON CONFLICT (aggregate_type, aggregate_id) DO UPDATE SET version = av.version + 1
    RETURNING av.version INTO v;

    INSERT INTO {schema}.outbox (event_id, aggregate_type, aggregate_id, aggregate_version,
                                 event_type, payload, headers)
    VALUES (coalesce(outbox_emit.event_id, gen_random_uuid()), outbox_emit.aggregate_type,
            outbox_emit.aggregate_id, v, outbox_emit.event_type, outbox_emit.payload,
            coalesce(outbox_emit.headers, '{}'));

    -- A wake-up hint for the relay; identical notifications fold into one per transaction.
    PERFORM pg_notify('{schema}_outbox', '');
    RETURN v;
END
$fn$;

-- Capture trigger for unmodified ERP tables: TG_ARGV = (aggregate_type, key_column,
-- event_type_prefix). Emits <prefix>.created / .updated / .deleted with the row as payload.
CREATE OR REPLACE FUNCTION {schema}.capture_row() RETURNS trigger
LANGUAGE plpgsql AS $fn$
DECLARE
    new_row jsonb;
    old_row jsonb;
    k       text;
    op      text;
    tbl     text := TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME;
BEGIN
    IF TG_OP = 'DELETE' THEN
        old_row := to_jsonb(OLD);
        k := old_row ->> TG_ARGV[1];
        op := 'deleted';
    ELSIF TG_OP = 'UPDATE' THEN
        new_row := to_jsonb(NEW);
        old_row := to_jsonb(OLD);
        IF new_row = old_row THEN
            RETURN NULL;  -- an update that changed nothing is not an event
        END IF;
        k := new_row ->> TG_ARGV[1];
        op := 'updated';
    ELSE
        new_row := to_jsonb(NEW);
        k := new_row ->> TG_ARGV[1];
        op := 'created';
    END IF;
    IF k IS NULL THEN
        RAISE EXCEPTION 'capture on %: key column % is null or missing', tbl, TG_ARGV[1]
            USING ERRCODE = '22023';
    END IF;
    PERFORM {schema}.outbox_emit(
        TG_ARGV[0], k, TG_ARGV[2] || '.' || op,
        jsonb_build_object('table', tbl, 'operation', TG_OP, 'key', k,
                           'row', new_row, 'old_row', old_row),
        jsonb_build_object('erp_capture', tbl));
    RETURN NULL;
END
$fn$;
