//! What both back-ends share: the handle, how transactions begin (snapshots, fencing), and
//! the state's small tables (watermarks, records set aside, cycles, durable facts).
//!
//! The files of `store/sql/` are compiled once per back-end (`store/sqlite/`, `store/pg/`),
//! with `Db` and `PG` naming it: one copy of the Rust code, and where the SQL differs the two
//! texts side by side (`if PG { .. } else { .. }`), so neither can drift from the other.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use sqlx::Row;

use super::{Conn, Db, DbRow, PG};
use super::{claims, digest, history, holds, outbox, pages, shadow};
use super::{end_session, query};
use crate::connectors::Watermark;
use crate::domain::now_ms;
use crate::store::FenceCheck;
use crate::store::*;

/// How long a background checkpoint waits after the write that asked for it (SQLite).
const CHECKPOINT_PACE: std::time::Duration = std::time::Duration::from_millis(200);

/// A handle on one back-end's state. Cheap to clone (a pool inside).
#[derive(Clone)]
pub struct Backend {
    pub(crate) pool: sqlx::Pool<Db>,
    /// The state file, or (PostgreSQL) the URL without its password: for messages.
    pub(crate) path: PathBuf,
    pub(crate) pause: Arc<Mutex<Option<PauseHook>>>,
    /// The lease this process writes under, if it holds one (PostgreSQL).
    pub(crate) fence: Fence,
    /// Rows written since the planner's statistics were last refreshed, and when (PostgreSQL).
    pub(crate) stats: Arc<StatsRefresh>,
    /// The WAL's checkpoints, made in the background after writes (SQLite; see
    /// [`Backend::note_written`]).
    pub(crate) checkpoints: Arc<Rounds>,
    /// Per kind, the last Pendo id the previous claim took, when more may follow (PostgreSQL):
    /// the next claim goes on from there instead of stepping over the dead index entries of
    /// every batch already settled.
    pub(crate) claim_cursor: Arc<Mutex<std::collections::HashMap<Kind, String>>>,
    /// The leader lease's own connection (PostgreSQL): renewals never wait behind the pool's
    /// other work (pages, the writer's settles, status reads), nor behind its closing.
    pub(crate) lease_pool: Option<sqlx::Pool<Db>>,
    /// Whether the state answered the last ping, and the log lines of an outage.
    pub(crate) reach: Arc<Reach>,
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Backend {
    /// A transaction whose reads all see one committed moment. SQLite's WAL gives every read
    /// transaction that; PostgreSQL's default (read committed) takes a new snapshot per
    /// statement, so the transaction asks for repeatable read.
    ///
    /// On PostgreSQL every transaction here (reads and writes) also has its statements planned
    /// for the tables as they are now (`plan_cache_mode`, set for the transaction only, so safe
    /// behind PgBouncer). The outbox and the shadow grow and shrink by hundreds of thousands of
    /// rows within minutes; a generic plan (PostgreSQL's choice after five runs of a prepared
    /// statement) made while the shadow was small nested-looped over all of it as it grew: the
    /// writer's shadow read took 63 ms, then 1.75 s, within one push. Planning each time did
    /// not show in the 1M reconcile (BENCHMARKS.md).
    pub(crate) async fn begin_read(&self) -> Result<sqlx::Transaction<'static, Db>, StoreError> {
        if PG {
            // One round trip: a custom BEGIN goes as a simple query, settings included.
            return begin_on(
                &self.pool,
                Some(
                    "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY;
                     SET LOCAL plan_cache_mode = force_custom_plan",
                ),
            )
            .await;
        }
        begin_on(&self.pool, None).await
    }

    /// After a write: on SQLite, a checkpoint soon ([`Backend::checkpoint_soon`]). Counts
    /// `rows` written; on PostgreSQL, every 10,000 refreshes the statistics of the
    /// tables that grow and shrink in bursts (a first sync fills the outbox, its push drains it
    /// into the shadow). Autovacuum would do it within a minute or so; until then the planner
    /// believes the outbox empty (or full) and chooses plans for the wrong table (the first
    /// push of 100,000 records ran at a tenth of Pendo's allowed rate). In the background, one
    /// at a time and at most every 5 s: the writer does not wait for it, and a refresh after
    /// every few batches would take a core of its own (ANALYZE reads a sample of both tables).
    pub(crate) async fn note_written(&self, rows: usize) {
        if !PG {
            return self.checkpoint_soon();
        }
        if rows == 0 {
            return;
        }
        if !self.stats.note(rows as u64, std::time::Instant::now()) {
            return;
        }
        if !self.stats.rounds.request() {
            return;
        }
        let (stats, pool) = (self.stats.clone(), self.pool.clone());
        tokio::spawn(async move {
            while stats.rounds.round() {
                if let Err(e) = sqlx::raw_sql("ANALYZE outbox, shadow").execute(&pool).await {
                    tracing::warn!(error = %e, "Cannot refresh the planner's statistics.");
                }
            }
        });
    }

