-- The target an environment deployed with (docker, rancher), as its events say.
ALTER TABLE deployments ADD COLUMN target TEXT NOT NULL DEFAULT 'docker';
