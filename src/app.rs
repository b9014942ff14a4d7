//! Wiring: settings + state file + Pendo client + writer + one connector per CRM source, and the
//! operations the commands share (a sync pass over the mappings, then a drain of the outbox).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::{ConfigError, MappingSettings, Settings, Source};
use crate::connectors::{Connector, PullSpec};
use crate::engine::{self, CycleError, CycleReport, Mode, Progress};
use crate::lock::InstanceLock;
use crate::mapping::Mapping;
use crate::pendo::{DrainReport, PendoClient, Writer, WriterConfig, WriterError};
use crate::store::{Store, StoreError};

/// Events deleted per retention transaction (a few milliseconds of SQLite's time).
pub const PRUNE_BATCH: u32 = 2_000;
/// The pause between two retention transactions: the writer's settles go first.
pub const PRUNE_PAUSE: Duration = Duration::from_millis(20);

/// A failure of a command, sorted by exit code.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// Exit 2: the configuration (or a usage) is wrong; the message names the key.
    #[error("configuration error: {0}")]
    Config(#[from] ConfigError),
    /// Exit 1: something failed at run time.
    #[error("{0}")]
    Runtime(String),
}

impl AppError {
    pub fn exit_code(&self) -> u8 {
        match self {
            AppError::Config(_) => 2,
            AppError::Runtime(_) => 1,
        }
    }
}

impl From<StoreError> for AppError {
    fn from(e: StoreError) -> Self {
        AppError::Runtime(e.to_string())
    }
}

impl From<WriterError> for AppError {
    fn from(e: WriterError) -> Self {
        AppError::Runtime(e.to_string())
    }
}

impl From<crate::lock::LockError> for AppError {
    fn from(e: crate::lock::LockError) -> Self {
        AppError::Runtime(e.to_string())
    }
}

impl From<CycleError> for AppError {
    fn from(e: CycleError) -> Self {
        AppError::Runtime(e.to_string())
    }
}

pub use crate::connectors::Connectors;

/// The assembled application.
pub struct App {
    pub settings: Arc<Settings>,
    pub store: Store,
    pub pendo: PendoClient,
    pub writer: Writer,
    connectors: Connectors,
    /// The instance lock, when the whole process holds it (see [`App::hold_lock`]).
    lock: std::sync::Mutex<Option<Arc<InstanceLock>>>,
    /// How long [`App::sync`] and [`App::drain`] wait for another writer to let go.
    pub lock_wait: Duration,
    /// `[notify]`: holds, a paused writer, dead values.
    pub notifier: crate::notify::Notifier,
}

/// What `sync` did.
#[derive(Debug, Default)]
pub struct SyncReport {
    pub cycles: Vec<CycleReport>,
    pub failed: Vec<(String, String)>,
    pub drain: Option<DrainReport>,
}

impl SyncReport {
    /// Adds another pass's cycles, failures and drain totals to this one.
    pub fn merge(&mut self, r: SyncReport) {
        self.cycles.extend(r.cycles);
        self.failed.extend(r.failed);
        if let Some(d) = r.drain {
            let total = self.drain.get_or_insert_with(Default::default);
            total.requests += d.requests;
            total.confirmed += d.confirmed;
            total.unmatched += d.unmatched;
            total.failed += d.failed;
            total.paused = d.paused;
        }
    }
}

impl App {
    /// Opens the state file and builds the Pendo side. `connectors` come from
    /// [`crate::connectors::build`] (or a test's fixtures).
    pub async fn open(settings: Arc<Settings>, connectors: Connectors) -> Result<App, AppError> {
        let store = Store::open_settings(&settings.state).await?;
        App::with_store(settings, store, connectors)
    }

    /// Opens the state file and the configured connectors, as the binary does: the connectors
    /// keep their durable facts (rotated tokens, quota readings) in the state file.
    pub async fn open_configured(settings: Arc<Settings>) -> Result<App, AppError> {
        let store = Store::open_settings(&settings.state).await?;
        let connectors = crate::connectors::build(&settings, Some(Arc::new(store.clone())))?;
        App::with_store(settings, store, connectors)
    }

    /// Opens what a dry run needs without writing anything (guarantee 6): the state file
    /// read-only, or an empty state in memory when there is none yet (a dry run on a fresh
    /// machine creates no file); connectors keep rotated tokens and quota readings in memory.
    pub async fn open_dry_run(settings: Arc<Settings>) -> Result<App, AppError> {
        let store = if settings.state.is_postgres() || settings.state.path.exists() {
            Store::open_settings_read_only(&settings.state).await?
        } else {
            Store::open_in_memory().await?
        };
        let kv = crate::connectors::MemoryKv::over(Some(Arc::new(store.clone())));
        let connectors = crate::connectors::build(&settings, Some(Arc::new(kv)))?;
        App::with_store(settings, store, connectors)
    }

