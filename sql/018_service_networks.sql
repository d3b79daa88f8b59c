-- Service networks in bridge mode (issue 23): each service's /24 of [network] cidr, by
-- index, and each component's host number in it, so an address follows a component
-- across replaces and agent restarts. Rows outlive a service's record until its links,
-- rules and name server are gone: a crash between the two leaves rows the next round
-- finds and clears, never links nobody knows about.
CREATE TABLE service_networks (
    service TEXT PRIMARY KEY,
    idx     INTEGER NOT NULL UNIQUE
);
CREATE TABLE network_hosts (
    service   TEXT NOT NULL,
    component TEXT NOT NULL,
    host      INTEGER NOT NULL,
    PRIMARY KEY (service, component),
    UNIQUE (service, host)
);
