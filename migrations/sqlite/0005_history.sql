-- Provenance (DESIGN guarantee 11): every state change of a (kind, Pendo id, field) value is an
-- event, written in the transaction that makes the change. Rows are appended in time order (the
-- rowid grows with `at`), so retention deletes the oldest rows from the front of the table in
-- small batches, with no index on time.
CREATE TABLE history (
    id       INTEGER PRIMARY KEY,
    at       INTEGER NOT NULL,
    kind     TEXT    NOT NULL,
    pendo_id TEXT    NOT NULL,
    field    TEXT    NOT NULL,
    -- What happened (store/history.rs `Event`): a small integer, named in `why`.
    event    INTEGER NOT NULL,
    -- The value concerned, in the outbox's canonical text (NULL where the event has none).
    value    TEXT,
    -- detected / cleared: the mapping (the events that follow a detection need not repeat it).
    mapping  TEXT,
    -- detected / cleared: the cycle (runs.id); sent answers: the batch (history_batches.id);
    -- held / approved / rejected: the hold (holds.id).
    ref      INTEGER,
    -- detected: the CRM record id and its modification time (Unix ms).
    crm_id   TEXT,
    crm_at   INTEGER,
    -- Text of this value's own: a per-record error from Pendo, who asked for a retry or a drop.
    -- A batch-wide answer lives once, in history_batches.
    detail   TEXT
);
-- `why` reads one entity's events newest first: by Pendo id, then the rowid every index entry
-- carries. The kind is checked on the row: a visitor and an account sharing an id are rare,
-- and leaving it out of the index saves 16 bytes per value.
CREATE INDEX history_by_entity ON history (pendo_id);

-- One row per Pendo request a writer made (in-process retries included): when it went out, when
-- the answer came, and the answer for the whole batch. The values' events refer to it.
CREATE TABLE history_batches (
    id          INTEGER PRIMARY KEY,
    kind        TEXT    NOT NULL,
    sent_at     INTEGER NOT NULL,
    answered_at INTEGER NOT NULL,
    records     INTEGER NOT NULL,
    attempts    INTEGER NOT NULL,
    answer      TEXT    NOT NULL
);

-- A newer value replacing a queued one that was never confirmed is a supersession. A trigger
-- records it whoever writes the row (the enqueue's upsert), at no cost to plain inserts.
CREATE TRIGGER history_superseded AFTER UPDATE OF value ON outbox
WHEN OLD.value IS NOT NEW.value BEGIN
    INSERT INTO history (at, kind, pendo_id, field, event, value)
    VALUES (CAST(unixepoch('subsec') * 1000 AS INTEGER), OLD.kind, OLD.pendo_id, OLD.field, 3,
            OLD.value);
END;
