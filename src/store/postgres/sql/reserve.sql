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
    -- A period's first row: nothing recorded or held, so the hold fits when the tokens are
    -- within every limit (with the gate closed, the allowance). The same rule as
    -- token_billing_hold's, written out so that the common case (the row exists) does not
    -- compute it.
    SELECT $1, $2, $3, 0, 0, $4, $5, $6,
           CASE WHEN NOT seen.settled
                     AND $8 <= least(coalesce($11, $15), coalesce($12, $15), $15,
                                     CASE WHEN seen.overdue THEN $5 ELSE $15 END)
                THEN jsonb_build_object($7::text, jsonb_build_array($8::bigint, $9::bigint, $10::bigint))
                ELSE '{}'::jsonb END
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
