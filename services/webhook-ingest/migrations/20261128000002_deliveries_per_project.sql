-- Delivery keys (Idempotency-Key, the forge's delivery id) are scoped per
-- project: one project's key cannot mark another project's delivery as a
-- duplicate.
ALTER TABLE deliveries DROP CONSTRAINT deliveries_pkey;
ALTER TABLE deliveries ADD PRIMARY KEY (project, source, delivery_key);
