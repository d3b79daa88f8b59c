-- Images that move (issue 19): the image ID ("sha256:<hex>") each component's
-- reference resolved to when it was deployed, and which it runs, so a moved tag
-- is a change and a restart runs the same image; "" for rows from before (they
-- run by reference until their next deploy). A deployment's definition carries
-- the same digest per component, so history and rollback return to it.
ALTER TABLE components ADD COLUMN image_digest TEXT NOT NULL DEFAULT '';
