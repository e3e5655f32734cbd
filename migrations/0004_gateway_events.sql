-- token-billing schema, version 4: gateway events (webhooks) applied, so that each is applied
-- once. Applying this file twice is harmless.

CREATE TABLE IF NOT EXISTS token_billing_gateway_events (
    user_id    text        NOT NULL,
    event_id   text        NOT NULL,
    event_type text        NOT NULL,
    applied_at timestamptz NOT NULL,
    PRIMARY KEY (user_id, event_id)
);

ALTER TABLE token_billing_gateway_events ENABLE ROW LEVEL SECURITY;
DROP POLICY IF EXISTS token_billing_own_rows ON token_billing_gateway_events;
CREATE POLICY token_billing_own_rows ON token_billing_gateway_events
    USING (user_id = current_setting('token_billing.user_id', true));

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'token_billing_reader') THEN
        GRANT SELECT ON token_billing_gateway_events TO token_billing_reader;
    END IF;
END
$$;
