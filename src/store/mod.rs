//! The state file: one SQLite database (WAL) holding the shadow copy, the outbox, watermarks,
//! records set aside, run history and a few durable facts.
//!
//! The store owns every SQL statement. Two rules it enforces for the rest of the crate:
//!
//! - **The shadow is what Pendo confirmed.** Only [`Store::settle`] with [`Settlement::Confirmed`]
//!   writes to it, and the writer calls that only for ids Pendo answered 2xx for and did not list
//!   in `missing` or `errors`.
//! - **No change is lost.** [`Store::commit_page`] writes a page's changes to the outbox and moves
//!   the mapping's watermark in one transaction; a crash before commit re-reads the page, a crash
//!   after it finds the changes in the outbox.
//! - **A value digest never outlives what it summarised** (see `digest.rs`): triggers delete an
//!   entity's digests whenever its shadow row or outbox rows change.
//!
//! The file is created readable and writable by its owner only: it holds the CRM data we sync and,
//! for OAuth flows, rotated refresh tokens.

mod claims;
mod digest;
mod history;
mod holds;
mod outbox;
mod pages;
mod shadow;

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};

pub use claims::Claim;
pub use history::{BatchInfo, Event, HistoryEvent, HoldInfo, SentBatch, Source};
pub use holds::{GuardOutcome, Hold, HoldError};
pub use outbox::{
    Change, OutboxEntry, OutboxKey, OutboxSummary, QueueFilter, QueueState, Settlement,
};
pub use pages::{ChartSlot, InvalidCursor, OutboxCursor, Page};
pub use shadow::ShadowRecord;

use crate::connectors::Watermark;
use crate::domain::now_ms;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state file {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: sqlx::Error,
    },
    #[error("state file {path}: {message}")]
    Io { path: PathBuf, message: String },
    #[error("state file migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("state file query failed: {0}")]
    Sql(#[from] sqlx::Error),
    #[error("state file holds an unreadable value: {0}")]
    Corrupt(String),
}

/// A handle on the state file. Cheap to clone (a pool inside).
#[derive(Clone)]
pub struct Store {
    pool: SqlitePool,
    path: PathBuf,
    pause: Arc<Mutex<Option<PauseHook>>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// Where a test may pause the store between two statements, to make a race deterministic
/// (mini-redis and supabase/etl use the same kind of seam). Production code never sets a hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PausePoint {
    /// [`Store::load_diff_state`]: the shadow was read, the outbox not yet.
    BetweenDiffReads,
    /// [`Store::load_digests`]: the digests were read, the outbox ids not yet.
    BetweenDigestReads,
}

/// A test's pause: called at a [`PausePoint`], the store waits for the future it returns.
pub type PauseHook = Arc<
    dyn Fn(PausePoint) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>
        + Send
        + Sync,
>;

/// One row of `invalid_records`: a CRM record set aside with its reason.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct InvalidRecord {
    pub mapping: String,
    pub crm_id: String,
    pub pendo_id: Option<String>,
    /// Short machine-friendly reason: `missing_id`, `bad_value`, `ambiguous_id`.
    pub reason: String,
    /// The full human message, naming the record and field.
    pub detail: String,
    pub seen_at: i64,
}

/// The state a page's diff reads (see [`Store::load_diff_state`]).
#[derive(Debug, Default)]
pub struct DiffState {
    pub shadow: std::collections::HashMap<String, ShadowRecord>,
    pub outbox: std::collections::HashMap<String, std::collections::HashMap<String, String>>,
    /// The shadow sequence number of the snapshot.
    pub shadow_seq: i64,
}

async fn shadow_seq(conn: &mut sqlx::SqliteConnection) -> Result<i64, StoreError> {
    let row = sqlx::query("SELECT seq FROM shadow_seq WHERE id = 1")
        .fetch_one(&mut *conn)
        .await?;
    Ok(row.get(0))
}

