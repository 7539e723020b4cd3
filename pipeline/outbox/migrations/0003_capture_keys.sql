-- Capture, second form (`pipeline outbox capture` installs it; triggers made by the first form
-- keep working): TG_ARGV = (aggregate_type, key columns (comma-separated), event_type_prefix,
-- bytea columns (comma-separated, may be empty)).
--   * the key: the column's text for one key column; for several, the JSON array of their
--     texts in the given order, e.g. ["SO-7","3"] (unambiguous whatever the values hold);
--   * bytea columns in the row images as base64 (to_jsonb would give \x-prefixed hex);
--   * a statement-level TRUNCATE is emitted as <prefix>.truncated, key "*", operation
--     TRUNCATE (the rows themselves are not listed);
--   * install refuses key columns that can be NULL, so an ERP write fails only when the outbox
--     itself cannot be written.
CREATE OR REPLACE FUNCTION {schema}.capture_row_v2() RETURNS trigger
LANGUAGE plpgsql AS $fn$
DECLARE
    new_row jsonb;
    old_row jsonb;
    img     jsonb;
    k       text;
    parts   text[] := '{}';
    keycols text[] := string_to_array(TG_ARGV[1], ',');
    bincols text[] := CASE WHEN TG_ARGV[3] = '' THEN '{}'::text[]
                           ELSE string_to_array(TG_ARGV[3], ',') END;
    c       text;
    op      text;
    tbl     text := TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME;
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        PERFORM {schema}.outbox_emit(
            TG_ARGV[0], '*', TG_ARGV[2] || '.truncated',
            jsonb_build_object('table', tbl, 'operation', 'TRUNCATE', 'key', '*',
                               'row', NULL, 'old_row', NULL),
            jsonb_build_object('erp_capture', tbl));
        RETURN NULL;
    END IF;
    IF TG_OP = 'DELETE' THEN
        old_row := to_jsonb(OLD);
        op := 'deleted';
    ELSIF TG_OP = 'UPDATE' THEN
        new_row := to_jsonb(NEW);
        old_row := to_jsonb(OLD);
        IF new_row = old_row THEN
            RETURN NULL;  -- an update that changed nothing is not an event
        END IF;
        op := 'updated';
    ELSE
        new_row := to_jsonb(NEW);
        op := 'created';
    END IF;
    img := coalesce(new_row, old_row);
    FOREACH c IN ARRAY keycols LOOP
        parts := parts || (img ->> c);
    END LOOP;
    IF array_position(parts, NULL) IS NOT NULL THEN
        RAISE EXCEPTION 'capture on %: key column(s) % hold NULL (capture was installed on NOT NULL columns; was a constraint dropped?)', tbl, TG_ARGV[1]
            USING ERRCODE = '22023';
    END IF;
    k := CASE WHEN cardinality(parts) = 1 THEN parts[1] ELSE to_jsonb(parts)::text END;
    FOREACH c IN ARRAY bincols LOOP
        IF new_row ->> c IS NOT NULL THEN
            new_row := jsonb_set(new_row, ARRAY[c], to_jsonb(translate(encode(
                decode(substr(new_row ->> c, 3), 'hex'), 'base64'), E'\n', '')));
        END IF;
        IF old_row ->> c IS NOT NULL THEN
            old_row := jsonb_set(old_row, ARRAY[c], to_jsonb(translate(encode(
                decode(substr(old_row ->> c, 3), 'hex'), 'base64'), E'\n', '')));
        END IF;
    END LOOP;
    PERFORM {schema}.outbox_emit(
        TG_ARGV[0], k, TG_ARGV[2] || '.' || op,
        jsonb_build_object('table', tbl, 'operation', TG_OP, 'key', k,
                           'row', new_row, 'old_row', old_row),
        jsonb_build_object('erp_capture', tbl));
    RETURN NULL;
END
$fn$;
