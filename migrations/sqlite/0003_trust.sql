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

-- Claims: which CRM record of a mapping names which Pendo id, with the digest of its mapped
-- values. An incremental pull sees only the records that changed; the claims let it find a
-- second record claiming a Pendo id it pulls (ambiguous: neither is sent), and let a deleted
-- record's clear wait while another live record still claims the id. Full pulls rewrite the
-- claims of the records they diff and drop the claims of records they no longer see.
CREATE TABLE claims (
    mapping  TEXT    NOT NULL,
    crm_id   TEXT    NOT NULL,
    pendo_id TEXT    NOT NULL,
    digest   INTEGER NOT NULL,
    PRIMARY KEY (mapping, crm_id)
) WITHOUT ROWID;
-- Covering (the primary key columns ride along): a lookup by Pendo id never visits the table,
-- which SQLite, without statistics, would otherwise prefer to scan by mapping.
CREATE INDEX claims_by_pendo_id ON claims (mapping, pendo_id, digest);

-- Stored digests now also cover the claimant (a record skipped by its digest keeps its claim),
-- and the claims start empty: every entity takes the long way once, which writes its claim.
DELETE FROM shadow_digest;
