//! `pendo-sync run`: the long-lived service. This module owns the run loop and its state:
//!
//! - the **instance lock** ([`crate::lock`]) for the life of the process: one writer per state file;
//! - one **mapping loop** per mapping ([`crate::schedule`]): an incremental cycle every
//!   `schedule.poll_interval`, a full reconcile instead when `schedule.reconcile_interval` has
//!   passed since the last successful one (remembered in the state file, so a restart does not
//!   reconcile at once); a failed reconcile is retried with backoff, incrementals in between;
//! - the **outbox worker**: the only sender to Pendo. It drains whatever is due, then sleeps until
//!   the next row falls due (retries, unmatched ids), a cycle nudges it, or a poll interval passes;
//! - **resync jobs** requested over the admin port (`POST /v1/resync`), run one at a time;
//! - **readiness**: what `/readyz` answers (see [`Service::readiness`]).
//!
//! Every task runs under one [`CancellationToken`] (SIGTERM/SIGINT) and one [`TaskTracker`]. On
//! shutdown the loops stop taking work; a cycle in progress is abandoned (its committed pages are
//! kept, the rest is read again at the next start); batches in flight to Pendo finish and are
//! settled, so what Pendo confirmed is committed and the rest stays in the outbox. The process
//! exits 0 once the tasks are done, or after `pendo.timeout` + 15 s if a request hangs (an
//! unsettled batch is only leased, and is sent again at the next start).
//!
//! A writer paused by Pendo (401/403) keeps the service up and fails `/readyz`. Once per poll
//! interval, and at once on `POST /v1/resync`, the worker re-reads the integration key and asks
//! Pendo's token-verify endpoint whether it now has write access; if so it resumes with a fresh
//! writer. So a key fixed in Pendo (write access enabled) or rotated on disk needs no restart, and a
//! refused key costs one cheap GET per poll interval.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use metrics_exporter_prometheus::PrometheusHandle;
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::app::App;
use crate::config::{ConfigError, MappingSettings, Settings};
use crate::domain::{Kind, iso8601_from_ms, now_ms};
use crate::engine::{CycleReport, Mode, Progress};
use crate::pendo::writer::PAUSED_KEY;
use crate::pendo::{Writer, WriterConfig};
use crate::schedule::{RECONCILE_FAILURES, ReconcileRecord, ReconcileSchedule};
use crate::store::{ResyncRecord, Store};

/// How often a running service deletes the history's expired events.
const PRUNE_EVERY: Duration = Duration::from_secs(600);

/// Readiness needs every mapping's last cycle to have succeeded within this many poll intervals.
const READY_INTERVALS: u32 = 3;

// ---- shared service state --------------------------------------------------------------------

/// What the service knows about one mapping's cycles (for `/readyz`).
#[derive(Debug, Clone, Default)]
struct MappingHealth {
    running_since: Option<Instant>,
    last_ok: Option<bool>,
    last_error: Option<String>,
    last_success: Option<Instant>,
    /// Consecutive failed reconciles, and the last one's error.
    reconcile_failures: u32,
    reconcile_error: Option<String>,
}

/// The progress document of a resync requested over the admin port (`GET /v1/resync/{id}`).
#[derive(Debug, Clone, Serialize)]
pub struct ResyncStatus {
    pub id: String,
    /// queued | running | done | failed
    pub state: String,
    pub mappings: Vec<String>,
    pub kind: Option<String>,
    pub records_read: u64,
    pub changes: u64,
    /// Records Pendo confirmed while the resync's changes were being sent (changes of regular
    /// cycles confirmed in the same window are included).
    pub pushed: u64,
    /// Values still pending in the outbox when this document was produced.
    pub outbox_pending: Option<i64>,
    /// Holds of the guard this resync's changes went into ("hold 3: would clear …").
    pub held: Vec<String>,
    pub error: Option<String>,
    pub requested_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
}

impl ResyncStatus {
    fn from_record(r: &ResyncRecord) -> ResyncStatus {
        ResyncStatus {
            id: r.id.clone(),
            state: r.state.clone(),
            mappings: r.mappings.clone(),
            kind: r.kind.clone(),
            records_read: r.records_read,
            changes: r.changes,
            pushed: r.pushed,
            outbox_pending: None,
            held: r.held.clone(),
            error: r.error.clone(),
            requested_at: iso8601_from_ms(r.requested_at),
            started_at: r.started_at.map(iso8601_from_ms),
            finished_at: r.finished_at.map(iso8601_from_ms),
        }
    }
}

