//! The SQLite back-end (the default): one file in WAL mode, guarded against a second writer by
//! the instance lock (`crate::lock`), so its transactions need no fencing.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::Row;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

use crate::store::{Fence, StoreError, create_owner_only};

pub type Db = sqlx::Sqlite;
pub type Conn = sqlx::SqliteConnection;
pub type DbRow = sqlx::sqlite::SqliteRow;
pub const PG: bool = false;

// Each file of `sql/` is compiled once per back-end, on purpose (see `sql/base.rs`).
#[allow(clippy::duplicate_mod)]
#[path = "../sql/adopt.rs"]
mod adopt;
#[allow(clippy::duplicate_mod)]
#[path = "../sql/base.rs"]
mod base;
#[allow(clippy::duplicate_mod)]
#[path = "../sql/claims.rs"]
mod claims;
#[allow(clippy::duplicate_mod)]
#[path = "../sql/digest.rs"]
mod digest;
#[allow(clippy::duplicate_mod)]
#[path = "../sql/forget.rs"]
mod forget;
#[allow(clippy::duplicate_mod)]
#[path = "../sql/history.rs"]
mod history;
#[allow(clippy::duplicate_mod)]
#[path = "../sql/holds.rs"]
mod holds;
#[allow(clippy::duplicate_mod)]
#[path = "../sql/outbox.rs"]
mod outbox;
#[allow(clippy::duplicate_mod)]
#[path = "../sql/pages.rs"]
mod pages;
#[allow(clippy::duplicate_mod)]
#[path = "../sql/requests.rs"]
mod requests;
#[allow(clippy::duplicate_mod)]
#[path = "../sql/shadow.rs"]
mod shadow;

pub use base::{Backend, Snapshot};

/// Statements as every module of `sql/` makes them (see the PostgreSQL back-end's: there they
/// are unnamed, for poolers; here they are cached per connection, as sqlx does by default).
pub(crate) fn query<'a>(
    sql: impl sqlx::SqlSafeStr,
) -> sqlx::query::Query<'a, Db, <Db as sqlx::Database>::Arguments> {
    sqlx::query(sql)
}

/// [`query`], for one column.
pub(crate) fn query_scalar<'a, O>(
    sql: impl sqlx::SqlSafeStr,
) -> sqlx::query::QueryScalar<'a, Db, O, <Db as sqlx::Database>::Arguments>
where
    (O,): for<'r> sqlx::FromRow<'r, DbRow>,
{
    sqlx::query_scalar(sql)
}

/// A connection for statements that need no read snapshot and no fencing, ended with
/// [`end_session`] (on SQLite a pooled connection, its statements each their own transaction).
pub(crate) type Session = sqlx::pool::PoolConnection<Db>;

/// Ends a [`Session`].
pub(crate) async fn end_session(session: Session) -> Result<(), StoreError> {
    drop(session);
    Ok(())
}

impl Backend {
    /// A [`Session`]: a connection of the pool.
    pub(crate) async fn session(&self) -> Result<Session, StoreError> {
        Ok(self.pool.acquire().await?)
    }
}

/// The WAL's size (pages) past which a commit checkpoints by itself.
const WAL_BOUND_PAGES: u32 = 32_768;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

impl Backend {
    /// Opens (creating if needed, owner-only) the state file and applies migrations.
    pub async fn open(path: &Path) -> Result<Backend, StoreError> {
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
            // Checkpoints are made in the background after writes (`Backend::note_written`);
            // a commit checkpoints by itself only past this bound (pages of 4 KiB), and a WAL
            // grown past it is cut back once it is checkpointed.
            .pragma("wal_autocheckpoint", WAL_BOUND_PAGES.to_string())
            .pragma("journal_size_limit", (WAL_BOUND_PAGES * 4096).to_string())
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
        let applied: Option<i64> =
            sqlx::query_scalar("SELECT max(version) FROM _sqlx_migrations WHERE success = 1")
                .fetch_one(&pool)
                .await
                .ok()
                .flatten();
        if let Err(e) =
            super::refuse_newer_schema(path, applied, MIGRATOR.iter().map(|m| m.version).max())
        {
            pool.close().await;
            return Err(e);
        }
        MIGRATOR.run(&pool).await?;
        Ok(Backend {
            pool,
            path: path.to_owned(),
            pause: Arc::default(),
            fence: Fence::default(),
            stats: Arc::default(),
            checkpoints: Arc::default(),
            claim_cursor: Arc::default(),
            reach: Arc::default(),
            lease_pool: None,
        })
    }

    /// Opens an existing state file without writing to it (audits, dry runs, status). Fails if
    /// the file does not exist rather than creating one.
    pub async fn open_read_only(path: &Path) -> Result<Backend, StoreError> {
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
        Ok(Backend {
            pool,
            path: path.to_owned(),
            pause: Arc::default(),
            fence: Fence::default(),
            stats: Arc::default(),
            checkpoints: Arc::default(),
            claim_cursor: Arc::default(),
            reach: Arc::default(),
            lease_pool: None,
        })
    }

    /// An empty state in memory, migrated (a dry run with no state file yet). One connection:
    /// each SQLite connection to `:memory:` is a database of its own.
    pub async fn open_in_memory() -> Result<Backend, StoreError> {
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
        Ok(Backend {
            pool,
            path,
            pause: Arc::default(),
            fence: Fence::default(),
            stats: Arc::default(),
            checkpoints: Arc::default(),
            claim_cursor: Arc::default(),
            reach: Arc::default(),
            lease_pool: None,
        })
    }
}

#[cfg(test)]
mod plan_tests {
    use crate::store::Store;

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

    /// The writer's claim finds its ids among the due pending rows alone (a range of
    /// `outbox_due`, read until it has enough ids, never sorted), and their rows by those ids.
    /// Not by walking the primary key over the rows that are not due: the unmatched rows of a
    /// portal's leads Pendo never saw are most of such an outbox, and each claim walked them.
    #[tokio::test]
    async fn a_claim_reads_the_due_rows_of_its_ids_only() {
        let store = Store::open_in_memory().await.unwrap();
        let claim = plan(&store, super::outbox::CLAIM_SQL).await;
        assert!(
            claim.starts_with("SEARCH outbox USING PRIMARY KEY (kind=? AND pendo_id=?)"),
            "{claim}"
        );
        assert!(
            claim.contains(
                "SEARCH outbox USING INDEX outbox_due (state=? AND kind=? AND next_attempt_at<?)"
            ),
            "{claim}"
        );
        assert!(!claim.contains("FOR ORDER BY"), "{claim}");
        assert_eq!(claim.matches("outbox_due").count(), 1, "{claim}");
    }
}
