-- Capture profile "odoo", accounting part (Odoo 17's account module, which sale depends on):
-- customer invoices as invoice.issued, customer payments as payment.completed. Same rules as
-- odoo.sql (deferred constraint triggers run at COMMIT, SECURITY DEFINER, the key the Odoo
-- record, money the exact text of Odoo's numeric, a value the catalogue cannot hold sent as
-- stored for the relay to dead-letter naming the field).
--
-- The order of an invoice is the sale order of its lines (sale_order_line_invoice_rel, which
-- Odoo fills when it invoices order lines; the lowest order id when one invoice covers several
-- orders), else its invoice_origin (the source document's name); an invoice of no order (both
-- empty) is not the catalogue's invoice.issued and emits nothing. A payment's order is the sale
-- order of an invoice it is reconciled with (account_partial_reconcile: "Register Payment"
-- reconciles in the same transaction as it posts, a bank reconciliation later), else of its
-- online payment transaction (sale_order_transaction_rel).

-- The helpers are SECURITY INVOKER: they write the outbox only when the profile's (SECURITY
-- DEFINER) trigger functions call them, not for any role that could call them directly.

-- an out_invoice (customer invoice) posted -> invoice.issued, once per invoice: a reset to
-- draft and a second posting (a correction) is the same invoice, issued once (consumers count
-- each invoice.issued: the CRM adds it to what the customer was invoiced).
CREATE OR REPLACE FUNCTION {schema}.odoo_invoice(move int4) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    key     text := 'account.move:' || move;
    payload jsonb;
BEGIN
    IF EXISTS (SELECT 1 FROM {schema}.aggregate_versions
                WHERE aggregate_type = 'invoice' AND aggregate_id = key) THEN
        RETURN;
    END IF;
    SELECT jsonb_build_object(
               'invoice_id', m.name,
               'order_id', coalesce((
                    SELECT so.name FROM {erp}.account_move_line aml
                      JOIN {erp}.sale_order_line_invoice_rel r ON r.invoice_line_id = aml.id
                      JOIN {erp}.sale_order_line sol ON sol.id = r.order_line_id
                      JOIN {erp}.sale_order so ON so.id = sol.order_id
                     WHERE aml.move_id = m.id ORDER BY so.id LIMIT 1),
                    nullif(m.invoice_origin, '')),
               'customer', coalesce(nullif(p.ref, ''), 'res.partner:' || m.partner_id),
               'amount', m.amount_total::text,
               'tax', m.amount_tax::text,
               'currency', c.name,
               -- posted now: Odoo's invoice_date is a date without a time
               'issued_at', to_char(now() AT TIME ZONE 'UTC',
                                    'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"'),
               'due_date', to_char(coalesce(m.invoice_date_due, m.invoice_date, m.date),
                                   'YYYY-MM-DD'))
      INTO payload
      FROM {erp}.account_move m
      LEFT JOIN {erp}.res_partner p ON p.id = m.partner_id
      LEFT JOIN {erp}.res_currency c ON c.id = m.currency_id
     WHERE m.id = move AND m.state = 'posted' AND m.move_type = 'out_invoice';
    IF payload IS NULL OR payload ->> 'order_id' IS NULL THEN
        RETURN;  -- not posted at commit, not a customer invoice, or an invoice of no order
    END IF;
    PERFORM {schema}.outbox_emit('invoice', key, 'invoice.issued', payload,
                                 jsonb_build_object('erp_profile', 'odoo',
                                                    'erp_record', 'account.move,' || move));
END
$fn$;
REVOKE EXECUTE ON FUNCTION {schema}.odoo_invoice(int4) FROM PUBLIC;