/// The handshake between the outbox worker and those who wait for it (resync jobs).
struct WorkerSignals {
    /// Wakes the worker early (a cycle committed changes, a resync wants a pass).
    wake: Notify,
    /// Passes asked for so far; a pass serves every request made before it started.
    requested: AtomicU64,
    /// The last request number a finished pass served.
    completed: watch::Sender<u64>,
    /// Records Pendo confirmed since the service started.
    confirmed: AtomicU64,
    /// Try a paused writer again at the next pass instead of waiting for the poll interval.
    probe_now: AtomicBool,
}

/// The admin port's tokens, read from their sources once at start-up (`admin.token`,
/// `admin.viewer_token`).
#[derive(Debug, Default, Clone)]
pub struct AdminTokens {
    /// Reads and actions.
    pub operator: Option<SecretString>,
    /// Reads only.
    pub viewer: Option<SecretString>,
}

impl AdminTokens {
    /// Reads both tokens; one token for both roles is refused (a viewer could act).
    pub fn resolve(admin: &crate::config::AdminSettings) -> Result<AdminTokens, ConfigError> {
        let read = |source: &crate::config::SecretSource, key: &str| {
            source.is_set().then(|| source.resolve(key)).transpose()
        };
        let tokens = AdminTokens {
            operator: read(&admin.token_source, "admin.token")?,
            viewer: read(&admin.viewer_token_source, "admin.viewer_token")?,
        };
        if let (Some(o), Some(v)) = (&tokens.operator, &tokens.viewer)
            && o.expose_secret() == v.expose_secret()
        {
            return Err(ConfigError::new(
                "admin.viewer_token",
                "is the same as admin.token: a viewer could act; give the viewer a token of its own",
            ));
        }
        Ok(tokens)
    }
}

/// The running service: what the loops, the resync jobs and the admin port share.
pub struct Service {
    pub settings: Arc<Settings>,
    pub store: Store,
    app: App,
    pub cancel: CancellationToken,
    tracker: TaskTracker,
    metrics: Option<PrometheusHandle>,
    admin_tokens: AdminTokens,
    health: Mutex<HashMap<String, MappingHealth>>,
    cycle_locks: HashMap<String, Arc<tokio::sync::Mutex<()>>>,
    writer_paused: Mutex<Option<String>>,
    worker: WorkerSignals,
    /// The resync this process is running, with its live counters (the state holds every
    /// job; this one's row is written at each step).
    running_resync: Mutex<Option<ResyncRecord>>,
    resync_seq: AtomicU64,
    /// Wakes the resync runner (a job was queued here).
    resync_wake: Notify,
    /// Whether this process holds the writer's role: always on SQLite (the file lock was taken
    /// before the service started); on PostgreSQL once it took the lease (a standby until then).
    leader: AtomicBool,
    gauges: StateGauges,
}

/// The state gauges' last read, and what wakes their loop.
#[derive(Default)]
struct StateGauges {
    figures: Mutex<Option<crate::status::GaugeFigures>>,
    wake: Notify,
}

/// The state gauges are read again at most this often after changes of this process's.
pub const GAUGES_MIN_INTERVAL: Duration = Duration::from_secs(1);
/// ... and at least this often.
pub const GAUGES_MAX_AGE: Duration = Duration::from_secs(5);

impl Service {
    fn poll_interval(&self) -> Duration {
        self.settings.schedule.poll_interval
    }

    pub fn metrics_handle(&self) -> Option<&PrometheusHandle> {
        self.metrics.as_ref()
    }

    /// The admin port's tokens (read once at start-up).
    pub fn admin_tokens(&self) -> &AdminTokens {
        &self.admin_tokens
    }

    /// Why the service is not ready, or `Ok` if it is: the state file answers, the writer is not
    /// paused, and every mapping's last finished cycle succeeded within three poll intervals (a
    /// cycle still running after a success counts as fresh: a long reconcile is not an outage;
    /// a hung one is bounded by the CRM clients' timeouts). Before the first cycle: not ready.
    pub async fn readiness(&self) -> Result<(), Vec<String>> {
        let mut reasons = Vec::new();
        if let Err(e) = self.store.ping().await {
            reasons.push(format!(
                "{} not usable: {e}",
                crate::store::state_kind(self.store.path())
            ));
        }
        if let Some(reason) = self.writer_paused.lock().expect("pause lock").clone() {
            reasons.push(format!("writer paused: {reason}"));
        }
        let window = self.poll_interval() * READY_INTERVALS;
        let health = self.health.lock().expect("health lock");
        for m in &self.settings.mappings {
            let h = health.get(&m.name).cloned().unwrap_or_default();
            match h.last_ok {
                None => reasons.push(format!("mapping {}: first cycle not finished", m.name)),
                Some(false) => reasons.push(format!(
                    "mapping {}: last cycle failed: {}",
                    m.name,
                    h.last_error.as_deref().unwrap_or("unknown error")
                )),
                Some(true) if h.reconcile_failures > 0 => reasons.push(format!(
                    "mapping {}: {} reconcile(s) failed in a row (deletes, filter exits and missed changes wait): {}",
                    m.name,
                    h.reconcile_failures,
                    h.reconcile_error.as_deref().unwrap_or("unknown error")
                )),
                Some(true) => {
                    let fresh = h.running_since.is_some()
                        || h.last_success.is_some_and(|at| at.elapsed() <= window);
                    if !fresh {
                        reasons.push(format!(
                            "mapping {}: no successful cycle in the last {}",
                            m.name,
                            humantime::format_duration(window)
                        ));
                    }
                }
            }
        }
        if reasons.is_empty() {
            Ok(())
        } else {
            Err(reasons)
        }
    }

