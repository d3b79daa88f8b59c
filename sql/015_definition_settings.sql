-- The definition keys issue 19 adds, kept with the record (they were only in the
-- deployment history, so a service's record and its status definition lost them):
-- a component's check_interval_s, check_timeout_s, check_failures and pull, and
-- the service's [update] table, each as a JSON object of the values that differ
-- from the defaults ('{}' for rows from before: the defaults).
ALTER TABLE components ADD COLUMN settings TEXT NOT NULL DEFAULT '{}';
ALTER TABLE services ADD COLUMN settings TEXT NOT NULL DEFAULT '{}';
