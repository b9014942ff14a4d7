//! The state: the shadow copy, the outbox, watermarks, records set aside, run history and a few
//! durable facts, in one SQLite file (WAL; the default) or one PostgreSQL database (`state.url`).
//!
//! The store owns every SQL statement, and [`Store`] is the one narrow interface to it: the
//! engine, writer, audit, guard and history code do not know which back-end they use. The
//! statements live in `store/sql/`, compiled once per back-end (`sqlite/`, `pg/`). The rules it
//! enforces for the rest of the crate:
//!
//! - **The shadow is what Pendo confirmed.** Only [`Store::settle`] with [`Settlement::Confirmed`]
//!   writes to it, and the writer calls that only for ids Pendo answered 2xx for and did not list
//!   in `missing` or `errors`.
//! - **No change is lost.** [`Store::commit_page`] writes a page's changes to the outbox and moves
//!   the mapping's watermark in one transaction; a crash before commit re-reads the page, a crash
//!   after it finds the changes in the outbox.
//! - **A value digest never outlives what it summarised** (see `sql/digest.rs`): triggers delete
//!   an entity's digests whenever its shadow row or outbox rows change.
//! - **A leader that lost its lease commits nothing** (PostgreSQL, see [`Fence`]): every
//!   transaction that changes the state checks the lease first, in the same transaction.
//!
//! A SQLite file is created readable and writable by its owner only: it holds the CRM data we
//! sync and, for OAuth flows, rotated refresh tokens.

mod claims;
mod history;
mod holds;
pub(crate) mod outbox;
mod pages;
pub mod pg;
mod requests;
pub(crate) mod shadow;
pub mod sqlite;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

pub use claims::Claim;
pub use history::{BatchInfo, Event, HistoryEvent, HoldInfo, SentBatch, Source};
pub use holds::{GuardOutcome, Hold, HoldError};
pub use outbox::{
    Change, OutboxEntry, OutboxKey, OutboxSummary, QueueFilter, QueueState, Settlement,
};
pub use pages::{ChartSlot, InvalidCursor, OutboxCursor, Page};
pub use requests::ResyncRecord;
pub use shadow::ShadowRecord;

use crate::config::GuardSettings;
use crate::connectors::Watermark;
use crate::digest::IdMap;
use crate::domain::Kind;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{} {}: {source}", state_kind(path), path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: sqlx::Error,
    },
    #[error("{} {}: {message}", state_kind(path), path.display())]
    Io { path: PathBuf, message: String },
    #[error("state migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("state query failed: {0}")]
    Sql(#[from] sqlx::Error),
    #[error("the state holds an unreadable value: {0}")]
    Corrupt(String),
    /// This process wrote under a lease (epoch) that expired or another replica took: the
    /// transaction was not committed, and this process must stop writing.
    #[error(
        "this replica lost the leader lease (epoch {epoch}) and no longer writes; nothing was committed"
    )]
    LostLease { epoch: i64 },
}

/// What a state is called in messages: the SQLite "state file", or the PostgreSQL "database"
/// (its `path` is the URL without the password).
pub fn state_kind(path: &Path) -> &'static str {
    if path.to_str().is_some_and(|p| p.starts_with("postgres")) {
        "database"
    } else {
        "state file"
    }
}

/// Refuses a state whose schema a newer pendo-sync wrote (`applied` is the highest migration
/// it records, `known` the highest this binary has). Migrations only add, so a newer binary
/// works with what an older one wrote; the other way round this binary would miss what the
/// newer one relies on.
pub(crate) fn refuse_newer_schema(
    path: &Path,
    applied: Option<i64>,
    known: Option<i64>,
) -> Result<(), StoreError> {
    match (applied, known) {
        (Some(applied), Some(known)) if applied > known => Err(StoreError::Io {
            path: path.to_owned(),
            message: format!(
                "holds schema version {applied}, newer than this pendo-sync knows (version {known}): a newer pendo-sync upgraded it; run that version (or newer)"
            ),
        }),
        _ => Ok(()),
    }
}

/// How long [`Store::ping`] waits for the state to answer: `/readyz` answers within 2 s
/// even while the database is away (the pool would otherwise wait its whole acquire timeout,
/// retrying a refused connection).
pub const PING_LIMIT: std::time::Duration = std::time::Duration::from_millis(1500);

/// Whether the state answers, as the last ping (or failed statement) found, and the log lines
/// that say so: one WARN when it is lost, one per [`Reach::REMIND`] while it stays lost, one
/// INFO when it is back. Errors of the pipelines and the writer during an outage are the same
/// news: they ask [`Store::reachable`] first and stay quiet when the outage is already told.
#[derive(Debug, Default)]
pub(crate) struct Reach {
    lost: std::sync::Mutex<Option<(std::time::Instant, std::time::Instant)>>,
}

