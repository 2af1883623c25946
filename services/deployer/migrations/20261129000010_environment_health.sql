-- The last health the watcher saw of what runs in each environment, so
-- that each change is told once (environment.unhealthy / .recovered).
CREATE TABLE environment_health (
    environment   TEXT PRIMARY KEY REFERENCES environments (name),
    healthy       BOOLEAN NOT NULL,
    deployment_id UUID NOT NULL,
    reason        TEXT,
    since         TIMESTAMPTZ NOT NULL DEFAULT now()
);
