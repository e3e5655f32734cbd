-- token-billing schema, version 3: the original product's record_token_consumption.
-- Applying this file twice is harmless.

-- Blocks owed for a period total: ceil(max(0, total - included) / block_size).
CREATE OR REPLACE FUNCTION token_billing_blocks_owed(total bigint, included_tokens bigint, block_size bigint)
RETURNS bigint
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    -- Integer arithmetic, exact; total - included - 1 >= 0 cannot overflow.
    SELECT CASE WHEN total <= included_tokens THEN 0
                ELSE (total - included_tokens - 1) / block_size + 1 END
$$;

-- Whether a currency code is one the library knows.
CREATE OR REPLACE FUNCTION token_billing_currency_known(currency text) RETURNS boolean
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT currency IN ('AED', 'ARS', 'AUD', 'BHD', 'BRL', 'CAD', 'CHF', 'CLP', 'CNY', 'COP', 'CZK', 'DKK', 'EUR',
                        'GBP', 'HKD', 'HUF', 'INR', 'ISK', 'JOD', 'JPY', 'KRW', 'KWD', 'MXN', 'NOK', 'NZD', 'OMR',
                        'PLN', 'SEK', 'SGD', 'TND', 'USD', 'VND', 'ZAR')
$$;

-- Minor units as the library writes an amount in major units ('100.00' BRL, '10000' JPY).
CREATE OR REPLACE FUNCTION token_billing_major_units(amount bigint, currency text) RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT round(amount::numeric / 10::numeric ^ e, e)::text
      FROM (SELECT CASE WHEN currency IN ('CLP', 'ISK', 'JPY', 'KRW', 'VND') THEN 0
                        WHEN currency IN ('BHD', 'JOD', 'KWD', 'OMR', 'TND') THEN 3
                        ELSE 2 END AS e) AS exponent
$$;

-- Records one usage event exactly as the library's record operation does, in the caller's
-- transaction: dedupe the event id, append the consumption, add the tokens to the period total,
-- and create a pending charge for the fixed fee (when the event opens the period) and for every
-- block the new total started. The library's resume_pending collects those charges.
--
-- The plan defaults to the original product's: BRL 400.00 covering 8,000,000 tokens, BRL 100.00
-- per started block of 8,000,000, months in America/Sao_Paulo. Amounts in minor units. Pass the
-- plan the library uses for the user: a period keeps the allowance, block size and currency it
-- was opened with, and a call with another plan is refused rather than charging the wrong
-- blocks. Pass p_collect_fixed_fee = false when a gateway subscription collects the fee.
-- Like the library, it refuses events more than 5 minutes in the future, and events of a period
-- that ended longer ago than p_late_usage_grace.
CREATE OR REPLACE FUNCTION record_token_consumption(
    p_user_id text,
    p_tokens_used bigint,
    p_operation_type text,
    p_client_id text DEFAULT NULL,
    p_metadata jsonb DEFAULT '{}',
    p_event_id text DEFAULT NULL,
    p_occurred_at timestamptz DEFAULT now(),
    p_included_tokens bigint DEFAULT 8000000,
    p_block_size bigint DEFAULT 8000000,
    p_fixed_fee bigint DEFAULT 40000,
    p_block_price bigint DEFAULT 10000,
    p_currency text DEFAULT 'BRL',
    p_time_zone text DEFAULT 'America/Sao_Paulo',
    p_collect_fixed_fee boolean DEFAULT true,
    p_late_usage_grace interval DEFAULT interval '72 hours'
) RETURNS TABLE (consumption_id uuid, total_tokens bigint, charges_created integer, replayed boolean)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_id uuid := gen_random_uuid();
    v_event text := coalesce(p_event_id, v_id::text);
    v_period text := to_char(p_occurred_at AT TIME ZONE p_time_zone, 'YYYY-MM');
    v_now timestamptz := date_trunc('microseconds', clock_timestamp());
    v_existing token_consumption%ROWTYPE;
    v_after bigint;
    v_included bigint;
    v_block bigint;
    v_before bigint;
    v_first bigint;
    v_end bigint;
    v_fee boolean := false;
    v_blocks integer := 0;
