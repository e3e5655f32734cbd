-- token-billing schema, version 6: token_consumption's primary key leads with (user_id, period),
-- which is how every read of it asks (a period's consumptions, usage by operation), so the
-- separate (user_id, period, created_at) index is dropped: recording an event writes one index
-- entry less. Rebuilding the key locks the table: on a large one, apply this in a quiet moment
-- (or build the new index CONCURRENTLY and attach it with ADD CONSTRAINT ... USING INDEX first).
-- Applying this file twice is harmless.

DO $$
BEGIN
    IF (SELECT indnatts FROM pg_index WHERE indexrelid = to_regclass('token_consumption_pkey')) = 2 THEN
        ALTER TABLE token_consumption
            DROP CONSTRAINT token_consumption_pkey,
            ADD CONSTRAINT token_consumption_pkey PRIMARY KEY (user_id, period, id);
    END IF;
END
$$;

DROP INDEX IF EXISTS token_consumption_user_period;
