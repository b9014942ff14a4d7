-- Shadow revisions: every settle that writes shadow rows takes the next number of shadow_seq and
-- stamps its rows with it. A page's diff reads the number with its snapshot, and its digests are
-- written only for entities whose shadow row is not newer (see store/digest.rs): a shadow that
-- changed between the diff's read and the page's commit must not get a digest of the old values.
ALTER TABLE shadow ADD COLUMN rev INTEGER NOT NULL DEFAULT 0;
CREATE TABLE shadow_seq (
    id  INTEGER PRIMARY KEY CHECK (id = 1),
    seq INTEGER NOT NULL
);
INSERT INTO shadow_seq (id, seq) VALUES (1, 0);
