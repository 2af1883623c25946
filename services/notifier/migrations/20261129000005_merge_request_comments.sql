-- One comment per merge request, created by its first pipeline and edited
-- by the changes of its newest one.
CREATE TABLE merge_request_comments (
    -- comment:<forge>:<forge project>:<number>, also the outbound key of its calls.
    key TEXT PRIMARY KEY,
    -- The newest pipeline of the merge request: an older one no longer edits it.
    latest_pipeline TEXT NOT NULL,
    -- The forge's id of the comment, once created.
    comment_id BIGINT,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- A call that edits a comment: where the comment is edited (its id appended);
-- the call's own path creates it when there is none yet.
ALTER TABLE outbound ADD COLUMN edit_path TEXT;