    /// Whether Pendo refused the key and the writer is waiting for it to be fixed.
    pub fn writer_paused(&self) -> Option<String> {
        self.writer_paused.lock().expect("pause lock").clone()
    }

    /// Validates a resync request and queues it in the state (any replica may; the writer
    /// carries it out); returns its document. Validation errors are for the caller (400).
    pub async fn request_resync(
        &self,
        mapping: Option<&str>,
        kind: Option<Kind>,
    ) -> Result<ResyncStatus, ResyncRequestError> {
        let job = new_resync(&self.settings, mapping, kind, &self.resync_seq)
            .map_err(ResyncRequestError::Invalid)?;
        self.store
            .save_resync(&job)
            .await
            .map_err(ResyncRequestError::Store)?;
        self.resync_wake.notify_one();
        tracing::info!(id = %job.id, mappings = ?job.mappings, "Resync requested.");
        Ok(ResyncStatus::from_record(&job))
    }

    /// A resync's progress (live, if this process runs it), with the outbox's current pending
    /// count. `None`: no such job.
    pub async fn resync_status(&self, id: &str) -> Option<ResyncStatus> {
        let live = self
            .running_resync
            .lock()
            .expect("resync lock")
            .clone()
            .filter(|r| r.id == id);
        let record = match live {
            Some(r) => r,
            None => self.store.resync(id).await.ok()??,
        };
        let mut status = ResyncStatus::from_record(&record);
        if let Ok(counts) = self.store.outbox_counts().await {
            status.outbox_pending = counts.get("pending").copied();
        }
        Some(status)
    }

    fn update_resync(&self, id: &str, f: impl FnOnce(&mut ResyncRecord)) {
        if let Some(r) = self
            .running_resync
            .lock()
            .expect("resync lock")
            .as_mut()
            .filter(|r| r.id == id)
        {
            f(r);
        }
    }

    /// Writes the running job's row as it stands.
    async fn save_running_resync(&self) {
        let job = self.running_resync.lock().expect("resync lock").clone();
        if let Some(job) = job
            && let Err(e) = self.store.save_resync(&job).await
        {
            tracing::warn!(id = %job.id, error = %e, "Cannot record the resync's progress.");
        }
    }

