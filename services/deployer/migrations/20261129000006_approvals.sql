-- Deployments of environments that require approval wait in
-- `awaiting_approval` until someone approves (→ `waiting`) or rejects
-- (→ `rejected`) them; who and when is kept.
ALTER TABLE deployments ADD COLUMN decided_by TEXT;
ALTER TABLE deployments ADD COLUMN decided_at TIMESTAMPTZ;
