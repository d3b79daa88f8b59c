-- Observed state changes: drift and flap detection read this log.
CREATE TABLE events (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    service    TEXT NOT NULL,
    component  TEXT NOT NULL,
    time       REAL NOT NULL,
    prev_state TEXT NOT NULL,
    new_state  TEXT NOT NULL,
    detail     TEXT NOT NULL DEFAULT ''
);
CREATE INDEX events_by_component ON events (service, component, time);
