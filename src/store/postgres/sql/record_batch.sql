-- A batch's charges, period rows, consumptions, audit entries and alerts in one statement.
-- `moved` moves the period rows (optimistically by compare-and-set, or carefully, already
-- locked), `summary` moves the summaries when the careful way did not; either frees the holds
-- the batch's events settle. The statement gives itself up (token_billing_give_up, undoing all
-- of it) when an account an event was placed with is no longer the stored one, or when the
-- batch lost a race: a period total moved since it was read, or an event id or a charge was
-- taken meanwhile.
-- Each row is stamped with its own event's instant. Filled in once per way.
WITH places AS (
    SELECT array_agg(nextval('token_billing_audit_seq_seq') ORDER BY p) AS seqs
      FROM generate_series(1, $42::bigint) AS p
), charge_input AS (
    SELECT * FROM unnest($1::text[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::bigint[],
                         $7::text[], $8::bigint[], $9::text[], $10::uuid[], $11::int[],
                         $12::timestamptz[], $13::timestamptz[])
         WITH ORDINALITY AS i(user_id, id, charge_key, period, kind, block, billing_tier, amount,
                              currency, consumption_id, attempts, lease_until, at, n)
), groups AS (
    SELECT * FROM unnest($14::text[], $15::text[], $16::bigint[], $17::bigint[], $35::bigint[],
                         $36::bigint[], $37::bigint[], $38::bigint[], $39::bigint[], $43::int[],
                         $44::int[], $53::timestamptz[])
         AS g(user_id, period, total_after, events, included, block, total_before, charges, amount,
              credit_after, credit_before, at)
), moved AS (
    {moved}
), created AS (
    INSERT INTO token_billing_charges
        (user_id, id, charge_key, period, kind, block, billing_tier, amount_charged, currency, status,
         round, attempts, consumption_id, lease_until, created_at, updated_at)
    SELECT i.user_id, i.id, i.charge_key, i.period, i.kind, i.block, i.billing_tier, i.amount,
           i.currency, 'pending', 0, i.attempts, i.consumption_id, i.lease_until, i.at, i.at
      FROM charge_input i JOIN moved m ON m.user_id = i.user_id AND m.period = i.period
     ORDER BY i.n
    ON CONFLICT DO NOTHING
    RETURNING {CHARGE_COLUMNS}
), {summary} emptied AS (
    DELETE FROM token_usage_summary s
     USING unnest($18::text[], $19::text[]) AS e(user_id, period)
     WHERE s.user_id = e.user_id AND s.period = e.period AND s.events = 0
), consumption AS (
    INSERT INTO token_consumption
        (user_id, id, event_id, period, tokens_used, operation_type, client_id, metadata, occurred_at,
         occurred_at_reported, created_at, total_before, created_fee, first_block, end_block,
         audit_seq, model, input_tokens, cached_input_tokens, cache_write_tokens, output_tokens,
         reasoning_tokens, billable_tokens, total_after)
    SELECT x.user_id, x.id, x.event_id, x.period, x.tokens, x.operation_type, x.client_id, x.metadata,
           x.occurred_at, x.reported, x.at, x.before,
           x.id IN (SELECT c.consumption_id FROM created c WHERE c.kind = 'fixed_fee'),
           x.first_block, x.end_block, (SELECT seqs FROM places)[x.place], x.model, x.input,
           x.cached_input, x.cache_write, x.output, x.reasoning, x.billable::numeric, x.after
      FROM unnest($20::text[], $21::uuid[], $22::text[], $23::text[], $24::bigint[], $25::text[],
                  $26::text[], $27::jsonb[], $28::timestamptz[], $29::bool[], $30::bigint[],
                  $31::bigint[], $32::bigint[], $41::bigint[], $45::text[], $46::bigint[],
                  $47::bigint[], $48::bigint[], $49::bigint[], $50::bigint[], $51::text[],
                  $52::bigint[], $54::timestamptz[])
           AS x(user_id, id, event_id, period, tokens, operation_type, client_id, metadata, occurred_at,
                reported, before, first_block, end_block, place, model, input, cached_input,
                cache_write, output, reasoning, billable, after, at)
      JOIN moved m ON m.user_id = x.user_id AND m.period = x.period
    RETURNING 1
), audited AS (
    INSERT INTO token_billing_audit (user_id, seq, at, period, event)
    SELECT c.user_id, (SELECT seqs FROM places)[a.place], a.at, c.period, a.event
      FROM unnest($33::uuid[], $34::jsonb[], $40::bigint[], $55::timestamptz[]) AS a(charge_id, event, place, at)
      JOIN created c ON c.id = a.charge_id
), alerted AS (
    INSERT INTO token_billing_alerts (user_id, period, alert_key, id, kind, total_tokens, created_at)
    SELECT * FROM unnest($56::text[], $57::text[], $58::text[], $59::uuid[], $60::jsonb[], $61::bigint[],
                         $62::timestamptz[])
    ON CONFLICT DO NOTHING
), accounts_moved AS (
    SELECT 1 FROM unnest($63::text[], $64::text[], $65::text[], $66::jsonb[], $67::text[],
                         $68::timestamptz[])
                  AS p(user_id, customer_id, plan_id, earlier_plans, subscription_id, updated_at)
     WHERE NOT EXISTS (SELECT 1 FROM token_billing_accounts a
                        WHERE a.user_id = p.user_id AND a.customer_id IS NOT DISTINCT FROM p.customer_id
                          AND a.plan_id = p.plan_id AND a.earlier_plans = p.earlier_plans
                          AND a.subscription_id IS NOT DISTINCT FROM p.subscription_id
                          AND a.updated_at = p.updated_at)
)
SELECT (SELECT count(*) FROM moved) AS moved, (SELECT count(*) FROM consumption) AS inserted,
       (SELECT count(*) FROM created) AS charged, created.*,
       CASE WHEN EXISTS (SELECT 1 FROM accounts_moved)
                 THEN token_billing_give_up('an account the batch was placed with changed')
            WHEN {lost}
                 THEN token_billing_give_up('the batch lost a race')
       END AS gave_up
  FROM (SELECT 1) AS one LEFT JOIN created ON true
