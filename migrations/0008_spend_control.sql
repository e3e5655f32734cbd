-- token-billing schema, version 8: spend control.
--
-- An account may carry its own limits (spend cap, token cap, payment gate); NULL takes its plan's.
-- A period's holds (tokens reserved for calls in flight) live in its token_usage_summary row, as
-- an object {hold id: [tokens, granted at, expires at]} with instants in microseconds since the
-- epoch: a hold is granted by one statement that locks that row, the row every record of the
-- period also locks, so grants and records always see each other's latest totals.
ALTER TABLE token_billing_accounts ADD COLUMN IF NOT EXISTS limits jsonb;
ALTER TABLE token_usage_summary ADD COLUMN IF NOT EXISTS holds jsonb NOT NULL DEFAULT '{}'::jsonb;

-- The holds of a period after a request for `tokens` under `hold_id`: the holds that have not
-- expired at `now_us`, with the new hold when the limits allow it. An open hold of the same id is
-- kept as it is (a re-sent request, or a conflict the caller tells by its tokens); a settled one
-- (`settled`) is not held again. The limits are the largest totals the spend cap and the token cap
-- allow (NULL: none), and, with `gate_closed`, the end of the block the usage is in. PL/pgSQL, so
-- that its query's plan is kept per connection.
CREATE OR REPLACE FUNCTION token_billing_hold(
    total bigint, holds jsonb, hold_id text, tokens bigint, now_us bigint, expires_us bigint,
    spend_cap_tokens bigint, token_cap bigint, gate_closed boolean, included bigint, block bigint,
    max_tokens bigint, settled boolean
) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
DECLARE
    kept jsonb := '{}'::jsonb;
    held bigint := 0;
    used bigint;
    ceiling bigint;
BEGIN
    IF holds <> '{}'::jsonb THEN
        SELECT coalesce(jsonb_object_agg(h.key, h.value), '{}'::jsonb),
               coalesce(sum((h.value->>0)::bigint), 0)::bigint
          INTO kept, held
          FROM jsonb_each(holds) AS h
         WHERE (h.value->>2)::bigint > now_us;
    END IF;
    IF settled OR kept ? hold_id THEN
        RETURN kept;
    END IF;
    used := total + held;
    ceiling := least(coalesce(spend_cap_tokens, max_tokens), coalesce(token_cap, max_tokens), max_tokens,
                     CASE WHEN NOT gate_closed THEN max_tokens
                          WHEN used <= included THEN included
                          ELSE included + ((used - included - 1) / block + 1) * block END);
    IF used::numeric + tokens <= ceiling THEN
        RETURN kept || jsonb_build_object(hold_id, jsonb_build_array(tokens, now_us, expires_us));
    END IF;
    RETURN kept;
END
$$;

-- Threshold alerts: an outbox, one row per (user, period, alert), created in the transaction that
-- records the event crossing its threshold; hosts read the rows not acknowledged and acknowledge
-- them once delivered.
CREATE TABLE IF NOT EXISTS token_billing_alerts (
    user_id text NOT NULL,
    period text NOT NULL,
    alert_key text NOT NULL,
    id uuid NOT NULL,
    kind jsonb NOT NULL,
    total_tokens bigint NOT NULL,
    created_at timestamptz NOT NULL,
    acknowledged_at timestamptz,
    PRIMARY KEY (user_id, period, alert_key)
);
CREATE INDEX IF NOT EXISTS token_billing_alerts_pending
    ON token_billing_alerts (created_at) WHERE acknowledged_at IS NULL;
ALTER TABLE token_billing_alerts ENABLE ROW LEVEL SECURITY;
DROP POLICY IF EXISTS token_billing_own_rows ON token_billing_alerts;
CREATE POLICY token_billing_own_rows ON token_billing_alerts
    USING (user_id = current_setting('token_billing.user_id', true));

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'token_billing_reader') THEN
        GRANT SELECT ON token_billing_alerts TO token_billing_reader;
    END IF;
END
$$;
