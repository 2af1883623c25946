-- A build whose pipeline file's `only`/`except` rules exclude its push ends
-- `skipped` (the reason in `reason`).
ALTER TABLE builds DROP CONSTRAINT builds_state_check;
ALTER TABLE builds ADD CONSTRAINT builds_state_check
    CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'canceled', 'skipped'));
