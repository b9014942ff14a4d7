//! The PostgreSQL back-end (`state.url`): the same statements as SQLite's where the SQL agrees,
//! their PostgreSQL form where it does not (`store/sql/`), and the leader lease.
//!
//! **The lease.** One row (`leader_lease`: holder, epoch, expiry by the database's clock), taken
//! and renewed with plain transactions: no session advisory lock, which a pooler in transaction
//! mode (PgBouncer) would strand on a server connection another client then gets. Taking an
//! expired (or absent) lease bumps the epoch. While a process holds it, every transaction that
//! changes the state starts by checking it (`Backend::begin_write`): same holder, same epoch,
//! not expired, key-share-locking the row until commit, so a takeover (which locks it `FOR
//! UPDATE`) waits for that transaction, the leader's own renewals do not, and a leader that
//! stalled past its expiry commits nothing. The lease has a connection of its own
//! (`lease_pool`), so renewals never queue behind the pool's other work, and each take or
//! renewal moves the fence's send deadline (`Fence::may_send`), which the writer checks before
//! every request.
//!
//! Session settings are not used either (a pooler would lose or leak them): the timeouts a
//! fenced transaction needs are set per transaction (`set_config(.., true)`).

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use secrecy::ExposeSecret;
use sqlx::Row;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::config::StateSettings;
use crate::store::{Fence, StoreError};

pub type Db = sqlx::Postgres;
pub type Conn = sqlx::PgConnection;
pub type DbRow = sqlx::postgres::PgRow;
pub const PG: bool = true;

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

/// Statements as every module of `sql/` makes them. On PostgreSQL unnamed (`persistent(false)`):
/// behind a pooler in transaction mode (PgBouncer 1.18 cannot carry named prepared statements
/// across server connections) a statement named `sqlx_s_1` by one client would be found
/// "already existing" by the next client given that server connection. Every such statement
/// runs inside a transaction (see [`Backend::session`]), which keeps its two round trips on one
/// server connection. Planning each time costs nothing extra here: every transaction already
/// asks for custom plans (`Backend::begin_read`).
pub(crate) fn query<'a>(
    sql: impl sqlx::SqlSafeStr,
) -> sqlx::query::Query<'a, Db, <Db as sqlx::Database>::Arguments> {
    sqlx::query(sql).persistent(false)
}

/// [`query`], for one column.
pub(crate) fn query_scalar<'a, O>(
    sql: impl sqlx::SqlSafeStr,
) -> sqlx::query::QueryScalar<'a, Db, O, <Db as sqlx::Database>::Arguments>
where
    (O,): for<'r> sqlx::FromRow<'r, DbRow>,
{
    sqlx::query_scalar(sql).persistent(false)
}

/// [`query`], into a type.
pub(crate) fn query_as<'a, O>(
    sql: impl sqlx::SqlSafeStr,
) -> sqlx::query::QueryAs<'a, Db, O, <Db as sqlx::Database>::Arguments>
where
    O: for<'r> sqlx::FromRow<'r, DbRow>,
{
    sqlx::query_as(sql).persistent(false)
}

/// A connection for statements that need no read snapshot and no fencing, ended with
/// [`end_session`]. On PostgreSQL a transaction all the same, so a pooler in transaction mode
/// keeps each statement's messages on one server connection.
pub(crate) type Session = sqlx::Transaction<'static, Db>;

/// Commits a [`Session`] (what it wrote is kept; a session dropped without this rolls back).
pub(crate) async fn end_session(session: Session) -> Result<(), StoreError> {
    session.commit().await?;
    Ok(())
}

impl Backend {
    /// A [`Session`]: a transaction (see there).
    pub(crate) async fn session(&self) -> Result<Session, StoreError> {
        base::begin_on(&self.pool, None).await
    }
}

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// The key of the transaction-scoped advisory lock that serialises migrators (per database).
const MIGRATION_LOCK: i64 = 0x7065_6e64_6f73; // "pendos"

