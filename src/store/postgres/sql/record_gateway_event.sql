-- Records a gateway event's id with its audit entry, or nothing when the id is recorded
-- already; answers how many were recorded. $1 user, $2 event id, $3 event type, $4 applied at,
-- $5 period, $6 the audit entry.
WITH recorded AS (
    INSERT INTO token_billing_gateway_events (user_id, event_id, event_type, applied_at)
    VALUES ($1, $2, $3, $4)
    ON CONFLICT (user_id, event_id) DO NOTHING
    RETURNING user_id
), audited AS (
    INSERT INTO token_billing_audit (user_id, at, period, event)
    SELECT user_id, $4, $5, $6 FROM recorded
)
SELECT count(*) FROM recorded