/// One row of run history.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunRecord {
    pub id: i64,
    pub mapping: String,
    pub mode: String,
    pub started_at: i64,
    pub finished_at: Option<i64>,
    pub ok: Option<bool>,
    pub pulled: i64,
    pub changes: i64,
    pub invalid: i64,
    pub error: Option<String>,
}

/// A page's digests: the kind, (Pendo id, digest) pairs, and the shadow sequence number of the
/// snapshot the diff read.
pub type PageDigests<'a> = (crate::domain::Kind, &'a [(String, u64)], i64);

/// What [`Store::commit_page`] writes in one transaction.
#[derive(Debug, Default)]
pub struct PageCommit<'a> {
    pub mapping: &'a str,
    pub changes: &'a [Change],
    pub watermark: Option<&'a Watermark>,
    pub invalid: &'a [InvalidRecord],
    /// CRM ids of this mapping that mapped cleanly: any earlier invalid entry is cleared.
    pub valid_crm_ids: &'a [String],
    /// Queued values to withdraw (ambiguous ids); only `kind`, `pendo_id` and `field` are used.
    /// Rows already in flight are left to finish.
    pub unqueue: &'a [Change],
    /// Pendo ids of this page whose diff was empty, with their value digests (see
    /// [`Store::load_digests`]), and the shadow sequence number of the snapshot the diff read
    /// ([`DiffState::shadow_seq`]); written last, only for entities with no outbox rows whose
    /// shadow row has not changed since that snapshot.
    pub digests: Option<PageDigests<'a>>,
    /// Claims of this page's records (see `claims.rs`), written or updated.
    pub claims: &'a [Claim],
    /// CRM ids of records deleted in the CRM: their claims, their Pendo ids' digests (of
    /// `kind`) and set-aside entries go.
    pub forget: &'a [String],
    pub kind: Option<crate::domain::Kind>,
    /// Write the changes as `staged` (the writer does not claim them until the guard passed
    /// the cycle's whole pull), not `pending`.
    pub stage: bool,
    /// With `stage`: per Pendo field, the values the shadow holds among the records this page
    /// covered; kept with the staged rows for the guard (`staged_cover`).
    pub cover: &'a [(String, u64)],
    /// The cycle (`runs.id`) the page belongs to, for the history's detections.
    pub run: Option<i64>,
}