BEGIN
    IF p_tokens_used IS NULL OR p_tokens_used < 1 THEN
        RAISE EXCEPTION 'tokens used must be at least 1' USING ERRCODE = '22023';
    END IF;
    IF p_user_id IS NULL OR p_user_id !~ '^[!-~]{1,128}$' THEN
        RAISE EXCEPTION 'invalid user id' USING ERRCODE = '22023';
    END IF;
    IF p_operation_type IS NULL OR p_operation_type !~ '^[!-~]{1,64}$' THEN
        RAISE EXCEPTION 'invalid operation type' USING ERRCODE = '22023';
    END IF;
    IF p_client_id IS NOT NULL AND p_client_id !~ '^[!-~]{1,128}$' THEN
        RAISE EXCEPTION 'invalid client id' USING ERRCODE = '22023';
    END IF;
    IF v_event !~ '^[!-~]{1,128}$' THEN
        RAISE EXCEPTION 'invalid event id' USING ERRCODE = '22023';
    END IF;
    IF p_block_size < 1 OR p_included_tokens < 0 OR p_fixed_fee < 0 OR p_block_price < 0 THEN
        RAISE EXCEPTION 'invalid plan' USING ERRCODE = '22023';
    END IF;
    IF NOT token_billing_currency_known(p_currency) THEN
        RAISE EXCEPTION 'unknown currency %', p_currency USING ERRCODE = '22023';
    END IF;
    IF p_occurred_at > v_now + interval '5 minutes' THEN
        RAISE EXCEPTION 'occurred_at % is in the future', p_occurred_at USING ERRCODE = '22023';
    END IF;
    IF v_now >= ((date_trunc('month', p_occurred_at AT TIME ZONE p_time_zone) + interval '1 month')
                 AT TIME ZONE p_time_zone) + p_late_usage_grace THEN
        RAISE EXCEPTION 'usage for period % is no longer accepted', v_period USING ERRCODE = '22023';
    END IF;

    SELECT * INTO v_existing FROM token_consumption c WHERE c.user_id = p_user_id AND c.event_id = v_event;
    IF FOUND THEN
        IF v_existing.tokens_used <> p_tokens_used OR v_existing.operation_type <> p_operation_type
           OR v_existing.client_id IS DISTINCT FROM p_client_id
           OR v_existing.metadata <> coalesce(p_metadata, '{}') THEN
            RAISE EXCEPTION 'event id % was already used for different usage', v_event USING ERRCODE = '23505';
        END IF;
        RETURN QUERY SELECT v_existing.id, v_existing.total_before + v_existing.tokens_used, 0, true;
        RETURN;
    END IF;

    -- The row lock on the period's summary serialises this user's events in the period.
    INSERT INTO token_usage_summary AS s
        (user_id, period, currency, total_tokens, events, updated_at, included_tokens, block_size)
    VALUES (p_user_id, v_period, p_currency, p_tokens_used, 1, v_now, p_included_tokens, p_block_size)
    ON CONFLICT (user_id, period) DO UPDATE
        SET total_tokens = s.total_tokens + EXCLUDED.total_tokens, events = s.events + 1,
            updated_at = EXCLUDED.updated_at,
            included_tokens = coalesce(s.included_tokens, EXCLUDED.included_tokens),
            block_size = coalesce(s.block_size, EXCLUDED.block_size)
      WHERE s.currency = EXCLUDED.currency
    RETURNING s.total_tokens, s.included_tokens, s.block_size INTO v_after, v_included, v_block;
    IF NOT FOUND OR v_included <> p_included_tokens OR v_block <> p_block_size THEN
        RAISE EXCEPTION 'period % of % is rated by another plan', v_period, p_user_id USING ERRCODE = '22023';
    END IF;
    v_before := v_after - p_tokens_used;
    v_first := token_billing_blocks_owed(v_before, p_included_tokens, p_block_size) + 1;
    v_end := token_billing_blocks_owed(v_after, p_included_tokens, p_block_size) + 1;
    IF v_end - v_first > 10000 THEN
        RAISE EXCEPTION 'one event would start % blocks, more than 10000', v_end - v_first USING ERRCODE = '22023';
    END IF;

    IF v_before = 0 AND p_collect_fixed_fee THEN
        INSERT INTO token_billing_charges
            (user_id, id, charge_key, period, kind, block, billing_tier, amount_charged, currency, status,
             consumption_id, created_at, updated_at)
        VALUES (p_user_id, gen_random_uuid(), 'tb:' || p_user_id || ':' || v_period || ':fixed_fee:0', v_period,
                'fixed_fee', 0, calculate_billing_tier(0, p_included_tokens, p_block_size), p_fixed_fee, p_currency,
                'pending', v_id, v_now, v_now)
        ON CONFLICT DO NOTHING;
        v_fee := FOUND;
    END IF;
    INSERT INTO token_billing_charges
        (user_id, id, charge_key, period, kind, block, billing_tier, amount_charged, currency, status,
         consumption_id, created_at, updated_at)
    SELECT p_user_id, gen_random_uuid(), 'tb:' || p_user_id || ':' || v_period || ':block:' || k, v_period, 'block', k,
           token_billing_compact(p_included_tokens + (k - 1) * p_block_size::numeric) || '-'
               || token_billing_compact(p_included_tokens + k * p_block_size::numeric),
           p_block_price, p_currency, 'pending', v_id, v_now, v_now
      FROM generate_series(v_first, v_end - 1) AS k
    ON CONFLICT DO NOTHING;
    GET DIAGNOSTICS v_blocks = ROW_COUNT;

    UPDATE token_usage_summary
       SET outstanding_count = outstanding_count + v_blocks + v_fee::int,
           outstanding_total = outstanding_total + v_blocks * p_block_price + CASE WHEN v_fee THEN p_fixed_fee ELSE 0 END
     WHERE user_id = p_user_id AND period = v_period;

    INSERT INTO token_consumption
        (user_id, id, event_id, period, tokens_used, operation_type, client_id, metadata, occurred_at,
         occurred_at_reported, created_at, total_before, created_fee, first_block, end_block)
    VALUES (p_user_id, v_id, v_event, v_period, p_tokens_used, p_operation_type, p_client_id,
            coalesce(p_metadata, '{}'), date_trunc('microseconds', p_occurred_at), true, v_now, v_before, v_fee,
            v_first, v_end);

    INSERT INTO token_billing_audit (user_id, at, period, event)
    SELECT p_user_id, v_now, v_period, e
      FROM (SELECT jsonb_build_object('type', 'charge_created', 'key', c.charge_key, 'billing_tier', c.billing_tier,
                       'amount', jsonb_build_object('amount', token_billing_major_units(c.amount_charged, c.currency),
                                                    'currency', c.currency),
                       'status', 'pending') AS e, 0 AS part, c.kind, c.block
              FROM token_billing_charges c
             WHERE c.user_id = p_user_id AND c.consumption_id = v_id
            UNION ALL
            SELECT jsonb_build_object('type', 'usage_recorded', 'consumption_id', v_id, 'event_id', v_event,
                       'tokens', p_tokens_used, 'total_after', v_after), 1, '', 0) AS entries
     ORDER BY part, kind DESC, block;

    RETURN QUERY SELECT v_id, v_after, v_blocks + v_fee::int, false;
END
$$;
