-- The container of each service of the release that runs in a stack's
-- environment: the truth a deployment starts from (anything else of the
-- environment is a leftover of an interrupted deployment) and changes only
-- once the new release is recorded.
CREATE TABLE stack_live_services (
    environment TEXT NOT NULL REFERENCES environments (name),
    service     TEXT NOT NULL,
    container   TEXT NOT NULL,
    PRIMARY KEY (environment, service)
);
