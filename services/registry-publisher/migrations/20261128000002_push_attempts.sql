-- Failed pushes per build.succeeded event, so that a registry that keeps
-- refusing ends the pipeline (image.publish_failed) instead of a retry loop.
CREATE TABLE push_attempts (
    event_id    TEXT PRIMARY KEY,
    attempts    INT NOT NULL,
    last_error  TEXT NOT NULL
);