    fn with_store(
        settings: Arc<Settings>,
        store: Store,
        connectors: Connectors,
    ) -> Result<App, AppError> {
        let key = settings
            .pendo
            .integration_key_source
            .resolve("pendo.integration_key")?;
        let pendo = PendoClient::new(&settings.pendo, key);
        let notifier = crate::notify::Notifier::from_settings(&settings.notify)?;
        let writer = Writer::new(
            store.clone(),
            pendo.clone(),
            WriterConfig::from_settings(&settings.pendo, settings.schedule.poll_interval),
        );
        Ok(App {
            settings,
            store,
            pendo,
            writer,
            connectors,
            lock: std::sync::Mutex::new(None),
            lock_wait: crate::lock::DEFAULT_WAIT,
            notifier,
        })
    }

    /// Keeps `lock` for the life of this App: every sync and drain runs under it.
    pub fn hold_lock(&self, lock: InstanceLock) {
        *self.lock.lock().expect("lock slot") = Some(Arc::new(lock));
    }

    /// Gives the lock this App holds up (the lease handed over in the database), before the
    /// store closes. Waits for no operation: call it when they are done.
    pub async fn release_lock(&self) {
        let held = self.lock.lock().expect("lock slot").take();
        if let Some(lock) = held.and_then(|l| Arc::try_unwrap(l).ok()) {
            lock.release().await;
        }
    }

    /// The instance lock for one writing operation: the one this App holds, or one taken now
    /// (waiting up to `lock_wait`) and given back when the operation ends.
    async fn writer_lock(&self) -> Result<Arc<InstanceLock>, AppError> {
        if let Some(held) = self.lock.lock().expect("lock slot").clone() {
            return Ok(held);
        }
        let lock =
            InstanceLock::acquire_for(&self.store, &self.settings.state, "sync", self.lock_wait)
                .await?;
        Ok(Arc::new(lock))
    }

    /// The configured mappings, or the one named.
    pub fn mappings(&self, only: Option<&str>) -> Result<Vec<&MappingSettings>, AppError> {
        match only {
            Some(name) => Ok(vec![self.settings.mapping(name)?]),
            None => Ok(self.settings.mappings.iter().collect()),
        }
    }

    /// Every configured connector (for `why --live`).
    pub fn connectors(&self) -> &Connectors {
        &self.connectors
    }

    pub fn connector(&self, source: Source) -> Result<&dyn Connector, AppError> {
        self.connectors
            .get(&source)
            .map(|c| c.as_ref())
            .ok_or_else(|| {
                AppError::Config(ConfigError::new(
                    source.as_str(),
                    "no connector configured for this source",
                ))
            })
    }

    /// Runs one cycle of `mode` for one mapping.
    pub async fn cycle(
        &self,
        m: &MappingSettings,
        mode: Mode,
        dry_run: bool,
        progress: &dyn Progress,
    ) -> Result<CycleReport, CycleError> {
        let connector = self
            .connectors
            .get(&m.source)
            .expect("validated config has a connector per used source");
        let overlap = self.settings.schedule.overlap;
        let mapping = Mapping::new(m);
        // A configuration change takes effect by itself: removed fields are forgotten, and a
        // new or changed field (or definition) makes this cycle a full reconcile.
        let (changed, fingerprint) =
            crate::reconfigure::before_cycle(&self.store, m, dry_run).await?;
        let mode = match (&changed, mode) {
            (Some(why), Mode::Incremental) => {
                tracing::info!(mapping = %m.name, %why, "The mapping's configuration changed; this cycle is a full reconcile.");
                Mode::Reconcile
            }
            _ => mode,
        };
        let result = engine::run_cycle(
            &self.store,
            connector.as_ref(),
            &mapping,
            |since| PullSpec::for_mapping(m, since, overlap),
            mode,
            dry_run,
            Some(&PendoAdopter {
                client: &self.pendo,
                retry: crate::pendo::values::Retry {
                    initial: self.settings.pendo.retry_initial,
                    max: self.settings.pendo.retry_max,
                    attempts: 6,
                },
            }),
            progress,
        )
        .await;
        if let Ok(report) = &result {
            self.notify_hold(report);
            // Remembered once a full pull has completed (or after a mapping's first cycle):
            // a failed one leaves the change to be taken up again.
            if let Some(print) = fingerprint
                && !dry_run
            {
                print.save(&self.store, &m.name).await?;
            }
        }
        result
    }

