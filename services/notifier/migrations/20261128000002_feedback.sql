-- One row per pipeline: the projection users see (state, stage, what failed,
-- what was published) and that commit statuses follow.
CREATE TABLE pipelines (
    pipeline_id   TEXT PRIMARY KEY,
    project       TEXT NOT NULL,
    git_ref       TEXT NOT NULL DEFAULT '',
    branch        TEXT NOT NULL DEFAULT '',
    tag           TEXT NOT NULL DEFAULT '',
    commit_sha    TEXT NOT NULL DEFAULT '',
    author        TEXT NOT NULL DEFAULT '',
    forge_project TEXT NOT NULL DEFAULT '',
    state         TEXT NOT NULL DEFAULT 'pending',  -- pending, running, success, failed
    rank          INT NOT NULL DEFAULT -1,          -- states only move forward
    stage         TEXT NOT NULL DEFAULT 'requested',-- requested, build, publish, deploy
    failure       TEXT NOT NULL DEFAULT '',
    failed_step   TEXT NOT NULL DEFAULT '',
    build_id      TEXT NOT NULL DEFAULT '',
    digest        TEXT NOT NULL DEFAULT '',
    created_at    TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    updated_at    TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX pipelines_recent ON pipelines (created_at DESC);
CREATE INDEX pipelines_updated ON pipelines (updated_at);

-- Deployments of a pipeline's image, per environment.
CREATE TABLE pipeline_deployments (
    pipeline_id TEXT NOT NULL,
    environment TEXT NOT NULL,
    -- The latest deployment (ids are time-ordered); its state only moves forward.
    deployment_id TEXT NOT NULL,
    state       TEXT NOT NULL,   -- running, succeeded, failed, rolled_back
    digest      TEXT NOT NULL,
    reason      TEXT NOT NULL DEFAULT '',
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (pipeline_id, environment)
);

-- Noise control: the last state announced per project and ref, and the last
-- version announced per environment. Chat hears only about changes.
CREATE TABLE ref_state (
    project     TEXT NOT NULL,
    git_ref     TEXT NOT NULL,
    state       TEXT NOT NULL,   -- green, red
    pipeline_id TEXT NOT NULL,
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (project, git_ref)
);
CREATE TABLE environment_state (
    environment TEXT PRIMARY KEY,
    digest      TEXT NOT NULL,
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Outgoing HTTP calls (commit statuses, chat messages), written in the same
-- transaction as the projection and sent by a separate loop with retries, so
-- a slow or failing forge never holds the event consumer. Calls with the same
-- key are sent in order. URLs and tokens come from the configuration at send
-- time; only the destination's name is stored.
CREATE TABLE outbound (
    id          BIGSERIAL PRIMARY KEY,
    key         TEXT NOT NULL,
    destination TEXT NOT NULL,   -- gitlab, github, chat:<name>
    path        TEXT NOT NULL,   -- appended to the destination's URL
    body        JSONB NOT NULL,
    attempts    INT NOT NULL DEFAULT 0,
    next_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_error  TEXT,
    sent_at     TIMESTAMPTZ,
    gave_up     BOOLEAN NOT NULL DEFAULT false,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX outbound_pending ON outbound (id) WHERE sent_at IS NULL AND NOT gave_up;
CREATE INDEX outbound_key ON outbound (key, id) WHERE sent_at IS NULL AND NOT gave_up;
