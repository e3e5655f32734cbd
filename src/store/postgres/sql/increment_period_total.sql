-- Adds an event's billable tokens to its period's total, creating the period row, unless the
-- event was recorded before; the row stays locked until commit. $1 user, $2 period, $3 currency,
-- $4 the event's whole billable tokens, $5 now, $6 included tokens, $7 block size, $8 event id,
-- $9 the event's fraction of a token in millionths. The total is the exact sum rounded up to a
-- whole token, and billable_credit what the rounding added: the fraction is taken from the
-- credit, and starts one more token (leaving the rest as credit) when the credit is smaller
-- (BillableTotal::plus). The hold the event settles (its id is the event's) is freed with it.
WITH recorded AS (
    SELECT 1 FROM token_consumption WHERE user_id = $1 AND event_id = $8
), incremented AS (
    INSERT INTO token_usage_summary
        (user_id, period, currency, total_tokens, billable_credit, events, updated_at, included_tokens,
         block_size)
    SELECT $1, $2, $3, $4 + CASE WHEN $9 > 0 THEN 1 ELSE 0 END,
           CASE WHEN $9 > 0 THEN 1000000 - $9 ELSE 0 END, 1, $5, $6, $7
     WHERE NOT EXISTS (SELECT 1 FROM recorded)
    ON CONFLICT (user_id, period) DO UPDATE
       SET total_tokens = token_usage_summary.total_tokens + $4
                          + CASE WHEN $9 > token_usage_summary.billable_credit THEN 1 ELSE 0 END,
           billable_credit = CASE WHEN $9 > token_usage_summary.billable_credit
                                  THEN 1000000 - ($9 - token_usage_summary.billable_credit)
                                  ELSE token_usage_summary.billable_credit - $9 END,
           events = token_usage_summary.events + 1, updated_at = EXCLUDED.updated_at,
           included_tokens = coalesce(token_usage_summary.included_tokens, EXCLUDED.included_tokens),
           block_size = coalesce(token_usage_summary.block_size, EXCLUDED.block_size),
           holds = token_usage_summary.holds - $8
     WHERE token_usage_summary.currency = EXCLUDED.currency
    RETURNING total_tokens, billable_credit
)
SELECT EXISTS (SELECT 1 FROM recorded) AS replayed, (SELECT total_tokens FROM incremented) AS total,
       (SELECT billable_credit FROM incremented) AS credit
