-- Each deployed version of a service's definition, for `mcp history` and
-- `mcp rollback`. Kept after an undeploy, so a removed service can come back.
CREATE TABLE deployments (
    service     TEXT NOT NULL,
    version     INTEGER NOT NULL,
    time        REAL NOT NULL,
    digest      TEXT NOT NULL,
    definition  TEXT NOT NULL,
    PRIMARY KEY (service, version)
);
