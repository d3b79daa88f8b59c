-- The event log is bounded (issue 21): by age and by count per service
-- (history.event_keep_days, history.max_events_per_service), and each query it serves
-- has an index that fits it, so its cost follows what it reads, not the table's size:
-- the monitor's flap count reads the unplanned events of the flap window only (a
-- partial, covering index); `status` and the per-service cap read one service's newest
-- by id; pruning by age seeks by time. (service, component, time) served none of them.
DROP INDEX IF EXISTS events_by_component;
CREATE INDEX events_by_service ON events (service, id);
CREATE INDEX events_by_time ON events (time);
CREATE INDEX events_unplanned ON events (time, service, component) WHERE unplanned = 1;
