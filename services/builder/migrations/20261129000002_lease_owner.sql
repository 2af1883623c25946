-- The builds table follows gantry-queue's leased-queue columns: the holder of
-- a build is its `owner` (as for deployments and outgoing calls).
ALTER TABLE builds RENAME COLUMN worker TO owner;
