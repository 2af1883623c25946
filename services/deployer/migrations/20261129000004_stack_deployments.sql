-- What a release deploys: the run's compose file (JSON) as tested.
ALTER TABLE stack_releases ADD COLUMN compose TEXT NOT NULL DEFAULT '{}';

-- Deployments of stack releases to stacks' environments, a leased queue
-- like `deployments`:
--   waiting -> running -> succeeded | failed | rolled_back
--   waiting -> superseded (a newer release came for the same environment)
CREATE TABLE stack_deployments (
    id               UUID PRIMARY KEY,
    environment      TEXT NOT NULL REFERENCES environments (name),
    stack            TEXT NOT NULL,
    release          BIGINT NOT NULL,
    pipeline_id      TEXT NOT NULL,
    trigger          TEXT NOT NULL,           -- auto, manual, rollback
    state            TEXT NOT NULL DEFAULT 'waiting',
    reason           TEXT,
    previous_release BIGINT,
    owner            TEXT,
    lease_until      TIMESTAMPTZ,
    attempt          INT NOT NULL DEFAULT 0,
    traceparent      TEXT,
    created_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    started_at       TIMESTAMPTZ,
    finished_at      TIMESTAMPTZ
);
CREATE UNIQUE INDEX stack_deployments_one_running ON stack_deployments (environment) WHERE state = 'running';
CREATE INDEX stack_deployments_environment ON stack_deployments (environment, created_at DESC);

-- The release that runs in each stack environment now.
CREATE TABLE stack_live (
    environment   TEXT PRIMARY KEY REFERENCES environments (name),
    deployment_id UUID NOT NULL REFERENCES stack_deployments (id),
    release       BIGINT NOT NULL,
    -- ip:port of the environment's service, for the endpoint.
    address       TEXT,
    since         TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Releases that failed (or were rolled back) in an environment: not
-- deployed there again automatically.
CREATE TABLE stack_blocked (
    environment TEXT NOT NULL,
    release     BIGINT NOT NULL,
    reason      TEXT NOT NULL,
    blocked_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (environment, release)
);
