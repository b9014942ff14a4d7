-- The guard's counting (DESIGN, "What is counted, and against what"). See the SQLite migration
-- 0009_guard_counting.sql for what each table is for.
CREATE TABLE field_totals (
    kind  TEXT COLLATE "C" NOT NULL,
    field TEXT COLLATE "C" NOT NULL,
    n     BIGINT NOT NULL,
    PRIMARY KEY (kind, field)
);
INSERT INTO field_totals (kind, field, n)
    SELECT s.kind, j.key, count(*) FROM shadow AS s, jsonb_each(s.vals) AS j
    WHERE jsonb_typeof(j.value) <> 'null' GROUP BY s.kind, j.key;

CREATE TABLE guard_window (
    mapping    TEXT COLLATE "C" NOT NULL,
    field      TEXT COLLATE "C" NOT NULL,
    at         BIGINT NOT NULL,
    clears     BIGINT NOT NULL,
    overwrites BIGINT NOT NULL
);
CREATE INDEX guard_window_by_mapping ON guard_window (mapping, at);