    /// Runs the queued resyncs one at a time, oldest first: those queued here (woken at once)
    /// and those another replica or the CLI queued in the state (polled each second). Jobs a
    /// dead predecessor left running are queued again first.
    async fn resync_runner(self: Arc<Self>) {
        match self.store.requeue_resyncs().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                jobs = n,
                "Resyncs left running by an earlier process are queued again."
            ),
            Err(e) => tracing::warn!(error = %e, "Cannot requeue resyncs left running."),
        }
        loop {
            match self.store.claim_resync(now_ms()).await {
                Ok(Some(job)) => {
                    let id = job.id.clone();
                    *self.running_resync.lock().expect("resync lock") = Some(job);
                    self.clone().run_resync(&id).await;
                    *self.running_resync.lock().expect("resync lock") = None;
                    continue;
                }
                Ok(None) => {}
                Err(e) if self.store.reachable().await => {
                    tracing::warn!(error = %e, "Cannot read the queued resyncs.")
                }
                // The outage is told once (`Store::reachable`), not by every loop.
                Err(_) => {}
            }
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = self.resync_wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    async fn run_resync(self: Arc<Self>, id: &str) {
        let mappings = self
            .running_resync
            .lock()
            .expect("resync lock")
            .as_ref()
            .map(|s| s.mappings.clone())
            .unwrap_or_default();
        let confirmed_before = self.worker.confirmed.load(Ordering::SeqCst);
        let mut errors = Vec::new();
        for name in &mappings {
            let Ok(m) = self.settings.mapping(name) else {
                continue;
            };
            let (read, changes) = self
                .running_resync
                .lock()
                .expect("resync lock")
                .as_ref()
                .map_or((0, 0), |s| (s.records_read, s.changes));
            let progress = JobProgress {
                service: &self,
                id,
                base_read: read,
                base_changes: changes,
            };
            match self.cycle(m, Mode::Resync, &progress).await {
                Some(Ok(report)) => {
                    if let Some(crate::store::GuardOutcome::Held {
                        hold_id, reason, ..
                    }) = &report.guard
                    {
                        let line = format!("hold {hold_id} (mapping {name}): {reason}");
                        self.update_resync(id, |s| s.held.push(line));
                    }
                }
                Some(Err(e)) => errors.push(e),
                None => {
                    self.stopped_during_resync(id).await;
                    return;
                }
            }
            self.save_running_resync().await;
        }
        // The worker sends what the resync queued; the resync is done when a pass that started
        // after its last cycle has finished (a paused writer is tried again at once), and the
        // retries falling due within SYNC_RETRY_WAIT have had their passes too, as `sync` waits.
        self.worker.probe_now.store(true, Ordering::SeqCst);
        let deadline = now_ms() + crate::engine::SYNC_RETRY_WAIT.as_millis() as i64;
        loop {
            if !self.worker_pass().await {
                self.stopped_during_resync(id).await;
                return;
            }
            if self.writer_paused().is_some() {
                break;
            }
            match self.store.next_due_at(None).await {
                Ok(Some(due)) if due <= deadline => {
                    let wait = Duration::from_millis((due - now_ms()).max(0) as u64);
                    tokio::select! {
                        _ = self.cancel.cancelled() => {}
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
                Ok(_) => break,
                Err(e) => {
                    errors.push(e.to_string());
                    break;
                }
            }
        }
        let pushed = self.worker.confirmed.load(Ordering::SeqCst) - confirmed_before;
        self.update_resync(id, |s| s.pushed = pushed);
        if let Some(reason) = self.writer_paused() {
            errors.push(format!("writer paused: {reason}"));
        }
        let result = if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        };
        self.finish_resync(id, result).await;
    }

    /// The service stopped mid-job: the job stays `running` in the state, and whoever writes
    /// next (this process restarted, or a standby) queues it again.
    async fn stopped_during_resync(&self, id: &str) {
        tracing::info!(%id, "Stopping during a resync; it runs again at the next start.");
        self.save_running_resync().await;
    }

    async fn finish_resync(&self, id: &str, result: Result<(), String>) {
        match &result {
            Ok(()) => tracing::info!(%id, "Resync done."),
            Err(e) => tracing::error!(%id, error = %e, "Resync failed."),
        }
        self.update_resync(id, |s| {
            s.finished_at = Some(now_ms());
            match result {
                Ok(()) => s.state = "done".into(),
                Err(e) => {
                    s.state = "failed".into();
                    s.error = Some(e);
                }
            }
        });
        self.save_running_resync().await;
    }

    /// Asks the worker for a pass and waits until one that started after this call finished.
    /// False if the service stopped first.
    async fn worker_pass(&self) -> bool {
        let ticket = self.worker.requested.fetch_add(1, Ordering::SeqCst) + 1;
        let mut completed = self.worker.completed.subscribe();
        self.worker.wake.notify_one();
        tokio::select! {
            _ = self.cancel.cancelled() => false,
            r = completed.wait_for(|done| *done >= ticket) => r.is_ok(),
        }
    }

    /// One cycle of `m` under its mapping lock (cycles of one mapping never overlap: they share
    /// its watermark). Records the outcome for readiness; `None` if the service stopped first.
    async fn cycle(
        &self,
        m: &MappingSettings,
        mode: Mode,
        progress: &dyn Progress,
    ) -> Option<Result<CycleReport, String>> {
        let lock = self.cycle_locks.get(&m.name).expect("a lock per mapping");
        let _guard = tokio::select! {
            _ = self.cancel.cancelled() => return None,
            g = lock.lock() => g,
        };
        self.health_update(&m.name, |h| h.running_since = Some(Instant::now()));
        let result = tokio::select! {
            _ = self.cancel.cancelled() => {
                tracing::warn!(mapping = %m.name, mode = mode.as_str(), "Abandoned a cycle to stop; its committed pages are kept, the rest is read again at the next start.");
                self.health_update(&m.name, |h| h.running_since = None);
                return None;
            }
            r = self.app.cycle(m, mode, false, progress) => r,
        };
        let result = result.map_err(|e| e.to_string());
        match &result {
            Ok(report) => {
                self.health_update(&m.name, |h| {
                    h.running_since = None;
                    h.last_ok = Some(true);
                    h.last_error = None;
                    h.last_success = Some(Instant::now());
                });
                // A resync is a reconcile too: the next one is a reconcile interval away.
                if mode == Mode::Resync {
                    match ReconcileRecord::record(&self.store, &m.name, Ok(()), None).await {
                        Ok(r) => self.health_update(&m.name, |h| {
                            h.reconcile_failures = r.failures;
                            h.reconcile_error = r.last_error.clone();
                        }),
                        Err(e) => {
                            tracing::warn!(mapping = %m.name, error = %e, "Could not record the reconcile time; the next one may come early.")
                        }
                    }
                }
                if report.changes > 0 || report.cleared_orphans > 0 {
                    self.worker.wake.notify_one();
                }
                self.state_changed();
                if let Some(crate::store::GuardOutcome::Held { .. }) = &report.guard {
                    self.refresh_state_gauges().await;
                }
            }
            Err(e) => {
                if self.store.reachable().await {
                    tracing::error!(mapping = %m.name, mode = mode.as_str(), error = %e, "Cycle failed; it is tried again next poll interval.");
                } else {
                    tracing::debug!(mapping = %m.name, error = %e, "Cycle failed: the state is unreachable.");
                }
                self.health_update(&m.name, |h| {
                    h.running_since = None;
                    h.last_ok = Some(false);
                    h.last_error = Some(e.clone());
                });
            }
        }
        Some(result)
    }

    /// Approves or rejects a hold (admin port), then refreshes the hold gauges and, on approval,
    /// wakes the writer for the rows that became pending.
    pub async fn decide_hold(
        &self,
        id: i64,
        approve: bool,
        who: &str,
        reason: Option<&str>,
    ) -> Result<crate::store::Hold, crate::store::HoldError> {
        let hold = self.store.decide_hold(id, approve, who, reason).await?;
        tracing::info!(hold = id, mapping = %hold.mapping, state = %hold.state, %who, "A hold was decided.");
        self.refresh_state_gauges().await;
        if approve {
            self.worker.wake.notify_one();
        }
        Ok(hold)
    }

    /// `queue retry` (`retry`) or `queue drop` over the admin port: the gauges follow a drop
    /// (it may close a hold), and a retry wakes the writer for the rows now due.
    pub async fn queue_action(
        &self,
        retry: bool,
        filter: &crate::store::QueueFilter,
        who: &str,
    ) -> Result<u64, crate::store::StoreError> {
        let n = if retry {
            self.store.outbox_retry(filter, who).await?
        } else {
            self.store.outbox_drop(filter, who).await?
        };
        tracing::info!(retry, rows = n, state = ?filter.state, id = ?filter.pendo_id, %who, "Queue action over the admin port.");
        if retry {
            self.worker.wake.notify_one();
        } else {
            self.refresh_state_gauges().await;
        }
        Ok(n)
    }

    /// The gauges that describe the state (holds, held values, outbox, ...), read now: after a
    /// change a scrape should see at once, and by [`Service::state_gauges_loop`]. A scrape does
    /// not read the state (at 100,000 outbox rows that read is tens of milliseconds, and
    /// scrapes come from every Prometheus, every few seconds); it shows what this read last
    /// found, with the oldest pending change's age as of the scrape.
    pub async fn refresh_state_gauges(&self) {
        match crate::status::gauge_figures(&self.settings, &self.store).await {
            Ok(figures) => {
                crate::status::set_gauges(&figures, now_ms());
                *self.gauges.figures.lock().expect("gauges lock") = Some(figures);
            }
            Err(e) if self.store.reachable().await => {
                tracing::warn!(error = %e, "Cannot read the state for the metrics.")
            }
            Err(_) => {}
        }
    }

    /// Tells the state gauges that this process changed the state (a cycle, a writer pass):
    /// they are read again within [`GAUGES_MIN_INTERVAL`], not at once.
    pub fn state_changed(&self) {
        self.gauges.wake.notify_one();
    }

    /// Sets the state gauges for a scrape, from their last read: the first scrape reads them
    /// (a service whose loop has not run yet), later ones only age the oldest pending change.
    pub async fn state_gauges_for_scrape(&self) {
        let known = self.gauges.figures.lock().expect("gauges lock").clone();
        match known {
            Some(figures) => crate::status::set_gauges(&figures, now_ms()),
            None => {
                let _ = tokio::time::timeout(crate::store::PING_LIMIT, self.refresh_state_gauges())
                    .await;
            }
        }
    }

    /// Reads the state gauges again after each change this process makes (at most once per
    /// [`GAUGES_MIN_INTERVAL`]) and every [`GAUGES_MAX_AGE`] (another process changes the
    /// state too: the CLI, or the leader when this is a standby). A read that takes long
    /// spaces them further, to 20 times its duration: the gauges never cost the state more
    /// than 5 % of one connection.
    pub async fn state_gauges_loop(self: Arc<Self>) {
        loop {
            let started = Instant::now();
            // A read that waits on a database gone away must not hold up a shutdown.
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = self.refresh_state_gauges() => {}
            }
            let took = started.elapsed() * 20;
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = tokio::time::sleep(GAUGES_MIN_INTERVAL.max(took)) => {}
            }
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = self.gauges.wake.notified() => {}
                _ = tokio::time::sleep(GAUGES_MAX_AGE - GAUGES_MIN_INTERVAL) => {}
            }
        }
    }

    fn health_update(&self, mapping: &str, f: impl FnOnce(&mut MappingHealth)) {
        f(self
            .health
            .lock()
            .expect("health lock")
            .entry(mapping.to_owned())
            .or_default());
    }

    async fn mapping_loop(self: Arc<Self>, name: String) {
        let Ok(m) = self.settings.mapping(&name) else {
            return;
        };
        let schedule = &self.settings.schedule;
        let record = match ReconcileRecord::load_or_start(&self.store, &name).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(mapping = %name, error = %e, "Cannot read the reconcile schedule; the clock starts now.");
                ReconcileRecord::default()
            }
        };
        metrics::gauge!(RECONCILE_FAILURES, "mapping" => name.clone()).set(record.failures as f64);
        self.health_update(&name, |h| {
            h.reconcile_failures = record.failures;
            h.reconcile_error = record.last_error.clone();
        });
        let plan = ReconcileSchedule::new(
            schedule.poll_interval,
            schedule.reconcile_interval,
            record.age(),
            record.failures,
        );
        let service = &self;
        crate::schedule::mapping_loop(
            plan,
            &self.cancel,
            |mode| async move {
                service
                    .cycle(m, mode, &())
                    .await
                    .map(|r| r.map(|_| ()))
            },
            |outcome, retry| async move {
                let recorded = ReconcileRecord::record(
                    &service.store,
                    &m.name,
                    outcome.as_ref().map(|_| ()).map_err(String::as_str),
                    retry,
                )
                .await;
                match recorded {
                    Ok(r) => service.health_update(&m.name, |h| {
                        h.reconcile_failures = r.failures;
                        h.reconcile_error = r.last_error.clone();
                    }),
                    Err(e) => {
                        tracing::warn!(mapping = %m.name, error = %e, "Could not record the reconcile's outcome in the state file.")
                    }
                }
            },
        )
        .await;
    }

    /// Builds a writer on a freshly read key if Pendo now accepts it with write access.
    async fn probe_writer(&self) -> Option<Writer> {
        let key = match self
            .settings
            .pendo
            .integration_key_source
            .resolve("pendo.integration_key")
        {
            Ok(k) => k,
            Err(e) => {
                tracing::error!(error = %e, "Cannot read the Pendo integration key; the writer stays paused.");
                return None;
            }
        };
        // The probe goes through the writer's limiter, like every Pendo call.
        let client = self.app.pendo.with_key(key);
        match client.verify_token().await {
            Ok(t) if t.valid && t.write_access => {
                if let Err(e) = self.store.kv_delete(PAUSED_KEY).await {
                    tracing::warn!(error = %e, "Could not clear the pause mark in the state file.");
                }
                tracing::info!(
                    "Pendo accepts the integration key with write access again; resuming the writer."
                );
                Some(Writer::new(
                    self.store.clone(),
                    client,
                    WriterConfig::from_settings(
                        &self.settings.pendo,
                        self.settings.schedule.poll_interval,
                    ),
                ))
            }
            Ok(t) => {
                tracing::warn!(
                    valid = t.valid,
                    write_access = t.write_access,
                    "Pendo still refuses the integration key; the writer stays paused."
                );
                None
            }
            Err(e) => {
                tracing::warn!(error = %e, "Could not verify the Pendo integration key; the writer stays paused.");
                None
            }
        }
    }

    /// The only sender to Pendo: drains what is due, then waits for the next due row, a nudge or
    /// a poll interval. Cancellation stops it between batches; batches in flight finish and settle.
    async fn outbox_worker(self: Arc<Self>, mut writer: Writer) {
        let mut last_probe = Instant::now();
        let mut release_leases = false;
        loop {
            if self.cancel.is_cancelled() {
                return;
            }
            // A failed pass may have dropped batches mid-flight with their rows still leased;
            // by now (a wait later) those tasks are gone, and the rows must become claimable.
            if std::mem::take(&mut release_leases)
                && let Err(e) = self.store.release_leases().await
            {
                if self.store.reachable().await {
                    tracing::error!(error = %e, "Cannot release outbox leases; trying again next pass.");
                }
                release_leases = true;
            }
            let ticket = self.worker.requested.load(Ordering::SeqCst);
            if writer.paused().is_some() {
                let now_please = self.worker.probe_now.swap(false, Ordering::SeqCst);
                if now_please || last_probe.elapsed() >= self.poll_interval() {
                    last_probe = Instant::now();
                    if let Some(fresh) = self.probe_writer().await {
                        writer = fresh;
                    }
                }
            } else {
                self.worker.probe_now.store(false, Ordering::SeqCst);
            }
            if writer.paused().is_none() {
                let dead_before = self.store.dead_count().await.unwrap_or(0);
                match writer.drain(&self.cancel, Duration::ZERO).await {
                    Ok(report) => {
                        let dead_after = self.store.dead_count().await.unwrap_or(dead_before);
                        self.app
                            .notify_after_drain(&report, dead_before, dead_after);
                        self.worker
                            .confirmed
                            .fetch_add(report.confirmed, Ordering::SeqCst);
                        if report.requests > 0 {
                            self.state_changed();
                            tracing::debug!(
                                requests = report.requests,
                                confirmed = report.confirmed,
                                unmatched = report.unmatched,
                                failed = report.failed,
                                "Outbox pass finished."
                            );
                        }
                    }
                    Err(e) => {
                        if self.store.reachable().await {
                            tracing::error!(error = %e, "An outbox pass failed; the rows stay in the outbox and are tried again.");
                        }
                        release_leases = true;
                    }
                }
            }
            *self.writer_paused.lock().expect("pause lock") = writer.paused();
            self.worker.completed.send_replace(ticket);
            let wait = if writer.paused().is_some() {
                self.poll_interval()
            } else {
                match self.store.next_due_at(None).await {
                    Ok(Some(due)) => Duration::from_millis((due - now_ms()).max(0) as u64)
                        .min(self.poll_interval()),
                    Ok(None) => self.poll_interval(),
                    Err(e) => {
                        if self.store.reachable().await {
                            tracing::error!(error = %e, "Cannot read the outbox; trying again next poll interval.");
                        }
                        self.poll_interval()
                    }
                }
            };
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = self.worker.wake.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }
}

