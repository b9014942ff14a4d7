use std::collections::{BTreeMap, HashMap};

use super::{Backend, Conn, Db, DbRow, PG};
use super::{end_session, query, query_scalar};
use super::{history, shadow};
use crate::store::*;
use sqlx::{Row, Transaction};

use crate::domain::{Kind, now_ms};

/// Settlements that share one statement and its parameters.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum GroupKey {
    Delete,
    Unmatched(String),
    Retry(i64, String, u32, u32),
    Dead(String),
}

pub(super) fn entry_from_row(row: &DbRow) -> Result<OutboxEntry, StoreError> {
    let kind: String = row.get("kind");
    let state: String = row.get("state");
    Ok(OutboxEntry {
        kind: Kind::parse(&kind)
            .ok_or_else(|| StoreError::Corrupt(format!("outbox kind {kind:?}")))?,
        pendo_id: row.get("pendo_id"),
        field: row.get("field"),
        value: row.get("value"),
        mapping: row.get("mapping"),
        state: match state.as_str() {
            "staged" => QueueState::Staged,
            "pending" => QueueState::Pending,
            "held" => QueueState::Held,
            "unmatched" => QueueState::Unmatched,
            "dead" => QueueState::Dead,
            other => return Err(StoreError::Corrupt(format!("outbox state {other:?}"))),
        },
        force: row.get::<i64, _>("force") != 0,
        version: row.get("version"),
        attempts: row.get::<i64, _>("attempts") as u32,
        next_attempt_at: row.get("next_attempt_at"),
        last_error: row.get("last_error"),
        enqueued_at: row.get("enqueued_at"),
    })
}

/// SQLite's claim: the due rows of the first `$3` Pendo ids found among the due pending rows,
/// longest due first. The ids come from a range of `outbox_due` (pending, this kind, due by
/// now), read until `$3` distinct ids are found and never sorted; their rows then come through
/// the primary key (the outer conditions are written so that `outbox_due` cannot serve them,
/// `|| ''` and `+ 0`: through it, SQLite walked every due row again, probing the id list for
/// each). Two earlier shapes cost a push its rate: the ids in key order through `outbox_due`
/// sorted every due row on every claim (500,000 at the start of a first push of 100,000
/// records: 50 to 300 ms a claim); through the primary key, every claim walked the rows that
/// are not due from the start of the kind, and a portal's unmatched leads are most of such an
/// outbox (54 ms a claim beside 600,000 unmatched values, growing with them). `plan_tests`
/// checks the plan.
pub(crate) const CLAIM_SQL: &str = "UPDATE outbox SET leased = 1
     WHERE kind = $1 AND pendo_id IN (
         SELECT DISTINCT pendo_id FROM outbox INDEXED BY outbox_due
         WHERE state = 'pending' AND kind = $1 AND next_attempt_at <= $2 AND leased = 0
         LIMIT $3)
       AND leased = 0 AND state || '' = 'pending' AND next_attempt_at + 0 <= $2
     RETURNING *";

