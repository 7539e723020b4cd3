-- The WAL engine (relay.engine: wal; issue 15). The relay reads events from logical replication
-- slots (pgoutput, through the SQL decoding functions) in commit order, and advances a slot only
-- once Kafka acknowledged what it read. While the engine is 'wal', outbox_emit writes each event
-- as a transactional logical decoding message (pg_logical_emit_message(true, ...)): no outbox row
-- is inserted, and none deleted. Rows inserted before (engine 'poll') are read by the WAL relay
-- too: those of the slot's era from the WAL (publication <schema>_outbox, inserts only), older
-- ones from the table first.

-- One slot per relay shard. ``boundary``: the outbox id sequence when the slots were created; a
-- row with a larger id was inserted after, so the slot decodes it. Rows up to it are drained
-- from the table before the slot is read.
CREATE TABLE IF NOT EXISTS {schema}.wal_slots (
    slot_name  text        PRIMARY KEY,
    shard      int         NOT NULL,
    shards     int         NOT NULL,
    boundary   bigint      NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (shard, shards)
);
COMMENT ON TABLE {schema}.wal_slots IS
    'Replication slots the WAL relay reads (relay.engine: wal), one per shard';

-- 'poll': outbox_emit inserts rows (the polling relay, or the WAL relay reading inserts).
-- 'wal': outbox_emit emits WAL messages, while every slot of wal_slots exists; should one be
-- missing (dropped by hand), it inserts rows again, so an event is never written where no relay
-- reads. ``pinned``: chosen with `pipeline outbox engine poll`; a WAL relay then does not make
-- slots and switch to 'wal' by itself.
CREATE TABLE IF NOT EXISTS {schema}.outbox_engine (
    singleton  boolean     PRIMARY KEY DEFAULT true CHECK (singleton),
    engine     text        NOT NULL CHECK (engine IN ('poll', 'wal')),
    pinned     boolean     NOT NULL DEFAULT false,
    changed_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO {schema}.outbox_engine (engine) VALUES ('poll') ON CONFLICT DO NOTHING;

-- What a WAL relay has confirmed, kept with the rows it completes (not waiting for a
-- checkpoint, which is when PostgreSQL saves a slot's advanced position): after a server crash
-- the slot is moved up to ``wal_lsn`` again. ``wal_carry_*``: a transaction larger than a batch
-- that is published in parts (the slot stands before it until its end): its events up to
-- ``wal_carry_id`` are in Kafka.
ALTER TABLE {schema}.relay_state
    ADD COLUMN IF NOT EXISTS wal_slot      text,
    ADD COLUMN IF NOT EXISTS wal_lsn       pg_lsn,
    ADD COLUMN IF NOT EXISTS wal_carry_lsn pg_lsn,
    ADD COLUMN IF NOT EXISTS wal_carry_id  bigint;

CREATE OR REPLACE FUNCTION {schema}.outbox_emit(
    aggregate_type text,
    aggregate_id   text,
    event_type     text,
    payload        jsonb,
    headers        jsonb DEFAULT '{}',
    event_id       uuid  DEFAULT gen_random_uuid(),
    encoded        bytea DEFAULT NULL
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
    IF outbox_emit.encoded IS NOT NULL
       AND (length(outbox_emit.encoded) < 10 OR substring(outbox_emit.encoded FROM 1 FOR 2) <> '\xc301'::bytea) THEN
        RAISE EXCEPTION 'outbox_emit: encoded is not Avro single-object bytes (event type %, aggregate %)',
            outbox_emit.event_type, outbox_emit.aggregate_id USING ERRCODE = '22023';
    END IF;
    IF outbox_emit.aggregate_type IS NULL OR outbox_emit.aggregate_type !~ '^[A-Za-z0-9_-]+$' THEN
        RAISE EXCEPTION 'outbox_emit: aggregate_type % is not letters, digits, _ or - (event type %)',
            outbox_emit.aggregate_type, outbox_emit.event_type USING ERRCODE = '23514';
    END IF;
    IF outbox_emit.event_type IS NULL OR outbox_emit.event_type = '' THEN
        RAISE EXCEPTION 'outbox_emit: event_type is empty (aggregate %)', outbox_emit.aggregate_id
            USING ERRCODE = '23514';
    END IF;
    INSERT INTO {schema}.aggregate_versions AS av (aggregate_type, aggregate_id, version)
    VALUES (outbox_emit.aggregate_type, outbox_emit.aggregate_id, 1)
    ON CONFLICT (aggregate_type, aggregate_id) DO UPDATE SET version = av.version + 1
    RETURNING av.version INTO v;

    -- a slot counts once it can decode (confirmed_flush_lsn is set when its creation ends)
    IF (SELECT e.engine FROM {schema}.outbox_engine e) = 'wal'
       AND EXISTS (SELECT 1 FROM {schema}.wal_slots)
       AND NOT EXISTS (
           SELECT 1 FROM {schema}.wal_slots w
            WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_replication_slots s
                               WHERE s.slot_name = w.slot_name
                                 AND s.database = current_database()
                                 AND s.confirmed_flush_lsn IS NOT NULL)) THEN
        -- One line of JSON (the envelope: no decimal in it), a line of the payload's jsonb
        -- text, one of the headers' (jsonb text never holds a raw newline), then the Avro
        -- bytes as they are (none when the writer did not encode).
        PERFORM pg_logical_emit_message(true, '{schema}.outbox', convert_to(
            json_build_array(nextval('{schema}.outbox_id_seq'),
                             coalesce(outbox_emit.event_id, gen_random_uuid()),
                             outbox_emit.aggregate_type, outbox_emit.aggregate_id, v,
                             outbox_emit.event_type, clock_timestamp())::text
            || E'\n' || outbox_emit.payload::text
            || E'\n' || coalesce(outbox_emit.headers, '{}')::text || E'\n', 'UTF8')
            || coalesce(outbox_emit.encoded, '\x'::bytea));
    ELSE
        INSERT INTO {schema}.outbox (event_id, aggregate_type, aggregate_id, aggregate_version,
                                     event_type, payload, headers, encoded)
        VALUES (coalesce(outbox_emit.event_id, gen_random_uuid()), outbox_emit.aggregate_type,
                outbox_emit.aggregate_id, v, outbox_emit.event_type, outbox_emit.payload,
                coalesce(outbox_emit.headers, '{}'), outbox_emit.encoded);
    END IF;

    -- A wake-up hint for the relay; identical notifications fold into one per transaction.
    PERFORM pg_notify('{schema}_outbox', '');
    RETURN v;
END
$fn$;
