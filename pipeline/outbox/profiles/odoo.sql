-- Capture profile "odoo" (pipeline outbox capture --profile odoo): Odoo 17/18's sales orders as
-- the catalogue's typed events. {schema} is the outbox schema; {erp} the schema of Odoo's tables.
--
-- A deferred constraint trigger: it runs at COMMIT of the ERP's transaction, once per changed
-- order row, when every line Odoo wrote in that transaction is there to be assembled. NEW/OLD
-- are the row as that statement left it; the order's lines are read as they are at commit.
--   state into 'sale' (Odoo's "Sales Order")         -> order.created, with its lines
--   into 'sale' again (after a reset to quotation)   -> order.status_changed ... -> CONFIRMED
--   'sale' -> 'cancel', or any cancel of an order    -> order.cancelled
--   confirmed before (reset, then cancelled again)
--   'cancel' -> 'draft' of an order confirmed before -> order.status_changed CANCELLED -> DRAFT
-- The aggregate (the Kafka key) is the record, 'sale.order:<id>' / 'res.partner:<id>': stable
-- when a name or ref changes, and never shared by two records (two companies' S00001, two
-- partners with one ref), which under Odoo's REPEATABLE READ would make one COMMIT fail on the
-- shared version counter. The payloads carry the readable name and ref.
-- Quotations (draft, sent) are not orders yet: they emit nothing. Odoo stores UTC datetimes
-- without a zone; they are sent as UTC. SECURITY DEFINER: Odoo's own database role needs no
-- right on the outbox (the functions run as the role that installed the profile).
CREATE OR REPLACE FUNCTION {schema}.odoo_sale_order() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    before  text := CASE WHEN TG_OP = 'UPDATE' THEN OLD.state END;
    after   text := NEW.state;
    payload jsonb;
    lines   jsonb;
BEGIN
    IF before IS NOT DISTINCT FROM after THEN
        RETURN NULL;
    END IF;
    IF after = 'sale' AND EXISTS (
            SELECT 1 FROM {schema}.aggregate_versions
             WHERE aggregate_type = 'order' AND aggregate_id = 'sale.order:' || NEW.id) THEN
        -- confirmed again after a reset to quotation: the order exists downstream already
        PERFORM {schema}.outbox_emit('order', 'sale.order:' || NEW.id, 'order.status_changed',
            jsonb_build_object('order_id', NEW.name,
                               'from_status', CASE WHEN before = 'cancel' THEN 'CANCELLED'
                                                   ELSE 'DRAFT' END,
                               'to_status', 'CONFIRMED',
                               'changed_at', to_char(now() AT TIME ZONE 'UTC',
                                                     'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"')),
            jsonb_build_object('erp_profile', 'odoo', 'erp_record', 'sale.order,' || NEW.id));
    ELSIF after = 'sale' THEN
        SELECT coalesce(jsonb_agg(jsonb_build_object(
                   'line_no', l.n,
                   'sku', coalesce(l.default_code, 'product.product:' || l.product_id),
                   -- the catalogue's qty is an integer: a whole quantity goes as one; a
                   -- fractional one (kg, hours) as it is, which the relay dead-letters with
                   -- the field named, never failing Odoo's write
                   'qty', CASE WHEN l.product_uom_qty = trunc(l.product_uom_qty)
                                    AND abs(l.product_uom_qty) < 9e18
                               THEN to_jsonb(l.product_uom_qty::bigint)
                               ELSE to_jsonb(l.product_uom_qty::text) END,
                   'unit_price', l.price_unit::text) ORDER BY l.n), '[]'::jsonb)
          INTO lines
          FROM (SELECT row_number() OVER (ORDER BY sl.sequence, sl.id) AS n, sl.product_id,
                       sl.product_uom_qty, sl.price_unit, pp.default_code
                  FROM {erp}.sale_order_line sl
                  LEFT JOIN {erp}.product_product pp ON pp.id = sl.product_id
                 WHERE sl.order_id = NEW.id AND sl.display_type IS NULL) l;
        -- the header as it is at commit (Odoo recomputes totals after the state change)
        SELECT jsonb_build_object(
                   'order_id', o.name,
                   'customer', coalesce(nullif(p.ref, ''), 'res.partner:' || o.partner_id),
                   'lines', lines,
                   'currency', c.name,
                   'total', o.amount_total::text,
                   'created_at', to_char(coalesce(o.date_order, now() AT TIME ZONE 'UTC'),
                                         'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"'),
                   'note', nullif(o.note::text, ''))
          INTO payload
          FROM {erp}.sale_order o
          LEFT JOIN {erp}.res_partner p ON p.id = o.partner_id
          LEFT JOIN {erp}.res_currency c ON c.id = o.currency_id
         WHERE o.id = NEW.id;
        IF payload IS NULL THEN
            RETURN NULL;  -- deleted later in the same transaction: nothing was confirmed
        END IF;
        PERFORM {schema}.outbox_emit('order', 'sale.order:' || NEW.id, 'order.created', payload,
                                     jsonb_build_object('erp_profile', 'odoo',
                                                        'erp_record', 'sale.order,' || NEW.id));
    ELSIF after = 'cancel' AND (before = 'sale' OR EXISTS (
            SELECT 1 FROM {schema}.aggregate_versions
             WHERE aggregate_type = 'order' AND aggregate_id = 'sale.order:' || NEW.id)) THEN
        PERFORM {schema}.outbox_emit('order', 'sale.order:' || NEW.id, 'order.cancelled',
            jsonb_build_object('order_id', NEW.name, 'reason', 'cancelled in Odoo',
                               'cancelled_at', to_char(now() AT TIME ZONE 'UTC',
                                                       'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"')),
            jsonb_build_object('erp_profile', 'odoo', 'erp_record', 'sale.order,' || NEW.id));
    ELSIF before = 'cancel' AND after = 'draft' AND EXISTS (
            SELECT 1 FROM {schema}.aggregate_versions
             WHERE aggregate_type = 'order' AND aggregate_id = 'sale.order:' || NEW.id) THEN
        PERFORM {schema}.outbox_emit('order', 'sale.order:' || NEW.id, 'order.status_changed',
            jsonb_build_object('order_id', NEW.name, 'from_status', 'CANCELLED',
                               'to_status', 'DRAFT',
                               'changed_at', to_char(now() AT TIME ZONE 'UTC',
                                                     'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"')),
            jsonb_build_object('erp_profile', 'odoo', 'erp_record', 'sale.order,' || NEW.id));
    END IF;
    RETURN NULL;
END
$fn$;

-- res_partner: a customer (customer_rank > 0) created or changed -> customer.upserted, once per
-- transaction and partner (Odoo's ORM writes a partner in several statements): the first
-- deferred event of the transaction marks the partner (a transaction-local setting) and emits
-- the row as it is at commit; the later ones see the mark and emit nothing.
CREATE OR REPLACE FUNCTION {schema}.odoo_res_partner() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    mark    text := 'pipeline_odoo.partner_' || NEW.id;
    p       record;
    key     text;
BEGIN
    IF coalesce(current_setting(mark, true), '') = '1' THEN
        RETURN NULL;
    END IF;
    SELECT r.id, r.name, r.email, r.ref, r.customer_rank, r.write_date, co.code AS country,
           cur.name AS currency
      INTO p
      FROM {erp}.res_partner r
      LEFT JOIN {erp}.res_country co ON co.id = r.country_id
      LEFT JOIN {erp}.res_company cmp ON cmp.id = coalesce(r.company_id,
                (SELECT min(id) FROM {erp}.res_company))
      LEFT JOIN {erp}.res_currency cur ON cur.id = cmp.currency_id
     WHERE r.id = NEW.id;
    IF NOT FOUND OR coalesce(p.customer_rank, 0) <= 0 THEN
        RETURN NULL;  -- deleted meanwhile, or not a customer (a vendor, a contact)
    END IF;
    PERFORM set_config(mark, '1', true);
    key := coalesce(nullif(p.ref, ''), 'res.partner:' || p.id);
    PERFORM {schema}.outbox_emit('customer', 'res.partner:' || p.id, 'customer.upserted',
        jsonb_build_object(
            'customer_id', key,
            'name', coalesce(p.name, ''),
            'email', nullif(p.email, ''),
            'country', coalesce(p.country, ''),
            'credit_limit', NULL,
            'currency', coalesce(p.currency, ''),
            'updated_at', to_char(coalesce(p.write_date, now() AT TIME ZONE 'UTC'),
                                  'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"')),
        jsonb_build_object('erp_profile', 'odoo', 'erp_record', 'res.partner,' || p.id));
    RETURN NULL;
END
$fn$;
