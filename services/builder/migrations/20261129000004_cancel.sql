-- A build can be canceled while queued or running (superseded by a newer
-- push to its branch, or by hand); `reason` says why. The ref and commit of
-- a service build are columns so that a push finds the builds it supersedes.
ALTER TABLE builds DROP CONSTRAINT builds_state_check;
ALTER TABLE builds ADD CONSTRAINT builds_state_check
    CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'canceled'));
ALTER TABLE builds ADD COLUMN git_ref TEXT;
ALTER TABLE builds ADD COLUMN commit_sha TEXT;
CREATE INDEX builds_open_ref ON builds (project, git_ref) WHERE state IN ('queued', 'running');