    /// SQLite: copies the WAL back into the state file in the background, a moment after a
    /// write (writes in that moment are copied with it). SQLite would otherwise checkpoint
    /// inside the commit that grows the WAL past its limit: a page of a cycle that rewrites
    /// claims and digests spread over a million records dirties thousands of pages, so every
    /// commit paid a checkpoint (40 of the 110 ms of each page of a 1M incremental,
    /// BENCHMARKS.md). A passive checkpoint waits for no reader or writer; the connection's
    /// own `wal_autocheckpoint` stays as the bound should these fall behind. Called after the
    /// commits that write the most (pages, settles, the guard, adoption, a decided hold); on
    /// PostgreSQL it does nothing.
    pub(crate) fn checkpoint_soon(&self) {
        if PG || !self.checkpoints.request() {
            return;
        }
        let (rounds, pool) = (self.checkpoints.clone(), self.pool.clone());
        tokio::spawn(async move {
            while rounds.round() {
                tokio::time::sleep(CHECKPOINT_PACE).await;
                if let Err(e) = sqlx::raw_sql("PRAGMA wal_checkpoint(PASSIVE)")
                    .execute(&pool)
                    .await
                {
                    if pool.is_closed() {
                        break;
                    }
                    tracing::warn!(error = %e, "Cannot checkpoint the state file's WAL.");
                }
            }
        });
    }

    /// `rows` of the outbox changed state at once (a guard pass): on PostgreSQL, from 10,000
    /// on, the statistics are refreshed before this returns, so the writer's next claims are
    /// planned for the queue as it now is (rows seen as staged made every claim of a
    /// 100,000-record first push sort the whole queue, 100+ ms a batch).
    /// The change is committed either way: a failed refresh is only a warning.
    pub(crate) async fn note_reshaped(&self, rows: usize) {
        if !PG || (rows as u64) < StatsRefresh::ROWS {
            return self.note_written(rows).await;
        }
        match sqlx::raw_sql("ANALYZE outbox").execute(&self.pool).await {
            Ok(_) => self.stats.refreshed(std::time::Instant::now()),
            Err(e) => tracing::warn!(error = %e, "Cannot refresh the planner's statistics."),
        }
    }

    /// A transaction that changes the state. While this process holds the lease (PostgreSQL),
    /// its first statement checks the lease is still this process's, under the same epoch and
    /// unexpired, and keeps the lease row key-share-locked until the transaction ends: a
    /// standby's takeover (which locks the row `FOR UPDATE` first) waits for it, while the
    /// leader's own renewals (plain updates) do not, however long the transaction. A leader
    /// that stalled past its lease commits nothing ([`StoreError::LostLease`]).
    pub(crate) async fn begin_write(&self) -> Result<sqlx::Transaction<'static, Db>, StoreError> {
        let mut tx = if PG {
            // Planned as in `begin_read`, in the same round trip as BEGIN.
            begin_on(
                &self.pool,
                Some("BEGIN; SET LOCAL plan_cache_mode = force_custom_plan"),
            )
            .await?
        } else {
            begin_on(&self.pool, None).await?
        };
        let (holder, epoch) = match self.fence.check() {
            FenceCheck::Unfenced => return Ok(tx),
            FenceCheck::Refuse(epoch) => return Err(StoreError::LostLease { epoch }),
            FenceCheck::Check(holder, epoch) => (holder, epoch),
        };
        if PG {
            // A leader stopped (SIGSTOP, a VM pause) inside this transaction would keep the
            // lease row locked and block the standby's takeover: the server ends the session
            // if it sits idle in the transaction for half a lease.
            let valid = query(
                "SELECT set_config('idle_in_transaction_session_timeout', $3, true)
                 FROM leader_lease
                 WHERE id = 1 AND holder = $1 AND epoch = $2 AND expires_at > clock_timestamp()
                 FOR KEY SHARE",
            )
            .bind(&holder)
            .bind(epoch)
            .bind((self.fence.ttl_ms() / 2).max(1000).to_string())
            .fetch_optional(&mut *tx)
            .await?;
            if valid.is_none() {
                self.fence.lost();
                return Err(StoreError::LostLease { epoch });
            }
            self.pause_at(PausePoint::InFencedWrite).await;
        }
        Ok(tx)
    }
}

