-- An event's charges, summary, consumption and audit entries, written behind a gate: the `locked`
-- fragment locks the period row (or passes, when the caller's transaction holds it), `totals` moves the
-- total under the compare-and-set, `summary_gate` says when the summary moves. Filled in once
-- per gate.
WITH locked AS (
    {locked}
), input AS (
    SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::bigint[], $5::text[], $6::bigint[],
                         $7::jsonb[]) WITH ORDINALITY AS i(id, charge_key, kind, block, billing_tier,
                                                            amount, audit, n)
), created AS (
    INSERT INTO token_billing_charges
        (user_id, id, charge_key, period, kind, block, billing_tier, amount_charged, currency, status,
         round, attempts, consumption_id, lease_until, created_at, updated_at)
    SELECT $8, id, charge_key, $9, kind, block, billing_tier, amount, $10, 'pending', 0, $11, $12, $13,
           $14, $14
      FROM input WHERE EXISTS (SELECT 1 FROM locked) ORDER BY n
    ON CONFLICT DO NOTHING
    RETURNING {CHARGE_COLUMNS}
), summary AS (
    UPDATE token_usage_summary
       SET {totals}
           outstanding_count = outstanding_count + (SELECT count(*) FROM created),
           outstanding_total = outstanding_total + (SELECT coalesce(sum(amount_charged), 0) FROM created)
     WHERE user_id = $8 AND period = $9 AND {summary_gate}
), consumption AS (
    INSERT INTO token_consumption
        (user_id, id, event_id, period, tokens_used, operation_type, client_id, metadata, occurred_at,
         occurred_at_reported, created_at, total_before, created_fee, first_block, end_block,
         audit_seq, model, input_tokens, cached_input_tokens, cache_write_tokens, output_tokens,
         reasoning_tokens, billable_tokens, total_after)
    SELECT $8, $12, $15, $9, $16, $17, $18, $19, $20, $21, $14, $22,
           EXISTS (SELECT 1 FROM created WHERE kind = 'fixed_fee'), $23, $24,
           nextval('token_billing_audit_seq_seq'), $25, $26, $27, $28, $29, $30, $31::numeric, $32
     WHERE EXISTS (SELECT 1 FROM locked)
), audited AS (
    INSERT INTO token_billing_audit (user_id, at, period, event)
    SELECT $8, $14, $9, a.event
      FROM input i JOIN created c ON c.id = i.id,
           LATERAL jsonb_array_elements(i.audit) WITH ORDINALITY AS a(event, k)
     ORDER BY i.n, a.k
)
SELECT EXISTS (SELECT 1 FROM locked) AS won, created.*
  FROM (SELECT 1) AS one LEFT JOIN created ON true
