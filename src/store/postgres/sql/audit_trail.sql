-- A user's audit trail, of one period or all ($2 null), in its order: the audit rows, and the
-- usage entries read from the consumptions placed in the trail (migration 7). $1 user, $2 period.
SELECT at, period, event FROM (
    SELECT seq, at, period, event FROM token_billing_audit
     WHERE user_id = $1 AND ($2::text IS NULL OR period = $2)
    UNION ALL
    SELECT audit_seq, created_at, period,
           jsonb_build_object('type', 'usage_recorded', 'consumption_id', id, 'event_id', event_id,
                              'tokens', tokens_used,
                              'total_after', coalesce(total_after, total_before + tokens_used))
      FROM token_consumption
     WHERE user_id = $1 AND ($2::text IS NULL OR period = $2) AND audit_seq IS NOT NULL
) AS trail ORDER BY seq
