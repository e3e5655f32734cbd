-- token-billing schema, version 5: a function that aborts the statement calling it.
--
-- The store records an event that creates no charge in a single statement that moves the
-- period's total, then, if the event turns out to start a block or to have been recorded
-- before, calls this function to undo the statement and take its other way. SQLSTATE TB001.
-- Applying this file twice is harmless.

CREATE OR REPLACE FUNCTION token_billing_give_up(reason text) RETURNS boolean
    LANGUAGE plpgsql VOLATILE
AS $$
BEGIN
    RAISE EXCEPTION 'token-billing: statement given up: %', reason USING ERRCODE = 'TB001';
END
$$;