/// Writes changes with latest-wins semantics. A row is replaced (and made pending again, version
/// bumped) only when the value differs, when a forced send arrives for an unforced row, or when a
/// forced send (a resync) finds the row unmatched or dead (an operator asked for everything
/// again); an identical unforced re-detection leaves an unmatched or dead row alone, so an
/// unknown id is not retried every cycle.
pub(super) async fn enqueue(
    tx: &mut Transaction<'_, Db>,
    changes: &[Change],
    state: &str,
    now: i64,
    run: Option<i64>,
) -> Result<(), StoreError> {
    // One statement per chunk: the rows travel as one JSON array (static SQL, one parameter),
    // which is far cheaper than a statement per row through the driver. Rows are applied in
    // order, so a later change to the same field in one chunk still wins. (PostgreSQL refuses
    // an upsert that meets one key twice, so there the statement keeps only each key's last
    // row, which ends in the same state whenever such duplicates are identical, the only kind
    // the engine produces.)
    for chunk in changes.chunks(10_000) {
        // Versions are never reused (one counter for the whole outbox): a late settle of a row
        // that was deleted and written again must match nothing. One number per chunk, not per
        // row, so a batch's rows share a few versions and settle in a few grouped statements.
        let version: i64 = query("UPDATE outbox_seq SET seq = seq + 1 WHERE id = 1 RETURNING seq")
            .fetch_one(&mut **tx)
            .await?
            .get(0);
        // Each row carries its detection's columns too (see `history::record_detected`): one
        // serialization serves both statements.
        let rows: Vec<serde_json::Value> = chunk
            .iter()
            .map(|c| {
                let (event, crm_id, crm_at, detail) = history::detection(c);
                serde_json::json!([
                    c.kind.as_str(),
                    c.pendo_id,
                    c.field,
                    c.value,
                    c.mapping,
                    c.force as i64,
                    event,
                    crm_id,
                    crm_at,
                    detail
                ])
            })
            .collect();
        let rows = serde_json::Value::Array(rows).to_string();
        let written = query(if PG {
            "INSERT INTO outbox (kind, pendo_id, field, value, mapping, state, force, version, attempts,
                                 next_attempt_at, last_error, enqueued_at, updated_at)
             SELECT DISTINCT ON ((e.value ->> 0) COLLATE \"C\", (e.value ->> 1) COLLATE \"C\", (e.value ->> 2) COLLATE \"C\")
                    e.value ->> 0, e.value ->> 1, e.value ->> 2, e.value ->> 3, e.value ->> 4, $3,
                    (e.value ->> 5)::bigint, $4, 0, $2, NULL, $2, $2
             FROM jsonb_array_elements($1::jsonb) WITH ORDINALITY AS e(value, n)
             ORDER BY (e.value ->> 0) COLLATE \"C\", (e.value ->> 1) COLLATE \"C\", (e.value ->> 2) COLLATE \"C\", e.n DESC
             ON CONFLICT (kind, pendo_id, field) DO UPDATE SET
                value = excluded.value, mapping = excluded.mapping,
                -- A newer value of a held row is staged again (keeping its hold): the guard
                -- counts it, and it rejoins the hold if that is still open. An approval never
                -- sends a value the guard did not judge.
                state = CASE WHEN outbox.state = 'held' THEN 'staged' ELSE excluded.state END,
                force = greatest(outbox.force, excluded.force), version = excluded.version, attempts = 0,
                next_attempt_at = excluded.next_attempt_at, last_error = NULL,
                enqueued_at = excluded.enqueued_at, updated_at = excluded.updated_at
             WHERE outbox.value <> excluded.value OR excluded.force > outbox.force
                OR (excluded.force = 1 AND outbox.state <> 'pending')"
        } else {
            "INSERT INTO outbox (kind, pendo_id, field, value, mapping, state, force, version, attempts,
                                 next_attempt_at, last_error, enqueued_at, updated_at)
             SELECT e.value ->> 0, e.value ->> 1, e.value ->> 2, e.value ->> 3, e.value ->> 4, $3,
                    e.value ->> 5, $4, 0, $2, NULL, $2, $2
             FROM jsonb_each(jsonb($1)) AS e WHERE true
             ON CONFLICT (kind, pendo_id, field) DO UPDATE SET
                value = excluded.value, mapping = excluded.mapping,
                -- A newer value of a held row is staged again (keeping its hold): the guard
                -- counts it, and it rejoins the hold if that is still open. An approval never
                -- sends a value the guard did not judge.
                state = CASE WHEN outbox.state = 'held' THEN 'staged' ELSE excluded.state END,
                force = max(outbox.force, excluded.force), version = excluded.version, attempts = 0,
                next_attempt_at = excluded.next_attempt_at, last_error = NULL,
                enqueued_at = excluded.enqueued_at, updated_at = excluded.updated_at
             WHERE outbox.value != excluded.value OR excluded.force > outbox.force
                OR (excluded.force = 1 AND outbox.state != 'pending')"
        })
        .bind(&rows)
        .bind(now)
        .bind(state)
        .bind(version)
        .execute(&mut **tx)
        .await?
        .rows_affected();
        // After the upsert: a supersession it caused (trigger) comes before the detection.
        // When it wrote every row (the usual case), every row is a detection; else only the
        // rows now carrying this chunk's version are.
        let skipped = (written < chunk.len() as u64).then_some(version);
        history::record_detected(tx, &rows, skipped, run, now).await?;
    }
    Ok(())
}

