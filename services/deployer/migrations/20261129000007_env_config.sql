-- Each environment's configuration, versioned: every change makes a new
-- version (a full snapshot). Plain values are kept as JSON; secret ones are
-- one sealed JSON object (AES-256-GCM under the configuration's
-- secrets_key, context `<environment>/<version>`), their names listed.
CREATE TABLE env_config_versions (
    environment TEXT NOT NULL,
    version     INT NOT NULL,
    plain       JSONB NOT NULL DEFAULT '{}',
    sealed      BYTEA,
    secret_keys TEXT[] NOT NULL DEFAULT '{}',
    changed_by  TEXT NOT NULL,
    -- What changed, for the history (names only for secrets).
    change      TEXT NOT NULL,
    -- Why its rollout failed (the previous image and configuration run):
    -- a failed version is not given to later deployments.
    failed      TEXT,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (environment, version)
);

-- The configuration version a deployment applies (none: the environment had none).
ALTER TABLE deployments ADD COLUMN config_version INT;
