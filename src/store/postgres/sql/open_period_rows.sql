-- Creates the period rows a batch's events need that do not exist yet, in the batch's order;
-- a row another writer created meanwhile is left alone. $1 users, $2 periods, $3 currencies,
-- $4 included tokens, $5 block sizes (one per row), $6 now.
INSERT INTO token_usage_summary AS s
    (user_id, period, currency, total_tokens, events, updated_at, included_tokens,
     block_size)
SELECT g.user_id, g.period, g.currency, 0, 0, $6, g.included, g.block
  FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::bigint[])
       WITH ORDINALITY AS g(user_id, period, currency, included, block, n)
 ORDER BY g.n
ON CONFLICT (user_id, period) DO NOTHING
RETURNING s.user_id, s.period, s.total_tokens, s.billable_credit, s.currency, true AS inserted