/// Begins a transaction on a connection of `pool` (with `statement` instead of a plain BEGIN),
/// in a task of its own: a caller dropped while the BEGIN is on its way (a request given up by
/// its client, a timeout) must not leave a connection in a transaction sqlx does not know of.
/// sqlx counts the transaction only once the server's answer is read; dropped before that, the
/// connection went back to the pool inside the transaction, and the next user's statements ran
/// in it (a BEGIN there: "there is already a transaction in progress"; a write after a read
/// transaction's BEGIN: refused as read-only). Spawned, the BEGIN completes, and a transaction
/// nobody awaits any more is rolled back as it is dropped.
pub(crate) async fn begin_on(
    pool: &sqlx::Pool<Db>,
    statement: Option<&'static str>,
) -> Result<sqlx::Transaction<'static, Db>, StoreError> {
    let pool = pool.clone();
    let begin = tokio::spawn(async move {
        match statement {
            Some(sql) => pool.begin_with(sql).await,
            None => pool.begin().await,
        }
    });
    match begin.await {
        Ok(tx) => Ok(tx?),
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        // The runtime is shutting down.
        Err(_) => Err(sqlx::Error::PoolClosed.into()),
    }
}

async fn shadow_seq(conn: &mut Conn) -> Result<i64, StoreError> {
    let row = query("SELECT seq FROM shadow_seq WHERE id = 1")
        .fetch_one(&mut *conn)
        .await?;
    Ok(row.get(0))
}

impl Backend {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Installs (or removes) a test's pause hook on this handle and its clones.
    pub fn set_pause_hook(&self, hook: Option<PauseHook>) {
        *self.pause.lock().expect("pause hook lock") = hook;
    }

    pub(crate) async fn pause_at(&self, point: PausePoint) {
        let hook = self.pause.lock().expect("pause hook lock").clone();
        if let Some(hook) = hook {
            hook(point).await;
        }
    }

    pub fn pool(&self) -> &sqlx::Pool<Db> {
        &self.pool
    }

    /// Closes the pool, checkpointing the WAL.
    pub async fn close(&self) {
        self.pool.close().await;
        if let Some(lease) = &self.lease_pool {
            lease.close().await;
        }
    }

