-- Unikernel extras: the ELF to extract and an optional image digest pin.
ALTER TABLE components ADD COLUMN binary TEXT NOT NULL DEFAULT '';
ALTER TABLE components ADD COLUMN image_sha256 TEXT NOT NULL DEFAULT '';
