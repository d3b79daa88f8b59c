-- An undeploy's intent (issue 18), set before anything is removed: a service
-- whose undeploy was interrupted (the agent killed half-way) is finished by
-- reconcile (its remaining workloads removed, the record deleted) instead of
-- staying recorded with some workloads gone. A deploy of the name clears it.
ALTER TABLE services ADD COLUMN undeploying INTEGER NOT NULL DEFAULT 0;
