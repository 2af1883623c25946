-- A release is an image of a project's default branch or of a `v*` tag:
-- what stacks take for their members.
ALTER TABLE images ADD COLUMN released BOOLEAN NOT NULL DEFAULT FALSE;
CREATE INDEX images_released ON images (project, published_at DESC) WHERE released;

-- One row per configured stack; locked while its runs change, and holding
-- the member projects its last finished run named (a release of one of them
-- starts a run).
CREATE TABLE stacks (
    name    TEXT PRIMARY KEY,
    members TEXT[] NOT NULL DEFAULT '{}'
);

-- Integration runs of stacks. A stack has at most one waiting run (new
-- triggers join it) and at most one requested or running run (runs of a
-- stack are serialized).
--   waiting -> requested (stack.run_requested written) -> running -> passed | failed
CREATE TABLE stack_runs (
    id           UUID PRIMARY KEY,
    stack        TEXT NOT NULL REFERENCES stacks (name),
    number       BIGINT NOT NULL,
    state        TEXT NOT NULL DEFAULT 'waiting'
                 CHECK (state IN ('waiting', 'requested', 'running', 'passed', 'failed')),
    run          BYTEA NOT NULL,           -- encoded gantry.v1.StackRun
    pipeline_id  TEXT NOT NULL,            -- of the newest trigger
    traceparent  TEXT,                     -- of the newest trigger
    build_id     TEXT,
    stack_commit TEXT,
    failed_step  TEXT,
    reason       TEXT,
    services     BYTEA,                    -- encoded gantry.v1.StackServices
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    requested_at TIMESTAMPTZ,
    finished_at  TIMESTAMPTZ,
    UNIQUE (stack, number)
);
CREATE UNIQUE INDEX stack_runs_one_waiting ON stack_runs (stack) WHERE state = 'waiting';
CREATE UNIQUE INDEX stack_runs_one_active ON stack_runs (stack) WHERE state IN ('requested', 'running');

-- Numbered, immutable stack releases: a green run's stack commit and images.
CREATE TABLE stack_releases (
    stack        TEXT NOT NULL REFERENCES stacks (name),
    number       BIGINT NOT NULL,
    run_id       UUID NOT NULL UNIQUE REFERENCES stack_runs (id),
    stack_commit TEXT NOT NULL,
    services     BYTEA NOT NULL,           -- encoded gantry.v1.StackServices
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (stack, number)
);