impl Reach {
    pub(crate) const REMIND: std::time::Duration = std::time::Duration::from_secs(30);

    pub(crate) fn lost(&self, path: &Path, error: &StoreError) {
        let kind = state_kind(path);
        let now = std::time::Instant::now();
        let mut lost = self.lost.lock().expect("reach lock");
        match &mut *lost {
            None => {
                tracing::warn!(%error, "Lost the {kind}; everything waits for it and is tried again (this is said again every {}s while it lasts).", Self::REMIND.as_secs());
                *lost = Some((now, now));
            }
            Some((since, told)) if now.duration_since(*told) >= Self::REMIND => {
                tracing::warn!(%error, unreachable_for = %humantime::format_duration(round_s(now.duration_since(*since))), "The {kind} is still unreachable.");
                *told = now;
            }
            Some(_) => {}
        }
    }

    pub(crate) fn answered(&self, path: &Path) {
        let mut lost = self.lost.lock().expect("reach lock");
        if let Some((since, _)) = lost.take() {
            let kind = state_kind(path);
            tracing::info!(unreachable_for = %humantime::format_duration(round_s(since.elapsed())), "The {kind} is back.");
        }
    }
}

fn round_s(d: std::time::Duration) -> std::time::Duration {
    std::time::Duration::from_secs(d.as_secs())
}

/// Background work that runs one round at a time and goes round again when asked while it
/// runs: the planner's statistics (PostgreSQL) and the WAL's checkpoints (SQLite).
#[derive(Debug, Default)]
pub(crate) struct Rounds {
    running: std::sync::atomic::AtomicBool,
    /// Another round is wanted: the running one may have started before what asked for it.
    again: std::sync::atomic::AtomicBool,
}

impl Rounds {
    /// Asks for a round; true when the caller is to run them (none runs yet: then it loops on
    /// [`Rounds::round`]), false when the running one goes round again.
    pub(crate) fn request(&self) -> bool {
        use std::sync::atomic::Ordering;
        self.again.store(true, Ordering::SeqCst);
        !self.running.swap(true, Ordering::SeqCst)
    }

    /// For the task running rounds: true while another round is wanted. When it returns false
    /// the task has stopped being the runner (a request racing with the end is either seen here
    /// or starts a runner of its own).
    pub(crate) fn round(&self) -> bool {
        use std::sync::atomic::Ordering;
        loop {
            if self.again.swap(false, Ordering::SeqCst) {
                return true;
            }
            self.running.store(false, Ordering::SeqCst);
            if !self.again.load(Ordering::SeqCst) || self.running.swap(true, Ordering::SeqCst) {
                return false;
            }
        }
    }
}

/// When to refresh the planner's statistics of the tables that grow and shrink in bursts
/// (PostgreSQL): after [`StatsRefresh::ROWS`] rows written, at most every
/// [`StatsRefresh::EVERY`].
#[derive(Debug, Default)]
pub(crate) struct StatsRefresh {
    written: std::sync::atomic::AtomicU64,
    last: std::sync::Mutex<Option<std::time::Instant>>,
    /// A refresh runs in the background (one at a time).
    pub(crate) rounds: Rounds,
}

impl StatsRefresh {
    pub(crate) const ROWS: u64 = 10_000;
    pub(crate) const EVERY: std::time::Duration = std::time::Duration::from_secs(5);

    /// A refresh made now, outside [`StatsRefresh::note`]'s pace: counts from zero again.
    pub(crate) fn refreshed(&self, now: std::time::Instant) {
        *self.last.lock().expect("statistics refresh lock") = Some(now);
        self.written.store(0, std::sync::atomic::Ordering::Relaxed);
    }

    /// Counts `rows` more written at `now`; true when a refresh is due (and then counts from
    /// zero again). Rows written while a refresh is not yet allowed still count towards the next.
    pub(crate) fn note(&self, rows: u64, now: std::time::Instant) -> bool {
        use std::sync::atomic::Ordering;
        let total = self.written.fetch_add(rows, Ordering::Relaxed) + rows;
        if total < Self::ROWS {
            return false;
        }
        let mut last = self.last.lock().expect("statistics refresh lock");
        if last.is_some_and(|at| now.saturating_duration_since(at) < Self::EVERY) {
            return false;
        }
        *last = Some(now);
        self.written.store(0, Ordering::Relaxed);
        true
    }
}

/// The lease a process writes under (PostgreSQL): who it is and the epoch it took. Shared by a
/// store handle and its clones. A process that never took a lease (a CLI command, a standby)
/// writes unfenced, as on SQLite; one that took a lease and lost it writes nothing more.
#[derive(Debug, Clone, Default)]
pub struct Fence {
    inner: Arc<Mutex<FenceState>>,
}