/// Why a resync request was not queued.
#[derive(Debug, thiserror::Error)]
pub enum ResyncRequestError {
    /// The request names no mapping that exists (a 400).
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Store(crate::store::StoreError),
}

/// A new queued resync of the mappings `mapping` and `kind` select, or why none matches.
/// `seq` keeps ids unique within a process; the start time and pid across processes.
pub fn new_resync(
    settings: &Settings,
    mapping: Option<&str>,
    kind: Option<Kind>,
    seq: &AtomicU64,
) -> Result<ResyncRecord, String> {
    let selected: Vec<String> = match mapping {
        Some(name) => vec![
            settings
                .mapping(name)
                .map_err(|e| e.to_string())?
                .name
                .clone(),
        ],
        None => settings.mappings.iter().map(|m| m.name.clone()).collect(),
    };
    let selected: Vec<String> = selected
        .into_iter()
        .filter(|name| kind.is_none_or(|k| settings.mapping(name).is_ok_and(|m| m.kind == k)))
        .collect();
    if selected.is_empty() {
        return Err("no mapping matches the requested mapping and kind".into());
    }
    let now = now_ms();
    let n = seq.fetch_add(1, Ordering::Relaxed) + 1;
    Ok(ResyncRecord {
        // Unique across restarts and replicas: a client polling an old id never gets someone
        // else's job.
        id: format!("{now}-{}-{n}", std::process::id()),
        mappings: selected,
        kind: kind.map(|k| k.as_str().to_owned()),
        state: "queued".into(),
        records_read: 0,
        changes: 0,
        pushed: 0,
        held: Vec::new(),
        error: None,
        requested_at: now,
        started_at: None,
        finished_at: None,
    })
}

