-- The state database on PostgreSQL 15: the schema SQLite reaches after
-- migrations/sqlite/0001..0006, in one step (a PostgreSQL state starts here; nothing is carried
-- over from a SQLite file).
--
-- Conventions, so the Rust code reads and writes both backends the same way:
-- - Integers are BIGINT (the code binds and decodes i64). Exceptions: runs.ok is BOOLEAN (bound as
--   bool); outbox.force and outbox.leased stay 0/1 integers, as the SQL compares them to 1 and 0.
-- - Every TEXT column is COLLATE "C": byte order, as SQLite compares, so keyset paging (`id > ?`)
--   and the merge joins the engine does in Rust see the database's order.
-- - JSON stays in TEXT columns as SQLite keeps it, except shadow.vals (JSONB, patched in SQL).
-- - SQLite indexes carry the primary key (or rowid) after their own columns; PostgreSQL indexes do
--   not, so where a statement relied on that, the columns are spelled out (outbox_due, claims,
--   history).

-- One row per Pendo entity. `vals` is a JSON object: field key -> canonical stored value
-- (see domain::Value::to_stored). A key is present only once Pendo confirmed that value.
-- JSONB: a settle patches it in place (SQLite's json_patch) and the guard reads single keys.
-- It does not keep the text as written (keys reordered, whitespace added): read it with
-- `vals::text` and parse it, never compare it as text.
-- `rev` (from 0003): the shadow_seq number of the settle that last wrote the row.
CREATE TABLE shadow (
    kind         TEXT COLLATE "C" NOT NULL,
    pendo_id     TEXT COLLATE "C" NOT NULL,
    vals         JSONB  NOT NULL,
    confirmed_at BIGINT NOT NULL,
    rev          BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (kind, pendo_id)
);

-- Shadow revisions: every settle that writes shadow rows takes the next number and stamps its rows
-- with it; a page's digests are written only for entities whose shadow row is not newer than the
-- snapshot its diff read (see store/digest.rs). One row, always there.
CREATE TABLE shadow_seq (
    id  BIGINT PRIMARY KEY CHECK (id = 1),
    seq BIGINT NOT NULL
);
INSERT INTO shadow_seq (id, seq) VALUES (1, 0);

-- At most one row per (kind, pendo_id, field): a newer CRM value replaces an unsent one
-- (latest wins). `version` comes from outbox_seq on every replacement, so a confirmation only
-- removes the row if it still holds the value that was sent.
-- States (from 0004): staged while its cycle's pull runs (the writer never claims it), pending
-- once the guard passed the pull, held under a hold (`hold_id`) until a person decides.
CREATE TABLE outbox (
    kind            TEXT COLLATE "C" NOT NULL,
    pendo_id        TEXT COLLATE "C" NOT NULL,
    field           TEXT COLLATE "C" NOT NULL,
    -- Canonical stored text (JSON) of the value: compared as text, so it stays TEXT.
    value           TEXT COLLATE "C" NOT NULL,
    mapping         TEXT COLLATE "C" NOT NULL,
    state           TEXT COLLATE "C" NOT NULL DEFAULT 'pending'
                    CHECK (state IN ('staged', 'pending', 'held', 'unmatched', 'dead')),
    -- 0/1, not BOOLEAN: the SQL compares it to 1 and takes the larger of two.
    force           BIGINT NOT NULL DEFAULT 0,
    version         BIGINT NOT NULL DEFAULT 1,
    -- 1 while a writer has the row in a request; cleared on settle and at writer start.
    leased          BIGINT NOT NULL DEFAULT 0,
    attempts        BIGINT NOT NULL DEFAULT 0,
    next_attempt_at BIGINT NOT NULL,
    last_error      TEXT COLLATE "C",
    enqueued_at     BIGINT NOT NULL,
    updated_at      BIGINT NOT NULL,
    -- The hold a held row belongs to (kept when a newer value re-stages it). No foreign key, as
    -- in SQLite.
    hold_id         BIGINT,
    PRIMARY KEY (kind, pendo_id, field)
);
-- (state, ...) first: the guard's per-mapping statements select state = 'staged' or 'held', the
-- writer claims pending/unmatched rows due by kind. pendo_id, field end it as they ended SQLite's
-- (the primary key rides along there): the console's queue pages by
-- (kind, next_attempt_at, pendo_id, field) within a state, read in index order.
CREATE INDEX outbox_due ON outbox (state, kind, next_attempt_at, pendo_id, field);

-- Outbox versions come from one counter, so a row deleted while in flight (rejected, dropped)
-- and written again never shares a version with the row a late settle refers to. One row.
CREATE TABLE outbox_seq (
    id  BIGINT PRIMARY KEY CHECK (id = 1),
    seq BIGINT NOT NULL
);
INSERT INTO outbox_seq (id, seq) VALUES (1, 0);

CREATE TABLE watermarks (
    mapping    TEXT COLLATE "C" PRIMARY KEY,
    value      TEXT COLLATE "C" NOT NULL,
    updated_at BIGINT NOT NULL
);

-- Records set aside with their reason (wrong type, missing id, ambiguous id). A record that later
-- maps cleanly is removed from here.
CREATE TABLE invalid_records (
    mapping   TEXT COLLATE "C" NOT NULL,
    crm_id    TEXT COLLATE "C" NOT NULL,
    pendo_id  TEXT COLLATE "C",
    reason    TEXT COLLATE "C" NOT NULL,
    detail    TEXT COLLATE "C" NOT NULL,
    seen_at   BIGINT NOT NULL,
    PRIMARY KEY (mapping, crm_id)
);

-- One row per cycle. `ok` is NULL while the cycle runs.
CREATE TABLE runs (
    id          BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    mapping     TEXT COLLATE "C" NOT NULL,
    mode        TEXT COLLATE "C" NOT NULL,
    started_at  BIGINT NOT NULL,
    finished_at BIGINT,
    ok          BOOLEAN,
    pulled      BIGINT NOT NULL DEFAULT 0,
    changes     BIGINT NOT NULL DEFAULT 0,
    invalid     BIGINT NOT NULL DEFAULT 0,
    error       TEXT COLLATE "C"
);
CREATE INDEX runs_by_mapping ON runs (mapping, id);
-- The console's chart reads the last day's cycles as a range of start times.
CREATE INDEX runs_by_start ON runs (started_at);

-- Small durable facts: quota readings, the writer's pause reason, OAuth refresh tokens that a CRM
-- rotated. Values are JSON text.
CREATE TABLE kv (
    key        TEXT COLLATE "C" PRIMARY KEY,
    value      TEXT COLLATE "C" NOT NULL,
    updated_at BIGINT NOT NULL
);

-- A shortcut for reconciles: per (kind, Pendo id, mapping), a 64-bit digest of the mapped values
-- that the last full diff found already in Pendo (in the shadow, nothing queued). A missing or
-- different digest only means "diff it the long way"; a digest must never outlive the state of
-- the shadow row it summarised: any change to that row deletes every digest of the entity (the
-- triggers below), whoever makes it. Outbox changes need no trigger (see
-- migrations/sqlite/0002_digest.sql).
CREATE TABLE shadow_digest (
    kind     TEXT COLLATE "C" NOT NULL,
    pendo_id TEXT COLLATE "C" NOT NULL,
    mapping  TEXT COLLATE "C" NOT NULL,
    -- 16 bytes: the engine's 64-bit hash of pendo_id (crate::digest::id_hash), then the values
    -- digest, both little-endian. A reconcile loads them concatenated, one value per 50,000.
    entry    BYTEA NOT NULL CHECK (length(entry) = 16),
    PRIMARY KEY (kind, pendo_id, mapping)
);

-- Statement-level, with transition tables: a settle upserts up to 10,000 shadow rows in one
-- statement, and one DELETE joined to the changed keys costs far less than 10,000 row triggers.
-- An INSERT ... ON CONFLICT DO UPDATE fires the INSERT trigger (rows it inserted) and the UPDATE
-- trigger (rows it updated). A transition table serves one event only, hence one function each.
CREATE FUNCTION shadow_digest_after_shadow_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM shadow_digest AS d USING new_rows AS n
    WHERE d.kind = n.kind AND d.pendo_id = n.pendo_id;
    RETURN NULL;
END $$;
CREATE TRIGGER shadow_digest_after_shadow_insert AFTER INSERT ON shadow
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION shadow_digest_after_shadow_insert();

CREATE FUNCTION shadow_digest_after_shadow_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM shadow_digest AS d USING old_rows AS o
    WHERE d.kind = o.kind AND d.pendo_id = o.pendo_id;
    RETURN NULL;
END $$;
CREATE TRIGGER shadow_digest_after_shadow_update AFTER UPDATE ON shadow
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION shadow_digest_after_shadow_update();

CREATE FUNCTION shadow_digest_after_shadow_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM shadow_digest AS d USING old_rows AS o
    WHERE d.kind = o.kind AND d.pendo_id = o.pendo_id;
    RETURN NULL;
END $$;
CREATE TRIGGER shadow_digest_after_shadow_delete AFTER DELETE ON shadow
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION shadow_digest_after_shadow_delete();

-- SQLite has no TRUNCATE; here it would empty the shadow without a DELETE trigger firing, so
-- it empties the digests too.
CREATE FUNCTION shadow_digest_after_shadow_truncate() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM shadow_digest;
    RETURN NULL;
END $$;
CREATE TRIGGER shadow_digest_after_shadow_truncate AFTER TRUNCATE ON shadow
    FOR EACH STATEMENT EXECUTE FUNCTION shadow_digest_after_shadow_truncate();

-- Claims: which CRM record of a mapping names which Pendo id, with the digest of its mapped
-- values (a u64 stored as its i64 bit pattern). They let an incremental pull find a second record
-- claiming a Pendo id it pulls, and let a deleted record's clear wait while another live record
-- still claims the id.
CREATE TABLE claims (
    mapping  TEXT COLLATE "C" NOT NULL,
    crm_id   TEXT COLLATE "C" NOT NULL,
    pendo_id TEXT COLLATE "C" NOT NULL,
    digest   BIGINT NOT NULL,
    PRIMARY KEY (mapping, crm_id)
);
-- Covering: a lookup by Pendo id reads (pendo_id, crm_id, digest) from the index alone (an
-- index-only scan). SQLite's index carried crm_id as its primary key; here it is INCLUDEd.
CREATE INDEX claims_by_pendo_id ON claims (mapping, pendo_id, digest) INCLUDE (crm_id);

-- The guard (DESIGN guarantee 9): a hold for a person when a cycle's pull would clear or
-- overwrite more than the limits allow.
CREATE TABLE holds (
    id              BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    mapping         TEXT COLLATE "C" NOT NULL,
    kind            TEXT COLLATE "C" NOT NULL,
    created_at      BIGINT NOT NULL,
    updated_at      BIGINT NOT NULL,
    -- What tripped it, one line per field over a limit.
    reason          TEXT COLLATE "C" NOT NULL,
    -- JSON: field -> {sets, clears, overwrites, covered}, over the rows the hold holds now.
    counts          TEXT COLLATE "C" NOT NULL,
    -- JSON: [{id, field, from, to}], clears and overwrites first, 20 at most.
    sample          TEXT COLLATE "C" NOT NULL,
    -- Cycles whose changes joined it (a mapping's later cycles join its open hold).
    cycles          BIGINT NOT NULL DEFAULT 1,
    held_values     BIGINT NOT NULL DEFAULT 0,
    state           TEXT COLLATE "C" NOT NULL DEFAULT 'open'
                    CHECK (state IN ('open', 'approved', 'rejected')),
    decided_at      BIGINT,
    decided_by      TEXT COLLATE "C",
    decision_reason TEXT COLLATE "C"
);
CREATE INDEX holds_by_mapping ON holds (mapping, state);

-- What the staged rows of a mapping were judged against: per field, the values the shadow held
-- among the records the cycles that staged them covered. Written with the staged rows, so the
-- guard never judges rows without their coverage.
CREATE TABLE staged_cover (
    mapping TEXT COLLATE "C" NOT NULL,
    field   TEXT COLLATE "C" NOT NULL,
    covered BIGINT NOT NULL,
    PRIMARY KEY (mapping, field)
);

-- Provenance (DESIGN guarantee 11): every state change of a (kind, Pendo id, field) value is an
-- event, written in the transaction that makes the change. Retention deletes the oldest rows by
-- id in small batches, with no index on time.
CREATE TABLE history (
    id       BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    at       BIGINT NOT NULL,
    kind     TEXT COLLATE "C" NOT NULL,
    pendo_id TEXT COLLATE "C" NOT NULL,
    field    TEXT COLLATE "C" NOT NULL,
    -- What happened (store/history.rs `Event`): a small integer, named in `why`.
    event    BIGINT NOT NULL,
    -- The value concerned, in the outbox's canonical text (NULL where the event has none).
    value    TEXT COLLATE "C",
    -- detected / cleared: the mapping.
    mapping  TEXT COLLATE "C",
    -- detected / cleared: the cycle (runs.id); sent answers: the batch (history_batches.id);
    -- held / approved / rejected: the hold (holds.id).
    ref      BIGINT,
    -- detected: the CRM record id and its modification time (Unix ms).
    crm_id   TEXT COLLATE "C",
    crm_at   BIGINT,
    -- Text of this value's own: a per-record error from Pendo, who asked for a retry or a drop.
    detail   TEXT COLLATE "C"
);
-- `why` reads one entity's events newest first: by Pendo id, then id. SQLite's index carried the
-- rowid implicitly; here it is the second column, so the newest-first read needs no sort. The
-- kind is checked on the row.
CREATE INDEX history_by_entity ON history (pendo_id, id);

-- One row per Pendo request a writer made (in-process retries included). The values' events
-- refer to it.
CREATE TABLE history_batches (
    id          BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    kind        TEXT COLLATE "C" NOT NULL,
    sent_at     BIGINT NOT NULL,
    answered_at BIGINT NOT NULL,
    records     BIGINT NOT NULL,
    attempts    BIGINT NOT NULL,
    answer      TEXT COLLATE "C" NOT NULL
);
-- The console's chart: Pendo requests per 15 minutes, a range of send times; `attempts` is in
-- the index so counting HTTP requests can read it alone.
CREATE INDEX history_batches_by_sent ON history_batches (sent_at, attempts);

-- A newer value replacing a queued one that was never confirmed is a supersession. A trigger
-- records it whoever writes the row (the enqueue's upsert), at no cost to plain inserts; the WHEN
-- clause keeps updates of other columns (leases, retries, state) from calling it at all.
-- `at` is Unix ms of the moment the row changes (clock_timestamp, not the transaction's start),
-- truncated as SQLite's CAST did.
CREATE FUNCTION history_superseded() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO history (at, kind, pendo_id, field, event, value)
    VALUES (floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint,
            OLD.kind, OLD.pendo_id, OLD.field, 3, OLD.value);
    RETURN NULL;
END $$;
CREATE TRIGGER history_superseded AFTER UPDATE OF value ON outbox
    FOR EACH ROW WHEN (OLD.value IS DISTINCT FROM NEW.value)
    EXECUTE FUNCTION history_superseded();

-- Leadership: with a shared database several processes may run, and only one may write.
-- The leader lease (one row): who may write, under which epoch, until when (database clock).
-- No initial row: the first taker inserts it.
CREATE TABLE leader_lease (
    id         BIGINT PRIMARY KEY CHECK (id = 1),
    holder     TEXT COLLATE "C" NOT NULL,
    epoch      BIGINT NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL,
    renewed_at TIMESTAMPTZ NOT NULL
);
