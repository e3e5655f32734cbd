-- One event that starts no block, in one statement ($1 user, $2 period, $3 now, $4 consumption id,
-- $5 event id, $6 tokens, $7-$11 the event's fields, $12 included tokens, $13 block size, $14
-- currency, $15 MAX_TOKENS, $16 whether the fee is the library's, $17 whether an account is
-- checked, $18-$22 the account's columns, $23 the totals where an alert starts, $24 the
-- event's billable tokens, whole (an event with a fraction of a token takes the locking way),
-- $25-$31 its model, token classes and exact billable tokens). The account check is filled in once. The hold the event
-- settles (its id is the event's) is freed with it.
WITH moved AS (
    UPDATE token_usage_summary
       SET total_tokens = total_tokens + $24, events = events + 1, updated_at = $3,
           included_tokens = coalesce(included_tokens, $12), block_size = coalesce(block_size, $13),
           holds = holds - $5
     WHERE user_id = $1 AND period = $2 AND currency = $14 AND total_tokens <= $15 - $24
       AND (NOT $17 OR EXISTS (SELECT 1 FROM token_billing_accounts a
                                WHERE a.user_id = $1 AND {account}))
    RETURNING total_tokens - $24 AS before, total_tokens AS after
), rated AS (
    SELECT before, after,
           CASE WHEN before <= $12 THEN 0 ELSE (before - $12 - 1) / $13 + 1 END AS owed_before,
           CASE WHEN after <= $12 THEN 0 ELSE (after - $12 - 1) / $13 + 1 END AS owed_after
      FROM moved
), consumption AS (
    INSERT INTO token_consumption
        (user_id, id, event_id, period, tokens_used, operation_type, client_id, metadata, occurred_at,
         occurred_at_reported, created_at, total_before, created_fee, first_block, end_block,
         audit_seq, model, input_tokens, cached_input_tokens, cache_write_tokens, output_tokens,
         reasoning_tokens, billable_tokens, total_after)
    SELECT $1, $4, $5, $2, $6, $7, $8, $9, $10, $11, $3, r.before, false, r.owed_before + 1,
           r.owed_after + 1, nextval('token_billing_audit_seq_seq'), $25, $26, $27, $28, $29, $30,
           $31::numeric, r.after
      FROM rated r
    ON CONFLICT DO NOTHING
    RETURNING 1
)
SELECT r.before, r.after,
       CASE WHEN r.owed_after > r.owed_before OR ($16 AND r.before = 0)
                 THEN token_billing_give_up('the event creates charges')
            WHEN EXISTS (SELECT 1 FROM unnest($23::bigint[]) AS p WHERE p > r.before AND p <= r.after)
                 THEN token_billing_give_up('the event crosses an alert')
            WHEN NOT EXISTS (SELECT 1 FROM consumption)
                 THEN token_billing_give_up('the event id is recorded')
       END AS gave_up
  FROM rated r
