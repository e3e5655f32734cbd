-- Grants a hold or refuses it, in one statement ($1 user, $2 period, $3 currency, $4 now, $5
-- included tokens, $6 block size, $7 hold id, $8 tokens, $9 now and $10 expiry in microseconds,
-- $11 spend cap's tokens, $12 token cap, $13 whether the payment gate applies, $14 its cut-off,
-- $15 MAX_TOKENS). The upsert locks the period row and decides on its latest version
-- (token_billing_hold), so concurrent grants and records of the period see each other.
WITH seen AS (
    SELECT EXISTS (SELECT 1 FROM token_consumption WHERE user_id = $1 AND event_id = $7) AS settled,
           $13 AND EXISTS (SELECT 1 FROM token_billing_charges
                            WHERE user_id = $1 AND status IN ('failed', 'requires_action')
                              AND created_at <= $14) AS overdue
), decided AS (
    INSERT INTO token_usage_summary AS s
        (user_id, period, currency, total_tokens, events, updated_at, included_tokens, block_size, holds)
    SELECT $1, $2, $3, 0, 0, $4, $5, $6,
           token_billing_hold(0, '{}'::jsonb, $7, $8, $9, $10, $11, $12, seen.overdue, $5, $6, $15, seen.settled)
      FROM seen
    ON CONFLICT (user_id, period) DO UPDATE
       SET holds = token_billing_hold(s.total_tokens, s.holds, $7, $8, $9, $10, $11, $12,
                                      (SELECT overdue FROM seen),
                                      coalesce(s.included_tokens, $5), coalesce(s.block_size, $6), $15,
                                      (SELECT settled FROM seen))
     WHERE s.currency = EXCLUDED.currency
    RETURNING s.total_tokens, s.holds
)
SELECT d.total_tokens, d.holds, seen.settled, seen.overdue FROM seen LEFT JOIN decided d ON true