impl Store {
    /// Opens (creating if needed, owner-only) the state file and applies migrations.
    pub async fn open(path: &Path) -> Result<Store, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| StoreError::Io {
                path: path.to_owned(),
                message: format!("cannot create directory {}: {e}", dir.display()),
            })?;
        }
        create_owner_only(path)?;
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // NORMAL in WAL mode survives a process crash (kill -9) with every committed
            // transaction intact; only a power cut can drop the last few, which costs a resend.
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(30))
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await
            .map_err(|source| StoreError::Open {
                path: path.to_owned(),
                source,
            })?;
        MIGRATOR.run(&pool).await?;
        Ok(Store {
            pool,
            path: path.to_owned(),
            pause: Arc::default(),
        })
    }

    /// Opens an existing state file without writing to it (audits, dry runs, status). Fails if
    /// the file does not exist rather than creating one.
    pub async fn open_read_only(path: &Path) -> Result<Store, StoreError> {
        if !path.exists() {
            return Err(StoreError::Io {
                path: path.to_owned(),
                message: "does not exist yet (run `pendo-sync sync` first)".into(),
            });
        }
        // `filename`, not a URL: a path with `?`, `#` or `%` in it is still the path.
        let options = SqliteConnectOptions::new()
            .filename(path)
            .read_only(true)
            .busy_timeout(Duration::from_secs(30));
        let pool = SqlitePoolOptions::new()
            .max_connections(2)
            .connect_with(options)
            .await
            .map_err(|source| StoreError::Open {
                path: path.to_owned(),
                source,
            })?;
        // Read-only means no migration: a state file written by an older version is said so,
        // instead of failing later on a missing table.
        let applied: Option<i64> =
            sqlx::query("SELECT max(version) FROM _sqlx_migrations WHERE success = 1")
                .fetch_one(&pool)
                .await
                .ok()
                .and_then(|r| r.get(0));
        let latest = MIGRATOR.iter().map(|m| m.version).max();
        if applied < latest {
            pool.close().await;
            return Err(StoreError::Io {
                path: path.to_owned(),
                message: "was written by an older pendo-sync: run `pendo-sync sync` (or `run`) once to upgrade it; read-only commands do not change it".into(),
            });
        }
        Ok(Store {
            pool,
            path: path.to_owned(),
            pause: Arc::default(),
        })
    }

    /// An empty state in memory, migrated (a dry run with no state file yet). One connection:
    /// each SQLite connection to `:memory:` is a database of its own.
    pub async fn open_in_memory() -> Result<Store, StoreError> {
        let path = PathBuf::from(":memory:");
        let options = SqliteConnectOptions::from_str("sqlite::memory:")
            .map_err(|source| StoreError::Open {
                path: path.clone(),
                source,
            })?
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(options)
            .await
            .map_err(|source| StoreError::Open {
                path: path.clone(),
                source,
            })?;
        MIGRATOR.run(&pool).await?;
        Ok(Store {
            pool,
            path,
            pause: Arc::default(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Installs (or removes) a test's pause hook on this handle and its clones.
    pub fn set_pause_hook(&self, hook: Option<PauseHook>) {
        *self.pause.lock().expect("pause hook lock") = hook;
    }

    async fn pause_at(&self, point: PausePoint) {
        let hook = self.pause.lock().expect("pause hook lock").clone();
        if let Some(hook) = hook {
            hook(point).await;
        }
    }

    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// Closes the pool, checkpointing the WAL.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// A trivial query: is the state file usable (for `/readyz`).
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
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
        let mut tx = self.pool.begin().await?;
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
        let mut conn = self.pool.acquire().await?;
        shadow_seq(&mut conn).await
    }

    // ---- watermarks -------------------------------------------------------------------------

    pub async fn watermark(&self, mapping: &str) -> Result<Option<Watermark>, StoreError> {
        let row = sqlx::query("SELECT value FROM watermarks WHERE mapping = ?1")
            .bind(mapping)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| Watermark(r.get::<String, _>(0))))
    }

    pub async fn watermarks(&self) -> Result<Vec<(String, Watermark, i64)>, StoreError> {
        let mut conn = self.pool.acquire().await?;
        watermarks_in(&mut conn).await
    }

    /// Writes one page's outcome atomically: outbox changes (latest wins), set-aside records, and
    /// the watermark. This is guarantee 2's transaction.
    pub async fn commit_page(&self, page: &PageCommit<'_>) -> Result<(), StoreError> {
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        let state = if page.stage { "staged" } else { "pending" };
        // The rows and their detections (history) in one pass over the changes.
        outbox::enqueue(&mut tx, page.changes, state, now, page.run).await?;
        if page.stage && !page.cover.is_empty() {
            sqlx::query(
                "INSERT INTO staged_cover (mapping, field, covered)
                 SELECT ?1, e.value ->> 0, e.value ->> 1 FROM json_each(?2) AS e WHERE true
                 ON CONFLICT (mapping, field) DO UPDATE SET covered = covered + excluded.covered",
            )
            .bind(page.mapping)
            .bind(serde_json::to_string(page.cover).expect("cover serializes"))
            .execute(&mut *tx)
            .await?;
        }
        let withdraw =
            history::from_outbox("kind = ?4 AND pendo_id = ?5 AND field = ?6 AND leased = 0");
        for c in page.unqueue {
            sqlx::query(sqlx::AssertSqlSafe(withdraw.as_str()))
                .bind(now)
                .bind(Event::Withdrawn as i64)
                .bind(page.run)
                .bind(c.kind.as_str())
                .bind(&c.pendo_id)
                .bind(&c.field)
                .execute(&mut *tx)
                .await?;
            sqlx::query("DELETE FROM outbox WHERE kind = ?1 AND pendo_id = ?2 AND field = ?3 AND leased = 0")
                .bind(c.kind.as_str())
                .bind(&c.pendo_id)
                .bind(&c.field)
                .execute(&mut *tx)
                .await?;
        }
        if !page.valid_crm_ids.is_empty() {
            let ids = serde_json::to_string(page.valid_crm_ids).expect("strings serialize");
            sqlx::query(
                "DELETE FROM invalid_records WHERE mapping = ?1 AND crm_id IN (SELECT value FROM json_each(?2))",
            )
            .bind(page.mapping)
            .bind(ids)
            .execute(&mut *tx)
            .await?;
        }
        for r in page.invalid {
            sqlx::query(
                "INSERT INTO invalid_records (mapping, crm_id, pendo_id, reason, detail, seen_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
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
            Some(_) => sqlx::query("SELECT value FROM watermarks WHERE mapping = ?1")
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
            sqlx::query(
                "INSERT INTO watermarks (mapping, value, updated_at) VALUES (?1, ?2, ?3)
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
        Ok(())
    }

    // ---- invalid records ----------------------------------------------------------------------

    pub async fn invalid_records(
        &self,
        mapping: Option<&str>,
    ) -> Result<Vec<InvalidRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT mapping, crm_id, pendo_id, reason, detail, seen_at FROM invalid_records
             WHERE (?1 IS NULL OR mapping = ?1) ORDER BY mapping, crm_id",
        )
        .bind(mapping)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(invalid_from_row).collect())
    }

    /// Whether any record of `mapping` is set aside (lets a clean pull skip clearing them).
    pub async fn has_invalid_records(&self, mapping: &str) -> Result<bool, StoreError> {
        let row = sqlx::query("SELECT EXISTS (SELECT 1 FROM invalid_records WHERE mapping = ?1)")
            .bind(mapping)
            .fetch_one(&self.pool)
            .await?;
        Ok(row.get::<i64, _>(0) != 0)
    }

    pub async fn drop_invalid(
        &self,
        mapping: Option<&str>,
        crm_id: Option<&str>,
    ) -> Result<u64, StoreError> {
        let done = sqlx::query(
            "DELETE FROM invalid_records WHERE (?1 IS NULL OR mapping = ?1) AND (?2 IS NULL OR crm_id = ?2)",
        )
        .bind(mapping)
        .bind(crm_id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    // ---- runs -------------------------------------------------------------------------------

    pub async fn start_run(&self, mapping: &str, mode: &str) -> Result<i64, StoreError> {
        let row = sqlx::query(
            "INSERT INTO runs (mapping, mode, started_at) VALUES (?1, ?2, ?3) RETURNING id",
        )
        .bind(mapping)
        .bind(mode)
        .bind(now_ms())
        .fetch_one(&self.pool)
        .await?;
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
        sqlx::query(
            "UPDATE runs SET finished_at = ?2, ok = ?3, pulled = ?4, changes = ?5, invalid = ?6, error = ?7
             WHERE id = ?1",
        )
        .bind(id)
        .bind(now_ms())
        .bind(error.is_none())
        .bind(pulled as i64)
        .bind(changes as i64)
        .bind(invalid as i64)
        .bind(error)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// When the mapping's latest successful cycle finished. Walks the mapping's runs newest
    /// first and stops at the first success, so a long history of runs costs nothing.
    pub async fn last_success_at(&self, mapping: &str) -> Result<Option<i64>, StoreError> {
        let mut conn = self.pool.acquire().await?;
        last_success_at_in(&mut conn, mapping).await
    }

    // ---- kv ---------------------------------------------------------------------------------

    pub async fn kv_get(&self, key: &str) -> Result<Option<serde_json::Value>, StoreError> {
        let mut conn = self.pool.acquire().await?;
        kv_get_in(&mut conn, key).await
    }

    pub async fn kv_set(&self, key: &str, value: &serde_json::Value) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO kv (key, value, updated_at) VALUES (?1, ?2, ?3)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
        )
        .bind(key)
        .bind(value.to_string())
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn kv_delete(&self, key: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM kv WHERE key = ?1")
            .bind(key)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

impl crate::connectors::StateKv for Store {
    fn get<'a>(
        &'a self,
        key: &'a str,
    ) -> crate::connectors::BoxFuture<'a, Result<Option<serde_json::Value>, String>> {
        Box::pin(async move { self.kv_get(key).await.map_err(|e| e.to_string()) })
    }

    fn set<'a>(
        &'a self,
        key: &'a str,
        value: &'a serde_json::Value,
    ) -> crate::connectors::BoxFuture<'a, Result<(), String>> {
        Box::pin(async move { self.kv_set(key, value).await.map_err(|e| e.to_string()) })
    }
}