/// Feeds a resync job's counters from the engine's page callbacks.
struct JobProgress<'a> {
    service: &'a Service,
    id: &'a str,
    base_read: u64,
    base_changes: u64,
}

impl Progress for JobProgress<'_> {
    fn page(&self, report: &CycleReport) {
        self.service.update_resync(self.id, |s| {
            s.records_read = self.base_read + report.pulled;
            s.changes = self.base_changes + report.changes;
        });
    }
}

impl Service {
    /// The service over an opened `app`, sharing `cancel` and `tracker` with whoever runs it.
    pub fn new(
        settings: Arc<Settings>,
        app: App,
        metrics: Option<PrometheusHandle>,
        admin_tokens: AdminTokens,
        cancel: CancellationToken,
        tracker: TaskTracker,
    ) -> Arc<Service> {
        let (completed, _) = watch::channel(0);
        Arc::new(Service {
            store: app.store.clone(),
            writer_paused: Mutex::new(None),
            cycle_locks: settings
                .mappings
                .iter()
                .map(|m| (m.name.clone(), Arc::default()))
                .collect(),
            health: Mutex::new(HashMap::new()),
            worker: WorkerSignals {
                wake: Notify::new(),
                requested: AtomicU64::new(0),
                completed,
                confirmed: AtomicU64::new(0),
                probe_now: AtomicBool::new(false),
            },
            running_resync: Mutex::new(None),
            resync_seq: AtomicU64::new(0),
            resync_wake: Notify::new(),
            leader: AtomicBool::new(false),
            gauges: StateGauges::default(),
            metrics,
            admin_tokens,
            cancel,
            tracker,
            settings,
            app,
        })
    }

