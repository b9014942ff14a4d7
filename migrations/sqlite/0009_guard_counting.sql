-- The guard's counting (DESIGN, "What is counted, and against what").
--
-- field_totals: per (kind, Pendo field), the non-null values the shadow holds: what overwrites
-- (and the window's clears) are judged against, "the values held for the field across the whole
-- mapping". Kept in the transactions that change the shadow (a settle, an adoption, a forget),
-- so a guard reads it in one lookup instead of scanning the shadow.
CREATE TABLE field_totals (
    kind  TEXT    NOT NULL,
    field TEXT    NOT NULL,
    n     INTEGER NOT NULL,
    PRIMARY KEY (kind, field)
) WITHOUT ROWID;
INSERT INTO field_totals (kind, field, n)
    SELECT s.kind, j.key, count(*) FROM shadow AS s, json_each(s.vals) AS j
    WHERE j.type != 'null' GROUP BY s.kind, j.key;

-- guard_window: what the guard let through, per mapping, field and cycle, so clears and
-- overwrites add up over the rolling `guard.window` (a property that vanishes 40 records per poll
-- is caught once the sum passes the limit). Rows older than the window are deleted as cycles
-- pass; a person's decision on a hold of the mapping starts the sum again.
CREATE TABLE guard_window (
    mapping    TEXT    NOT NULL,
    field      TEXT    NOT NULL,
    at         INTEGER NOT NULL,
    clears     INTEGER NOT NULL,
    overwrites INTEGER NOT NULL
);
CREATE INDEX guard_window_by_mapping ON guard_window (mapping, at);
