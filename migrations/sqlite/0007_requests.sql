-- Resync jobs as rows (DESIGN "State on PostgreSQL, and more than one replica"): any process
-- may queue one (an admin port, the CLI), the one that writes carries it out, and its progress
-- survives a restart. `mappings` and `held` are JSON arrays of strings.
CREATE TABLE resyncs (
    id           TEXT    PRIMARY KEY,
    mappings     TEXT    NOT NULL,
    kind         TEXT,
    state        TEXT    NOT NULL CHECK (state IN ('queued', 'running', 'done', 'failed')),
    records_read INTEGER NOT NULL DEFAULT 0,
    changes      INTEGER NOT NULL DEFAULT 0,
    pushed       INTEGER NOT NULL DEFAULT 0,
    held         TEXT    NOT NULL DEFAULT '[]',
    error        TEXT,
    requested_at INTEGER NOT NULL,
    started_at   INTEGER,
    finished_at  INTEGER
);
CREATE INDEX resyncs_by_state ON resyncs (state, requested_at);