/// Creates the file with mode 0600 if it does not exist, so the database is never world-readable,
/// not even for the moment before a chmod.
fn create_owner_only(path: &Path) -> Result<(), StoreError> {
    if path.exists() {
        return Ok(());
    }
    let mut options = std::fs::OpenOptions::new();
    options.create(true).append(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options.open(path).map(|_| ()).map_err(|e| StoreError::Io {
        path: path.to_owned(),
        message: format!("cannot create: {e}"),
    })
}

/// Reads a shadow record from its stored JSON text exactly as [`Store::load_shadow`] does (for
/// tests and tools that build shadows by hand).
/// One consistent read of the state: every read through it sees the same committed moment (a
/// read transaction: SQLite's WAL keeps that moment for it while writers go on). The status
/// model reads through one, so its numbers agree with each other.
pub struct Snapshot {
    tx: sqlx::Transaction<'static, sqlx::Sqlite>,
}

impl Store {
    /// A [`Snapshot`]: its moment is fixed by its first read.
    pub async fn snapshot(&self) -> Result<Snapshot, StoreError> {
        Ok(Snapshot {
            tx: self.pool.begin().await?,
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
fn invalid_from_row(r: &sqlx::sqlite::SqliteRow) -> InvalidRecord {
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
fn run_from_row(r: &sqlx::sqlite::SqliteRow) -> RunRecord {
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

pub fn shadow_record_from_json(text: &str) -> Result<ShadowRecord, StoreError> {
    shadow::parse_record(crate::domain::Kind::Account, "-", text)
}

/// [`Store::watermarks`] on a given connection (a [`super::Snapshot`]'s transaction, or one of the pool's).
pub(super) async fn watermarks_in(
    conn: &mut sqlx::SqliteConnection,
) -> Result<Vec<(String, Watermark, i64)>, StoreError> {
    let rows = sqlx::query("SELECT mapping, value, updated_at FROM watermarks ORDER BY mapping")
        .fetch_all(&mut *conn)
        .await?;
    Ok(rows
        .into_iter()
        .map(|r| (r.get(0), Watermark(r.get(1)), r.get(2)))
        .collect())
}

/// [`Store::last_success_at`] on a given connection (a [`super::Snapshot`]'s transaction, or one of the pool's).
pub(super) async fn last_success_at_in(
    conn: &mut sqlx::SqliteConnection,
    mapping: &str,
) -> Result<Option<i64>, StoreError> {
    let row = sqlx::query(pages::LAST_SUCCESS_SQL)
        .bind(mapping)
        .fetch_optional(&mut *conn)
        .await?;
    Ok(row.and_then(|r| r.get(0)))
}

/// [`Store::kv_get`] on a given connection (a [`super::Snapshot`]'s transaction, or one of the pool's).
pub(super) async fn kv_get_in(
    conn: &mut sqlx::SqliteConnection,
    key: &str,
) -> Result<Option<serde_json::Value>, StoreError> {
    let row = sqlx::query("SELECT value FROM kv WHERE key = ?1")
        .bind(key)
        .fetch_optional(&mut *conn)
        .await?;
    row.map(|r| {
        let text: String = r.get(0);
        serde_json::from_str(&text).map_err(|e| StoreError::Corrupt(format!("kv {key}: {e}")))
    })
    .transpose()
}

#[cfg(test)]
mod plan_tests {
    use super::Store;

    async fn plan(store: &Store, sql: &str) -> String {
        let rows: Vec<(i64, i64, i64, String)> =
            sqlx::query_as(sqlx::AssertSqlSafe(format!("EXPLAIN QUERY PLAN {sql}")))
                .fetch_all(store.pool())
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"));
        rows.into_iter().map(|r| r.3).collect::<Vec<_>>().join("; ")
    }

    /// The status model reads through a snapshot: a write committed between two of its reads
    /// is not half seen.
    #[tokio::test]
    async fn a_snapshot_reads_one_moment_while_writers_go_on() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("state.db")).await.unwrap();
        store.kv_set("k", &serde_json::json!(1)).await.unwrap();
        let mut snap = store.snapshot().await.unwrap();
        assert_eq!(snap.kv_get("k").await.unwrap(), Some(serde_json::json!(1)));
        store.kv_set("k", &serde_json::json!(2)).await.unwrap();
        sqlx::query(
            "INSERT INTO invalid_records (mapping, crm_id, reason, detail, seen_at)
             VALUES ('m', 'x', 'bad_value', 'd', 0)",
        )
        .execute(store.pool())
        .await
        .unwrap();
        assert_eq!(
            snap.kv_get("k").await.unwrap(),
            Some(serde_json::json!(1)),
            "the snapshot keeps its moment"
        );
        assert_eq!(snap.invalid_count().await.unwrap(), 0);
        snap.close().await.unwrap();
        assert_eq!(store.kv_get("k").await.unwrap(), Some(serde_json::json!(2)));
        assert_eq!(store.invalid_count().await.unwrap(), 1);
        store.close().await;
    }

    /// The status model is read on every `/metrics` scrape and every console overview: its
    /// reads must not scan the tables that grow with uptime (history, runs, Pendo batches), and
    /// must read the outbox once, without sorting it.
    #[tokio::test]
    async fn the_status_model_s_reads_do_not_scan_what_grows_with_uptime() {
        let store = Store::open_in_memory().await.unwrap();
        for sql in [super::history::COUNT_SQL, super::pages::LAST_SUCCESS_SQL] {
            let plan = plan(&store, sql).await;
            for table in ["history", "runs", "history_batches"] {
                assert!(
                    !plan
                        .split("; ")
                        .any(|step| step.starts_with(&format!("SCAN {table}"))),
                    "{sql}\n  scans {table}: {plan}"
                );
            }
        }
        // The outbox in one pass in key order: no sort of its rows into a temporary b-tree.
        let summary = plan(&store, super::outbox::SUMMARY_SQL).await;
        assert!(!summary.contains("TEMP B-TREE"), "{summary}");
        // A mapping's last runs: a range of its index, newest first.
        let runs = plan(&store, super::pages::RECENT_RUNS_SQL).await;
        assert!(
            runs.contains("SEARCH runs USING INDEX runs_by_mapping"),
            "{runs}"
        );
        // Held values per mapping: from the holds (one row per hold), not the held rows.
        let held = plan(&store, super::holds::HELD_PER_MAPPING_SQL).await;
        assert!(!held.contains("outbox"), "{held}");
        // The chart: a range of the cycles' start times, and of the requests' send times read
        // from the index alone.
        let runs = plan(&store, super::pages::CHART_RUNS_SQL).await;
        assert!(
            runs.contains("SEARCH runs USING INDEX runs_by_start"),
            "{runs}"
        );
        let requests = plan(&store, super::pages::CHART_REQUESTS_SQL).await;
        assert!(
            requests
                .contains("SEARCH history_batches USING COVERING INDEX history_batches_by_sent"),
            "{requests}"
        );
    }
}
