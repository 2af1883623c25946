-- Projects' secrets set through the API (`gantry secrets set`), sealed with
-- the configuration's secrets_key (AES-256-GCM; the context `project/name`
-- is authenticated, so a value moved to another row does not open).
CREATE TABLE project_secrets (
    project    TEXT NOT NULL,
    name       TEXT NOT NULL,
    sealed     BYTEA NOT NULL,
    protected  BOOLEAN NOT NULL DEFAULT false,
    set_by     TEXT NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (project, name)
);
