-- Routes of a component and the host port allocated to each.
-- host_port is unique across the node: two components never share a port.
CREATE TABLE routes (
    service    TEXT NOT NULL,
    component  TEXT NOT NULL,
    name       TEXT NOT NULL DEFAULT '',
    port       INTEGER NOT NULL,
    mode       TEXT NOT NULL DEFAULT 'l7',
    hostname   TEXT NOT NULL DEFAULT '',
    host_port  INTEGER NOT NULL UNIQUE,
    PRIMARY KEY (service, component, name),
    FOREIGN KEY (service, component) REFERENCES components(service, name) ON DELETE CASCADE
);