#[derive(Debug, Default)]
struct FenceState {
    lease: Lease,
    /// The lease's length, in milliseconds.
    ttl_ms: i64,
    /// Until when this process may send to Pendo under the lease, by its own monotonic clock:
    /// the start of the last successful take or renewal plus the lease's length, less a margin
    /// (the database's expiry is at least that late). Past it another replica may lead.
    send_until: Option<std::time::Instant>,
}

/// How much of a lease's length a leader does not use for sending: clock rates, the renewal's
/// round trip, a request that is slow to leave.
fn send_margin(ttl: std::time::Duration) -> std::time::Duration {
    (ttl / 5).max(std::time::Duration::from_millis(200))
}

#[derive(Debug, Default, Clone)]
enum Lease {
    #[default]
    None,
    Held(String, i64),
    Lost(i64),
}

/// What a write must do about the lease (see `Backend::begin_write`).
pub(crate) enum FenceCheck {
    Unfenced,
    Check(String, i64),
    Refuse(i64),
}

impl Fence {
    /// The (holder, epoch) every write checks, if this process holds the lease.
    pub fn current(&self) -> Option<(String, i64)> {
        match &self.inner.lock().expect("fence lock").lease {
            Lease::Held(holder, epoch) => Some((holder.clone(), *epoch)),
            _ => None,
        }
    }

    pub(crate) fn check(&self) -> FenceCheck {
        match &self.inner.lock().expect("fence lock").lease {
            Lease::None => FenceCheck::Unfenced,
            Lease::Held(holder, epoch) => FenceCheck::Check(holder.clone(), *epoch),
            Lease::Lost(epoch) => FenceCheck::Refuse(*epoch),
        }
    }

    /// The lease (`holder`, `epoch`) was taken by a statement sent at `since`.
    pub(crate) fn hold(
        &self,
        holder: String,
        epoch: i64,
        ttl: std::time::Duration,
        since: std::time::Instant,
    ) {
        let mut state = self.inner.lock().expect("fence lock");
        state.lease = Lease::Held(holder, epoch);
        state.ttl_ms = ttl.as_millis() as i64;
        state.send_until = (since + ttl).checked_sub(send_margin(ttl));
    }

    /// The lease of `epoch` was renewed by a statement sent at `since`.
    pub(crate) fn renewed(&self, epoch: i64, since: std::time::Instant) {
        let mut state = self.inner.lock().expect("fence lock");
        if matches!(state.lease, Lease::Held(_, e) if e == epoch) {
            let ttl = std::time::Duration::from_millis(state.ttl_ms.max(0) as u64);
            let until = (since + ttl).checked_sub(send_margin(ttl));
            state.send_until = state.send_until.max(until);
        }
    }

    /// Whether this process may send to Pendo now: always without a lease (SQLite's file lock,
    /// a CLI command); under a lease only until its send deadline (by this process's own clock,
    /// so a leader that stalled and woke up knows without asking the database); never once the
    /// lease was lost.
    pub fn may_send(&self) -> bool {
        let state = self.inner.lock().expect("fence lock");
        match state.lease {
            Lease::None => true,
            Lease::Held(..) => state
                .send_until
                .is_some_and(|until| std::time::Instant::now() < until),
            Lease::Lost(_) => false,
        }
    }

    /// The lease is gone (expired, taken, or given up): every later write is refused.
    pub fn lost(&self) {
        let mut state = self.inner.lock().expect("fence lock");
        if let Lease::Held(_, epoch) = state.lease {
            state.lease = Lease::Lost(epoch);
        }
    }

    /// The lease of `epoch` was given up: writes go unfenced again (if no newer lease was taken).
    pub(crate) fn release(&self, epoch: i64) {
        let mut state = self.inner.lock().expect("fence lock");
        if matches!(state.lease, Lease::Held(_, e) if e == epoch) {
            state.lease = Lease::None;
        }
    }

    pub(crate) fn ttl_ms(&self) -> i64 {
        self.inner.lock().expect("fence lock").ttl_ms
    }

    /// Whether this process held a lease and lost it.
    pub fn was_lost(&self) -> bool {
        matches!(self.inner.lock().expect("fence lock").lease, Lease::Lost(_))
    }
}

/// A handle on the state. Cheap to clone (a pool inside).
#[derive(Clone)]
pub struct Store {
    inner: Inner,
}

#[derive(Clone)]
enum Inner {
    Sqlite(sqlite::Backend),
    Pg(pg::Backend),
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.path())
            .finish_non_exhaustive()
    }
}

/// Runs the same call on whichever back-end the handle holds.
macro_rules! on {
    ($self:expr, $b:ident => $e:expr) => {
        match &$self.inner {
            Inner::Sqlite($b) => $e,
            Inner::Pg($b) => $e,
        }
    };
}

