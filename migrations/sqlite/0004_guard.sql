-- The guard (DESIGN guarantee 9): a cycle's outbox rows are staged while its pull runs (the
-- writer never claims them), become pending once the guard passed the whole pull, and are held
-- under a hold for a person when the pull would clear or overwrite more than the limits allow.

CREATE TABLE holds (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    mapping         TEXT    NOT NULL,
    kind            TEXT    NOT NULL,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL,
    -- What tripped it, one line per field over a limit.
    reason          TEXT    NOT NULL,
    -- JSON: field -> {sets, clears, overwrites, covered}, over the rows the hold holds now.
    counts          TEXT    NOT NULL,
    -- JSON: [{id, field, from, to}], clears and overwrites first, 20 at most.
    sample          TEXT    NOT NULL,
    -- Cycles whose changes joined it (a mapping's later cycles join its open hold).
    cycles          INTEGER NOT NULL DEFAULT 1,
    held_values     INTEGER NOT NULL DEFAULT 0,
    state           TEXT    NOT NULL DEFAULT 'open' CHECK (state IN ('open', 'approved', 'rejected')),
    decided_at      INTEGER,
    decided_by      TEXT,
    decision_reason TEXT
);
CREATE INDEX holds_by_mapping ON holds (mapping, state);

-- The outbox gains two states and the hold a held row belongs to. SQLite cannot change a CHECK
-- constraint in place: the table is rebuilt.
CREATE TABLE outbox_new (
    kind            TEXT    NOT NULL,
    pendo_id        TEXT    NOT NULL,
    field           TEXT    NOT NULL,
    value           TEXT    NOT NULL,
    mapping         TEXT    NOT NULL,
    state           TEXT    NOT NULL DEFAULT 'pending'
                    CHECK (state IN ('staged', 'pending', 'held', 'unmatched', 'dead')),
    force           INTEGER NOT NULL DEFAULT 0,
    version         INTEGER NOT NULL DEFAULT 1,
    leased          INTEGER NOT NULL DEFAULT 0,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    last_error      TEXT,
    enqueued_at     INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL,
    hold_id         INTEGER,
    PRIMARY KEY (kind, pendo_id, field)
) WITHOUT ROWID;
INSERT INTO outbox_new (kind, pendo_id, field, value, mapping, state, force, version, leased,
                        attempts, next_attempt_at, last_error, enqueued_at, updated_at)
    SELECT kind, pendo_id, field, value, mapping, state, force, version, leased,
           attempts, next_attempt_at, last_error, enqueued_at, updated_at FROM outbox;
DROP TABLE outbox;
ALTER TABLE outbox_new RENAME TO outbox;
-- (state, ...) first: the guard's per-mapping statements select state = 'staged' or 'held'.
CREATE INDEX outbox_due ON outbox (state, kind, next_attempt_at);

-- What the staged rows of a mapping were judged against: per field, the values the shadow held
-- among the records the cycles that staged them covered. Pages add to it in the transaction that
-- stages their rows, so a cycle interrupted after some pages leaves its coverage with its rows
-- and the next cycle's guard judges both together (never rows without coverage).
CREATE TABLE staged_cover (
    mapping TEXT    NOT NULL,
    field   TEXT    NOT NULL,
    covered INTEGER NOT NULL,
    PRIMARY KEY (mapping, field)
) WITHOUT ROWID;

-- Outbox versions come from one counter, so a row deleted while in flight (rejected, dropped)
-- and written again never shares a version with the row a late settle refers to.
CREATE TABLE outbox_seq (
    id  INTEGER PRIMARY KEY CHECK (id = 1),
    seq INTEGER NOT NULL
);
INSERT INTO outbox_seq (id, seq) SELECT 1, coalesce(max(version), 0) FROM outbox;