    /// Prepares the writer once this process holds `lock` (see [`Writer::start`]).
    pub async fn start_writer(
        &self,
        lock: &crate::lock::InstanceLock,
    ) -> Result<(), crate::pendo::WriterError> {
        self.app.writer.start(lock).await?;
        // Once per leadership too: mappings no longer configured are forgotten.
        crate::reconfigure::forget_removed(&self.settings, &self.store).await?;
        Ok(())
    }

    /// Whether this process writes (the leader), or waits as a standby (PostgreSQL). A leader
    /// whose lease may have passed (its renewals stopped getting through) is not one: another
    /// replica may lead by now, and this one commits and sends nothing.
    pub fn is_leader(&self) -> bool {
        self.leader.load(Ordering::SeqCst) && self.store.may_send()
    }

    /// The `pendo_sync_leader` gauge, as of now (a scrape reads it).
    pub fn refresh_leader_gauge(&self) {
        metrics::gauge!(crate::metrics::LEADER).set(if self.is_leader() { 1.0 } else { 0.0 });
    }

    /// Records the role, and the `pendo_sync_leader` gauge.
    pub fn set_leader(&self, leader: bool) {
        self.leader.store(leader, Ordering::SeqCst);
        metrics::gauge!(crate::metrics::LEADER).set(if leader { 1.0 } else { 0.0 });
    }

