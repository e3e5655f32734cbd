-- Adds an event's tokens to its period's total, creating the period row, unless the event
-- was recorded before; the row stays locked until commit. $1 user, $2 period, $3 currency,
-- $4 tokens, $5 now, $6 included tokens, $7 block size, $8 event id. The hold the event settles
-- (its id is the event's) is freed with it.
WITH recorded AS (
    SELECT 1 FROM token_consumption WHERE user_id = $1 AND event_id = $8
), incremented AS (
    INSERT INTO token_usage_summary
        (user_id, period, currency, total_tokens, events, updated_at, included_tokens, block_size)
    SELECT $1, $2, $3, $4, 1, $5, $6, $7 WHERE NOT EXISTS (SELECT 1 FROM recorded)
    ON CONFLICT (user_id, period) DO UPDATE
       SET total_tokens = token_usage_summary.total_tokens + EXCLUDED.total_tokens,
           events = token_usage_summary.events + 1, updated_at = EXCLUDED.updated_at,
           included_tokens = coalesce(token_usage_summary.included_tokens, EXCLUDED.included_tokens),
           block_size = coalesce(token_usage_summary.block_size, EXCLUDED.block_size),
           holds = token_usage_summary.holds - $8
     WHERE token_usage_summary.currency = EXCLUDED.currency
    RETURNING total_tokens
)
SELECT EXISTS (SELECT 1 FROM recorded) AS replayed, (SELECT total_tokens FROM incremented) AS total
