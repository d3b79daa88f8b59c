-- Services and their components: the desired state the agent keeps.
CREATE TABLE services (
    name        TEXT PRIMARY KEY,
    active      INTEGER NOT NULL DEFAULT 1,
    created_at  TEXT NOT NULL,
    updated_at  TEXT NOT NULL
);

CREATE TABLE components (
    service        TEXT NOT NULL REFERENCES services(name) ON DELETE CASCADE,
    name           TEXT NOT NULL,
    image          TEXT NOT NULL,
    cmd            TEXT NOT NULL DEFAULT '[]',
    env            TEXT NOT NULL DEFAULT '[]',
    volumes        TEXT NOT NULL DEFAULT '[]',
    restart        TEXT NOT NULL DEFAULT '',
    desired_state  TEXT NOT NULL DEFAULT 'running',
    observed_state TEXT NOT NULL DEFAULT 'unknown',
    version        TEXT NOT NULL DEFAULT '',
    updated_at     TEXT NOT NULL,
    PRIMARY KEY (service, name)
);
