-- The state file: what Pendo confirmed (shadow), what still has to go (outbox), how far each
-- mapping has read (watermarks), records set aside (invalid_records), and run history.

-- One row per Pendo entity. `vals` is a JSON object: field key -> canonical stored value
-- (see domain::Value::to_stored). A key is present only once Pendo confirmed that value.
CREATE TABLE shadow (
    kind         TEXT    NOT NULL,
    pendo_id     TEXT    NOT NULL,
    vals         TEXT    NOT NULL,
    confirmed_at INTEGER NOT NULL,
    PRIMARY KEY (kind, pendo_id)
) WITHOUT ROWID;

-- At most one row per (kind, pendo_id, field): a newer CRM value replaces an unsent one
-- (latest wins). `version` grows on every replacement, so a confirmation only removes the row
-- if it still holds the value that was sent.
CREATE TABLE outbox (
    kind            TEXT    NOT NULL,
    pendo_id        TEXT    NOT NULL,
    field           TEXT    NOT NULL,
    value           TEXT    NOT NULL,
    mapping         TEXT    NOT NULL,
    state           TEXT    NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'unmatched', 'dead')),
    force           INTEGER NOT NULL DEFAULT 0,
    version         INTEGER NOT NULL DEFAULT 1,
    -- 1 while a writer has the row in a request; cleared on settle and at writer start.
    leased          INTEGER NOT NULL DEFAULT 0,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    last_error      TEXT,
    enqueued_at     INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL,
    PRIMARY KEY (kind, pendo_id, field)
) WITHOUT ROWID;
CREATE INDEX outbox_due ON outbox (state, kind, next_attempt_at);

CREATE TABLE watermarks (
    mapping    TEXT    PRIMARY KEY,
    value      TEXT    NOT NULL,
    updated_at INTEGER NOT NULL
);

-- Records set aside with their reason (wrong type, missing id, ambiguous id). A record that later
-- maps cleanly is removed from here.
CREATE TABLE invalid_records (
    mapping   TEXT    NOT NULL,
    crm_id    TEXT    NOT NULL,
    pendo_id  TEXT,
    reason    TEXT    NOT NULL,
    detail    TEXT    NOT NULL,
    seen_at   INTEGER NOT NULL,
    PRIMARY KEY (mapping, crm_id)
);

CREATE TABLE runs (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    mapping     TEXT    NOT NULL,
    mode        TEXT    NOT NULL,
    started_at  INTEGER NOT NULL,
    finished_at INTEGER,
    ok          INTEGER,
    pulled      INTEGER NOT NULL DEFAULT 0,
    changes     INTEGER NOT NULL DEFAULT 0,
    invalid     INTEGER NOT NULL DEFAULT 0,
    error       TEXT
);
CREATE INDEX runs_by_mapping ON runs (mapping, id);

-- Small durable facts: quota readings, the writer's pause reason, OAuth refresh tokens that a CRM
-- rotated (which is one reason the file is created owner-only). Values are JSON text.
CREATE TABLE kv (
    key        TEXT    PRIMARY KEY,
    value      TEXT    NOT NULL,
    updated_at INTEGER NOT NULL
);
