-- Capture profile "odoo", stock part (Odoo 17/18's stock + sale_stock modules): deliveries as
-- shipment.created, reservations as inventory.reserved / inventory.released. {schema} is the
-- outbox schema, {erp} the schema of Odoo's tables. Same rules as odoo.sql: deferred constraint
-- triggers (they run at COMMIT, reading Odoo's rows as they are then), SECURITY DEFINER, the
-- key the Odoo record, a value the catalogue cannot hold sent as stored (the relay dead-letters
-- it naming the field), never failing Odoo's write unless the outbox cannot be written.
-- "{if:<table>.<column>}A{else}B{end}" is resolved at install: A when Odoo has that column (an
-- optional module's, e.g. stock_delivery's carrier), B when not.

-- A quantity in the catalogue is an int: a whole one goes as a number, a fractional one (kg,
-- hours) as its text, which the relay dead-letters with the field named.
CREATE OR REPLACE FUNCTION {schema}.odoo_qty(q numeric) RETURNS jsonb
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT CASE WHEN q IS NULL THEN 'null'::jsonb
                WHEN q = trunc(q) AND abs(q) < 2147483648 THEN to_jsonb(q::bigint)
                ELSE to_jsonb(q::text) END
$fn$;

-- stock_picking: an outgoing picking (its operation type's code 'outgoing', a delivery) whose
-- state becomes 'done' (validated: the goods left) -> shipment.created, once per picking (done
-- is final in Odoo). The lines are what was shipped: the move lines of its done moves, in the
-- product's own unit (quantity_product_uom), one line per product. The order is the picking's
-- sale_id (sale_stock), else its origin (the source document, e.g. "S00012"); a delivery of
-- no order (both empty) is not a shipment of the catalogue's and emits nothing. Carrier and
-- tracking number come from stock_delivery's carrier_id / carrier_tracking_ref when that
-- module is installed, else (and when empty) ''. The aggregate is 'stock.picking:<id>'.
CREATE OR REPLACE FUNCTION {schema}.odoo_stock_picking() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    key     text := 'stock.picking:' || NEW.id;
    payload jsonb;
    lines   jsonb;
BEGIN
    IF NEW.state IS DISTINCT FROM 'done'
       OR (TG_OP = 'UPDATE' AND OLD.state IS NOT DISTINCT FROM NEW.state) THEN
        RETURN NULL;
    END IF;
    IF EXISTS (SELECT 1 FROM {schema}.aggregate_versions
                WHERE aggregate_type = 'shipment' AND aggregate_id = key) THEN
        RETURN NULL;  -- emitted already (a second state write of the same transaction)
    END IF;
    SELECT coalesce(jsonb_agg(jsonb_build_object('sku', l.sku, 'qty', {schema}.odoo_qty(l.qty))
                              ORDER BY l.first), '[]'::jsonb)
      INTO lines
      FROM (SELECT coalesce(pp.default_code, 'product.product:' || ml.product_id) AS sku,
                   sum(ml.quantity_product_uom) AS qty, min(ml.id) AS first
              FROM {erp}.stock_move m
              JOIN {erp}.stock_move_line ml ON ml.move_id = m.id
              LEFT JOIN {erp}.product_product pp ON pp.id = ml.product_id
             WHERE m.picking_id = NEW.id AND m.state = 'done'
             GROUP BY ml.product_id, pp.default_code) l;
    SELECT jsonb_build_object(
               'shipment_id', p.name,
               'order_id', coalesce(so.name, nullif(p.origin, '')),
               'carrier', {if:stock_picking.carrier_id}coalesce((
                    SELECT CASE WHEN jsonb_typeof(to_jsonb(dc.name)) = 'object'
                                THEN to_jsonb(dc.name) ->> 'en_US'
                                ELSE to_jsonb(dc.name) #>> '{}' END
                      FROM {erp}.delivery_carrier dc WHERE dc.id = p.carrier_id), ''){else}''{end},
               'tracking_number', {if:stock_picking.carrier_tracking_ref}coalesce(p.carrier_tracking_ref, ''){else}''{end},
               'lines', lines,
               'shipped_at', to_char(coalesce(p.date_done, now() AT TIME ZONE 'UTC'),
                                     'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"'))
      INTO payload
      FROM {erp}.stock_picking p
      JOIN {erp}.stock_picking_type pt ON pt.id = p.picking_type_id
      LEFT JOIN {erp}.sale_order so ON so.id = p.sale_id
     WHERE p.id = NEW.id AND pt.code = 'outgoing';
    IF payload IS NULL OR payload ->> 'order_id' IS NULL THEN
        RETURN NULL;  -- a receipt or an internal transfer, or a delivery of no order
    END IF;
    PERFORM {schema}.outbox_emit('shipment', key, 'shipment.created', payload,
                                 jsonb_build_object('erp_profile', 'odoo',
                                                    'erp_record', 'stock.picking,' || NEW.id));
    RETURN NULL;
END
$fn$;

-- Reservations. Which table: Odoo 17 reserves by creating (or growing) a stock_move_line with a
-- quantity on a move of a picking and adding the same amount to stock_quant.reserved_quantity.
-- The quant is the per product / location / lot / package sum over every order (it changes too
-- when stock arrives, is counted, or leaves), so its changes cannot say which order reserved;
-- the move line can: it is one reservation of one product for one move, which is one sale order
-- line (stock_move.sale_line_id) of an order (else the picking's sale_id). So the reservation
-- is the move line: a move line of an outgoing picking whose move is 'assigned' or
-- 'partially_available' (Odoo's "reserved" states) with a quantity > 0 is reserved; the line
-- unlinked (Unreserve, a cancel), its quantity set to 0, its move done (shipped: the stock has
-- left) or cancelled is released. Odoo writes a move line in several statements (create, then
-- the move's state, which is stored on the line too), and changes its quantity in place (a
-- second reservation of the same quant, a quantity edited before validation): at commit the
-- trigger compares the line as it is with what was announced for it ({schema}.odoo_reservation,
-- the reservations announced and not released) and sends the difference: nothing, a
-- reservation, a release, or a release and a new reservation (a changed quantity). The key is
-- 'stock.move.line:<id>'; reservation_id is '<key>-<version>' (the version its
-- inventory.reserved event has), so a new reservation of the same line never reuses the id of
-- a released one. Multi-step deliveries (pick, pack, ship) reserve on their internal pickings
-- and are not captured here; a delivery's own move lines are.
CREATE TABLE IF NOT EXISTS {schema}.odoo_reservation (
    move_line_id int4  PRIMARY KEY,
    payload      jsonb NOT NULL  -- the inventory.reserved payload announced
);
COMMENT ON TABLE {schema}.odoo_reservation IS
    'profile odoo: the reservations (Odoo stock move lines) announced by inventory.reserved and '
    'not released yet';

CREATE OR REPLACE FUNCTION {schema}.odoo_stock_move_line() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    ml_id   int4 := CASE WHEN TG_OP = 'DELETE' THEN OLD.id ELSE NEW.id END;
    key     text := 'stock.move.line:' || ml_id;
    now_utc text := to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"');
    headers jsonb := jsonb_build_object('erp_profile', 'odoo', 'erp_record',
                                        'stock.move.line,' || ml_id);
    current jsonb;
    known   jsonb;
    v       bigint;
BEGIN
    SELECT jsonb_build_object(
               'order_id', so.name,
               'sku', coalesce(pp.default_code, 'product.product:' || ml.product_id),
               'qty', {schema}.odoo_qty(ml.quantity_product_uom),
               'warehouse', coalesce(wh.code, ''))
      INTO current
      FROM {erp}.stock_move_line ml
      JOIN {erp}.stock_move m ON m.id = ml.move_id
      JOIN {erp}.stock_picking p ON p.id = m.picking_id
      JOIN {erp}.stock_picking_type pt ON pt.id = p.picking_type_id
      LEFT JOIN {erp}.sale_order_line sol ON sol.id = m.sale_line_id
      JOIN {erp}.sale_order so ON so.id = coalesce(sol.order_id, p.sale_id)
      LEFT JOIN {erp}.stock_warehouse wh ON wh.id = pt.warehouse_id
      LEFT JOIN {erp}.product_product pp ON pp.id = ml.product_id
     WHERE ml.id = ml_id AND pt.code = 'outgoing'
       AND m.state IN ('assigned', 'partially_available') AND ml.quantity_product_uom > 0;
    SELECT r.payload INTO known FROM {schema}.odoo_reservation r WHERE r.move_line_id = ml_id;
    IF known - 'reservation_id' - 'at' IS NOT DISTINCT FROM current THEN
        RETURN NULL;  -- announced as it is (or neither reserved nor announced)
    END IF;
    IF known IS NOT NULL THEN
        v := {schema}.outbox_emit('inventory', key, 'inventory.released',
                                  jsonb_set(known, '{at}', to_jsonb(now_utc)), headers);
        DELETE FROM {schema}.odoo_reservation WHERE move_line_id = ml_id;
    ELSE
        SELECT av.version INTO v FROM {schema}.aggregate_versions av
         WHERE av.aggregate_type = 'inventory' AND av.aggregate_id = key;
    END IF;
    IF current IS NOT NULL THEN
        current := jsonb_build_object('reservation_id', key || '-' || (coalesce(v, 0) + 1))
                   || current || jsonb_build_object('at', now_utc);
        PERFORM {schema}.outbox_emit('inventory', key, 'inventory.reserved', current, headers);
        INSERT INTO {schema}.odoo_reservation (move_line_id, payload) VALUES (ml_id, current);
    END IF;
    RETURN NULL;
END
$fn$;