    /// A trivial query, bounded by [`PING_LIMIT`]: is the state usable (for `/readyz` and the
    /// database watch). Records whether it answered (see `Reach`).
    pub async fn ping(&self) -> Result<(), StoreError> {
        // A simple query (one message, no prepared statement): safe behind a pooler outside a
        // transaction.
        let answer =
            tokio::time::timeout(PING_LIMIT, sqlx::raw_sql("SELECT 1").execute(&self.pool))
                .await
                .unwrap_or_else(|_| {
                    Err(sqlx::Error::Io(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("no answer within {} ms", PING_LIMIT.as_millis()),
                    )))
                });
        match answer {
            Ok(_) => {
                self.reach.answered(&self.path);
                Ok(())
            }
            Err(e) => {
                let e = StoreError::Sql(e);
                self.reach.lost(&self.path, &e);
                Err(e)
            }
        }
    }

    /// What a page's diff compares against: the confirmed shadow and the queued outbox values of
    /// `ids`.
    ///
    /// Both are read in one read transaction, so they are one snapshot: a writer settling
    /// between two separate reads (shadow A → B, its outbox row deleted) would otherwise show the
    /// diff "shadow A, nothing queued". The snapshot's shadow sequence number goes with it, so
    /// a digest computed from it is only written if the shadow rows did not change since (see
    /// [`PageCommit::digests`]).
    pub async fn load_diff_state(
        &self,
        kind: crate::domain::Kind,
        ids: &[&str],
    ) -> Result<DiffState, StoreError> {
        let mut tx = self.begin_read().await?;
        // The first read starts the snapshot (WAL): the sequence number is read inside it.
        let seq = shadow_seq(&mut tx).await?;
        let shadow = shadow::load_records(&mut tx, kind, ids).await?;
        self.pause_at(PausePoint::BetweenDiffReads).await;
        let outbox = outbox::load_values(&mut tx, kind, ids).await?;
        tx.commit().await?;
        Ok(DiffState {
            shadow,
            outbox,
            shadow_seq: seq,
        })
    }

    /// The shadow's sequence number now: every settle that writes shadow rows takes the next one
    /// and stamps them with it.
    pub async fn shadow_seq(&self) -> Result<i64, StoreError> {
        let mut conn = self.session().await?;
        let seq = shadow_seq(&mut conn).await?;
        end_session(conn).await?;
        Ok(seq)
    }

    // ---- watermarks -------------------------------------------------------------------------

    pub async fn watermark(&self, mapping: &str) -> Result<Option<Watermark>, StoreError> {
        let mut session = self.session().await?;
        let row = query("SELECT value FROM watermarks WHERE mapping = $1")
            .bind(mapping)
            .fetch_optional(&mut *session)
            .await?;
        end_session(session).await?;
        Ok(row.map(|r| Watermark(r.get::<String, _>(0))))
    }

    pub async fn watermarks(&self) -> Result<Vec<(String, Watermark, i64)>, StoreError> {
        let mut conn = self.session().await?;
        let marks = watermarks_in(&mut conn).await?;
        end_session(conn).await?;
        Ok(marks)
    }

    /// Writes one page's outcome atomically: outbox changes (latest wins), set-aside records, and
    /// the watermark. This is guarantee 2's transaction.
    pub async fn commit_page(&self, page: &PageCommit<'_>) -> Result<(), StoreError> {
        let now = now_ms();
        let mut tx = self.begin_write().await?;
        if PG && page.digests.is_some() {
            // A settle's `UPDATE shadow_seq` holds this row until it commits: waiting for it
            // first orders this page's digests after any settle in flight (they then see its
            // shadow rows), and taking it before any outbox row avoids a lock cycle with one.
            query("SELECT seq FROM shadow_seq WHERE id = 1 FOR SHARE")
                .execute(&mut *tx)
                .await?;
        }
        let state = if page.stage { "staged" } else { "pending" };
        // The rows and their detections (history) in one pass over the changes.
        outbox::enqueue(&mut tx, page.changes, state, now, page.run).await?;
        if page.stage && !page.cover.is_empty() {
            // `WHERE true`: SQLite's parser needs it before an upsert's ON CONFLICT. PostgreSQL
            // walks the array with `jsonb_array_elements`, casts the count (`->>` gives text) and
            // needs the table's name on `covered` in the SET (unqualified, it is ambiguous).
            query(if PG {
                "INSERT INTO staged_cover (mapping, field, covered)
                 SELECT $1, e.value ->> 0, (e.value ->> 1)::bigint
                 FROM jsonb_array_elements($2::jsonb) AS e(value)
                 ON CONFLICT (mapping, field)
                 DO UPDATE SET covered = staged_cover.covered + excluded.covered"
            } else {
                "INSERT INTO staged_cover (mapping, field, covered)
                 SELECT $1, e.value ->> 0, e.value ->> 1 FROM json_each($2) AS e WHERE true
                 ON CONFLICT (mapping, field) DO UPDATE SET covered = covered + excluded.covered"
            })
            .bind(page.mapping)
            .bind(serde_json::to_string(page.cover).expect("cover serializes"))
            .execute(&mut *tx)
            .await?;
        }
        let withdraw =
            history::from_outbox("kind = $4 AND pendo_id = $5 AND field = $6 AND leased = 0");
        for c in page.unqueue {
            query(sqlx::AssertSqlSafe(withdraw.as_str()))
                .bind(now)
                .bind(Event::Withdrawn as i64)
                .bind(page.run)
                .bind(c.kind.as_str())
                .bind(&c.pendo_id)
                .bind(&c.field)
                .execute(&mut *tx)
                .await?;
            query("DELETE FROM outbox WHERE kind = $1 AND pendo_id = $2 AND field = $3 AND leased = 0")
                .bind(c.kind.as_str())
                .bind(&c.pendo_id)
                .bind(&c.field)
                .execute(&mut *tx)
                .await?;
        }
        if !page.valid_crm_ids.is_empty() {
            let ids = serde_json::to_string(page.valid_crm_ids).expect("strings serialize");
            query(if PG {
                "DELETE FROM invalid_records
                 WHERE mapping = $1 AND crm_id IN (SELECT jsonb_array_elements_text($2::jsonb))"
            } else {
                "DELETE FROM invalid_records WHERE mapping = $1 AND crm_id IN (SELECT value FROM json_each($2))"
            })
            .bind(page.mapping)
            .bind(ids)
            .execute(&mut *tx)
            .await?;
        }
        for r in page.invalid {
            query(
                "INSERT INTO invalid_records (mapping, crm_id, pendo_id, reason, detail, seen_at)
                 VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (mapping, crm_id) DO UPDATE SET pendo_id = excluded.pendo_id,
                   reason = excluded.reason, detail = excluded.detail, seen_at = excluded.seen_at",
            )
            .bind(&r.mapping)
            .bind(&r.crm_id)
            .bind(&r.pendo_id)
            .bind(&r.reason)
            .bind(&r.detail)
            .bind(r.seen_at)
            .execute(&mut *tx)
            .await?;
        }
        // The connector contract says watermarks never move backward; a mark behind the stored
        // one (a connector bug, a clock step) is not stored, so no change before it is re-read
        // forever or skipped.
        let stored = match page.watermark {
            Some(_) => query("SELECT value FROM watermarks WHERE mapping = $1")
                .bind(page.mapping)
                .fetch_optional(&mut *tx)
                .await?
                .map(|r| Watermark(r.get::<String, _>(0))),
            None => None,
        };
        let behind = match (page.watermark, &stored) {
            (Some(w), Some(s)) => w.is_behind(s),
            _ => false,
        };
        if behind {
            // A full pull may end on a mark with the same time and a smaller id (HubSpot's full
            // pulls restart the id): not news, but never stored.
            tracing::debug!(
                mapping = page.mapping,
                new = %page.watermark.map(|w| w.0.as_str()).unwrap_or(""),
                stored = %stored.as_ref().map(|w| w.0.as_str()).unwrap_or(""),
                "A pull returned a watermark behind the stored one; keeping the stored one."
            );
        }
        if let Some(w) = page.watermark.filter(|_| !behind) {
            query(
                "INSERT INTO watermarks (mapping, value, updated_at) VALUES ($1, $2, $3)
                 ON CONFLICT (mapping) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
            )
            .bind(page.mapping)
            .bind(&w.0)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        claims::write(&mut tx, page.mapping, page.claims).await?;
        claims::forget(&mut tx, page.kind, page.mapping, page.forget).await?;
        if let Some((kind, digests, seq)) = page.digests {
            digest::write_digests(&mut tx, kind, page.mapping, digests, seq).await?;
        }
        tx.commit().await?;
        self.note_written(page.changes.len()).await;
        Ok(())
    }

    // ---- invalid records ----------------------------------------------------------------------

    pub async fn invalid_records(
        &self,
        mapping: Option<&str>,
    ) -> Result<Vec<InvalidRecord>, StoreError> {
        let mut session = self.session().await?;
        let rows = query(
            "SELECT mapping, crm_id, pendo_id, reason, detail, seen_at FROM invalid_records
             WHERE ($1 IS NULL OR mapping = $1) ORDER BY mapping, crm_id",
        )
        .bind(mapping)
        .fetch_all(&mut *session)
        .await?;
        end_session(session).await?;
        Ok(rows.iter().map(invalid_from_row).collect())
    }

    /// Whether any record of `mapping` is set aside (lets a clean pull skip clearing them).
    pub async fn has_invalid_records(&self, mapping: &str) -> Result<bool, StoreError> {
        let mut session = self.session().await?;
        let row = query("SELECT EXISTS (SELECT 1 FROM invalid_records WHERE mapping = $1)")
            .bind(mapping)
            .fetch_one(&mut *session)
            .await?;
        end_session(session).await?;
        // A boolean on PostgreSQL, an integer on SQLite (which decodes as `bool` too).
        Ok(row.get::<bool, _>(0))
    }

    pub async fn drop_invalid(
        &self,
        mapping: Option<&str>,
        crm_id: Option<&str>,
    ) -> Result<u64, StoreError> {
        let mut tx = self.begin_write().await?;
        let done = query(
            "DELETE FROM invalid_records WHERE ($1 IS NULL OR mapping = $1) AND ($2 IS NULL OR crm_id = $2)",
        )
        .bind(mapping)
        .bind(crm_id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(done.rows_affected())
    }

    // ---- runs -------------------------------------------------------------------------------

    pub async fn start_run(&self, mapping: &str, mode: &str) -> Result<i64, StoreError> {
        let mut tx = self.begin_write().await?;
        let row =
            query("INSERT INTO runs (mapping, mode, started_at) VALUES ($1, $2, $3) RETURNING id")
                .bind(mapping)
                .bind(mode)
                .bind(now_ms())
                .fetch_one(&mut *tx)
                .await?;
        tx.commit().await?;
        Ok(row.get(0))
    }

    pub async fn finish_run(
        &self,
        id: i64,
        pulled: u64,
        changes: u64,
        invalid: u64,
        error: Option<&str>,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        query(
            "UPDATE runs SET finished_at = $2, ok = $3, pulled = $4, changes = $5, invalid = $6, error = $7
             WHERE id = $1",
        )
        .bind(id)
        .bind(now_ms())
        .bind(error.is_none())
        .bind(pulled as i64)
        .bind(changes as i64)
        .bind(invalid as i64)
        .bind(error)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// When the mapping's latest successful cycle finished. Walks the mapping's runs newest
    /// first and stops at the first success, so a long history of runs costs nothing.
    pub async fn last_success_at(&self, mapping: &str) -> Result<Option<i64>, StoreError> {
        let mut conn = self.session().await?;
        let at = last_success_at_in(&mut conn, mapping).await?;
        end_session(conn).await?;
        Ok(at)
    }

    // ---- kv ---------------------------------------------------------------------------------

    pub async fn kv_get(&self, key: &str) -> Result<Option<serde_json::Value>, StoreError> {
        let mut conn = self.session().await?;
        let value = kv_get_in(&mut conn, key).await?;
        end_session(conn).await?;
        Ok(value)
    }

    pub async fn kv_set(&self, key: &str, value: &serde_json::Value) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        query(
            "INSERT INTO kv (key, value, updated_at) VALUES ($1, $2, $3)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
        )
        .bind(key)
        .bind(value.to_string())
        .bind(now_ms())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn kv_prefix(
        &self,
        prefix: &str,
    ) -> Result<Vec<(String, serde_json::Value)>, StoreError> {
        let mut conn = self.session().await?;
        // Not LIKE: no escaping of `_` and `%`. The kv holds a few dozen keys.
        let rows =
            query("SELECT key, value FROM kv WHERE substr(key, 1, length($1)) = $1 ORDER BY key")
                .bind(prefix)
                .fetch_all(&mut *conn)
                .await?;
        end_session(conn).await?;
        rows.iter()
            .map(|r| {
                let key: String = r.get(0);
                let text: String = r.get(1);
                serde_json::from_str(&text)
                    .map(|v| (key.clone(), v))
                    .map_err(|e| StoreError::Corrupt(format!("kv {key}: {e}")))
            })
            .collect()
    }

    pub async fn kv_delete(&self, key: &str) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        query("DELETE FROM kv WHERE key = $1")
            .bind(key)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }
}

/// One consistent read of the state: every read through it sees the same committed moment (a
/// read transaction: SQLite's WAL keeps that moment for it while writers go on). The status
/// model reads through one, so its numbers agree with each other.
pub struct Snapshot {
    tx: sqlx::Transaction<'static, Db>,
}

impl Backend {
    /// A [`Snapshot`]: its moment is fixed by its first read.
    pub async fn snapshot(&self) -> Result<Snapshot, StoreError> {
        Ok(Snapshot {
            tx: self.begin_read().await?,
        })
    }
}

/// The reads of the status model, each the same code as the [`Store`] method of that name.
impl Snapshot {
    pub async fn watermarks(&mut self) -> Result<Vec<(String, Watermark, i64)>, StoreError> {
        watermarks_in(&mut self.tx).await
    }

    pub async fn last_success_at(&mut self, mapping: &str) -> Result<Option<i64>, StoreError> {
        last_success_at_in(&mut self.tx, mapping).await
    }

    pub async fn kv_get(&mut self, key: &str) -> Result<Option<serde_json::Value>, StoreError> {
        kv_get_in(&mut self.tx, key).await
    }

    pub async fn held_values_by_mapping(
        &mut self,
    ) -> Result<std::collections::BTreeMap<String, i64>, StoreError> {
        holds::held_values_by_mapping_in(&mut self.tx).await
    }

    pub async fn holds(&mut self, open_only: bool) -> Result<Vec<Hold>, StoreError> {
        holds::holds_in(&mut self.tx, open_only).await
    }

    pub async fn history_count(&mut self) -> Result<i64, StoreError> {
        history::history_count_in(&mut self.tx).await
    }

    pub async fn outbox_summary(&mut self) -> Result<OutboxSummary, StoreError> {
        outbox::outbox_summary_in(&mut self.tx).await
    }

    pub async fn invalid_count(&mut self) -> Result<i64, StoreError> {
        pages::invalid_count_in(&mut self.tx).await
    }

    pub async fn recent_runs(
        &mut self,
        mapping: &str,
        limit: u32,
    ) -> Result<Vec<RunRecord>, StoreError> {
        pages::recent_runs_in(&mut self.tx, mapping, limit).await
    }

    pub async fn chart(
        &mut self,
        end: i64,
        width: i64,
        slots: usize,
    ) -> Result<Vec<ChartSlot>, StoreError> {
        pages::chart_in(&mut self.tx, end, width, slots).await
    }

    /// Ends the read (it wrote nothing).
    pub async fn close(self) -> Result<(), StoreError> {
        self.tx.rollback().await?;
        Ok(())
    }
}

/// An `invalid_records` row read as mapping, crm_id, pendo_id, reason, detail, seen_at.
pub(super) fn invalid_from_row(r: &DbRow) -> InvalidRecord {
    InvalidRecord {
        mapping: r.get(0),
        crm_id: r.get(1),
        pendo_id: r.get(2),
        reason: r.get(3),
        detail: r.get(4),
        seen_at: r.get(5),
    }
}

/// A `runs` row whose first ten columns are id, mapping, mode, started_at, finished_at, ok,
/// pulled, changes, invalid, error.
pub(super) fn run_from_row(r: &DbRow) -> RunRecord {
    RunRecord {
        id: r.get(0),
        mapping: r.get(1),
        mode: r.get(2),
        started_at: r.get(3),
        finished_at: r.get(4),
        ok: r.get(5),
        pulled: r.get(6),
        changes: r.get(7),
        invalid: r.get(8),
        error: r.get(9),
    }
}

/// [`Store::watermarks`] on a given connection (a [`super::Snapshot`]'s transaction, or one of the pool's).
pub(super) async fn watermarks_in(
    conn: &mut Conn,
) -> Result<Vec<(String, Watermark, i64)>, StoreError> {
    let rows = query("SELECT mapping, value, updated_at FROM watermarks ORDER BY mapping")
        .fetch_all(&mut *conn)
        .await?;
    Ok(rows
        .into_iter()
        .map(|r| (r.get(0), Watermark(r.get(1)), r.get(2)))
        .collect())
}

/// [`Store::last_success_at`] on a given connection (a [`super::Snapshot`]'s transaction, or one of the pool's).
pub(super) async fn last_success_at_in(
    conn: &mut Conn,
    mapping: &str,
) -> Result<Option<i64>, StoreError> {
    let row = query(if PG {
        pages::PG_LAST_SUCCESS_SQL
    } else {
        pages::LAST_SUCCESS_SQL
    })
    .bind(mapping)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(row.and_then(|r| r.get(0)))
}

/// [`Store::kv_get`] on a given connection (a [`super::Snapshot`]'s transaction, or one of the pool's).
pub(super) async fn kv_get_in(
    conn: &mut Conn,
    key: &str,
) -> Result<Option<serde_json::Value>, StoreError> {
    let row = query("SELECT value FROM kv WHERE key = $1")
        .bind(key)
        .fetch_optional(&mut *conn)
        .await?;
    row.map(|r| {
        let text: String = r.get(0);
        serde_json::from_str(&text).map_err(|e| StoreError::Corrupt(format!("kv {key}: {e}")))
    })
    .transpose()
}