    /// Spawns the outbox worker (the only sender, with `writer`), a loop per mapping, the resync
    /// runner and the metrics upkeep on the service's tracker: the leader's work.
    pub fn spawn_tasks(self: &Arc<Self>) {
        self.set_leader(true);
        let writer = self.app.writer.clone();
        self.tracker.spawn(self.clone().outbox_worker(writer));
        self.tracker.spawn(self.clone().resync_runner());
        for m in &self.settings.mappings {
            self.tracker
                .spawn(self.clone().mapping_loop(m.name.clone()));
        }
        self.tracker.spawn(self.clone().history_loop());
        if let Some(handle) = self.metrics.clone() {
            let cancel = self.cancel.clone();
            // Histograms are kept as summaries that need periodic upkeep to stay bounded.
            self.tracker.spawn(async move {
                loop {
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(5)) => handle.run_upkeep(),
                    }
                }
            });
        }
    }

    /// `GET /v1/why/{kind}/{id}`: the same report as `why`; `live` reads through the service's
    /// own connectors and Pendo client (their limiters are the sync's).
    pub async fn why(
        &self,
        kind: crate::domain::Kind,
        id: &str,
        options: &crate::why::WhyOptions,
    ) -> Result<crate::why::WhyReport, crate::why::WhyError> {
        let sources = crate::why::LiveSources {
            connectors: self.app.connectors(),
            pendo: &self.app.pendo,
        };
        crate::why::explain(
            &self.settings,
            &self.store,
            kind,
            id,
            options,
            Some(sources),
        )
        .await
    }

    /// Pings the state every second on a leader and a standby alike, so an outage is told when
    /// it starts and when it ends (see `Store::ping`) even while nothing else asks.
    pub async fn database_watch(self: Arc<Self>) {
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            let _ = self.store.ping().await;
        }
    }

    /// Retention: prunes the history a minute after start, then every [`PRUNE_EVERY`].
    async fn history_loop(self: Arc<Self>) {
        let mut wait = Duration::from_secs(60);
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            if let Err(e) = self.app.prune_history(&self.cancel).await {
                tracing::warn!(error = %e, "Pruning the history failed; tried again later.");
            }
            wait = PRUNE_EVERY;
        }
    }

    /// Closes the state file (checkpointing the WAL) once the tasks are done, after giving
    /// notifications under way a few seconds.
    pub async fn close(&self) {
        self.app.notifier.flush(Duration::from_secs(5)).await;
        self.store.close().await;
        self.app.store.close().await;
    }
}