impl Store {
    /// Opens (creating and migrating if needed) the state `settings` name: the SQLite file of
    /// `state.path`, or the PostgreSQL database of `state.url`.
    pub async fn open_settings(
        settings: &crate::config::StateSettings,
    ) -> Result<Store, StoreError> {
        match settings.backend() {
            crate::config::StateBackend::Sqlite(path) => Store::open(path).await,
            crate::config::StateBackend::Postgres(pg) => Ok(Store {
                inner: Inner::Pg(pg::Backend::open(pg).await?),
            }),
        }
    }

    /// Opens the state `settings` name without writing to it (audits, dry runs, status).
    pub async fn open_settings_read_only(
        settings: &crate::config::StateSettings,
    ) -> Result<Store, StoreError> {
        match settings.backend() {
            crate::config::StateBackend::Sqlite(path) => Store::open_read_only(path).await,
            crate::config::StateBackend::Postgres(pg) => Ok(Store {
                inner: Inner::Pg(pg::Backend::open_read_only(pg).await?),
            }),
        }
    }

    /// Opens (creating if needed, owner-only) a SQLite state file and applies migrations.
    pub async fn open(path: &Path) -> Result<Store, StoreError> {
        Ok(Store {
            inner: Inner::Sqlite(sqlite::Backend::open(path).await?),
        })
    }

    /// Opens an existing SQLite state file without writing to it. Fails if the file does not
    /// exist rather than creating one.
    pub async fn open_read_only(path: &Path) -> Result<Store, StoreError> {
        Ok(Store {
            inner: Inner::Sqlite(sqlite::Backend::open_read_only(path).await?),
        })
    }

    /// An empty state in memory, migrated (a dry run with no state yet).
    pub async fn open_in_memory() -> Result<Store, StoreError> {
        Ok(Store {
            inner: Inner::Sqlite(sqlite::Backend::open_in_memory().await?),
        })
    }

    /// Whether the state is in PostgreSQL (leases, standbys) rather than a SQLite file.
    pub fn is_postgres(&self) -> bool {
        matches!(self.inner, Inner::Pg(_))
    }

    /// The PostgreSQL back-end, for the leader lease.
    pub fn postgres(&self) -> Option<&pg::Backend> {
        match &self.inner {
            Inner::Pg(b) => Some(b),
            Inner::Sqlite(_) => None,
        }
    }

    /// The lease this handle writes under (always empty on SQLite, whose file lock excludes
    /// a second writer instead).
    pub fn fence(&self) -> &Fence {
        on!(self, b => &b.fence)
    }

    /// The state file, or (PostgreSQL) the database URL without its password.
    pub fn path(&self) -> &Path {
        on!(self, b => b.path())
    }

    /// Installs (or removes) a test's pause hook on this handle and its clones.
    pub fn set_pause_hook(&self, hook: Option<PauseHook>) {
        on!(self, b => b.set_pause_hook(hook))
    }

    /// Waits at `point` if a test's hook asks to (for seams outside the store, such as the
    /// writer's [`PausePoint::BeforeSend`]).
    pub async fn pause(&self, point: PausePoint) {
        on!(self, b => b.pause_at(point).await)
    }

    /// The SQLite pool, for tests and benches that read or write the file directly.
    ///
    /// # Panics
    /// On a PostgreSQL store.
    pub fn pool(&self) -> &sqlx::SqlitePool {
        match &self.inner {
            Inner::Sqlite(b) => b.pool(),
            Inner::Pg(_) => panic!("Store::pool is the SQLite pool; this store is PostgreSQL"),
        }
    }

    /// Closes the pool (SQLite: checkpointing the WAL).
    pub async fn close(&self) {
        on!(self, b => b.close().await)
    }

    /// A [`Snapshot`]: one committed moment for every read through it.
    pub async fn snapshot(&self) -> Result<Snapshot, StoreError> {
        Ok(match &self.inner {
            Inner::Sqlite(b) => Snapshot::Sqlite(b.snapshot().await?),
            Inner::Pg(b) => Snapshot::Pg(b.snapshot().await?),
        })
    }
}

