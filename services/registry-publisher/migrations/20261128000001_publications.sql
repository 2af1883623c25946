-- Every image published: which build, where, under which tags, with which digest.
CREATE TABLE publications (
    event_id      TEXT PRIMARY KEY,      -- the build.succeeded event
    pipeline_id   TEXT NOT NULL,
    project       TEXT NOT NULL,
    build_id      TEXT NOT NULL,
    image_id      TEXT NOT NULL,
    repository    TEXT NOT NULL,
    tags          TEXT[] NOT NULL,
    digest        TEXT NOT NULL,
    published_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX publications_project ON publications (project, published_at DESC);
