-- token-billing schema for SQLite, version 1: the PostgreSQL store's tables and columns, so that
-- the original product's monitoring queries run on either.
--
-- SQLite has no timestamptz, numeric, uuid or jsonb: instants are UTC text of fixed width
-- ('2026-11-15 15:00:00.000000', SQLite's own format, which sorts as time does and which its date
-- functions read), exact billable tokens are decimal text ('1040.25'), ids are hyphenated UUID
-- text, and JSON is text. Money is integer minor units. Each table is STRICT, so a value of the
-- wrong type is refused rather than stored.

CREATE TABLE IF NOT EXISTS token_billing_accounts (
    user_id         TEXT NOT NULL PRIMARY KEY,
    customer_id     TEXT,
    plan_id         TEXT NOT NULL,
    earlier_plans   TEXT NOT NULL DEFAULT '[]',
    subscription_id TEXT,
    limits          TEXT,
    created_at      TEXT NOT NULL,
    updated_at      TEXT NOT NULL
) STRICT;

-- One row per usage event, in recording order (rowid). `total_before` and `total_after` are the
-- period's billable total around the event; `created_fee`, `first_block` and `end_block` name the
-- charges it created, so that a re-send is answered with the original outcome.
CREATE TABLE IF NOT EXISTS token_consumption (
    user_id              TEXT    NOT NULL,
    id                   TEXT    NOT NULL UNIQUE,
    event_id             TEXT    NOT NULL,
    period               TEXT    NOT NULL,
    tokens_used          INTEGER NOT NULL CHECK (tokens_used > 0),
    operation_type       TEXT    NOT NULL,
    client_id            TEXT,
    metadata             TEXT    NOT NULL DEFAULT '{}',
    occurred_at          TEXT    NOT NULL,
    occurred_at_reported INTEGER NOT NULL DEFAULT 0,
    created_at           TEXT    NOT NULL,
    total_before         INTEGER NOT NULL,
    total_after          INTEGER NOT NULL,
    created_fee          INTEGER NOT NULL,
    first_block          INTEGER NOT NULL,
    end_block            INTEGER NOT NULL,
    model                TEXT,
    input_tokens         INTEGER,
    cached_input_tokens  INTEGER,
    cache_write_tokens   INTEGER,
    output_tokens        INTEGER,
    reasoning_tokens     INTEGER,
    billable_tokens      TEXT,
    UNIQUE (user_id, event_id)
) STRICT;
CREATE INDEX IF NOT EXISTS token_consumption_user_period ON token_consumption (user_id, period);

CREATE TABLE IF NOT EXISTS token_billing_charges (
    user_id         TEXT    NOT NULL,
    id              TEXT    NOT NULL UNIQUE,
    charge_key      TEXT    NOT NULL,
    period          TEXT    NOT NULL,
    kind            TEXT    NOT NULL CHECK (kind IN ('fixed_fee', 'block')),
    block           INTEGER NOT NULL CHECK (block >= 0),
    billing_tier    TEXT    NOT NULL,
    amount_charged  INTEGER NOT NULL CHECK (amount_charged >= 0),
    currency        TEXT    NOT NULL,
    status          TEXT    NOT NULL CHECK (status IN ('pending', 'succeeded', 'failed', 'requires_action')),
    round           INTEGER NOT NULL DEFAULT 0,
    attempts        INTEGER NOT NULL DEFAULT 0,
    consumption_id  TEXT,
    payment_id      TEXT,
    failure_code    TEXT,
    failure_message TEXT,
    next_retry_at   TEXT,
    lease_until     TEXT,
    created_at      TEXT    NOT NULL,
    updated_at      TEXT    NOT NULL,
    UNIQUE (user_id, charge_key)
) STRICT;
CREATE INDEX IF NOT EXISTS token_billing_charges_user_period ON token_billing_charges (user_id, period);
CREATE INDEX IF NOT EXISTS token_billing_charges_open ON token_billing_charges (status, created_at)
    WHERE status <> 'succeeded';
