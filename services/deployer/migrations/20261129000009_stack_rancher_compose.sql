-- The stack's rancher-compose file (JSON) a release carries, for Rancher
-- environments; empty when the stack has none.
ALTER TABLE stack_releases ADD COLUMN rancher_compose TEXT NOT NULL DEFAULT '';
