-- Health-gated rollouts (issue 19): each service's latest rollout (the deploy's
-- version, the version a revert goes back to, the changed components it waits
-- for, its state and reason) as one JSON body, so a restarted agent goes on
-- judging it and finishes a revert a crash cut. A deployment's note says why it
-- was made when the agent made it itself (a revert).
CREATE TABLE rollouts (
    service TEXT PRIMARY KEY,
    body    TEXT NOT NULL
);
ALTER TABLE deployments ADD COLUMN note TEXT NOT NULL DEFAULT '';
