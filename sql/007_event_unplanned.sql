-- Whether a state change was unplanned: it left the desired state, or the
-- runtime restarted the workload. Only unplanned changes count as flapping;
-- an operator's stop/start or a deploy coming up is not a flap.
ALTER TABLE events ADD COLUMN unplanned INTEGER NOT NULL DEFAULT 1;
