-- token-billing schema, version 2: the original product's SQL functions, and row-level security.
-- Applying this file twice is harmless.

-- The plan that rates each period, as the library recorded it when the period opened, so that
-- SQL can label tiers as the library does.
ALTER TABLE token_usage_summary ADD COLUMN IF NOT EXISTS included_tokens bigint;
ALTER TABLE token_usage_summary ADD COLUMN IF NOT EXISTS block_size bigint;

-- A token count in compact units, exactly: 8M, 1.5M, 750K, 999.999K, 500.
CREATE OR REPLACE FUNCTION token_billing_compact(tokens numeric) RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT CASE
        WHEN tokens >= 1000000 THEN
            div(tokens, 1000000)::text
            || CASE WHEN mod(tokens, 1000000) = 0 THEN ''
                    ELSE '.' || rtrim(lpad(mod(tokens, 1000000)::text, 6, '0'), '0') END
            || 'M'
        WHEN tokens >= 1000 THEN
            div(tokens, 1000)::text
            || CASE WHEN mod(tokens, 1000) = 0 THEN ''
                    ELSE '.' || rtrim(lpad(mod(tokens, 1000)::text, 3, '0'), '0') END
            || 'K'
        ELSE tokens::text
    END
$$;

-- The stable label of the tier a period total is in: 0-8M (covered by the fixed fee), 8M-16M,
-- 16M-24M, ... The seed's one-argument call uses the seed's plan (8M included, blocks of 8M).
CREATE OR REPLACE FUNCTION calculate_billing_tier(
    tokens_used bigint,
    included_tokens bigint DEFAULT 8000000,
    block_size bigint DEFAULT 8000000
) RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    WITH tier AS (
        -- Integer arithmetic: a division rounded to numeric precision could lose a block.
        SELECT CASE WHEN tokens_used <= included_tokens THEN 0::numeric
                    ELSE div(tokens_used::numeric - included_tokens - 1, block_size) + 1 END AS k
    )
    SELECT CASE WHEN k = 0 THEN '0-' || token_billing_compact(included_tokens)
                ELSE token_billing_compact(included_tokens + (k - 1) * block_size::numeric)
                     || '-' || token_billing_compact(included_tokens + k * block_size::numeric) END
      FROM tier
$$;

-- The seed's usage summary of a user for a period ('YYYY-MM'; the current month in São Paulo
-- when omitted). Amounts in minor units; charges counted once collected.
CREATE OR REPLACE FUNCTION get_user_token_summary(
    p_user_id text,
    p_period text DEFAULT to_char(now() AT TIME ZONE 'America/Sao_Paulo', 'YYYY-MM')
) RETURNS TABLE (
    total_tokens bigint,
    current_tier text,
    fixed_fee_charged bigint,
    tier_charges_count bigint,
    tier_charges_total bigint,
    total_charged bigint
)
LANGUAGE sql STABLE AS $$
    SELECT coalesce(s.total_tokens, 0),
           calculate_billing_tier(coalesce(s.total_tokens, 0),
                                  coalesce(s.included_tokens, 8000000), coalesce(s.block_size, 8000000)),
           coalesce(s.fixed_fee_charged, 0),
           coalesce(s.tier_charges_count, 0),
           coalesce(s.tier_charges_total, 0),
           coalesce(s.fixed_fee_charged, 0) + coalesce(s.tier_charges_total, 0)
      FROM (SELECT 1) AS one
      LEFT JOIN token_usage_summary s ON s.user_id = p_user_id AND s.period = p_period
$$;

-- Row-level security: a restricted role sees only the rows of the user named in the session
-- setting token_billing.user_id. The library's own role owns the tables and is not restricted.
-- The setting is chosen by whoever holds the session: this guards user-facing reads made by the
-- host's own code against its mistakes, not against a client that can run arbitrary SQL. Set it
-- with set_config(..., true) inside a transaction so a pooled connection does not keep it.
ALTER TABLE token_consumption ENABLE ROW LEVEL SECURITY;
ALTER TABLE token_billing_charges ENABLE ROW LEVEL SECURITY;
ALTER TABLE token_usage_summary ENABLE ROW LEVEL SECURITY;
ALTER TABLE token_billing_accounts ENABLE ROW LEVEL SECURITY;
ALTER TABLE token_billing_audit ENABLE ROW LEVEL SECURITY;

DROP POLICY IF EXISTS token_billing_own_rows ON token_consumption;
CREATE POLICY token_billing_own_rows ON token_consumption
    USING (user_id = current_setting('token_billing.user_id', true));
DROP POLICY IF EXISTS token_billing_own_rows ON token_billing_charges;
CREATE POLICY token_billing_own_rows ON token_billing_charges
    USING (user_id = current_setting('token_billing.user_id', true));
DROP POLICY IF EXISTS token_billing_own_rows ON token_usage_summary;
CREATE POLICY token_billing_own_rows ON token_usage_summary
    USING (user_id = current_setting('token_billing.user_id', true));
DROP POLICY IF EXISTS token_billing_own_rows ON token_billing_accounts;
CREATE POLICY token_billing_own_rows ON token_billing_accounts
    USING (user_id = current_setting('token_billing.user_id', true));
DROP POLICY IF EXISTS token_billing_own_rows ON token_billing_audit;
CREATE POLICY token_billing_own_rows ON token_billing_audit
    USING (user_id = current_setting('token_billing.user_id', true));

-- The restricted role for user-facing reads, created when the migrating role may create roles.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'token_billing_reader') THEN
        CREATE ROLE token_billing_reader NOLOGIN;
    END IF;
EXCEPTION
    WHEN insufficient_privilege THEN
        RAISE NOTICE 'token_billing_reader not created: create it and grant SELECT on the tables yourself';
    WHEN duplicate_object OR unique_violation THEN
        NULL; -- created at the same moment by another database of the cluster
END
$$;

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'token_billing_reader') THEN
        EXECUTE format('GRANT USAGE ON SCHEMA %I TO token_billing_reader', current_schema());
        GRANT SELECT ON token_consumption, token_billing_charges, token_usage_summary, token_billing_accounts,
            token_billing_audit TO token_billing_reader;
        GRANT EXECUTE ON FUNCTION calculate_billing_tier(bigint, bigint, bigint),
            get_user_token_summary(text, text), token_billing_compact(numeric) TO token_billing_reader;
    END IF;
END
$$;