/// Each method's contract is documented on its code in `store/sql/`, shared by both back-ends.
impl Store {
    pub async fn save_resync(&self, job: &ResyncRecord) -> Result<(), StoreError> {
        on!(self, b => b.save_resync(job).await)
    }
    pub async fn resync(&self, id: &str) -> Result<Option<ResyncRecord>, StoreError> {
        on!(self, b => b.resync(id).await)
    }
    pub async fn claim_resync(&self, now: i64) -> Result<Option<ResyncRecord>, StoreError> {
        on!(self, b => b.claim_resync(now).await)
    }
    pub async fn requeue_resyncs(&self) -> Result<u64, StoreError> {
        on!(self, b => b.requeue_resyncs().await)
    }
    pub async fn prune_resyncs(&self, before: i64) -> Result<u64, StoreError> {
        on!(self, b => b.prune_resyncs(before).await)
    }
    /// Whether the state answers within [`PING_LIMIT`] (for `/readyz` and the database
    /// watch); a loss and a return are logged once (see `Reach`).
    pub async fn ping(&self) -> Result<(), StoreError> {
        on!(self, b => b.ping().await)
    }
    /// After an error: whether the state answers. `false`: the outage is being told (one WARN,
    /// then one per 30 s), so the caller need not log its own error as well.
    pub async fn reachable(&self) -> bool {
        self.ping().await.is_ok()
    }
    pub async fn load_diff_state(
        &self,
        kind: crate::domain::Kind,
        ids: &[&str],
    ) -> Result<DiffState, StoreError> {
        on!(self, b => b.load_diff_state(kind, ids).await)
    }
    pub async fn shadow_seq(&self) -> Result<i64, StoreError> {
        on!(self, b => b.shadow_seq().await)
    }
    pub async fn watermark(&self, mapping: &str) -> Result<Option<Watermark>, StoreError> {
        on!(self, b => b.watermark(mapping).await)
    }
    pub async fn watermarks(&self) -> Result<Vec<(String, Watermark, i64)>, StoreError> {
        on!(self, b => b.watermarks().await)
    }
    pub async fn commit_page(&self, page: &PageCommit<'_>) -> Result<(), StoreError> {
        on!(self, b => b.commit_page(page).await)
    }
    pub async fn invalid_records(
        &self,
        mapping: Option<&str>,
    ) -> Result<Vec<InvalidRecord>, StoreError> {
        on!(self, b => b.invalid_records(mapping).await)
    }
    pub async fn has_invalid_records(&self, mapping: &str) -> Result<bool, StoreError> {
        on!(self, b => b.has_invalid_records(mapping).await)
    }
    pub async fn drop_invalid(
        &self,
        mapping: Option<&str>,
        crm_id: Option<&str>,
    ) -> Result<u64, StoreError> {
        on!(self, b => b.drop_invalid(mapping, crm_id).await)
    }
    pub async fn start_run(&self, mapping: &str, mode: &str) -> Result<i64, StoreError> {
        on!(self, b => b.start_run(mapping, mode).await)
    }
    pub async fn finish_run(
        &self,
        id: i64,
        pulled: u64,
        changes: u64,
        invalid: u64,
        error: Option<&str>,
    ) -> Result<(), StoreError> {
        on!(self, b => b.finish_run(id, pulled, changes, invalid, error).await)
    }
    pub async fn last_success_at(&self, mapping: &str) -> Result<Option<i64>, StoreError> {
        on!(self, b => b.last_success_at(mapping).await)
    }
    pub async fn kv_get(&self, key: &str) -> Result<Option<serde_json::Value>, StoreError> {
        on!(self, b => b.kv_get(key).await)
    }
    pub async fn kv_set(&self, key: &str, value: &serde_json::Value) -> Result<(), StoreError> {
        on!(self, b => b.kv_set(key, value).await)
    }
    pub async fn kv_delete(&self, key: &str) -> Result<(), StoreError> {
        on!(self, b => b.kv_delete(key).await)
    }
    /// Every kv entry whose key starts with `prefix`, in key order.
    pub async fn kv_prefix(
        &self,
        prefix: &str,
    ) -> Result<Vec<(String, serde_json::Value)>, StoreError> {
        on!(self, b => b.kv_prefix(prefix).await)
    }
    /// See `sql/forget.rs`.
    pub async fn forget_mapped(
        &self,
        mapping: &str,
        kind: Kind,
        fields: &[String],
        whole: bool,
    ) -> Result<Forgotten, StoreError> {
        on!(self, b => b.forget_mapped(mapping, kind, fields, whole).await)
    }
    pub async fn load_shadow(
        &self,
        kind: Kind,
        ids: &[&str],
    ) -> Result<HashMap<String, ShadowRecord>, StoreError> {
        on!(self, b => b.load_shadow(kind, ids).await)
    }
    pub async fn shadow_entry(
        &self,
        kind: Kind,
        id: &str,
    ) -> Result<Option<(ShadowRecord, i64)>, StoreError> {
        on!(self, b => b.shadow_entry(kind, id).await)
    }
    pub async fn shadow_page(
        &self,
        kind: Kind,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<(String, ShadowRecord)>, StoreError> {
        on!(self, b => b.shadow_page(kind, after, limit).await)
    }
    pub async fn shadow_count(&self, kind: Kind) -> Result<i64, StoreError> {
        on!(self, b => b.shadow_count(kind).await)
    }
    pub async fn load_outbox_values(
        &self,
        kind: Kind,
        ids: &[&str],
    ) -> Result<HashMap<String, HashMap<String, String>>, StoreError> {
        on!(self, b => b.load_outbox_values(kind, ids).await)
    }
    pub async fn release_leases(&self) -> Result<u64, StoreError> {
        on!(self, b => b.release_leases().await)
    }
    pub async fn leased_rows(&self) -> Result<u64, StoreError> {
        on!(self, b => b.leased_rows().await)
    }
    /// Whether this process may send to Pendo now (see [`Fence::may_send`]).
    pub fn may_send(&self) -> bool {
        self.fence().may_send()
    }
    pub async fn claim_due(
        &self,
        kind: Kind,
        now: i64,
        max_records: usize,
    ) -> Result<Vec<OutboxEntry>, StoreError> {
        on!(self, b => b.claim_due(kind, now, max_records).await)
    }
    pub async fn has_unmatched(&self, kind: Kind) -> Result<bool, StoreError> {
        on!(self, b => b.has_unmatched(kind).await)
    }
    pub async fn promote_unmatched(
        &self,
        kind: Kind,
        ids: &[String],
        now: i64,
    ) -> Result<u64, StoreError> {
        on!(self, b => b.promote_unmatched(kind, ids, now).await)
    }
    pub async fn next_due_at(&self, kind: Option<Kind>) -> Result<Option<i64>, StoreError> {
        on!(self, b => b.next_due_at(kind).await)
    }
    pub async fn settle(&self, outcomes: &[(OutboxEntry, Settlement)]) -> Result<(), StoreError> {
        on!(self, b => b.settle(outcomes).await)
    }
    pub async fn settle_sent(
        &self,
        outcomes: &[(OutboxEntry, Settlement)],
        batches: &[SentBatch],
        batch_of: &[Option<usize>],
    ) -> Result<(), StoreError> {
        on!(self, b => b.settle_sent(outcomes, batches, batch_of).await)
    }
    pub async fn settle_uncommitted(
        &self,
        outcomes: &[(OutboxEntry, Settlement)],
        batches: &[SentBatch],
        batch_of: &[Option<usize>],
    ) -> Result<(), StoreError> {
        on!(self, b => b.settle_uncommitted(outcomes, batches, batch_of).await)
    }
    pub async fn outbox_list(
        &self,
        filter: &QueueFilter,
        limit: u32,
    ) -> Result<Vec<OutboxEntry>, StoreError> {
        on!(self, b => b.outbox_list(filter, limit).await)
    }
    pub async fn outbox_retry(&self, filter: &QueueFilter, who: &str) -> Result<u64, StoreError> {
        on!(self, b => b.outbox_retry(filter, who).await)
    }
    pub async fn outbox_drop(&self, filter: &QueueFilter, who: &str) -> Result<u64, StoreError> {
        on!(self, b => b.outbox_drop(filter, who).await)
    }
    pub async fn outbox_counts(&self) -> Result<BTreeMap<&'static str, i64>, StoreError> {
        on!(self, b => b.outbox_counts().await)
    }
    pub async fn dead_count(&self) -> Result<i64, StoreError> {
        on!(self, b => b.dead_count().await)
    }
    pub async fn outbox_count(&self, filter: &QueueFilter) -> Result<i64, StoreError> {
        on!(self, b => b.outbox_count(filter).await)
    }
    pub async fn outbox_summary(&self) -> Result<OutboxSummary, StoreError> {
        on!(self, b => b.outbox_summary().await)
    }
    pub async fn load_claims(
        &self,
        mapping: &str,
        pendo_ids: &[&str],
    ) -> Result<HashMap<String, Vec<(String, u64)>>, StoreError> {
        on!(self, b => b.load_claims(mapping, pendo_ids).await)
    }
    pub async fn claims_count(&self, mapping: &str) -> Result<i64, StoreError> {
        on!(self, b => b.claims_count(mapping).await)
    }
    pub async fn claim_crm_ids(
        &self,
        mapping: &str,
        after: &str,
        limit: i64,
    ) -> Result<Vec<String>, StoreError> {
        on!(self, b => b.claim_crm_ids(mapping, after, limit).await)
    }
    pub async fn forget_records(
        &self,
        kind: crate::domain::Kind,
        mapping: &str,
        crm_ids: &[String],
    ) -> Result<(), StoreError> {
        on!(self, b => b.forget_records(kind, mapping, crm_ids).await)
    }
    pub async fn load_digests(&self, kind: Kind, mapping: &str) -> Result<IdMap<u64>, StoreError> {
        on!(self, b => b.load_digests(kind, mapping).await)
    }
    pub async fn digest_count(&self, mapping: &str) -> Result<i64, StoreError> {
        on!(self, b => b.digest_count(mapping).await)
    }
    pub async fn finish_staged(
        &self,
        mapping: &str,
        kind: Kind,
        limits: &GuardSettings,
    ) -> Result<GuardOutcome, StoreError> {
        on!(self, b => b.finish_staged(mapping, kind, limits).await)
    }
    pub async fn adopt_values(
        &self,
        mapping: &str,
        kind: Kind,
        held: &[(String, String, String)],
    ) -> Result<Adopted, StoreError> {
        on!(self, b => b.adopt_values(mapping, kind, held).await)
    }
    pub async fn guard_context(
        &self,
        mapping: &str,
        kind: Kind,
        limits: &GuardSettings,
    ) -> Result<BTreeMap<String, crate::guard::FieldCounts>, StoreError> {
        on!(self, b => b.guard_context(mapping, kind, limits).await)
    }
    pub async fn recount_field_totals(&self) -> Result<(), StoreError> {
        on!(self, b => b.recount_field_totals().await)
    }
    pub async fn holds(&self, open_only: bool) -> Result<Vec<Hold>, StoreError> {
        on!(self, b => b.holds(open_only).await)
    }
    pub async fn hold(&self, id: i64) -> Result<Option<Hold>, StoreError> {
        on!(self, b => b.hold(id).await)
    }
    pub async fn decide_hold(
        &self,
        id: i64,
        approve: bool,
        who: &str,
        reason: Option<&str>,
    ) -> Result<Hold, HoldError> {
        on!(self, b => b.decide_hold(id, approve, who, reason).await)
    }
    pub async fn held_values_by_mapping(&self) -> Result<BTreeMap<String, i64>, StoreError> {
        on!(self, b => b.held_values_by_mapping().await)
    }
    pub async fn history(
        &self,
        kind: Kind,
        pendo_id: &str,
        field: Option<&str>,
        limit: u32,
    ) -> Result<Vec<HistoryEvent>, StoreError> {
        on!(self, b => b.history(kind, pendo_id, field, limit).await)
    }
    pub async fn last_events(
        &self,
        kind: Kind,
        pendo_id: &str,
        events: &[Event],
    ) -> Result<Vec<HistoryEvent>, StoreError> {
        on!(self, b => b.last_events(kind, pendo_id, events).await)
    }
    pub async fn last_event_per_field(
        &self,
        kind: Kind,
        ids: &[&str],
    ) -> Result<Vec<HistoryEvent>, StoreError> {
        on!(self, b => b.last_event_per_field(kind, ids).await)
    }
    pub async fn history_count(&self) -> Result<i64, StoreError> {
        on!(self, b => b.history_count().await)
    }
    pub async fn prune_history(&self, before: i64, batch: u32) -> Result<u64, StoreError> {
        on!(self, b => b.prune_history(before, batch).await)
    }
    pub async fn outbox_page(
        &self,
        state: QueueState,
        id_prefix: Option<&str>,
        after: Option<&OutboxCursor>,
        limit: u32,
    ) -> Result<Page<OutboxEntry, OutboxCursor>, StoreError> {
        on!(self, b => b.outbox_page(state, id_prefix, after, limit).await)
    }
    pub async fn invalid_page(
        &self,
        id_prefix: Option<&str>,
        after: Option<&InvalidCursor>,
        limit: u32,
    ) -> Result<Page<InvalidRecord, InvalidCursor>, StoreError> {
        on!(self, b => b.invalid_page(id_prefix, after, limit).await)
    }
    pub async fn prune_runs(&self, before: i64, batch: u32) -> Result<u64, StoreError> {
        on!(self, b => b.prune_runs(before, batch).await)
    }
    pub async fn invalid_count(&self) -> Result<i64, StoreError> {
        on!(self, b => b.invalid_count().await)
    }
    pub async fn recent_runs(
        &self,
        mapping: &str,
        limit: u32,
    ) -> Result<Vec<RunRecord>, StoreError> {
        on!(self, b => b.recent_runs(mapping, limit).await)
    }
    pub async fn chart(
        &self,
        end: i64,
        width: i64,
        slots: usize,
    ) -> Result<Vec<ChartSlot>, StoreError> {
        on!(self, b => b.chart(end, width, slots).await)
    }
}