/// The queued values of `ids`, read on `conn` (see [`Store::load_outbox_values`]).
pub(super) async fn load_values(
    conn: &mut Conn,
    kind: Kind,
    ids: &[&str],
) -> Result<HashMap<String, HashMap<String, String>>, StoreError> {
    let mut out: HashMap<String, HashMap<String, String>> = HashMap::new();
    for chunk in ids.chunks(5_000) {
        let list = serde_json::to_string(chunk).expect("strings serialize");
        let rows = query(if PG {
            "SELECT pendo_id, field, value FROM outbox
             WHERE kind = $1 AND pendo_id IN (SELECT jsonb_array_elements_text($2::jsonb))"
        } else {
            "SELECT pendo_id, field, value FROM outbox
             WHERE kind = $1 AND pendo_id IN (SELECT value FROM json_each($2))"
        })
        .bind(kind.as_str())
        .bind(list)
        .fetch_all(&mut *conn)
        .await?;
        for row in rows {
            out.entry(row.get(0))
                .or_default()
                .insert(row.get(1), row.get(2));
        }
    }
    Ok(out)
}

impl Backend {
    /// Values waiting in the outbox for these ids (any state): the diff compares against them as
    /// well as the shadow, so a CRM value that goes A → B → A before B was sent sends A again.
    pub async fn load_outbox_values(
        &self,
        kind: Kind,
        ids: &[&str],
    ) -> Result<HashMap<String, HashMap<String, String>>, StoreError> {
        let mut conn = self.session().await?;
        let values = load_values(&mut conn, kind, ids).await?;
        end_session(conn).await?;
        Ok(values)
    }

    /// Clears every lease. Called when a writer starts: a lease left by a crashed process means
    /// "maybe sent"; sending again is safe (Pendo's write is idempotent) and losing it is not.
    pub async fn release_leases(&self) -> Result<u64, StoreError> {
        let mut tx = self.begin_write().await?;
        let done = query("UPDATE outbox SET leased = 0 WHERE leased = 1")
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(done.rows_affected())
    }

    /// Rows a writer has in a request (a lease left by another process, at a writer's start).
    pub async fn leased_rows(&self) -> Result<u64, StoreError> {
        let mut session = self.session().await?;
        let n: i64 = query_scalar("SELECT count(*) FROM outbox WHERE leased = 1")
            .fetch_one(&mut *session)
            .await?;
        end_session(session).await?;
        Ok(n.max(0) as u64)
    }

