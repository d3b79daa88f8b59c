-- Per-component runtime (container | unikernel) and VM resources.
ALTER TABLE components ADD COLUMN runtime TEXT NOT NULL DEFAULT 'container';
ALTER TABLE components ADD COLUMN memory_mb INTEGER;
ALTER TABLE components ADD COLUMN vcpus INTEGER NOT NULL DEFAULT 1;