    /// Tells `[notify]` about a hold this cycle opened.
    fn notify_hold(&self, report: &CycleReport) {
        if let Some(crate::store::GuardOutcome::Held {
            hold_id,
            new: true,
            reason,
            values,
        }) = &report.guard
        {
            self.notifier.notify(
                crate::config::NotifyEvent::Hold,
                Some(&report.mapping),
                format!(
                    "pendo-sync held {values} changes of mapping {}: {reason}. Nothing of it reaches Pendo until someone approves or rejects it: `pendo-sync holds show {hold_id}`",
                    report.mapping
                ),
                serde_json::json!({ "hold_id": hold_id, "reason": reason, "values": values }),
            );
        }
    }

    /// Tells `[notify]` that the writer paused or that values went dead during a drain.
    pub fn notify_after_drain(&self, report: &DrainReport, dead_before: i64, dead_after: i64) {
        if let Some(reason) = &report.paused {
            self.notifier.notify(
                crate::config::NotifyEvent::WriterPaused,
                None,
                format!("pendo-sync paused its writer: {reason}"),
                serde_json::json!({ "reason": reason }),
            );
        }
        if dead_after > dead_before {
            let n = dead_after - dead_before;
            self.notifier.notify(
                crate::config::NotifyEvent::Dead,
                None,
                format!(
                    "pendo-sync: {n} values went dead (they are not retried without an operator): `pendo-sync queue list --state dead`"
                ),
                serde_json::json!({ "new_dead_values": n, "dead_values": dead_after }),
            );
        }
    }

    /// The mode of one scheduled step of `m` (what `sync` runs): a reconcile when
    /// `schedule.reconcile_interval` has passed since the last successful one, else an
    /// incremental cycle. The first time a state file is served, the clock starts now (unless
    /// `dry_run`, which writes nothing).
    pub async fn scheduled_mode(
        &self,
        m: &MappingSettings,
        dry_run: bool,
    ) -> Result<Mode, AppError> {
        let record = if dry_run {
            crate::schedule::ReconcileRecord::load(&self.store, &m.name).await?
        } else {
            Some(crate::schedule::ReconcileRecord::load_or_start(&self.store, &m.name).await?)
        };
        Ok(match record {
            Some(r) if r.due(self.settings.schedule.reconcile_interval) => Mode::Reconcile,
            _ => Mode::Incremental,
        })
    }

    /// One scheduled step of every mapping (or the one named), as `run` would take it, then the
    /// outbox drained: `sync`.
    pub async fn sync_scheduled(
        &self,
        only: Option<&str>,
        dry_run: bool,
        cancel: &CancellationToken,
        progress: &dyn Progress,
    ) -> Result<SyncReport, AppError> {
        let mut report = SyncReport::default();
        for m in self.mappings(only)? {
            let mode = self.scheduled_mode(m, dry_run).await?;
            let r = self
                .sync(Some(&m.name), mode, dry_run, cancel, progress)
                .await?;
            if mode != Mode::Incremental && !dry_run {
                let failed = r.failed.first().map(|(_, e)| e.as_str());
                crate::schedule::ReconcileRecord::record(
                    &self.store,
                    &m.name,
                    failed.map_or(Ok(()), Err),
                    None,
                )
                .await?;
            }
            report.merge(r);
        }
        Ok(report)
    }

    /// Deletes the history's events older than `history.retention`, [`PRUNE_BATCH`] at a time
    /// with a pause between batches, so a writer settling meanwhile waits for one short
    /// transaction at most; then the cycles (`runs`) as old, but each mapping's last one and
    /// last successful one. Returns the events deleted. Stops early when `cancel` fires.
    pub async fn prune_history(&self, cancel: &CancellationToken) -> Result<u64, AppError> {
        let retention = self.settings.history.retention.as_millis() as i64;
        let before = crate::domain::now_ms() - retention;
        let total = in_batches(cancel, || self.store.prune_history(before, PRUNE_BATCH)).await?;
        if total > 0 {
            tracing::info!(
                events = total,
                "Deleted history events past history.retention."
            );
        }
        // The cycle log ages out with the history (its detections name their cycle).
        let runs = in_batches(cancel, || self.store.prune_runs(before, PRUNE_BATCH)).await?;
        if runs > 0 {
            tracing::info!(cycles = runs, "Deleted cycles past history.retention.");
        }
        // Finished resync jobs too (one row per request).
        self.store.prune_resyncs(before).await?;
        Ok(total)
    }

