-- token-billing schema, version 1.
--
-- The original product's three tables keep their names and column names (token_consumption,
-- token_billing_charges, token_usage_summary), so its monitoring queries run unchanged. Every
-- primary key and unique index leads with user_id: no statement needs two users' rows, and the
-- schema can be distributed by user_id.
--
-- Applying this file twice is harmless.

CREATE TABLE IF NOT EXISTS token_billing_accounts (
    user_id          text        NOT NULL,
    customer_id      text,
    plan_id          text        NOT NULL,
    earlier_plans    jsonb       NOT NULL DEFAULT '[]',
    subscription_id  text,
    created_at       timestamptz NOT NULL,
    updated_at       timestamptz NOT NULL,
    PRIMARY KEY (user_id)
);

-- One row per accepted usage event (the seed's "registra cada operação de consumo").
CREATE TABLE IF NOT EXISTS token_consumption (
    user_id              text        NOT NULL,
    id                   uuid        NOT NULL,
    event_id             text        NOT NULL,
    period               text        NOT NULL,
    tokens_used          bigint      NOT NULL CHECK (tokens_used > 0),
    operation_type       text        NOT NULL,
    client_id            text,
    metadata             jsonb       NOT NULL DEFAULT '{}',
    occurred_at          timestamptz NOT NULL,
    occurred_at_reported boolean     NOT NULL DEFAULT false,
    created_at           timestamptz NOT NULL,
    -- What answering a re-sent event needs: the total before it and the charges it created.
    total_before         bigint      NOT NULL,
    created_fee          boolean     NOT NULL,
    first_block          bigint      NOT NULL,
    end_block            bigint      NOT NULL,
    PRIMARY KEY (user_id, id),
    UNIQUE (user_id, event_id)
);
CREATE INDEX IF NOT EXISTS token_consumption_user_period ON token_consumption (user_id, period, created_at);

-- One row per charge: the fixed fee and each started block.
CREATE TABLE IF NOT EXISTS token_billing_charges (
    user_id         text        NOT NULL,
    id              uuid        NOT NULL,
    charge_key      text        NOT NULL,
    period          text        NOT NULL,
    kind            text        NOT NULL CHECK (kind IN ('fixed_fee', 'block')),
    block           bigint      NOT NULL CHECK (block >= 0),
    billing_tier    text        NOT NULL,
    amount_charged  bigint      NOT NULL CHECK (amount_charged >= 0),
    currency        text        NOT NULL,
    status          text        NOT NULL CHECK (status IN ('pending', 'succeeded', 'failed', 'requires_action')),
    round           integer     NOT NULL DEFAULT 0,
    attempts        integer     NOT NULL DEFAULT 0,
    consumption_id  uuid,
    payment_id      text,
    failure_code    text,
    failure_message text,
    next_retry_at   timestamptz,
    lease_until     timestamptz,
    created_at      timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL,
    PRIMARY KEY (user_id, id),
    UNIQUE (user_id, charge_key),
    -- Exactly-once blocks, enforced by the database.
    UNIQUE (user_id, period, kind, block)
);
CREATE INDEX IF NOT EXISTS token_billing_charges_pending
    ON token_billing_charges (created_at) WHERE status = 'pending';
CREATE INDEX IF NOT EXISTS token_billing_charges_retries
    ON token_billing_charges (next_retry_at) WHERE status = 'failed' AND next_retry_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS token_billing_charges_awaiting
    ON token_billing_charges (created_at) WHERE status = 'requires_action';
CREATE INDEX IF NOT EXISTS token_billing_charges_user_unpaid
    ON token_billing_charges (user_id) WHERE status IN ('failed', 'requires_action');

-- One row per user and month, kept up to date by every write.
CREATE TABLE IF NOT EXISTS token_usage_summary (
    user_id            text        NOT NULL,
    period             text        NOT NULL,
    currency           text        NOT NULL,
    total_tokens       bigint      NOT NULL DEFAULT 0 CHECK (total_tokens >= 0),
    events             bigint      NOT NULL DEFAULT 0,
    fixed_fee_charged  bigint      NOT NULL DEFAULT 0,
    tier_charges_count bigint      NOT NULL DEFAULT 0,
    tier_charges_total bigint      NOT NULL DEFAULT 0,
    outstanding_count  bigint      NOT NULL DEFAULT 0,
    outstanding_total  bigint      NOT NULL DEFAULT 0,
    updated_at         timestamptz NOT NULL,
    PRIMARY KEY (user_id, period)
);

-- Every consumption, charge creation, collection attempt and status change.
CREATE TABLE IF NOT EXISTS token_billing_audit (
    user_id text        NOT NULL,
    seq     bigserial   NOT NULL,
    at      timestamptz NOT NULL,
    period  text,
    event   jsonb       NOT NULL,
    PRIMARY KEY (user_id, seq)
);