/// One consistent read of the state: every read through it sees the same committed moment
/// (SQLite: a WAL read transaction; PostgreSQL: a repeatable-read transaction). The status
/// model reads through one, so its numbers agree with each other.
pub enum Snapshot {
    Sqlite(sqlite::Snapshot),
    Pg(pg::Snapshot),
}

macro_rules! on_snapshot {
    ($self:expr, $b:ident => $e:expr) => {
        match $self {
            Snapshot::Sqlite($b) => $e,
            Snapshot::Pg($b) => $e,
        }
    };
}

/// The reads of the status model, each the same code as the [`Store`] method of that name.
impl Snapshot {
    pub async fn watermarks(&mut self) -> Result<Vec<(String, Watermark, i64)>, StoreError> {
        on_snapshot!(self, b => b.watermarks().await)
    }
    pub async fn last_success_at(&mut self, mapping: &str) -> Result<Option<i64>, StoreError> {
        on_snapshot!(self, b => b.last_success_at(mapping).await)
    }
    pub async fn kv_get(&mut self, key: &str) -> Result<Option<serde_json::Value>, StoreError> {
        on_snapshot!(self, b => b.kv_get(key).await)
    }
    pub async fn held_values_by_mapping(
        &mut self,
    ) -> Result<std::collections::BTreeMap<String, i64>, StoreError> {
        on_snapshot!(self, b => b.held_values_by_mapping().await)
    }
    pub async fn holds(&mut self, open_only: bool) -> Result<Vec<Hold>, StoreError> {
        on_snapshot!(self, b => b.holds(open_only).await)
    }
    pub async fn history_count(&mut self) -> Result<i64, StoreError> {
        on_snapshot!(self, b => b.history_count().await)
    }
    pub async fn outbox_summary(&mut self) -> Result<OutboxSummary, StoreError> {
        on_snapshot!(self, b => b.outbox_summary().await)
    }
    pub async fn invalid_count(&mut self) -> Result<i64, StoreError> {
        on_snapshot!(self, b => b.invalid_count().await)
    }
    pub async fn recent_runs(
        &mut self,
        mapping: &str,
        limit: u32,
    ) -> Result<Vec<RunRecord>, StoreError> {
        on_snapshot!(self, b => b.recent_runs(mapping, limit).await)
    }
    pub async fn chart(
        &mut self,
        end: i64,
        width: i64,
        slots: usize,
    ) -> Result<Vec<ChartSlot>, StoreError> {
        on_snapshot!(self, b => b.chart(end, width, slots).await)
    }
    /// Ends the read (it wrote nothing).
    pub async fn close(self) -> Result<(), StoreError> {
        on_snapshot!(self, b => b.close().await)
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
    /// A writing transaction has checked its lease (PostgreSQL) and not committed yet.
    InFencedWrite,
    /// The writer claimed a batch and is about to send it (a leader that stalls here).
    BeforeSend,
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

/// The kv key that says `field` of `mapping` had what Pendo held adopted (DESIGN, "The guard"):
/// its first push was prepared, and no later cycle reads Pendo for it again.
pub fn adopted_key(mapping: &str, field: &str) -> String {
    format!("guard.adopted.{mapping}.{field}")
}

/// What one page of [`Store::adopt_values`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Adopted {
    /// Pendo's values written into the shadow as confirmed.
    pub seeded: u64,
    /// Of those, the ones equal to the staged value: dropped, never sent.
    pub equal: u64,
}

/// What [`Store::forget_mapped`] forgot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Forgotten {
    pub outbox_rows: u64,
    /// Shadow rows that held one of the fields.
    pub shadow_values: u64,
    pub holds_closed: u64,
}

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
pub(crate) fn create_owner_only(path: &Path) -> Result<(), StoreError> {
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
pub fn shadow_record_from_json(text: &str) -> Result<ShadowRecord, StoreError> {
    shadow::parse_record(crate::domain::Kind::Account, "-", text)
}

#[cfg(test)]
mod tests {
    use super::StatsRefresh;
    use std::time::{Duration, Instant};

    #[test]
    fn statistics_are_refreshed_after_enough_rows_and_at_most_every_five_seconds() {
        let stats = StatsRefresh::default();
        let t0 = Instant::now();
        assert!(!stats.note(9_999, t0), "fewer rows than the threshold");
        assert!(stats.note(1, t0), "the threshold reached");
        // A push writes 2,500 rows a batch, 20 batches a second: not an ANALYZE every 200 ms.
        let mut due = 0;
        for i in 1..=20 {
            if stats.note(2_500, t0 + Duration::from_millis(200 * i)) {
                due += 1;
            }
        }
        assert_eq!(due, 0, "refreshed again within {:?}", StatsRefresh::EVERY);
        // The rows counted meanwhile are not forgotten: the next note after the pause refreshes.
        assert!(stats.note(1, t0 + StatsRefresh::EVERY + Duration::from_millis(1)));
        assert!(
            !stats.note(1, t0 + Duration::from_secs(20)),
            "no rows since"
        );
    }

    #[test]
    fn a_refresh_asked_for_while_one_runs_makes_it_go_round_again() {
        let stats = super::Rounds::default();
        assert!(stats.request(), "the first request runs");
        assert!(stats.round());
        assert!(!stats.request(), "one runner at a time");
        assert!(stats.round(), "the running one goes round again");
        assert!(!stats.round(), "nothing more asked: the runner stops");
        assert!(stats.request(), "a later request runs again");
    }
}
