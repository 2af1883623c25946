-- Every published image the deployer may roll out: the catalogue that
-- environments and deployment rules select from.
CREATE TABLE images (
    event_id     TEXT PRIMARY KEY,
    pipeline_id  TEXT NOT NULL,
    project      TEXT NOT NULL,
    repository   TEXT NOT NULL,
    digest       TEXT NOT NULL,
    tags         TEXT[] NOT NULL,
    commit_sha   TEXT NOT NULL,
    git_ref      TEXT NOT NULL,
    published_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX images_project ON images (project, published_at DESC);
