-- The revision an image was built from, so deployments can carry it.
ALTER TABLE images ADD COLUMN revision BYTEA;

-- One row per configured environment; locked while its queue changes, so
-- that two images published at once queue one after the other.
CREATE TABLE environments (
    name TEXT PRIMARY KEY
);

-- Every deployment, from waiting to its end.
--   waiting -> running -> succeeded | failed | rolled_back
--   waiting -> superseded (a newer image came for the same environment)
CREATE TABLE deployments (
    id              UUID PRIMARY KEY,
    environment     TEXT NOT NULL REFERENCES environments (name),
    project         TEXT NOT NULL,
    pipeline_id     TEXT NOT NULL,
    repository      TEXT NOT NULL,
    digest          TEXT NOT NULL,
    revision        BYTEA NOT NULL,          -- encoded gantry.v1.Revision
    trigger         TEXT NOT NULL,           -- auto, manual, rollback
    state           TEXT NOT NULL DEFAULT 'waiting',
    reason          TEXT,
    previous_digest TEXT,
    container_id    TEXT,
    owner           TEXT,
    lease_until     TIMESTAMPTZ,
    attempt         INT NOT NULL DEFAULT 0,
    traceparent     TEXT,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    started_at      TIMESTAMPTZ,
    finished_at     TIMESTAMPTZ
);
-- The database itself guarantees one running deployment per environment.
CREATE UNIQUE INDEX deployments_one_running ON deployments (environment) WHERE state = 'running';
CREATE INDEX deployments_waiting ON deployments (created_at) WHERE state = 'waiting';
CREATE INDEX deployments_environment ON deployments (environment, created_at DESC);

-- What runs in each environment now.
CREATE TABLE live (
    environment   TEXT PRIMARY KEY REFERENCES environments (name),
    deployment_id UUID NOT NULL REFERENCES deployments (id),
    container_id  TEXT NOT NULL,
    -- ip:port of the service in its container, for the endpoint.
    address       TEXT,
    since         TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Digests that failed (or were rolled back) in an environment: they are not
-- deployed there again automatically, only on an explicit Deploy.
CREATE TABLE blocked (
    environment TEXT NOT NULL,
    digest      TEXT NOT NULL,
    reason      TEXT NOT NULL,
    blocked_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (environment, digest)
);
