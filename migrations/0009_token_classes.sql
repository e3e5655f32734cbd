-- token-billing schema, version 9: token classes and rate cards.
--
-- A consumption keeps the model and the tokens by class its report gave (NULL when it gave only
-- tokens_used, which keeps its meaning: every token of the call), the exact billable tokens a
-- rate card made of them (NULL: tokens_used, one for one) and the period's total after it (NULL:
-- total_before + tokens_used, as every event before this version).
--
-- A period's total_tokens is its billable total rounded up to a whole token; billable_credit is
-- what the rounding added, in millionths of a token, so the exact total is
-- total_tokens - billable_credit / 1e6. Blocks start at whole tokens, so deciding them on the
-- rounded total decides them as the exact one would: the sum is exact, whatever the split.
ALTER TABLE token_consumption
    ADD COLUMN IF NOT EXISTS model              text,
    ADD COLUMN IF NOT EXISTS input_tokens       bigint CHECK (input_tokens >= 0),
    ADD COLUMN IF NOT EXISTS cached_input_tokens bigint CHECK (cached_input_tokens >= 0),
    ADD COLUMN IF NOT EXISTS cache_write_tokens bigint CHECK (cache_write_tokens >= 0),
    ADD COLUMN IF NOT EXISTS output_tokens      bigint CHECK (output_tokens >= 0),
    ADD COLUMN IF NOT EXISTS reasoning_tokens   bigint CHECK (reasoning_tokens >= 0),
    ADD COLUMN IF NOT EXISTS billable_tokens    numeric CHECK (billable_tokens >= 0),
    ADD COLUMN IF NOT EXISTS total_after        bigint;

ALTER TABLE token_usage_summary
    ADD COLUMN IF NOT EXISTS billable_credit integer NOT NULL DEFAULT 0
        CHECK (billable_credit >= 0 AND billable_credit < 1000000);