/// Applies the migrations this binary has and the database lacks, all in one transaction that
/// first takes a transaction-scoped advisory lock: replicas starting together apply them once,
/// and no lock outlives the transaction. (sqlx's own migrator takes a session-level advisory
/// lock, on every start, standbys and cron `sync` included, which a pooler in transaction mode
/// strands on a server connection another client then gets; and it names its statements.)
/// The bookkeeping table is sqlx's `_sqlx_migrations`, so states made before stay as they are.
async fn migrate(pool: &sqlx::PgPool) -> Result<(), StoreError> {
    let mut tx = base::begin_on(pool, None).await?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "SELECT pg_advisory_xact_lock({MIGRATION_LOCK})"
    )))
    .execute(&mut *tx)
    .await?;
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS _sqlx_migrations (
             version BIGINT PRIMARY KEY,
             description TEXT NOT NULL,
             installed_on TIMESTAMPTZ NOT NULL DEFAULT now(),
             success BOOLEAN NOT NULL,
             checksum BYTEA NOT NULL,
             execution_time BIGINT NOT NULL
         )",
    )
    .execute(&mut *tx)
    .await?;
    let applied: Vec<(i64, bool, Vec<u8>)> =
        query_as("SELECT version, success, checksum FROM _sqlx_migrations ORDER BY version")
            .fetch_all(&mut *tx)
            .await?;
    if let Some((version, ..)) = applied.iter().find(|(_, success, _)| !success) {
        return Err(sqlx::migrate::MigrateError::Dirty(*version).into());
    }
    for m in MIGRATOR
        .iter()
        .filter(|m| m.migration_type.is_up_migration())
    {
        if let Some((_, _, checksum)) = applied.iter().find(|(v, ..)| *v == m.version) {
            if checksum.as_slice() != &*m.checksum {
                return Err(sqlx::migrate::MigrateError::VersionMismatch(m.version).into());
            }
            continue;
        }
        let started = std::time::Instant::now();
        sqlx::raw_sql(m.sql.clone()).execute(&mut *tx).await?;
        query(
            "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)
             VALUES ($1, $2, TRUE, $3, $4)",
        )
        .bind(m.version)
        .bind(&*m.description)
        .bind(&*m.checksum)
        .bind(started.elapsed().as_nanos() as i64)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Who holds the lease, as [`Backend::lease_holder`] reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseHolder {
    pub holder: String,
    pub epoch: i64,
    /// Milliseconds until it expires (negative: expired).
    pub expires_in_ms: i64,
}

fn connect_options(state: &StateSettings) -> Result<(PgConnectOptions, PathBuf), StoreError> {
    let url = state.url().expect("a PostgreSQL state has a URL");
    let label = PathBuf::from(state.display());
    let mut options = PgConnectOptions::from_str(url.expose_secret()).map_err(|e| {
        StoreError::Io {
            path: label.clone(),
            // sqlx's message names the part it could not read, never the password.
            message: format!("state.url is not a usable PostgreSQL URL: {e}"),
        }
    })?;
    if state.password_source.is_set() {
        let password = state
            .password_source
            .resolve("state.password")
            .map_err(|e| StoreError::Io {
                path: label.clone(),
                message: e.to_string(),
            })?;
        options = options.password(password.expose_secret());
    }
    // `extra_float_digits` is not sent at start: PgBouncer refuses startup parameters it does
    // not know ("unsupported startup parameter"), and the server's default since PostgreSQL 12
    // already prints floats exactly (values are read in binary anyway).
    Ok((
        options
            .application_name("pendo-sync")
            .extra_float_digits(None),
        label,
    ))
}

/// How long a lease statement waits for the lease's connection (made again after a failure).
const LEASE_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether a statement gave up on a row lock (55P03, lock_not_available: the lock timeout a
/// takeover sets), which only means "try again at the next poll".
fn lock_timed_out(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.code().as_deref() == Some("55P03"))
}

impl Backend {
    /// The lease's own connection (see the field's docs).
    fn lease_pool(&self) -> &sqlx::PgPool {
        self.lease_pool.as_ref().unwrap_or(&self.pool)
    }

    /// Connects to `state.url` and applies the migrations (sqlx serialises concurrent
    /// migrators, so replicas starting together apply them once).
    pub async fn open(state: &StateSettings) -> Result<Backend, StoreError> {
        let backend = Backend::connect(state, 8).await?;
        let applied = backend.schema_version().await;
        let known = MIGRATOR.iter().map(|m| m.version).max();
        if let Err(e) = crate::store::refuse_newer_schema(&backend.path, applied, known) {
            backend.pool.close().await;
            return Err(e);
        }
        migrate(&backend.pool).await?;
        Ok(backend)
    }

    /// Connects without migrating or writing; a database an older pendo-sync wrote is refused
    /// with a message, as for SQLite.
    pub async fn open_read_only(state: &StateSettings) -> Result<Backend, StoreError> {
        let backend = Backend::connect(state, 2).await?;
        let applied = backend.schema_version().await;
        let latest = MIGRATOR.iter().map(|m| m.version).max();
        if applied < latest {
            backend.pool.close().await;
            return Err(StoreError::Io {
                path: backend.path,
                message: match applied {
                    None => "holds no pendo-sync state yet (run `pendo-sync sync` first)".into(),
                    Some(_) => "was written by an older pendo-sync: run `pendo-sync sync` (or `run`) once to upgrade it; read-only commands do not change it".into(),
                },
            });
        }
        Ok(backend)
    }

    /// The newest migration the database records as applied (`None`: none, or no table yet).
    async fn schema_version(&self) -> Option<i64> {
        let mut session = self.session().await.ok()?;
        let applied: Option<i64> =
            query_scalar("SELECT max(version) FROM _sqlx_migrations WHERE success")
                .fetch_one(&mut *session)
                .await
                .ok()
                .flatten();
        let _ = end_session(session).await;
        applied
    }

    async fn connect(state: &StateSettings, max: u32) -> Result<Backend, StoreError> {
        let (options, path) = connect_options(state)?;
        let pool = PgPoolOptions::new()
            .max_connections(max)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(options.clone())
            .await
            .map_err(|source| StoreError::Open {
                path: path.clone(),
                source,
            })?;
        // One connection of its own for the lease, made when first needed (a read-only command
        // never takes a lease). A renewal waits at most a few seconds for it.
        let lease_pool = PgPoolOptions::new()
            .max_connections(1)
            .min_connections(0)
            .acquire_timeout(LEASE_ACQUIRE_TIMEOUT)
            .connect_lazy_with(options);
        Ok(Backend {
            pool,
            path,
            pause: Arc::default(),
            fence: Fence::default(),
            stats: Arc::default(),
            checkpoints: Arc::default(),
            claim_cursor: Arc::default(),
            reach: Arc::default(),
            lease_pool: Some(lease_pool),
        })
    }

    /// Takes the lease for `holder` if it is free or expired (a new epoch), and starts fencing
    /// this handle's writes with it. `None`: another holder's lease is live.
    pub async fn try_take_lease(
        &self,
        holder: &str,
        ttl: Duration,
    ) -> Result<Option<i64>, StoreError> {
        let since = std::time::Instant::now();
        let mut tx = base::begin_on(self.lease_pool(), None).await?;
        // A stalled leader's transaction may hold the row (key share lock): wait a little, not
        // for ever; the next poll tries again.
        query("SELECT set_config('lock_timeout', '2000', true)")
            .execute(&mut *tx)
            .await?;
        // The row `FOR UPDATE` first: this waits for the current leader's writing transactions
        // (they hold it `FOR KEY SHARE`), so none of them commits after a takeover. An
        // unexpired lease ends the attempt there.
        let current = query(
            "SELECT expires_at > clock_timestamp() FROM leader_lease WHERE id = 1 FOR UPDATE",
        )
        .fetch_optional(&mut *tx)
        .await;
        match current {
            Ok(Some(row)) if row.get::<bool, _>(0) => {
                tx.commit().await?;
                return Ok(None);
            }
            Ok(_) => {}
            Err(e) if lock_timed_out(&e) => {
                return Ok(None);
            }
            Err(e) => return Err(e.into()),
        }
        let row = query(
            "INSERT INTO leader_lease (id, holder, epoch, expires_at, renewed_at)
             VALUES (1, $1, 1, clock_timestamp() + $2 * interval '1 millisecond', clock_timestamp())
             ON CONFLICT (id) DO UPDATE SET holder = excluded.holder,
                 epoch = leader_lease.epoch + 1, expires_at = excluded.expires_at,
                 renewed_at = excluded.renewed_at
             WHERE leader_lease.expires_at <= clock_timestamp()
             RETURNING epoch",
        )
        .bind(holder)
        .bind(ttl.as_millis() as i64)
        .fetch_optional(&mut *tx)
        .await;
        let row = match row {
            Ok(row) => row,
            Err(e) if lock_timed_out(&e) => None,
            Err(e) => return Err(e.into()),
        };
        tx.commit().await?;
        let epoch = row.map(|r| r.get::<i64, _>(0));
        if let Some(epoch) = epoch {
            self.fence.hold(holder.to_owned(), epoch, ttl, since);
        }
        Ok(epoch)
    }

    /// Extends this process's lease by `ttl` from now. `false`: it expired or was taken, and
    /// this handle stops fencing with it (its writes then fail with
    /// [`StoreError::LostLease`]).
    pub async fn renew_lease(&self, ttl: Duration) -> Result<bool, StoreError> {
        let Some((holder, epoch)) = self.fence.current() else {
            return Ok(false);
        };
        let since = std::time::Instant::now();
        let mut tx = base::begin_on(self.lease_pool(), None).await?;
        let row = query(
            "UPDATE leader_lease
             SET expires_at = clock_timestamp() + $3 * interval '1 millisecond',
                 renewed_at = clock_timestamp()
             WHERE id = 1 AND holder = $1 AND epoch = $2 AND expires_at > clock_timestamp()
             RETURNING epoch",
        )
        .bind(&holder)
        .bind(epoch)
        .bind(ttl.as_millis() as i64)
        .fetch_optional(&mut *tx)
        .await?;
        tx.commit().await?;
        match row {
            Some(_) => self.fence.renewed(epoch, since),
            None => self.fence.lost(),
        }
        Ok(row.is_some())
    }

    /// Gives the lease (`holder`, `epoch`) up at once (the end of a run or a `sync`), so a
    /// standby need not wait for expiry. This handle then writes unfenced again, unless it has
    /// taken a newer lease meanwhile.
    pub async fn release_lease(&self, holder: &str, epoch: i64) -> Result<(), StoreError> {
        self.fence.release(epoch);
        let mut tx = base::begin_on(self.lease_pool(), None).await?;
        query(
            "UPDATE leader_lease SET expires_at = clock_timestamp()
             WHERE id = 1 AND holder = $1 AND epoch = $2",
        )
        .bind(holder)
        .bind(epoch)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Who holds the lease now, if anyone ever took it.
    pub async fn lease_holder(&self) -> Result<Option<LeaseHolder>, StoreError> {
        let mut tx = base::begin_on(self.lease_pool(), None).await?;
        let row = query(
            "SELECT holder, epoch,
                    (extract(epoch FROM expires_at - clock_timestamp()) * 1000)::bigint
             FROM leader_lease WHERE id = 1",
        )
        .fetch_optional(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(row.map(|r| LeaseHolder {
            holder: r.get(0),
            epoch: r.get(1),
            expires_in_ms: r.get(2),
        }))
    }
}
