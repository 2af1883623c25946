-- Pipelines started by webhook-ingest, and the deliveries that started them.
CREATE TABLE pipelines (
    id          UUID PRIMARY KEY,
    project     TEXT NOT NULL,
    source      TEXT NOT NULL,
    commit_sha  TEXT NOT NULL,
    git_ref     TEXT NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- One row per accepted delivery; (source, delivery_key) deduplicates retries.
CREATE TABLE deliveries (
    source       TEXT NOT NULL,
    delivery_key TEXT NOT NULL,
    event        TEXT NOT NULL,
    project      TEXT NOT NULL,
    pipeline_id  UUID NOT NULL REFERENCES pipelines (id),
    body         BYTEA NOT NULL,
    received_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (source, delivery_key)
);
