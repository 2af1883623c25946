-- The pipeline timeline: a projection of every event, one row per event.
CREATE TABLE timeline (
    event_id     TEXT PRIMARY KEY,
    pipeline_id  TEXT NOT NULL,
    project      TEXT NOT NULL,
    kind         TEXT NOT NULL,       -- routing key, e.g. build.failed
    occurred_at  TIMESTAMPTZ NOT NULL,
    summary      TEXT NOT NULL
);
CREATE INDEX timeline_pipeline ON timeline (pipeline_id, occurred_at);