    /// Leases the due pending rows of up to `max_records` entities of `kind` and returns them,
    /// grouped by entity in id order. Unmatched rows are never claimed: they wait until Pendo
    /// is found to know their id ([`Backend::promote_unmatched`]).
    pub async fn claim_due(
        &self,
        kind: Kind,
        now: i64,
        max_records: usize,
    ) -> Result<Vec<OutboxEntry>, StoreError> {
        let mut tx = self.begin_write().await?;
        let rows = if PG {
            // Claims of one writer (its batches in flight) take turns: under read committed two
            // would pick the same ids, and the second would lease nothing and take the outbox
            // for drained. A transaction-scoped advisory lock (safe behind PgBouncer).
            query("SELECT pg_advisory_xact_lock(7368021990)")
                .execute(&mut *tx)
                .await?;
            // The ids first, then the rows by id: as one statement PostgreSQL's generic plan
            // (after five runs) scans the whole outbox per claim. The ids come in key order from
            // where the last claim stopped, wrapping round to the start: from the start every
            // time, each claim would step over the (dead until vacuumed) index entries of every
            // batch settled before it, 10 ms a claim after 100 batches.
            let due = |bound: &str| {
                format!(
                    "SELECT DISTINCT pendo_id FROM outbox
                     WHERE kind = $1 AND leased = 0 AND state = 'pending'
                       AND next_attempt_at <= $2 {bound}
                     ORDER BY pendo_id LIMIT $3"
                )
            };
            let cursor = self
                .claim_cursor
                .lock()
                .expect("claim cursor lock")
                .get(&kind)
                .cloned();
            // After the cursor, then up to it (or, with none, everything).
            let passes: &[&str] = match cursor {
                Some(_) => &["AND pendo_id > $4", "AND pendo_id <= $4"],
                None => &[""],
            };
            let mut ids: Vec<String> = Vec::new();
            // Where the next claim goes on: after the last id of a full batch; from the start
            // once a claim has seen every due id.
            let mut next = None;
            for bound in passes {
                let want = max_records - ids.len();
                let query = query_scalar(sqlx::AssertSqlSafe(due(bound)))
                    .bind(kind.as_str())
                    .bind(now)
                    .bind(want as i64);
                let query = match &cursor {
                    Some(c) => query.bind(c),
                    None => query,
                };
                let found: Vec<String> = query.fetch_all(&mut *tx).await?;
                let full = found.len() == want;
                ids.extend(found);
                if full {
                    next = ids.last().cloned();
                    break;
                }
            }
            {
                let mut cursors = self.claim_cursor.lock().expect("claim cursor lock");
                match next {
                    Some(id) => cursors.insert(kind, id),
                    None => cursors.remove(&kind),
                };
            }
            if ids.is_empty() {
                tx.commit().await?;
                return Ok(Vec::new());
            }
            // By the ids through the primary key: the state and time conditions are written so
            // that no index can serve them (`|| ''`, `+ 0`). Statistics taken while a cycle's
            // rows were still staged make the planner believe few rows are due and walk
            // `outbox_due` instead, joining every due row against the id list (14 s a claim at
            // 150,000 due values).
            query(
                "UPDATE outbox SET leased = 1
                 WHERE kind = $1 AND pendo_id IN (SELECT jsonb_array_elements_text($3::jsonb))
                   AND leased = 0 AND state || '' = 'pending'
                   AND next_attempt_at + 0 <= $2
                 RETURNING *",
            )
            .bind(kind.as_str())
            .bind(now)
            .bind(serde_json::to_string(&ids).expect("strings serialize"))
            .fetch_all(&mut *tx)
            .await?
        } else {
            query(CLAIM_SQL)
                .bind(kind.as_str())
                .bind(now)
                .bind(max_records as i64)
                .fetch_all(&mut *tx)
                .await?
        };
        tx.commit().await?;
        let mut entries = rows
            .iter()
            .map(entry_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        entries.sort_by(|a, b| (&a.pendo_id, &a.field).cmp(&(&b.pendo_id, &b.field)));
        Ok(entries)
    }

    /// When the next row of `kind` (or any kind) becomes due, if any is waiting.
    pub async fn next_due_at(&self, kind: Option<Kind>) -> Result<Option<i64>, StoreError> {
        let mut session = self.session().await?;
        let row = query(
            "SELECT min(next_attempt_at) FROM outbox
             WHERE leased = 0 AND state = 'pending' AND ($1 IS NULL OR kind = $1)",
        )
        .bind(kind.map(Kind::as_str))
        .fetch_one(&mut *session)
        .await?;
        end_session(session).await?;
        Ok(row.get(0))
    }

    /// Whether any row of `kind` waits for Pendo to know its id.
    pub async fn has_unmatched(&self, kind: Kind) -> Result<bool, StoreError> {
        let mut session = self.session().await?;
        let n: i64 = query_scalar(
            "SELECT count(*) FROM (SELECT 1 FROM outbox WHERE state = 'unmatched' AND kind = $1 LIMIT 1) AS u",
        )
        .bind(kind.as_str())
        .fetch_one(&mut *session)
        .await?;
        end_session(session).await?;
        Ok(n > 0)
    }

    /// Makes the unmatched rows of these ids pending, due at once: Pendo knows the ids now.
    /// One statement for the whole list; returns the values made pending.
    pub async fn promote_unmatched(
        &self,
        kind: Kind,
        ids: &[String],
        now: i64,
    ) -> Result<u64, StoreError> {
        if ids.is_empty() {
            return Ok(0);
        }
        let mut tx = self.begin_write().await?;
        let done = query(if PG {
            "UPDATE outbox SET state = 'pending', next_attempt_at = $2, last_error = NULL, updated_at = $2
             WHERE kind = $1 AND state = 'unmatched'
               AND pendo_id IN (SELECT jsonb_array_elements_text($3::jsonb))"
        } else {
            "UPDATE outbox SET state = 'pending', next_attempt_at = $2, last_error = NULL, updated_at = $2
             WHERE kind = $1 AND state = 'unmatched' AND pendo_id IN (SELECT value FROM json_each($3))"
        })
        .bind(kind.as_str())
        .bind(now)
        .bind(serde_json::to_string(ids).expect("strings serialize"))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        let promoted = done.rows_affected();
        if promoted > 0 {
            self.note_written(promoted as usize).await;
        }
        Ok(promoted)
    }

    /// Applies the writer's outcomes in one transaction: shadow updates for confirmed rows and the
    /// outbox bookkeeping for everything else. Rows whose version moved on (a newer CRM value
    /// arrived while this one was in flight) are only released, so the newer value goes out next.
    pub async fn settle(&self, outcomes: &[(OutboxEntry, Settlement)]) -> Result<(), StoreError> {
        self.settle_inner(outcomes, &[], &[], true).await
    }

    /// [`Store::settle`] for rows the writer sent: `batches` are its requests, and
    /// `batch_of[i]` the request outcome `i` was answered in (`None`: not sent). The history
    /// keeps each request once and an event per value pointing at it.
    pub async fn settle_sent(
        &self,
        outcomes: &[(OutboxEntry, Settlement)],
        batches: &[SentBatch],
        batch_of: &[Option<usize>],
    ) -> Result<(), StoreError> {
        self.settle_inner(outcomes, batches, batch_of, true).await
    }

    /// Runs the settle transaction and rolls it back, as a crash before COMMIT would (crash tests).
    pub async fn settle_uncommitted(
        &self,
        outcomes: &[(OutboxEntry, Settlement)],
        batches: &[SentBatch],
        batch_of: &[Option<usize>],
    ) -> Result<(), StoreError> {
        self.settle_inner(outcomes, batches, batch_of, false).await
    }

    async fn settle_inner(
        &self,
        outcomes: &[(OutboxEntry, Settlement)],
        batches: &[SentBatch],
        batch_of: &[Option<usize>],
        commit: bool,
    ) -> Result<(), StoreError> {
        let now = now_ms();
        let mut tx = self.begin_write().await?;
        // The answers' events first: they match the rows by the version that was sent, before
        // the statements below delete or update them.
        history::record_answers(&mut tx, outcomes, batches, batch_of, now).await?;
        // Shadow patches grouped per entity: one statement per record, not per field.
        let mut patches: BTreeMap<(Kind, &str), serde_json::Map<String, serde_json::Value>> =
            BTreeMap::new();
        for (entry, settlement) in outcomes {
            if *settlement == Settlement::Confirmed {
                let value: serde_json::Value = serde_json::from_str(&entry.value).map_err(|e| {
                    StoreError::Corrupt(format!("outbox value {:?}: {e}", entry.value))
                })?;
                patches
                    .entry((entry.kind, entry.pendo_id.as_str()))
                    .or_default()
                    .insert(entry.field.clone(), value);
            }
        }
        // All of a batch's shadow patches in one statement (and the field totals beside them).
        if !patches.is_empty() {
            let rows: Vec<serde_json::Value> = patches
                .into_iter()
                .map(|((kind, id), patch)| serde_json::json!([kind.as_str(), id, patch]))
                .collect();
            shadow::patch(&mut tx, rows, now).await?;
        }
        // Rows settle in groups that share a statement and its parameters: the settlement, and
        // the kind, field and version that was sent, so each group's ids travel as one plain JSON
        // array of strings matched on the primary key (cheaper for SQLite than a list of
        // tuples). Each statement also ends the lease of the rows it matches.
        type Keyed<'o> = (GroupKey, &'static str, &'o str, i64);
        let mut groups: BTreeMap<Keyed<'_>, Vec<&str>> = BTreeMap::new();
        // Rows no group statement matched keep their lease until the release at the end: rows
        // not sent (`Release`), and rows whose version moved on (a newer CRM value arrived while
        // this one was in flight), so that the newer value goes out next.
        let mut unreleased: BTreeMap<(&'static str, &str), Vec<&str>> = BTreeMap::new();
        for (entry, settlement) in outcomes {
            let key = match settlement {
                Settlement::Confirmed | Settlement::AlreadyConfirmed => GroupKey::Delete,
                Settlement::Unmatched { message } => GroupKey::Unmatched(message.clone()),
                Settlement::Retry {
                    retry_at,
                    error,
                    max_attempts,
                    attempts,
                } => GroupKey::Retry(*retry_at, error.clone(), *max_attempts, *attempts),
                Settlement::Dead { error } => GroupKey::Dead(error.clone()),
                Settlement::Release => {
                    unreleased
                        .entry((entry.kind.as_str(), entry.field.as_str()))
                        .or_default()
                        .push(entry.pendo_id.as_str());
                    continue;
                }
            };
            groups
                .entry((
                    key,
                    entry.kind.as_str(),
                    entry.field.as_str(),
                    entry.version,
                ))
                .or_default()
                .push(entry.pendo_id.as_str());
        }
        let keys = if PG {
            "kind = $1 AND field = $2 AND version = $3
             AND pendo_id IN (SELECT jsonb_array_elements_text($4::jsonb))"
        } else {
            "kind = $1 AND field = $2 AND version = $3
             AND pendo_id IN (SELECT value FROM json_each($4))"
        };
        for ((group, kind, field, version), ids) in groups {
            let sql = match &group {
                GroupKey::Delete => format!("DELETE FROM outbox WHERE {keys}"),
                GroupKey::Unmatched(..) => format!(
                    "UPDATE outbox SET state = 'unmatched', last_error = $5, updated_at = $6, leased = 0
                     WHERE {keys}"
                ),
                GroupKey::Retry(..) => format!(
                    "UPDATE outbox SET attempts = attempts + $9, next_attempt_at = $5, last_error = $6,
                        updated_at = $7, state = CASE WHEN attempts + $9 >= $8 THEN 'dead' ELSE state END,
                        leased = 0
                     WHERE {keys}"
                ),
                GroupKey::Dead(..) => format!(
                    "UPDATE outbox SET state = 'dead', attempts = attempts + 1, last_error = $5, updated_at = $6,
                        leased = 0
                     WHERE {keys}"
                ),
            };
            // Arguments bind in order: the keys are $1..$4, the statement's own values follow.
            let q = query(sqlx::AssertSqlSafe(sql))
                .bind(kind)
                .bind(field)
                .bind(version)
                .bind(serde_json::to_string(&ids).expect("strings serialize"));
            let q = match group {
                GroupKey::Delete => q,
                GroupKey::Unmatched(message) => q.bind(message).bind(now),
                GroupKey::Retry(retry_at, error, max_attempts, attempts) => q
                    .bind(retry_at)
                    .bind(error)
                    .bind(now)
                    .bind(max_attempts as i64)
                    .bind(attempts as i64),
                GroupKey::Dead(error) => q.bind(error).bind(now),
            };
            let matched = q.execute(&mut *tx).await?.rows_affected();
            // (kind, id, field) is the key and the version is one per group: a group that
            // matched as many rows as it has ids matched every one of them. Otherwise some
            // version moved on; releasing the whole group is harmless for the rows it matched.
            if matched < ids.len() as u64 {
                unreleased.entry((kind, field)).or_default().extend(ids);
            }
        }
        for ((kind, field), ids) in unreleased {
            query(if PG {
                "UPDATE outbox SET leased = 0
                 WHERE kind = $1 AND field = $2 AND pendo_id IN (SELECT jsonb_array_elements_text($3::jsonb))
                   AND leased = 1"
            } else {
                "UPDATE outbox SET leased = 0
                 WHERE kind = $1 AND field = $2 AND pendo_id IN (SELECT value FROM json_each($3))
                   AND leased = 1"
            })
            .bind(kind)
            .bind(field)
            .bind(serde_json::to_string(&ids).expect("strings serialize"))
            .execute(&mut *tx)
            .await?;
        }
        if commit {
            tx.commit().await?;
            self.note_written(outcomes.len()).await;
        } else {
            tx.rollback().await?;
        }
        Ok(())
    }

    /// Rows matching `filter`, oldest first, at most `limit`.
    pub async fn outbox_list(
        &self,
        filter: &QueueFilter,
        limit: u32,
    ) -> Result<Vec<OutboxEntry>, StoreError> {
        let mut session = self.session().await?;
        let rows = query(
            "SELECT * FROM outbox WHERE ($1 IS NULL OR state = $1) AND ($2 IS NULL OR kind = $2)
               AND ($3 IS NULL OR pendo_id = $3)
             ORDER BY enqueued_at, kind, pendo_id, field LIMIT $4",
        )
        .bind(filter.state.map(QueueState::as_str))
        .bind(filter.kind.map(Kind::as_str))
        .bind(filter.pendo_id.as_deref())
        .bind(i64::from(limit))
        .fetch_all(&mut *session)
        .await?;
        end_session(session).await?;
        rows.iter().map(entry_from_row).collect()
    }

    /// Makes matching rows pending and due now, with a fresh attempt count (staged and held rows
    /// excepted).
    pub async fn outbox_retry(&self, filter: &QueueFilter, who: &str) -> Result<u64, StoreError> {
        let now = now_ms();
        let mut tx = self.begin_write().await?;
        history::record_operator(
            &mut tx,
            Event::Retried,
            filter,
            "'pending', 'unmatched', 'dead'",
            who,
            now,
        )
        .await?;
        let done = query(
            // Never staged or held rows: those wait for the guard or for a person's decision
            // (`holds approve`), and a retry must not slip them past it.
            "UPDATE outbox SET state = 'pending', attempts = 0, next_attempt_at = $4, updated_at = $4
             WHERE state IN ('pending', 'unmatched', 'dead')
               AND ($1 IS NULL OR state = $1) AND ($2 IS NULL OR kind = $2) AND ($3 IS NULL OR pendo_id = $3)",
        )
        .bind(filter.state.map(QueueState::as_str))
        .bind(filter.kind.map(Kind::as_str))
        .bind(filter.pendo_id.as_deref())
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(done.rows_affected())
    }

    /// Deletes matching rows: an operator's decision that these changes should never go out.
    /// A hold they were held under counts what it still holds; one left holding nothing is
    /// closed as rejected by `who` (an open hold keeps `sync` exiting 4).
    pub async fn outbox_drop(&self, filter: &QueueFilter, who: &str) -> Result<u64, StoreError> {
        let now = now_ms();
        let mut tx = self.begin_write().await?;
        history::record_operator(
            &mut tx,
            Event::Dropped,
            filter,
            "'staged', 'pending', 'held', 'unmatched', 'dead'",
            who,
            now,
        )
        .await?;
        let done = query(
            "DELETE FROM outbox WHERE ($1 IS NULL OR state = $1) AND ($2 IS NULL OR kind = $2)
               AND ($3 IS NULL OR pendo_id = $3)",
        )
        .bind(filter.state.map(QueueState::as_str))
        .bind(filter.kind.map(Kind::as_str))
        .bind(filter.pendo_id.as_deref())
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() > 0 {
            query(
                "UPDATE holds SET updated_at = $1,
                    held_values = (SELECT count(*) FROM outbox WHERE state = 'held' AND hold_id = holds.id)
                 WHERE state = 'open'",
            )
            .bind(now)
            .execute(&mut *tx)
            .await?;
            // Rows a newer CRM value re-staged keep their hold id and rejoin it at the guard:
            // such a hold is not empty.
            query(
                "UPDATE holds SET state = 'rejected', decided_at = $1, decided_by = $2,
                    decision_reason = 'every value it held was dropped from the outbox'
                 WHERE state = 'open'
                   AND NOT EXISTS (SELECT 1 FROM outbox WHERE outbox.hold_id = holds.id)",
            )
            .bind(now)
            .bind(who)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(done.rows_affected())
    }

    /// Row counts per state.
    pub async fn outbox_counts(&self) -> Result<BTreeMap<&'static str, i64>, StoreError> {
        self.counts_per_state("SELECT state, count(*) FROM outbox GROUP BY state")
            .await
    }

    /// Dead values (read around every writer pass, to tell `[notify]` about new ones): one
    /// count on the state index.
    pub async fn dead_count(&self) -> Result<i64, StoreError> {
        let mut session = self.session().await?;
        let row = query("SELECT count(*) FROM outbox WHERE state = 'dead'")
            .fetch_one(&mut *session)
            .await?;
        end_session(session).await?;
        Ok(row.get(0))
    }

    /// `(state, count)` rows into a map with every state present.
    async fn counts_per_state(
        &self,
        sql: &'static str,
    ) -> Result<BTreeMap<&'static str, i64>, StoreError> {
        let mut session = self.session().await?;
        let rows = query(sql).fetch_all(&mut *session).await?;
        end_session(session).await?;
        let mut out: BTreeMap<&'static str, i64> = crate::store::outbox::STATES
            .iter()
            .map(|s| (*s, 0))
            .collect();
        for row in rows {
            let state: String = row.get(0);
            if let Some(known) = crate::store::outbox::STATES.iter().find(|s| **s == state) {
                out.insert(known, row.get(1));
            }
        }
        Ok(out)
    }

    /// Rows matching `filter` (what `outbox_list` would return without a limit).
    pub async fn outbox_count(&self, filter: &QueueFilter) -> Result<i64, StoreError> {
        let mut session = self.session().await?;
        let row = query(
            "SELECT count(*) FROM outbox WHERE ($1 IS NULL OR state = $1) AND ($2 IS NULL OR kind = $2)
               AND ($3 IS NULL OR pendo_id = $3)",
        )
        .bind(filter.state.map(QueueState::as_str))
        .bind(filter.kind.map(Kind::as_str))
        .bind(filter.pendo_id.as_deref())
        .fetch_one(&mut *session)
        .await?;
        end_session(session).await?;
        Ok(row.get(0))
    }

    /// Values and entities (kind, id) per state, and when the oldest pending change was
    /// enqueued: the status model's view of the outbox, in one pass over it in key order.
    ///
    /// An entity's rows are adjacent in the primary key, so grouping by (kind, id) streams, and
    /// an entity counts once in each state it has a row in. This is what a 100k-row outbox
    /// costs a `/metrics` scrape instead of a sort of every row into a temporary b-tree
    /// (`DISTINCT state, kind, id`) and a row lookup per pending value for the oldest, and it
    /// needs no index beyond the writer's: every index on the state is rewritten by each
    /// staged → pending → confirmed step of the hot path.
    pub async fn outbox_summary(&self) -> Result<OutboxSummary, StoreError> {
        let mut conn = self.session().await?;
        let summary = outbox_summary_in(&mut conn).await?;
        end_session(conn).await?;
        Ok(summary)
    }
}

/// Per state (in `crate::store::outbox::STATES` order) the values, then the entities, then the oldest pending enqueue.
pub(super) const SUMMARY_SQL: &str = "
    SELECT coalesce(sum(ns), 0), coalesce(sum(np), 0), coalesce(sum(nh), 0),
           coalesce(sum(nu), 0), coalesce(sum(nd), 0),
           coalesce(sum(ns > 0), 0), coalesce(sum(np > 0), 0), coalesce(sum(nh > 0), 0),
           coalesce(sum(nu > 0), 0), coalesce(sum(nd > 0), 0),
           min(op)
    FROM (SELECT sum(state = 'staged') AS ns, sum(state = 'pending') AS np,
                 sum(state = 'held') AS nh, sum(state = 'unmatched') AS nu,
                 sum(state = 'dead') AS nd,
                 min(CASE WHEN state = 'pending' THEN enqueued_at END) AS op
          FROM outbox GROUP BY kind, pendo_id)";

/// [`SUMMARY_SQL`] for PostgreSQL: no sum of booleans (`count(*) FILTER` instead), an outer
/// `sum(bigint)` is numeric (cast back to bigint), and the derived table needs an alias.
pub(super) const PG_SUMMARY_SQL: &str = "
    SELECT coalesce(sum(ns), 0)::bigint, coalesce(sum(np), 0)::bigint, coalesce(sum(nh), 0)::bigint,
           coalesce(sum(nu), 0)::bigint, coalesce(sum(nd), 0)::bigint,
           count(*) FILTER (WHERE ns > 0), count(*) FILTER (WHERE np > 0), count(*) FILTER (WHERE nh > 0),
           count(*) FILTER (WHERE nu > 0), count(*) FILTER (WHERE nd > 0),
           min(op)
    FROM (SELECT count(*) FILTER (WHERE state = 'staged') AS ns,
                 count(*) FILTER (WHERE state = 'pending') AS np,
                 count(*) FILTER (WHERE state = 'held') AS nh,
                 count(*) FILTER (WHERE state = 'unmatched') AS nu,
                 count(*) FILTER (WHERE state = 'dead') AS nd,
                 min(enqueued_at) FILTER (WHERE state = 'pending') AS op
          FROM outbox GROUP BY kind, pendo_id) AS per_entity";

/// [`Store::outbox_summary`] on a given connection (a [`super::Snapshot`]'s transaction, or one of the pool's).
pub(super) async fn outbox_summary_in(conn: &mut Conn) -> Result<OutboxSummary, StoreError> {
    let row = query(if PG { PG_SUMMARY_SQL } else { SUMMARY_SQL })
        .fetch_one(&mut *conn)
        .await?;
    let mut summary = OutboxSummary::default();
    for (i, state) in crate::store::outbox::STATES.iter().enumerate() {
        summary.values.insert(state, row.get(i));
        summary
            .ids
            .insert(state, row.get(i + crate::store::outbox::STATES.len()));
    }
    summary.oldest_pending_at = row.get(2 * crate::store::outbox::STATES.len());
    Ok(summary)
}
