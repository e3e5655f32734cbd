-- A batch's charges, period rows, consumptions and audit entries in one statement. `moved` moves
-- the period rows (optimistically by compare-and-set, or carefully, already locked), `summary`
-- moves the summaries when the careful way did not. Filled in once per way.
WITH places AS (
    SELECT array_agg(nextval('token_billing_audit_seq_seq') ORDER BY p) AS seqs
      FROM generate_series(1, $42::bigint) AS p
), charge_input AS (
    SELECT * FROM unnest($1::text[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::bigint[],
                         $7::text[], $8::bigint[], $9::text[], $10::uuid[], $11::int[],
                         $12::timestamptz[])
         WITH ORDINALITY AS i(user_id, id, charge_key, period, kind, block, billing_tier, amount,
                              currency, consumption_id, attempts, lease_until, n)
), groups AS (
    SELECT * FROM unnest($14::text[], $15::text[], $16::bigint[], $17::bigint[], $35::bigint[],
                         $36::bigint[], $37::bigint[], $38::bigint[], $39::bigint[], $43::int[],
                         $44::int[])
         AS g(user_id, period, total_after, events, included, block, total_before, charges, amount,
              credit_after, credit_before)
), moved AS (
    {moved}
), created AS (
    INSERT INTO token_billing_charges
        (user_id, id, charge_key, period, kind, block, billing_tier, amount_charged, currency, status,
         round, attempts, consumption_id, lease_until, created_at, updated_at)
    SELECT i.user_id, i.id, i.charge_key, i.period, i.kind, i.block, i.billing_tier, i.amount,
           i.currency, 'pending', 0, i.attempts, i.consumption_id, i.lease_until, $13, $13
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
           x.occurred_at, x.reported, $13, x.before,
           x.id IN (SELECT c.consumption_id FROM created c WHERE c.kind = 'fixed_fee'),
           x.first_block, x.end_block, (SELECT seqs FROM places)[x.place], x.model, x.input,
           x.cached_input, x.cache_write, x.output, x.reasoning, x.billable::numeric, x.after
      FROM unnest($20::text[], $21::uuid[], $22::text[], $23::text[], $24::bigint[], $25::text[],
                  $26::text[], $27::jsonb[], $28::timestamptz[], $29::bool[], $30::bigint[],
                  $31::bigint[], $32::bigint[], $41::bigint[], $45::text[], $46::bigint[],
                  $47::bigint[], $48::bigint[], $49::bigint[], $50::bigint[], $51::text[],
                  $52::bigint[])
           AS x(user_id, id, event_id, period, tokens, operation_type, client_id, metadata, occurred_at,
                reported, before, first_block, end_block, place, model, input, cached_input,
                cache_write, output, reasoning, billable, after)
      JOIN moved m ON m.user_id = x.user_id AND m.period = x.period
    RETURNING 1
), audited AS (
    INSERT INTO token_billing_audit (user_id, seq, at, period, event)
    SELECT c.user_id, (SELECT seqs FROM places)[a.place], $13, c.period, a.event
      FROM unnest($33::uuid[], $34::jsonb[], $40::bigint[]) AS a(charge_id, event, place)
      JOIN created c ON c.id = a.charge_id
)
SELECT (SELECT count(*) FROM moved) AS moved, (SELECT count(*) FROM consumption) AS inserted,
       (SELECT count(*) FROM created) AS charged, created.*
  FROM (SELECT 1) AS one LEFT JOIN created ON true