-- an inbound customer payment (payment_type 'inbound', partner_type 'customer') whose journal
-- entry (account_payment.move_id: Odoo 17's payment is an account.move) is posted and which
-- settles an order -> payment.completed, once per payment. Posted without an order yet (a
-- payment on account), it is emitted when it is reconciled with an order's invoice. The
-- method: a cash journal CASH; the payment method's code 'paypal' PAYPAL, 'sdd' (SEPA direct
-- debit) DIRECT_DEBIT, 'manual' (a bank journal's) or 'sepa_ct' BANK_TRANSFER; another
-- provider's code through an online transaction CARD; any other code is sent as it is and
-- dead-lettered naming method.
CREATE OR REPLACE FUNCTION {schema}.odoo_payment(pay int4) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    key     text := 'account.payment:' || pay;
    r       record;
    ord     text;
BEGIN
    IF EXISTS (SELECT 1 FROM {schema}.aggregate_versions
                WHERE aggregate_type = 'payment' AND aggregate_id = key) THEN
        RETURN;
    END IF;
    SELECT ap.amount, ap.payment_transaction_id AS tx, m.id AS move, m.name, c.name AS currency,
           j.type AS journal_type, apm.code AS method_code
      INTO r
      FROM {erp}.account_payment ap
      JOIN {erp}.account_move m ON m.id = ap.move_id
      LEFT JOIN {erp}.res_currency c ON c.id = coalesce(ap.currency_id, m.currency_id)
      LEFT JOIN {erp}.account_journal j ON j.id = m.journal_id
      LEFT JOIN {erp}.account_payment_method_line pml ON pml.id = ap.payment_method_line_id
      LEFT JOIN {erp}.account_payment_method apm ON apm.id = pml.payment_method_id
     WHERE ap.id = pay AND m.state = 'posted' AND ap.payment_type = 'inbound'
       AND ap.partner_type = 'customer';
    IF NOT FOUND THEN
        RETURN;  -- not posted at commit, or not a customer's payment (a refund, a vendor's)
    END IF;
    SELECT so.name INTO ord
      FROM {erp}.account_move_line pl
      JOIN {erp}.account_partial_reconcile pr
        ON pr.debit_move_id = pl.id OR pr.credit_move_id = pl.id
      JOIN {erp}.account_move_line il
        ON il.id = CASE WHEN pr.debit_move_id = pl.id THEN pr.credit_move_id
                        ELSE pr.debit_move_id END
      JOIN {erp}.account_move_line ol ON ol.move_id = il.move_id
      JOIN {erp}.sale_order_line_invoice_rel rel ON rel.invoice_line_id = ol.id
      JOIN {erp}.sale_order_line sol ON sol.id = rel.order_line_id
      JOIN {erp}.sale_order so ON so.id = sol.order_id
     WHERE pl.move_id = r.move
     ORDER BY so.id LIMIT 1;
    IF ord IS NULL AND r.tx IS NOT NULL THEN
        SELECT so.name INTO ord
          FROM {erp}.sale_order_transaction_rel t
          JOIN {erp}.sale_order so ON so.id = t.sale_order_id
         WHERE t.transaction_id = r.tx ORDER BY so.id LIMIT 1;
    END IF;
    IF ord IS NULL THEN
        RETURN;  -- settles no order yet: its reconciliation with an invoice emits it
    END IF;
    PERFORM {schema}.outbox_emit('payment', key, 'payment.completed',
        jsonb_build_object(
            'payment_id', r.name,
            'order_id', ord,
            'amount', r.amount::text,
            'currency', r.currency,
            'method', CASE WHEN r.journal_type = 'cash' THEN 'CASH'
                           WHEN r.method_code = 'paypal' THEN 'PAYPAL'
                           WHEN r.method_code = 'sdd' THEN 'DIRECT_DEBIT'
                           WHEN r.method_code IN ('manual', 'sepa_ct') THEN 'BANK_TRANSFER'
                           WHEN r.tx IS NOT NULL THEN 'CARD'
                           ELSE r.method_code END,
            'completed_at', to_char(now() AT TIME ZONE 'UTC',
                                    'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"')),
        jsonb_build_object('erp_profile', 'odoo', 'erp_record', 'account.payment,' || pay));
END
$fn$;
REVOKE EXECUTE ON FUNCTION {schema}.odoo_payment(int4) FROM PUBLIC;

-- account_move: state into 'posted' -> the invoice (an out_invoice) and the payment (a move of
-- an account_payment), each checked as it is at commit.
CREATE OR REPLACE FUNCTION {schema}.odoo_account_move() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    pay int4;
BEGIN
    IF NEW.state IS DISTINCT FROM 'posted'
       OR (TG_OP = 'UPDATE' AND OLD.state IS NOT DISTINCT FROM NEW.state) THEN
        RETURN NULL;
    END IF;
    IF NEW.move_type = 'out_invoice' THEN
        PERFORM {schema}.odoo_invoice(NEW.id);
    END IF;
    FOR pay IN SELECT ap.id FROM {erp}.account_payment ap WHERE ap.move_id = NEW.id LOOP
        PERFORM {schema}.odoo_payment(pay);
    END LOOP;
    RETURN NULL;
END
$fn$;

-- account_partial_reconcile: a payment reconciled with an invoice (possibly after it was
-- posted) -> the payment, if it settles an order now and was not emitted yet.
CREATE OR REPLACE FUNCTION {schema}.odoo_account_partial_reconcile() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    pay int4;
BEGIN
    FOR pay IN SELECT DISTINCT ap.id FROM {erp}.account_move_line l
                 JOIN {erp}.account_payment ap ON ap.move_id = l.move_id
                WHERE l.id IN (NEW.debit_move_id, NEW.credit_move_id) LOOP
        PERFORM {schema}.odoo_payment(pay);
    END LOOP;
    RETURN NULL;
END
$fn$;
