-- The transactional outbox on MariaDB / MySQL (DESIGN decision 1; the PostgreSQL migrations'
-- counterpart). {schema} is a database of its own on the ERP's server; the ERP's transactions
-- write into it with CALL {schema}.outbox_emit(...). Times are UTC (utc_timestamp).
CREATE TABLE IF NOT EXISTS {schema}.outbox (
    id                bigint unsigned NOT NULL AUTO_INCREMENT PRIMARY KEY,
    event_id          char(36)     NOT NULL,
    aggregate_type    varchar(255) NOT NULL,
    aggregate_id      varchar(512) NOT NULL,
    aggregate_version bigint       NOT NULL,
    event_type        varchar(255) NOT NULL,
    payload           longtext     NOT NULL,
    headers           longtext     NOT NULL DEFAULT '{}',
    -- the Avro bytes its writer encoded (Confluent framing: C3 01 + fingerprint), or NULL
    encoded           longblob     NULL,
    occurred_at       datetime(6)  NOT NULL,
    UNIQUE KEY outbox_event_id (event_id),
    CONSTRAINT outbox_aggregate_type_ok CHECK (aggregate_type REGEXP '^[A-Za-z0-9_-]+$'),
    CONSTRAINT outbox_aggregate_id_ok CHECK (aggregate_id <> ''),
    CONSTRAINT outbox_event_type_ok CHECK (event_type <> ''),
    CONSTRAINT outbox_payload_json CHECK (json_valid(payload)),
    CONSTRAINT outbox_headers_json CHECK (json_valid(headers))
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin
  COMMENT = 'Events waiting for the relay; a row is deleted once Kafka acknowledged it.';

-- One row per aggregate: the last version handed out. outbox_emit locks it until commit, which
-- serialises the writers of one entity and makes versions gapless among committed events.
CREATE TABLE IF NOT EXISTS {schema}.aggregate_versions (
    aggregate_type varchar(255) NOT NULL,
    aggregate_id   varchar(512) NOT NULL,
    version        bigint       NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

-- Payloads over relay.max_inline_bytes, referenced from the event (claim check).
CREATE TABLE IF NOT EXISTS {schema}.claim_check (
    ref        char(36)    NOT NULL PRIMARY KEY,
    event_id   char(36)    NOT NULL,
    body       longblob    NOT NULL,
    created_at datetime(6) NOT NULL
) ENGINE = InnoDB;

-- What the relay leaders report, for `pipeline outbox status`.
CREATE TABLE IF NOT EXISTS {schema}.relay_state (
    shard          int          NOT NULL PRIMARY KEY,
    leader         varchar(255) NOT NULL,
    since          datetime(6)  NOT NULL,
    last_publish   datetime(6)  NULL,
    published      bigint       NOT NULL DEFAULT 0,
    dead_lettered  bigint       NOT NULL DEFAULT 0,
    heartbeat      datetime(6)  NOT NULL
) ENGINE = InnoDB;

-- CALL {schema}.outbox_emit(aggregate_type, aggregate_id, event_type, payload JSON text,
--                           headers JSON text or NULL, event_id or NULL, encoded or NULL)
-- in the ERP's transaction. The version handed out is left in @pipeline_outbox_version.
CREATE OR REPLACE PROCEDURE {schema}.outbox_emit(
    IN p_aggregate_type varchar(255),
    IN p_aggregate_id   varchar(512),
    IN p_event_type     varchar(255),
    IN p_payload        longtext,
    IN p_headers        longtext,
    IN p_event_id       char(36),
    IN p_encoded        longblob
)
MODIFIES SQL DATA
BEGIN
    DECLARE v bigint;
    DECLARE msg varchar(512);
    IF p_aggregate_id IS NULL OR p_aggregate_id = '' THEN
        SET msg = concat('outbox_emit: aggregate_id is empty (event type ',
                         coalesce(p_event_type, 'NULL'), ')');
        SIGNAL SQLSTATE '22023' SET MESSAGE_TEXT = msg;
    END IF;
    IF p_payload IS NULL OR NOT json_valid(p_payload) THEN
        SET msg = concat('outbox_emit: payload is null or not JSON (event type ',
                         coalesce(p_event_type, 'NULL'), ', aggregate ', p_aggregate_id, ')');
        SIGNAL SQLSTATE '22023' SET MESSAGE_TEXT = msg;
    END IF;
    IF p_encoded IS NOT NULL AND (length(p_encoded) < 10 OR left(p_encoded, 2) <> x'C301') THEN
        SET msg = concat('outbox_emit: encoded is not Avro single-object encoding (C3 01 + ',
                         '8-byte fingerprint + body) (event type ', p_event_type, ', aggregate ',
                         p_aggregate_id, ')');
        SIGNAL SQLSTATE '22023' SET MESSAGE_TEXT = msg;
    END IF;
    INSERT INTO {schema}.aggregate_versions (aggregate_type, aggregate_id, version)
    VALUES (p_aggregate_type, p_aggregate_id, 1)
    ON DUPLICATE KEY UPDATE version = version + 1;
    SELECT version INTO v FROM {schema}.aggregate_versions
     WHERE aggregate_type = p_aggregate_type AND aggregate_id = p_aggregate_id FOR UPDATE;
    INSERT INTO {schema}.outbox (event_id, aggregate_type, aggregate_id, aggregate_version,
                                 event_type, payload, headers, encoded, occurred_at)
    VALUES (coalesce(p_event_id, uuid()), p_aggregate_type, p_aggregate_id, v, p_event_type,
            p_payload, coalesce(p_headers, '{}'), p_encoded, utc_timestamp(6));
    SET @pipeline_outbox_version = v;
END;