CREATE INDEX IF NOT EXISTS token_billing_charges_retries ON token_billing_charges (next_retry_at)
    WHERE status = 'failed';

-- A user's running figures for a period, kept up to date by every write: a summary is one row.
-- `included_tokens` and `block_size` are the period's rating, as the PostgreSQL store keeps them.
CREATE TABLE IF NOT EXISTS token_usage_summary (
    user_id            TEXT    NOT NULL,
    period             TEXT    NOT NULL,
    currency           TEXT    NOT NULL,
    total_tokens       INTEGER NOT NULL DEFAULT 0 CHECK (total_tokens >= 0),
    billable_credit    INTEGER NOT NULL DEFAULT 0 CHECK (billable_credit >= 0 AND billable_credit < 1000000),
    events             INTEGER NOT NULL DEFAULT 0,
    fixed_fee_charged  INTEGER NOT NULL DEFAULT 0,
    tier_charges_count INTEGER NOT NULL DEFAULT 0,
    tier_charges_total INTEGER NOT NULL DEFAULT 0,
    outstanding_count  INTEGER NOT NULL DEFAULT 0,
    outstanding_total  INTEGER NOT NULL DEFAULT 0,
    included_tokens    INTEGER,
    block_size         INTEGER,
    updated_at         TEXT    NOT NULL,
    PRIMARY KEY (user_id, period)
) STRICT, WITHOUT ROWID;

-- The audit trail, in the order written.
CREATE TABLE IF NOT EXISTS token_billing_audit (
    seq     INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id TEXT NOT NULL,
    at      TEXT NOT NULL,
    period  TEXT,
    event   TEXT NOT NULL
) STRICT;
CREATE INDEX IF NOT EXISTS token_billing_audit_user ON token_billing_audit (user_id, seq);

-- Every consumption is in the audit trail, however it was written: SQLite writes its entry in
-- the statement that inserts the row.
CREATE TRIGGER IF NOT EXISTS token_consumption_audit AFTER INSERT ON token_consumption
BEGIN
    INSERT INTO token_billing_audit (user_id, at, period, event)
    VALUES (NEW.user_id, NEW.created_at, NEW.period,
            json_object('type', 'usage_recorded', 'consumption_id', NEW.id, 'event_id', NEW.event_id,
                        'tokens', NEW.tokens_used, 'total_after', NEW.total_after));
END;

CREATE TABLE IF NOT EXISTS token_billing_gateway_events (
    user_id    TEXT NOT NULL,
    event_id   TEXT NOT NULL,
    event_type TEXT NOT NULL,
    applied_at TEXT NOT NULL,
    PRIMARY KEY (user_id, event_id)
) STRICT, WITHOUT ROWID;

-- Holds for calls in flight, in the order granted (rowid): granted in the same write
-- transaction that every record of the user takes, so that grants and records always see each
-- other.
CREATE TABLE IF NOT EXISTS token_billing_holds (
    user_id    TEXT    NOT NULL,
    period     TEXT    NOT NULL,
    hold_id    TEXT    NOT NULL,
    tokens     INTEGER NOT NULL CHECK (tokens >= 0),
    created_at TEXT    NOT NULL,
    expires_at TEXT    NOT NULL,
    PRIMARY KEY (user_id, period, hold_id)
) STRICT;

-- Threshold alerts: an outbox, one row per (user, period, alert), created in the transaction that
-- records the event crossing its threshold.
CREATE TABLE IF NOT EXISTS token_billing_alerts (
    user_id         TEXT    NOT NULL,
    period          TEXT    NOT NULL,
    alert_key       TEXT    NOT NULL,
    id              TEXT    NOT NULL UNIQUE,
    kind            TEXT    NOT NULL,
    total_tokens    INTEGER NOT NULL,
    created_at      TEXT    NOT NULL,
    acknowledged_at TEXT,
    PRIMARY KEY (user_id, period, alert_key)
) STRICT;
CREATE INDEX IF NOT EXISTS token_billing_alerts_pending ON token_billing_alerts (created_at)
    WHERE acknowledged_at IS NULL;
