-- A component's readiness check (design §9): "" (default: tcp with routes, none
-- without), "tcp", "none" or "http:/path". Until it passes, ps shows "starting".
ALTER TABLE components ADD COLUMN health_check TEXT NOT NULL DEFAULT '';
