-- When each service whose history is kept was undeployed (issue 16): the
-- history of a service no longer deployed is pruned by this age and by a cap on
-- how many such services are kept. A row may outlive a redeploy; a service is
-- undeployed only while it has no row in services. History kept from before
-- this migration counts as undeployed at its last deployment.
CREATE TABLE undeployed (
    service TEXT PRIMARY KEY,
    time    REAL NOT NULL
);
INSERT INTO undeployed (service, time)
    SELECT service, MAX(time) FROM deployments
    WHERE service NOT IN (SELECT name FROM services)
    GROUP BY service;
