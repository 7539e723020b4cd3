-- Capture profile "erpnext" (pipeline outbox capture --profile erpnext): ERPNext 15's documents
-- on MariaDB as the catalogue's typed events. {schema} is the outbox database, {erp} the site's
-- database. Statements are separated by lines holding only $$ (each is sent on its own).
--
-- MariaDB has no deferred (at-commit) trigger, and Frappe writes a document's child rows AFTER
-- its parent row: "Save & Submit" of a new document inserts the parent already with docstatus
-- 1 and only then its items; a submit of a draft updates the parent, then each child. So the
-- parent's trigger emits the event with the lines as they are at that moment and remembers it
-- as *pending* in the session variable @pipeline_erpnext, tagged with the session's transaction
-- generation (erpnext_generation()). The child tables' triggers rebuild that outbox row's
-- payload (or emit it then, when the parent alone did not qualify yet: a delivery whose order
-- is named by its items) only when the pending entry is of the same generation: the row is then
-- still uncommitted, invisible to the relay. An entry of an older generation is stale and
-- dropped. The next write of the parent row (Frappe's post-submit status updates) closes the
-- window too, so lines written in a later transaction never touch a committed event.
--
-- Why a generation counter and not INNODB_TRX.trx_id: information_schema.INNODB_TRX is a cache
-- that InnoDB refreshes only when nobody read it for 100 ms (trx0i_s.cc); a trigger reading it
-- right after the previous transaction of the same connection committed saw that transaction's
-- trx_id (verified on MariaDB 10.11). The generation is the sum of the session's COMMIT,
-- ROLLBACK, BEGIN, XA, implicit-commit (DDL, LOCK TABLES ...) and SET (SET autocommit = 1
-- commits) statement counters: it changes at every transaction boundary, and is NULL outside
-- a transaction (autocommit: every
-- statement commits by itself, nothing stays pending). Why a session variable and not a side
-- table: the pending state belongs to one transaction, which runs on one connection; a table
-- would add row and gap locks between ERPNext's writers and grow by a row per document.
--
--   tabSales Order      submitted (docstatus 0 -> 1, or inserted with 1) -> order.created
--                       cancelled (1 -> 2)                                -> order.cancelled
--                       an amendment (amended_from a cancelled order) submitted -> order.created
--                       again, under the same key: the root of the amended_from chain
--   tabDelivery Note    submitted, not a return, its items against an order -> shipment.created
--   tabSales Invoice    submitted, not a return, its items of an order      -> invoice.issued
--   tabPayment Entry    submitted, Receive from a Customer, referencing an order (or an invoice
--                       of one)                                             -> payment.completed
--   tabCustomer         inserted or changed (once per transaction)          -> customer.upserted
--
-- Money is the stored decimal(21,9): with two decimals or fewer it is sent as "450.10", else as
-- stored ("0.833333333"), which the relay dead-letters naming the field; quantities are whole
-- numbers or the stored text. Nothing here refuses ERPNext's write. Frappe stores datetimes in
-- the site's time zone without one; the times sent are the database's UTC clock at the write
-- that made the event (the submit), dates (due_date) as stored.

-- The session's transaction-boundary statement counters summed. A counter that bumps without
-- a transaction boundary (a SET that is not autocommit) only closes the pending window early.
-- Install runs it once (MySQL has no information_schema.SESSION_STATUS in this form).
CREATE OR REPLACE FUNCTION {schema}.erpnext_counters() RETURNS bigint
    NOT DETERMINISTIC READS SQL DATA
    RETURN (SELECT sum(variable_value) FROM information_schema.SESSION_STATUS
             WHERE variable_name IN (
                 'COM_COMMIT', 'COM_ROLLBACK', 'COM_BEGIN', 'COM_XA_COMMIT', 'COM_XA_ROLLBACK',
                 'COM_XA_START', 'COM_LOCK_TABLES', 'COM_UNLOCK_TABLES', 'COM_CREATE_TABLE',
                 'COM_ALTER_TABLE', 'COM_DROP_TABLE', 'COM_RENAME_TABLE', 'COM_TRUNCATE',
                 'COM_CREATE_INDEX', 'COM_DROP_INDEX', 'COM_CREATE_DB', 'COM_DROP_DB',
                 'COM_ALTER_DB', 'COM_ALTER_DB_UPGRADE', 'COM_CREATE_TRIGGER',
                 'COM_DROP_TRIGGER', 'COM_CREATE_PROCEDURE', 'COM_DROP_PROCEDURE',
                 'COM_ALTER_PROCEDURE', 'COM_CREATE_FUNCTION', 'COM_DROP_FUNCTION',
                 'COM_ALTER_FUNCTION', 'COM_CREATE_VIEW', 'COM_DROP_VIEW', 'COM_CREATE_USER',
                 'COM_DROP_USER', 'COM_ALTER_USER', 'COM_RENAME_USER', 'COM_CREATE_ROLE',
                 'COM_DROP_ROLE', 'COM_GRANT', 'COM_GRANT_ROLE', 'COM_REVOKE',
                 'COM_REVOKE_ALL', 'COM_REVOKE_ROLE', 'COM_FLUSH', 'COM_ANALYZE',
                 'COM_OPTIMIZE', 'COM_REPAIR', 'COM_CHECK', 'COM_CREATE_SEQUENCE',
                 'COM_ALTER_SEQUENCE', 'COM_DROP_SEQUENCE', 'COM_CREATE_EVENT',
                 'COM_ALTER_EVENT', 'COM_DROP_EVENT', 'COM_CREATE_SERVER', 'COM_ALTER_SERVER',
                 'COM_DROP_SERVER', 'COM_ASSIGN_TO_KEYCACHE', 'COM_PRELOAD_KEYS', 'COM_RESET',
                 'COM_SLAVE_START', 'COM_SLAVE_STOP', 'COM_START_ALL_SLAVES',
                 'COM_STOP_ALL_SLAVES', 'COM_CHANGE_MASTER', 'COM_INSTALL_PLUGIN',
                 'COM_UNINSTALL_PLUGIN', 'COM_CREATE_PACKAGE', 'COM_DROP_PACKAGE',
                 'COM_CREATE_PACKAGE_BODY', 'COM_DROP_PACKAGE_BODY', 'COM_BACKUP',
                 'COM_BACKUP_LOCK',
                 -- SET autocommit = 1 commits a pending transaction (this very routine's
                 -- statements never SET a user variable: they SELECT ... INTO it)
                 'COM_SET_OPTION'))
$$
CREATE OR REPLACE FUNCTION {schema}.erpnext_generation() RETURNS bigint
    NOT DETERMINISTIC READS SQL DATA
    RETURN IF(@@in_transaction = 1, {schema}.erpnext_counters(), NULL)
$$
-- money: "450.10" when it has two decimals or fewer, else the stored digits (never rounded)
CREATE OR REPLACE FUNCTION {schema}.erpnext_money(v decimal(21,9)) RETURNS varchar(40)
    DETERMINISTIC NO SQL
    RETURN IF(v = round(v, 2), cast(cast(v AS decimal(21,2)) AS char), cast(v AS char))
$$
-- a quantity as a JSON value: a whole number as one, a fractional one as the stored text
CREATE OR REPLACE FUNCTION {schema}.erpnext_qty(v decimal(21,9)) RETURNS varchar(40)
    DETERMINISTIC NO SQL
    RETURN IF(v = truncate(v, 0), cast(cast(v AS decimal(21,0)) AS char),
              json_quote(cast(v AS char)))
$$
CREATE OR REPLACE FUNCTION {schema}.erpnext_now() RETURNS varchar(40)
    NOT DETERMINISTIC NO SQL
    RETURN date_format(utc_timestamp(6), '%Y-%m-%dT%H:%i:%s.%f+00:00')
$$
-- the first order of an amended_from chain: the business order all its versions belong to
CREATE OR REPLACE FUNCTION {schema}.erpnext_order_root(p_name varchar(140)) RETURNS varchar(140)
    NOT DETERMINISTIC READS SQL DATA SQL SECURITY DEFINER
BEGIN
    DECLARE cur varchar(140) DEFAULT p_name;
    DECLARE prev varchar(140);
    DECLARE depth int DEFAULT 0;
    WHILE depth < 100 DO
        SET prev = NULL;
        SELECT nullif(amended_from, '') INTO prev FROM {erp}.`tabSales Order` WHERE name = cur;
        IF prev IS NULL THEN
            RETURN cur;
        END IF;
        SET cur = prev, depth = depth + 1;
    END WHILE;
    RETURN cur;
END
$$
-- The payload of an event about one document as the tables are now; NULL when the document does
-- not make that event (not submitted, a return, of no order, not a customer's receipt).
CREATE OR REPLACE FUNCTION {schema}.erpnext_payload(p_event varchar(64), p_name varchar(140),
                                                   p_at varchar(40)) RETURNS longtext
    NOT DETERMINISTIC READS SQL DATA SQL SECURITY DEFINER
BEGIN
    DECLARE payload longtext DEFAULT NULL;
    DECLARE ord varchar(140) DEFAULT NULL;
    -- json_arrayagg is cut at group_concat_max_len (1M by default: invalid JSON): raised for
    -- these statements only (SET STATEMENT: the session's own value and counters untouched)
    IF p_event = 'order.created' THEN
        SET STATEMENT group_concat_max_len = 4294967295 FOR
        SELECT json_object(
                   'order_id', o.name,
                   'customer', coalesce(o.customer, ''),
                   'lines', json_extract(coalesce((
                       SELECT json_arrayagg(json_object(
                                  'line_no', l.n,
                                  'sku', coalesce(l.item_code, ''),
                                  'qty', json_extract({schema}.erpnext_qty(l.stock_qty), '$'),
                                  'unit_price', {schema}.erpnext_money(l.stock_uom_rate))
                              ORDER BY l.n)
                         FROM (SELECT row_number() OVER (ORDER BY i.idx, i.name) AS n,
                                      i.item_code, i.stock_qty, i.stock_uom_rate
                                 FROM {erp}.`tabSales Order Item` i
                                WHERE i.parent = p_name AND i.parenttype = 'Sales Order') l),
                       '[]'), '$'),
                   'currency', coalesce(o.currency, ''),
                   'total', {schema}.erpnext_money(o.grand_total),
                   'created_at', p_at,
                   'note', nullif(o.terms, ''))
          INTO payload
          FROM {erp}.`tabSales Order` o
         WHERE o.name = p_name AND o.docstatus = 1;
    ELSEIF p_event = 'order.cancelled' THEN
        SELECT json_object('order_id', o.name, 'reason', 'cancelled in ERPNext',
                           'cancelled_at', p_at)
          INTO payload
          FROM {erp}.`tabSales Order` o
         WHERE o.name = p_name AND o.docstatus = 2;
    ELSEIF p_event = 'shipment.created' THEN
        SELECT i.against_sales_order INTO ord FROM {erp}.`tabDelivery Note Item` i
         WHERE i.parent = p_name AND i.parenttype = 'Delivery Note'
           AND coalesce(i.against_sales_order, '') <> ''
         ORDER BY i.idx, i.name LIMIT 1;
        IF ord IS NOT NULL THEN
            SET STATEMENT group_concat_max_len = 4294967295 FOR
            SELECT json_object(
                       'shipment_id', d.name,
                       'order_id', ord,
                       'carrier', coalesce(nullif(d.transporter_name, ''),
                                           nullif(d.transporter, ''), ''),
                       'tracking_number', coalesce(d.lr_no, ''),
                       'lines', json_extract(coalesce((
                           SELECT json_arrayagg(json_object(
                                      'sku', g.item_code,
                                      'qty', json_extract({schema}.erpnext_qty(g.qty), '$'))
                                  ORDER BY g.first_idx)
                             FROM (SELECT i.item_code, sum(i.stock_qty) AS qty,
                                          min(i.idx) AS first_idx
                                     FROM {erp}.`tabDelivery Note Item` i
                                    WHERE i.parent = p_name AND i.parenttype = 'Delivery Note'
                                    GROUP BY i.item_code) g), '[]'), '$'),
                       'shipped_at', p_at)
              INTO payload
              FROM {erp}.`tabDelivery Note` d
             WHERE d.name = p_name AND d.docstatus = 1 AND coalesce(d.is_return, 0) = 0;
        END IF;
    ELSEIF p_event = 'invoice.issued' THEN
        SELECT i.sales_order INTO ord FROM {erp}.`tabSales Invoice Item` i
         WHERE i.parent = p_name AND i.parenttype = 'Sales Invoice'
           AND coalesce(i.sales_order, '') <> ''
         ORDER BY i.idx, i.name LIMIT 1;
        IF ord IS NOT NULL THEN
            SELECT json_object(
                       'invoice_id', s.name,
                       'order_id', ord,
                       'customer', coalesce(s.customer, ''),
                       'amount', {schema}.erpnext_money(s.grand_total),
                       'tax', {schema}.erpnext_money(s.total_taxes_and_charges),
                       'currency', coalesce(s.currency, ''),
                       'issued_at', p_at,
                       'due_date', date_format(coalesce(s.due_date, s.posting_date), '%Y-%m-%d'))
              INTO payload
              FROM {erp}.`tabSales Invoice` s
             WHERE s.name = p_name AND s.docstatus = 1 AND coalesce(s.is_return, 0) = 0;
        END IF;
    ELSEIF p_event = 'payment.completed' THEN
        -- the first reference (in the form's order) naming an order, or an invoice of one
        SELECT CASE WHEN r.reference_doctype = 'Sales Order' THEN r.reference_name
                    ELSE (SELECT si.sales_order FROM {erp}.`tabSales Invoice Item` si
                           WHERE si.parent = r.reference_name
                             AND si.parenttype = 'Sales Invoice'
                             AND coalesce(si.sales_order, '') <> ''
                           ORDER BY si.idx, si.name LIMIT 1) END AS o
          INTO ord
          FROM {erp}.`tabPayment Entry Reference` r
         WHERE r.parent = p_name AND r.parenttype = 'Payment Entry'
           AND (r.reference_doctype = 'Sales Order'
                OR (r.reference_doctype = 'Sales Invoice' AND EXISTS (
                    SELECT 1 FROM {erp}.`tabSales Invoice Item` si
                     WHERE si.parent = r.reference_name AND si.parenttype = 'Sales Invoice'
                       AND coalesce(si.sales_order, '') <> '')))
         ORDER BY r.idx, r.name LIMIT 1;
        IF ord IS NOT NULL THEN
            SELECT json_object(
                       'payment_id', p.name,
                       'order_id', ord,
                       'amount', {schema}.erpnext_money(p.paid_amount),
                       'currency', coalesce(p.paid_from_account_currency, ''),
                       -- ERPNext's Mode of Payment is a free name with a type (Cash, Bank,
                       -- General, Phone): Cash is CASH; a card, PayPal or direct debit by name;
                       -- any other bank or general mode a BANK_TRANSFER
                       'method', CASE
                           WHEN m.type = 'Cash' OR lower(p.mode_of_payment) LIKE '%cash%'
                               THEN 'CASH'
                           WHEN lower(p.mode_of_payment) LIKE '%paypal%' THEN 'PAYPAL'
                           WHEN lower(p.mode_of_payment) LIKE '%card%' THEN 'CARD'
                           WHEN lower(p.mode_of_payment) LIKE '%debit%'
                                OR lower(p.mode_of_payment) LIKE '%sepa%dd%'
                               THEN 'DIRECT_DEBIT'
                           ELSE 'BANK_TRANSFER' END,
                       'completed_at', p_at)
              INTO payload
              FROM {erp}.`tabPayment Entry` p
              LEFT JOIN {erp}.`tabMode of Payment` m ON m.name = p.mode_of_payment
             WHERE p.name = p_name AND p.docstatus = 1 AND p.payment_type = 'Receive'
               AND p.party_type = 'Customer';
        END IF;
    ELSEIF p_event = 'customer.upserted' THEN
        SELECT json_object(
                   'customer_id', c.name,
                   'name', coalesce(c.customer_name, c.name),
                   'email', nullif(c.email_id, ''),
                   'country', coalesce(upper(co.code), ''),
                   -- ERPNext's limits are per company (0: none); the strictest one
                   'credit_limit', (SELECT {schema}.erpnext_money(min(cl.credit_limit))
                                      FROM {erp}.`tabCustomer Credit Limit` cl
                                     WHERE cl.parent = c.name AND cl.parenttype = 'Customer'
                                       AND cl.credit_limit > 0),
                   'currency', coalesce(c.default_currency, ''),
                   'updated_at', p_at)
          INTO payload
          FROM {erp}.`tabCustomer` c
          LEFT JOIN {erp}.`tabAddress` a ON a.name = c.customer_primary_address
          LEFT JOIN {erp}.`tabCountry` co ON co.name = a.country
         WHERE c.name = p_name;
    END IF;
    RETURN payload;
END
$$
-- Rebuild a pending event from the tables as they are now (the caller checked it is of this
-- transaction): rewrite its uncommitted outbox row, or emit it now if the parent alone did not
-- make it yet. If the document no longer makes it (its only line of an order removed), the row
-- emitted stays as it is: withdrawing it (a DELETE, its version given back) would need proof
-- that the row is uncommitted, which no session counter gives. The session variable is only
-- ever written by SELECT ... INTO (a SET would bump Com_set_option, a counter of the
-- generation).
CREATE OR REPLACE PROCEDURE {schema}.erpnext_refresh(p_path varchar(64))
    MODIFIES SQL DATA SQL SECURITY DEFINER
body: BEGIN
    DECLARE entry longtext DEFAULT json_extract(@pipeline_erpnext, p_path);
    DECLARE et varchar(64) DEFAULT json_value(entry, '$.et');
    DECLARE ev char(36) DEFAULT json_value(entry, '$.ev');
    DECLARE payload longtext;
    DECLARE found bigint DEFAULT 0;
    IF et = 'order.cancelled' THEN
        LEAVE body;  -- nothing of it is read from the lines
    END IF;
    SET payload = {schema}.erpnext_payload(et, json_value(entry, '$.dn'),
                                           json_value(entry, '$.at'));
    IF payload IS NULL THEN
        LEAVE body;
    END IF;
    IF ev IS NOT NULL THEN
        UPDATE {schema}.outbox SET payload = payload WHERE event_id = ev;
        IF ROW_COUNT() > 0 THEN
            LEAVE body;
        END IF;
        SELECT count(*) INTO found FROM {schema}.outbox WHERE event_id = ev;
        IF found > 0 THEN
            LEAVE body;  -- the payload was that already
        END IF;
        -- the row is gone (undone by ROLLBACK TO SAVEPOINT): emit the event again, with the
        -- next version, rather than lose it
    END IF;
    SET ev = uuid();
    CALL {schema}.outbox_emit(json_value(entry, '$.ag'), json_value(entry, '$.ai'), et,
                              payload, json_extract(entry, '$.hd'), ev, NULL);
    -- outbox_emit SETs @pipeline_outbox_version (Com_set_option): the generation is re-read
    -- at once, in this same statement, so that bump of ours does not close the window
    SELECT json_set(@pipeline_erpnext, concat(p_path, '.ev'), ev,
                    '$.g', {schema}.erpnext_generation()) INTO @pipeline_erpnext;
END
$$
-- A parent row written. p_event: the event its transition makes (NULL: none); p_mode 'emit'
-- (a transition: emit now, keep it pending), 'upsert' (a customer: rebuild the pending event of
-- this transaction, else emit one), 'touch' (any other write: closes the pending window).
CREATE OR REPLACE PROCEDURE {schema}.erpnext_document(
    p_doctype varchar(140), p_name varchar(140), p_event varchar(64), p_mode varchar(8),
    p_aggregate_type varchar(64), p_aggregate_id varchar(512), p_headers longtext)
    MODIFIES SQL DATA SQL SECURITY DEFINER
body: BEGIN
    DECLARE path varchar(64) DEFAULT concat('$.d.k', md5(concat(p_doctype, x'00', p_name)));
    DECLARE gen bigint DEFAULT NULL;
    DECLARE pending longtext DEFAULT NULL;
    DECLARE payload longtext;
    DECLARE at varchar(40);
    DECLARE ev char(36) DEFAULT NULL;
    IF p_mode = 'touch' THEN
        -- no generation needed: whatever is pending for the document, its window is over
        IF json_extract(@pipeline_erpnext, path) IS NOT NULL THEN
            SELECT json_remove(@pipeline_erpnext, path) INTO @pipeline_erpnext;
        END IF;
        LEAVE body;
    END IF;
    SET gen = {schema}.erpnext_generation();
    IF @pipeline_erpnext IS NOT NULL THEN
        IF gen IS NULL OR NOT (json_value(@pipeline_erpnext, '$.g') <=> gen) THEN
            SELECT NULL INTO @pipeline_erpnext;  -- of an earlier transaction: stale, all of it
        ELSE
            SET pending = json_extract(@pipeline_erpnext, path);
        END IF;
    END IF;
    IF p_mode = 'upsert' AND pending IS NOT NULL THEN
        CALL {schema}.erpnext_refresh(path);
    ELSE
        SET at = {schema}.erpnext_now();
        SET payload = {schema}.erpnext_payload(p_event, p_name, at);
        IF payload IS NOT NULL THEN
            SET ev = uuid();
            CALL {schema}.outbox_emit(p_aggregate_type, p_aggregate_id, p_event, payload,
                                      p_headers, ev, NULL);
        END IF;
        IF gen IS NOT NULL THEN
            SET gen = {schema}.erpnext_generation();  -- outbox_emit's own SET counted (above)
            IF @pipeline_erpnext IS NULL THEN
                SELECT json_object('g', gen, 'd', json_object()) INTO @pipeline_erpnext;
            ELSE
                SELECT json_set(@pipeline_erpnext, '$.g', gen) INTO @pipeline_erpnext;
            END IF;
            SELECT json_set(@pipeline_erpnext, path, json_object(
                'dn', p_name, 'et', p_event, 'ag', p_aggregate_type, 'ai', p_aggregate_id,
                'hd', json_extract(p_headers, '$'), 'at', at, 'ev', ev)) INTO @pipeline_erpnext;
        END IF;
    END IF;
END
$$
-- A child row (a line, a reference, a credit limit) written: rebuild its parent's pending
-- event when that is of this transaction; an entry of an earlier one is dropped (all of them).
-- A credit limit changed alone (Frappe rewrites the customer's row, no column the event reads
-- changed) is the customer's change: customer.upserted, once per transaction.
CREATE OR REPLACE PROCEDURE {schema}.erpnext_child(p_doctype varchar(140), p_parent varchar(140))
    MODIFIES SQL DATA SQL SECURITY DEFINER
BEGIN
    DECLARE path varchar(64) DEFAULT concat('$.d.k', md5(concat(p_doctype, x'00', p_parent)));
    DECLARE gen bigint;
    IF @pipeline_erpnext IS NOT NULL THEN
        SET gen = {schema}.erpnext_generation();
        IF gen IS NULL OR NOT (json_value(@pipeline_erpnext, '$.g') <=> gen) THEN
            SELECT NULL INTO @pipeline_erpnext;
        END IF;
    END IF;
    IF json_extract(@pipeline_erpnext, path) IS NOT NULL THEN
        CALL {schema}.erpnext_refresh(path);
    ELSEIF p_doctype = 'Customer' THEN
        CALL {schema}.erpnext_document('Customer', p_parent, 'customer.upserted', 'upsert',
                                       'customer', concat('Customer:', p_parent),
                                       json_object('erp_profile', 'erpnext', 'erp_record',
                                                   concat('Customer,', p_parent)));
    END IF;
END
