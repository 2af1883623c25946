-- One row per requested pipeline build. The row, not the broker message, owns
-- the work: the request is acked once stored, and a worker holds the build
-- through a lease it renews, so builds may run for hours and a build whose
-- worker died is taken over when its lease runs out.
CREATE TABLE builds (
    id           UUID PRIMARY KEY,
    pipeline_id  TEXT NOT NULL,
    project      TEXT NOT NULL,
    event_id     TEXT NOT NULL UNIQUE,
    request      BYTEA NOT NULL,           -- encoded gantry.v1.PipelineRequested
    traceparent  TEXT,                     -- the pipeline's trace, continued by the build
    state        TEXT NOT NULL DEFAULT 'queued'
                 CHECK (state IN ('queued', 'running', 'succeeded', 'failed')),
    attempt      INT NOT NULL DEFAULT 0,
    worker       TEXT,
    lease_until  TIMESTAMPTZ,
    image_id     TEXT,
    failed_step  TEXT,
    exit_code    INT,
    reason       TEXT,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    started_at   TIMESTAMPTZ,
    finished_at  TIMESTAMPTZ
);
CREATE INDEX builds_open ON builds (created_at) WHERE state IN ('queued', 'running');
CREATE INDEX builds_pipeline ON builds (pipeline_id, created_at);

-- Log lines of every step of every attempt, in order.
CREATE TABLE build_logs (
    seq       BIGSERIAL PRIMARY KEY,
    build_id  UUID NOT NULL REFERENCES builds (id) ON DELETE CASCADE,
    attempt   INT NOT NULL,
    step      TEXT NOT NULL,
    stream    TEXT NOT NULL,
    data      BYTEA NOT NULL,
    at        TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX build_logs_build ON build_logs (build_id, seq);
