-- Events encoded by the writer (issue 14): pipeline.outbox.emit() validates a payload by encoding
-- it with the event type's Avro schema; it now keeps those bytes (Avro single-object encoding:
-- C3 01, the writer schema's 8-byte fingerprint, the body) so the relay moves bytes instead of
-- parsing JSON and encoding again. The jsonb payload stays the event's readable form (outbox
-- status, the outbox DLQ, SQL queries). A relay that does not know the fingerprint (its schema
-- catalogue is older than the writer's) encodes the jsonb as before. Rows written by SQL
-- (capture triggers, lsFusion, hand-written calls) have no bytes and are encoded by the relay.
ALTER TABLE {schema}.outbox ADD COLUMN IF NOT EXISTS encoded bytea;
COMMENT ON COLUMN {schema}.outbox.encoded IS
    'The payload as Avro single-object bytes, when the writer encoded it (pipeline.outbox.emit)';

-- One outbox_emit, with the bytes as a seventh, optional argument (two overloads would make a
-- six-argument call ambiguous).
DROP FUNCTION IF EXISTS {schema}.outbox_emit(text, text, text, jsonb, jsonb, uuid);
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
    INSERT INTO {schema}.aggregate_versions AS av (aggregate_type, aggregate_id, version)
    VALUES (outbox_emit.aggregate_type, outbox_emit.aggregate_id, 1)
    ON CONFLICT (aggregate_type, aggregate_id) DO UPDATE SET version = av.version + 1
    RETURNING av.version INTO v;

    INSERT INTO {schema}.outbox (event_id, aggregate_type, aggregate_id, aggregate_version,
                                 event_type, payload, headers, encoded)
    VALUES (coalesce(outbox_emit.event_id, gen_random_uuid()), outbox_emit.aggregate_type,
            outbox_emit.aggregate_id, v, outbox_emit.event_type, outbox_emit.payload,
            coalesce(outbox_emit.headers, '{}'), outbox_emit.encoded);

    -- A wake-up hint for the relay; identical notifications fold into one per transaction.
    PERFORM pg_notify('{schema}_outbox', '');
    RETURN v;
END
$fn$;
