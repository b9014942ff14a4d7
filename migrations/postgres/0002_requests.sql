-- Resync jobs as rows: any replica's admin port or the CLI queues one, the leader carries it
-- out, and its progress survives a restart or a failover. `mappings` and `held` are JSON arrays
-- of strings (text, as in SQLite).
CREATE TABLE resyncs (
    id           TEXT   COLLATE "C" PRIMARY KEY,
    mappings     TEXT   COLLATE "C" NOT NULL,
    kind         TEXT   COLLATE "C",
    state        TEXT   COLLATE "C" NOT NULL CHECK (state IN ('queued', 'running', 'done', 'failed')),
    records_read BIGINT NOT NULL DEFAULT 0,
    changes      BIGINT NOT NULL DEFAULT 0,
    pushed       BIGINT NOT NULL DEFAULT 0,
    held         TEXT   COLLATE "C" NOT NULL DEFAULT '[]',
    error        TEXT   COLLATE "C",
    requested_at BIGINT NOT NULL,
    started_at   BIGINT,
    finished_at  BIGINT
);
CREATE INDEX resyncs_by_state ON resyncs (state, requested_at);
