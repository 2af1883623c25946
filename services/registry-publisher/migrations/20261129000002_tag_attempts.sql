-- The table counts failed taggings (the publisher tags through the registry
-- API; the builder is the one that pushes): named for what it counts.
ALTER TABLE push_attempts RENAME TO tag_attempts;
