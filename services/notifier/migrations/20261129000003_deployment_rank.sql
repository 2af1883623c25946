-- The order of a pipeline's deployment states is kept with each row (the
-- rank of gantry_states::DeploymentState, bound by the notifier), so the
-- "only forward" rule is written once, in Rust, not again in SQL.
ALTER TABLE pipeline_deployments ADD COLUMN rank INT NOT NULL DEFAULT 0;
UPDATE pipeline_deployments
   SET rank = CASE state WHEN 'running' THEN 0 WHEN 'rolled_back' THEN 2 ELSE 1 END;
