-- A build is either a service's pipeline or a stack's integration run; both
-- share the leased queue, the workers and the log.
--   kind 'build': request is an encoded gantry.v1.PipelineRequested
--   kind 'stack': request is an encoded gantry.v1.StackRun
ALTER TABLE builds ADD COLUMN kind TEXT NOT NULL DEFAULT 'build'
    CHECK (kind IN ('build', 'stack'));