    /// One pass: a cycle per mapping (a failing mapping does not stop the others), then the
    /// outbox drained. Dry runs write nothing and send nothing.
    pub async fn sync(
        &self,
        only: Option<&str>,
        mode: Mode,
        dry_run: bool,
        cancel: &CancellationToken,
        progress: &dyn Progress,
    ) -> Result<SyncReport, AppError> {
        // One writer per outbox: the cycles and the drain run under the instance lock.
        let lock = if dry_run {
            None
        } else {
            Some(self.writer_lock().await?)
        };
        let mut report = SyncReport::default();
        if lock.is_some() {
            crate::reconfigure::forget_removed(&self.settings, &self.store).await?;
        }
        for m in self.mappings(only)? {
            if cancel.is_cancelled() {
                break;
            }
            match self.cycle(m, mode, dry_run, progress).await {
                Ok(r) => report.cycles.push(r),
                Err(CycleError::Store(e)) => return Err(e.into()),
                Err(e) => {
                    tracing::error!(mapping = %m.name, error = %e, "Cycle failed; its watermark stays where the last committed page left it.");
                    report.failed.push((m.name.clone(), e.to_string()));
                }
            }
        }
        if let Some(lock) = &lock
            && !cancel.is_cancelled()
        {
            report.drain = Some(
                self.drain_locked(lock, cancel, engine::SYNC_RETRY_WAIT)
                    .await?,
            );
            // A `sync` run from cron is the only upkeep such a state file gets.
            self.prune_history(cancel).await?;
        }
        Ok(report)
    }

    /// Starts the writer (releasing stale leases) and drains the outbox, under the instance
    /// lock.
    pub async fn drain(
        &self,
        cancel: &CancellationToken,
        wait_for_retries: Duration,
    ) -> Result<DrainReport, AppError> {
        let lock = self.writer_lock().await?;
        self.drain_locked(&lock, cancel, wait_for_retries).await
    }

    async fn drain_locked(
        &self,
        lock: &InstanceLock,
        cancel: &CancellationToken,
        wait_for_retries: Duration,
    ) -> Result<DrainReport, AppError> {
        self.writer.start(lock).await?;
        let dead_before = self.store.dead_count().await?;
        let report = self.writer.drain(cancel, wait_for_retries).await?;
        let dead_after = self.store.dead_count().await?;
        self.notify_after_drain(&report, dead_before, dead_after);
        Ok(report)
    }
}

/// Runs one batch of a pruning (it returns how many rows it deleted) until a batch comes back
/// short of [`PRUNE_BATCH`], [`PRUNE_PAUSE`] apart, or `cancel` fires; the rows deleted in all.
async fn in_batches<F, Fut>(cancel: &CancellationToken, mut batch: F) -> Result<u64, AppError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<u64, crate::store::StoreError>>,
{
    let mut total = 0;
    while !cancel.is_cancelled() {
        let n = batch().await?;
        total += n;
        if n < u64::from(PRUNE_BATCH) {
            break;
        }
        tokio::time::sleep(PRUNE_PAUSE).await;
    }
    Ok(total)
}

/// The cycle's adoption of what Pendo holds before a first push ([`crate::pendo::adopt`]).
struct PendoAdopter<'c> {
    client: &'c PendoClient,
    retry: crate::pendo::values::Retry,
}

impl engine::Adopter for PendoAdopter<'_> {
    fn adopt<'a>(
        &'a self,
        store: &'a Store,
        mapping: &'a Mapping,
        fields: &'a [&'a crate::mapping::FieldMap],
    ) -> crate::connectors::BoxFuture<'a, Result<crate::store::Adopted, String>> {
        Box::pin(async move {
            crate::pendo::adopt::adopt(store, self.client, mapping, fields, self.retry)
                .await
                .map(|a| crate::store::Adopted {
                    seeded: a.seeded,
                    equal: a.equal,
                })
                .map_err(|e| e.to_string())
        })
    }

    fn read_held<'a>(
        &'a self,
        mapping: &'a Mapping,
        fields: &'a [&'a crate::mapping::FieldMap],
    ) -> crate::connectors::BoxFuture<'a, Result<engine::PendoHeld, String>> {
        Box::pin(async move {
            crate::pendo::adopt::read_held(self.client, mapping, fields, self.retry)
                .await
                .map_err(|e| e.to_string())
        })
    }
}
