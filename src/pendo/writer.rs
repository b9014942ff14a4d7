//! The outbox writer: takes due outbox rows, sends them to Pendo in batches per kind, and settles
//! each row by what Pendo said about its id.
//!
//! One [`Writer::step`] is one batch: claim (lease) due rows → drop rows the shadow already holds →
//! send (limiter before every attempt, in-process retries with exponential backoff and jitter,
//! Retry-After honoured up to `retry_max`) → settle in one transaction. [`Writer::drain`] loops
//! steps, `max_in_flight` at a time, until nothing is due.
//!
//! What each Pendo answer does (the one place this is decided):
//!
//! | answer | rows |
//! |---|---|
//! | 200, id not in `missing`/`errors` | confirmed: shadow updated, row removed |
//! | 200, id in `missing` | `unmatched`: not sent again until Pendo is found to know the id ([`super::discovery`]); a record that only clears: done |
//! | 2xx that does not account for the batch (`{}`, counts ≠ sent) | retried; then bisected; then backoff |
//! | 200, id in `errors` | attempt counted, error text kept, retried with backoff, `dead` at `max_attempts` |
//! | 200 with failures we cannot attribute | batch bisected until they can be |
//! | 400 for the batch | bisected; a record rejected alone is `dead` with Pendo's message |
//! | 408, 413 | batch halved (and later batches smaller) |
//! | 429 / 5xx / timeout / dropped | retried; then backoff in the outbox; `dead` at `max_attempts` |
//! | 401 / 403 | writer paused with an operator hint; rows released, outbox kept |

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder, Retryable};
use tokio_util::sync::CancellationToken;

use super::client::{AUTH_HINT, BulkResult, PendoClient, PendoError};
use super::discovery::{self, DiscoveryConfig};
use crate::config::PendoSettings;
use crate::domain::{DateFormat, Kind, Value, now_ms};
use crate::metrics::VALUES_PUSHED;
use crate::store::{OutboxEntry, SentBatch, Settlement, Store, StoreError};

/// The kv key under which a paused writer leaves its reason (shown by `status`, fails `/readyz`).
pub const PAUSED_KEY: &str = "writer.paused";

/// The writer's knobs, from `[pendo]`.
#[derive(Debug, Clone)]
pub struct WriterConfig {
    pub batch_size: usize,
    pub max_in_flight: usize,
    pub max_attempts: u32,
    pub create_missing: bool,
    /// When the reads that bring unmatched rows back run (`unmatched_retry` among them).
    pub discovery: DiscoveryConfig,
    pub date_format: DateFormat,
    pub retry_initial: Duration,
    pub retry_max: Duration,
    /// Attempts made in-process before a failing batch goes back to the outbox with a backoff.
    pub in_process_attempts: u32,
    /// Test hook: fail the next step once at this point, as a crash would.
    pub fail_point: Option<FailPoint>,
    /// How long after a takeover the rows a dead leader had in a request stay untouched: a
    /// request it started before its lease passed may land at Pendo up to `pendo.timeout`
    /// later, and a newer value sent meanwhile would be overwritten by it.
    pub send_window: Duration,
}

/// Where an injected failure stops a step (crash tests). The effect on the state file is that of a
/// process killed at that point: nothing after it is committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailPoint {
    /// Rows claimed (leased), nothing sent.
    BeforeSend,
    /// Pendo applied the batch; the confirmation was never recorded.
    AfterSend,
    /// The settle transaction ran but never committed.
    DuringSettle,
}

impl WriterConfig {
    /// The writer of `[pendo]`, its discovery paced by the poll interval.
    pub fn from_settings(s: &PendoSettings, poll_interval: Duration) -> WriterConfig {
        WriterConfig {
            batch_size: s.batch_size,
            max_in_flight: s.max_in_flight,
            max_attempts: s.max_attempts,
            create_missing: s.create_missing,
            discovery: DiscoveryConfig {
                every: poll_interval.max(s.discovery_interval),
                full_every: s.unmatched_retry,
            },
            date_format: s.date_format,
            retry_initial: s.retry_initial,
            retry_max: s.retry_max,
            in_process_attempts: 3,
            fail_point: None,
            send_window: s.timeout,
        }
    }
}

/// What one step did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Sent (or settled without sending) the rows of this many records.
    Worked { records: usize },
    /// Nothing of this kind is due.
    Idle,
    /// Pendo refused the key; nothing more is sent until an operator fixes it.
    Paused(String),
}

/// Totals of a drain.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DrainReport {
    pub requests: u64,
    pub confirmed: u64,
    pub unmatched: u64,
    pub failed: u64,
    pub paused: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum WriterError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("injected failure at {0:?}")]
    Injected(FailPoint),
}

#[derive(Debug, Default)]
struct Shared {
    paused: Mutex<Option<String>>,
    /// The batch size now: halved on 408 or 413, grown back on success.
    batch_limit: AtomicUsize,
    requests: AtomicU32,
    confirmed: AtomicU32,
    unmatched: AtomicU32,
    failed: AtomicU32,
    /// A configured fail point fires once.
    fired: std::sync::atomic::AtomicBool,
    /// When the rows another leader left in a request may be sent again (see
    /// [`WriterConfig::send_window`]); none once they were released.
    in_flight_elsewhere_until: Mutex<Option<tokio::time::Instant>>,
}

/// The outbox writer. Cheap to clone; clones share pause state and counters.
#[derive(Debug, Clone)]
pub struct Writer {
    store: Store,
    client: PendoClient,
    cfg: Arc<WriterConfig>,
    shared: Arc<Shared>,
}

/// The rows of one Pendo entity in a batch.
type RecordRows = (String, Vec<OutboxEntry>);

impl Writer {
    pub fn new(store: Store, client: PendoClient, cfg: WriterConfig) -> Writer {
        let shared = Shared::default();
        shared.batch_limit.store(cfg.batch_size, Ordering::Relaxed);
        Writer {
            store,
            client,
            cfg: Arc::new(cfg),
            shared: Arc::new(shared),
        }
    }

    /// Prepares a fresh writer: leases left by a crashed process are released (those rows may
    /// have been sent; sending again is safe), and an old pause is lifted so a fixed key is tried.
    /// Only the holder of the instance lock may do this: another live writer's leases mean
    /// "in flight", and releasing them would send those batches twice.
    ///
    /// On PostgreSQL the earlier process may be a leader that stalled and is still sending: the
    /// rows it had in a request stay leased for `send_window` (a request it started before its
    /// lease passed lands within that), and are released by [`Writer::step`] afterwards. The
    /// other rows go at once.
    pub async fn start(&self, _held: &crate::lock::InstanceLock) -> Result<(), WriterError> {
        if self.store.postgres().is_some() {
            let leased = self.store.leased_rows().await?;
            if leased > 0 {
                tracing::info!(
                    rows = leased,
                    wait = %humantime::format_duration(self.cfg.send_window),
                    "Outbox rows were in a request of the previous leader; they are sent again once its send window (pendo.timeout) has passed."
                );
                *self
                    .shared
                    .in_flight_elsewhere_until
                    .lock()
                    .expect("window lock") =
                    Some(tokio::time::Instant::now() + self.cfg.send_window);
            }
        } else {
            let released = self.store.release_leases().await?;
            if released > 0 {
                tracing::info!(
                    released,
                    "Released outbox rows left in flight by an earlier process."
                );
            }
        }
        self.store.kv_delete(PAUSED_KEY).await?;
        Ok(())
    }

    /// Releases the rows a previous leader had in flight once its send window has passed.
    async fn release_after_window(&self) -> Result<(), WriterError> {
        let due = {
            let mut until = self
                .shared
                .in_flight_elsewhere_until
                .lock()
                .expect("window lock");
            match *until {
                Some(at) if tokio::time::Instant::now() >= at => until.take().is_some(),
                _ => false,
            }
        };
        if due {
            let released = self.store.release_leases().await?;
            tracing::info!(
                released,
                "Released the outbox rows the previous leader had in flight; its send window has passed."
            );
        }
        Ok(())
    }

    /// Why the writer is paused, if it is.
    pub fn paused(&self) -> Option<String> {
        self.shared.paused.lock().expect("pause lock").clone()
    }

    /// Sends at most one batch of `kind`.
    pub async fn step(&self, kind: Kind) -> Result<Step, WriterError> {
        if let Some(reason) = self.paused() {
            return Ok(Step::Paused(reason));
        }
        self.release_after_window().await?;
        let limit = self.shared.batch_limit.load(Ordering::Relaxed).max(1);
        let claimed = self.store.claim_due(kind, now_ms(), limit).await?;
        if claimed.is_empty() {
            return Ok(Step::Idle);
        }
        let mut outcomes: Vec<(OutboxEntry, Settlement)> = Vec::with_capacity(claimed.len());
        let records = self
            .drop_already_confirmed(kind, claimed, &mut outcomes)
            .await?;
        let record_count = records.len();

        // Batches still to send; bisection pushes halves back on. Records that only clear
        // fields go in batches of their own: those are never sent with `?create=true` (a clear
        // must not create an entity a Pendo clean-up deleted), and halving keeps them apart.
        let mut stack: Vec<Vec<RecordRows>> = Vec::new();
        let (clears, sets): (Vec<RecordRows>, Vec<RecordRows>) =
            records.into_iter().partition(|(_, rows)| only_clears(rows));
        for batch in [clears, sets] {
            if !batch.is_empty() {
                stack.push(batch);
            }
        }
        // The requests made (for the history), and the request each outcome was answered in.
        let mut sent: Vec<SentBatch> = Vec::new();
        let mut batch_of: Vec<Option<usize>> = vec![None; outcomes.len()];
        while let Some(batch) = stack.pop() {
            self.fail_at(FailPoint::BeforeSend)?;
            self.store.pause(crate::store::PausePoint::BeforeSend).await;
            if self.paused().is_some() {
                release(batch, &mut outcomes);
                batch_of.resize(outcomes.len(), None);
                continue;
            }
            let sent_at = now_ms();
            let (result, attempts) = self.send(kind, &batch).await;
            let request = SentBatch {
                kind,
                sent_at,
                answered_at: now_ms(),
                records: batch.len() as u32,
                attempts,
                answer: match &result {
                    Ok(r) => r.summary(batch.len()),
                    Err(e) => e.to_string(),
                },
            };
            let answered_from = outcomes.len();
            match result {
                Ok(result) => self.settle_ok(batch, &result, attempts, &mut stack, &mut outcomes),
                Err(PendoError::NotSent { reason }) => {
                    tracing::warn!(records = batch.len(), %reason, "Not sending a batch again.");
                    release(batch, &mut outcomes);
                }
                Err(PendoError::BadRequest { message }) if batch.len() > 1 => {
                    tracing::warn!(records = batch.len(), %message, "Pendo rejected a batch; bisecting to find the bad records.");
                    split_onto(batch, &mut stack);
                }
                Err(PendoError::BadRequest { message }) => {
                    let error = format!("Pendo rejected this record (400): {message}");
                    tracing::error!(kind = %kind, id = %batch[0].0, %error, "Dead-lettered a record.");
                    self.count(&self.shared.failed, &batch);
                    metrics::counter!(VALUES_PUSHED, "kind" => kind.as_str(), "outcome" => "error")
                        .increment(1);
                    for record in batch {
                        settle_all(record, &mut outcomes, |_| Settlement::Dead {
                            error: error.clone(),
                        });
                    }
                }
                Err(PendoError::Unaccounted { message }) if batch.len() > 1 => {
                    tracing::warn!(records = batch.len(), %message, "Pendo's answers did not account for a batch after retries; bisecting it.");
                    split_onto(batch, &mut stack);
                }
                // 408 (too slow) and 413 (too large): the same batch would fail again.
                Err(e) if e.wants_smaller_batch() => {
                    let halved = (batch.len() / 2).max(1);
                    self.shared.batch_limit.fetch_min(halved, Ordering::Relaxed);
                    let error = e.to_string();
                    tracing::warn!(records = batch.len(), halved, %error, "Pendo refused a batch as too slow or too large; halving it.");
                    if batch.len() > 1 {
                        split_onto(batch, &mut stack);
                    } else {
                        self.retry_later(batch, attempts, &error, None, &mut outcomes);
                    }
                }
                Err(PendoError::Auth { status }) => {
                    let reason = format!(
                        "Pendo refused the integration key ({status}); {AUTH_HINT}. The outbox is kept."
                    );
                    tracing::error!(%reason, "Pausing the Pendo writer.");
                    *self.shared.paused.lock().expect("pause lock") = Some(reason.clone());
                    self.store
                        .kv_set(
                            PAUSED_KEY,
                            &serde_json::json!({"reason": reason, "at_ms": now_ms()}),
                        )
                        .await?;
                    release(batch, &mut outcomes);
                }
                Err(e) => {
                    let retry_after = e.retry_after();
                    let error = e.to_string();
                    tracing::warn!(records = batch.len(), attempts, %error, "A Pendo batch failed; it stays in the outbox and is retried later.");
                    self.retry_later(batch, attempts, &error, retry_after, &mut outcomes);
                }
            }
            // Outcomes this answer settled point at it (a paused writer's releases do not,
            // and a batch only bisected leaves none).
            let answered = outcomes.len() > answered_from
                && outcomes[answered_from..]
                    .iter()
                    .any(|(_, s)| *s != Settlement::Release);
            if answered {
                sent.push(request);
            }
            batch_of.resize(outcomes.len(), answered.then(|| sent.len() - 1));
        }
        self.fail_at(FailPoint::AfterSend)?;
        if self.cfg.fail_point == Some(FailPoint::DuringSettle)
            && !self.shared.fired.swap(true, Ordering::SeqCst)
        {
            self.store
                .settle_uncommitted(&outcomes, &sent, &batch_of)
                .await?;
            return Err(WriterError::Injected(FailPoint::DuringSettle));
        }
        self.store.settle_sent(&outcomes, &sent, &batch_of).await?;
        if let Some(reason) = self.paused() {
            return Ok(Step::Paused(reason));
        }
        Ok(Step::Worked {
            records: record_count.max(1),
        })
    }

    /// Sends every due row, `max_in_flight` batches at a time, and waits for retries that fall due
    /// within `wait_for_retries`. Returns early when cancelled (between batches) or paused.
    pub async fn drain(
        &self,
        cancel: &CancellationToken,
        wait_for_retries: Duration,
    ) -> Result<DrainReport, WriterError> {
        let deadline = now_ms() + wait_for_retries.as_millis() as i64;
        let before = self.snapshot();
        if self.paused().is_none() && self.store.may_send() {
            // Unmatched rows whose ids Pendo now knows go out in this drain. A failed read is
            // tried again at the next drain; it stops nothing else.
            if let Err(e) = discovery::pass(&self.store, &self.client, self.cfg.discovery).await {
                tracing::warn!(error = %e, "Could not ask Pendo which unknown ids it knows now; asking again at the next pass.");
            }
        }
        loop {
            let mut workers = tokio::task::JoinSet::new();
            for _ in 0..self.cfg.max_in_flight.max(1) {
                let writer = self.clone();
                let cancel = cancel.clone();
                workers.spawn(async move { writer.work_until_idle(&cancel).await });
            }
            while let Some(joined) = workers.join_next().await {
                joined.expect("writer task does not panic")?;
            }
            if cancel.is_cancelled() || self.paused().is_some() {
                break;
            }
            match self.store.next_due_at(None).await? {
                Some(due) if due <= deadline => {
                    let wait = Duration::from_millis((due - now_ms()).max(0) as u64);
                    tokio::select! {
                        _ = cancel.cancelled() => break,
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
                _ => break,
            }
        }
        let after = self.snapshot();
        Ok(DrainReport {
            requests: (after.0 - before.0) as u64,
            confirmed: (after.1 - before.1) as u64,
            unmatched: (after.2 - before.2) as u64,
            failed: (after.3 - before.3) as u64,
            paused: self.paused(),
        })
    }

    async fn work_until_idle(&self, cancel: &CancellationToken) -> Result<(), WriterError> {
        // A kind with nothing due is asked again after a pause, not before every batch of the
        // other kind: an empty claim is a transaction of its own, as costly on PostgreSQL as a
        // claim that finds rows. Its rows wait at most that long behind a long drain.
        const IDLE_RECHECK: Duration = Duration::from_secs(1);
        let mut idle_since: [Option<tokio::time::Instant>; Kind::ALL.len()] =
            [None; Kind::ALL.len()];
        loop {
            let mut worked = false;
            for (i, kind) in Kind::ALL.into_iter().enumerate() {
                if cancel.is_cancelled() {
                    return Ok(());
                }
                if idle_since[i].is_some_and(|at| at.elapsed() < IDLE_RECHECK) {
                    continue;
                }
                match self.step(kind).await? {
                    Step::Worked { .. } => {
                        worked = true;
                        idle_since[i] = None;
                    }
                    Step::Idle => idle_since[i] = Some(tokio::time::Instant::now()),
                    Step::Paused(_) => return Ok(()),
                }
            }
            if !worked {
                return Ok(());
            }
        }
    }

    fn fail_at(&self, point: FailPoint) -> Result<(), WriterError> {
        if self.cfg.fail_point == Some(point) && !self.shared.fired.swap(true, Ordering::SeqCst) {
            return Err(WriterError::Injected(point));
        }
        Ok(())
    }

    fn snapshot(&self) -> (u32, u32, u32, u32) {
        let s = &self.shared;
        (
            s.requests.load(Ordering::Relaxed),
            s.confirmed.load(Ordering::Relaxed),
            s.unmatched.load(Ordering::Relaxed),
            s.failed.load(Ordering::Relaxed),
        )
    }

    /// Re-checks claimed rows against the shadow: a row whose value Pendo already confirmed (a
    /// later cycle or another batch caught up) is settled without a request, unless forced.
    /// A row whose stored value cannot be read (a corrupt state) is dead-lettered here, never
    /// sent: sent as a null it would clear Pendo's value. The record's other rows go on.
    async fn drop_already_confirmed(
        &self,
        kind: Kind,
        claimed: Vec<OutboxEntry>,
        outcomes: &mut Vec<(OutboxEntry, Settlement)>,
    ) -> Result<Vec<RecordRows>, WriterError> {
        let ids: Vec<&str> = {
            let mut seen = HashSet::new();
            claimed
                .iter()
                .map(|e| e.pendo_id.as_str())
                .filter(|id| seen.insert(*id))
                .collect()
        };
        let shadow = self.store.load_shadow(kind, &ids).await?;
        let mut records: Vec<RecordRows> = Vec::new();
        for entry in claimed {
            let value = match Value::from_stored(&entry.value) {
                Ok(v) => v,
                Err(e) => {
                    let error = unreadable_value_error(&entry.field, &e);
                    tracing::error!(kind = %kind, id = %entry.pendo_id, field = %entry.field, %error, "Dead-lettered a value that could not be read.");
                    self.shared.failed.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!(VALUES_PUSHED, "kind" => kind.as_str(), "outcome" => "error")
                        .increment(1);
                    outcomes.push((entry, Settlement::Dead { error }));
                    continue;
                }
            };
            let confirmed = shadow
                .get(&entry.pendo_id)
                .and_then(|r| r.get(&entry.field));
            let already = match confirmed {
                Some(c) => value.matches_stored(c),
                None => value.is_null(),
            };
            if already && !entry.force {
                outcomes.push((entry, Settlement::AlreadyConfirmed));
                continue;
            }
            match records.last_mut() {
                Some((id, rows)) if *id == entry.pendo_id => rows.push(entry),
                _ => records.push((entry.pendo_id.clone(), vec![entry])),
            }
        }
        Ok(records)
    }

    /// Sends one batch with in-process retries for transient failures. Returns the last result
    /// and how many attempts were made.
    async fn send(
        &self,
        kind: Kind,
        batch: &[RecordRows],
    ) -> (Result<BulkResult, PendoError>, u32) {
        let body = self.body(kind, batch);
        let ids: Vec<&str> = batch.iter().map(|(id, _)| id.as_str()).collect();
        let create = self.cfg.create_missing && !batch.iter().all(|(_, rows)| only_clears(rows));
        let attempts = AtomicU32::new(0);
        let retry_max = self.cfg.retry_max;
        let policy = ExponentialBuilder::default()
            .with_min_delay(self.cfg.retry_initial)
            .with_max_delay(retry_max)
            .with_jitter()
            .with_max_times(self.cfg.in_process_attempts.saturating_sub(1) as usize);
        let result = (|| async {
            // A leader sends only while its lease is surely its own (by its own clock since the
            // last renewal): one that stalled past it may have a successor already, whose newer
            // values this batch would overwrite in Pendo. Checked before every attempt, as a
            // backoff may outlast the lease.
            if !self.store.may_send() {
                return Err(PendoError::NotSent {
                    reason: "the leader lease may have passed to another replica".into(),
                });
            }
            attempts.fetch_add(1, Ordering::Relaxed);
            self.shared.requests.fetch_add(1, Ordering::Relaxed);
            self.client.set_values(kind, &body, create, &ids).await
        })
        .retry(policy)
        .sleep(tokio::time::sleep)
        .when(PendoError::is_transient)
        // Honour Retry-After (bounded by retry_max, so a hostile header cannot stall us), but
        // only while the policy still allows a retry.
        .adjust(|e: &PendoError, planned| {
            planned.map(|p| e.retry_after().map_or(p, |ra| ra.min(retry_max)))
        })
        .notify(|e: &PendoError, wait: Duration| {
            tracing::warn!(error = %e, ?wait, records = batch.len(), "Retrying a Pendo batch.");
        })
        .await;
        (result, attempts.load(Ordering::Relaxed))
    }

    fn body(&self, kind: Kind, batch: &[RecordRows]) -> serde_json::Value {
        let items: Vec<serde_json::Value> = batch
            .iter()
            .map(|(id, rows)| {
                // Unreadable values were dead-lettered before the send; one that got here
                // anyway is left out, never sent as a null (which would clear Pendo's value).
                let values: serde_json::Map<String, serde_json::Value> = rows
                    .iter()
                    .filter_map(|r| {
                        let value = Value::from_stored(&r.value).ok()?;
                        Some((r.field.clone(), value.to_wire(self.cfg.date_format)))
                    })
                    .collect();
                serde_json::json!({ kind.id_key(): id, "values": values })
            })
            .collect();
        serde_json::Value::Array(items)
    }

    /// Settles a 200: confirmed, missing and errored ids; unattributable failures bisect.
    fn settle_ok(
        &self,
        batch: Vec<RecordRows>,
        result: &BulkResult,
        attempts: u32,
        stack: &mut Vec<Vec<RecordRows>>,
        outcomes: &mut Vec<(OutboxEntry, Settlement)>,
    ) {
        let kind = batch[0].1[0].kind;
        let missing: HashSet<&str> = result.missing.iter().map(String::as_str).collect();
        let errors: HashMap<&str, &str> = result
            .errors
            .iter()
            .map(|(id, text)| (id.as_str(), text.as_str()))
            .collect();
        let unknown = !result.unattributed.is_empty();
        let mut undecided = Vec::new();
        let single = batch.len() == 1;
        // One text for every unknown id (the row names its id), so that they settle together.
        let unmatched = format!(
            "Pendo has no such {kind}; sent once Pendo knows the id (asked every {}, in full \
             every {}), or set pendo.create_missing = true",
            humantime::format_duration(self.cfg.discovery.every),
            humantime::format_duration(self.cfg.discovery.full_every)
        );
        for (id, rows) in batch {
            if missing.contains(id.as_str()) && only_clears(&rows) {
                // Pendo holds nothing for an id it does not know: the clear is done.
                self.shared.confirmed.fetch_add(1, Ordering::Relaxed);
                metrics::counter!(VALUES_PUSHED, "kind" => kind.as_str(), "outcome" => "missing")
                    .increment(1);
                settle_all((id, rows), outcomes, |_| Settlement::Confirmed);
            } else if missing.contains(id.as_str()) {
                self.shared.unmatched.fetch_add(1, Ordering::Relaxed);
                metrics::counter!(VALUES_PUSHED, "kind" => kind.as_str(), "outcome" => "missing")
                    .increment(1);
                settle_all((id, rows), outcomes, |_| Settlement::Unmatched {
                    message: unmatched.clone(),
                });
            } else if let Some(text) = errors.get(id.as_str()) {
                metrics::counter!(VALUES_PUSHED, "kind" => kind.as_str(), "outcome" => "error")
                    .increment(1);
                self.shared.failed.fetch_add(1, Ordering::Relaxed);
                let error = format!("Pendo reported an error for {kind} {id:?}: {text}");
                self.retry_later(vec![(id, rows)], attempts, &error, None, outcomes);
            } else if unknown && !single {
                undecided.push((id, rows));
            } else if unknown {
                self.shared.failed.fetch_add(1, Ordering::Relaxed);
                let error = format!(
                    "Pendo reported a failure: {}",
                    result.unattributed.join("; ")
                );
                self.retry_later(vec![(id, rows)], attempts, &error, None, outcomes);
            } else {
                self.shared.confirmed.fetch_add(1, Ordering::Relaxed);
                metrics::counter!(VALUES_PUSHED, "kind" => kind.as_str(), "outcome" => "updated")
                    .increment(1);
                settle_all((id, rows), outcomes, |_| Settlement::Confirmed);
            }
        }
        if !undecided.is_empty() {
            tracing::warn!(
                records = undecided.len(),
                errors = ?result.unattributed,
                "Pendo reported failures without ids; bisecting the batch to find them."
            );
            split_onto(undecided, stack);
        }
        // A clean answer lets a batch size cut by a 408 or a 413 grow back.
        if !unknown && missing.is_empty() && errors.is_empty() {
            let grown =
                (self.shared.batch_limit.load(Ordering::Relaxed) * 2).min(self.cfg.batch_size);
            self.shared.batch_limit.store(grown, Ordering::Relaxed);
        }
    }

    /// Schedules a failed batch's rows for a later attempt with exponential backoff (or the
    /// server's Retry-After, bounded), counting the attempts made.
    fn retry_later(
        &self,
        batch: Vec<RecordRows>,
        attempts: u32,
        error: &str,
        retry_after: Option<Duration>,
        outcomes: &mut Vec<(OutboxEntry, Settlement)>,
    ) {
        let now = now_ms();
        for (id, rows) in batch {
            // One wait per record, so its fields stay together in the next batch.
            let before = rows.iter().map(|r| r.attempts).max().unwrap_or(0);
            let wait = self
                .backoff(before + attempts)
                .max(retry_after.unwrap_or_default().min(self.cfg.retry_max));
            settle_all((id, rows), outcomes, |_| Settlement::Retry {
                retry_at: now + wait.as_millis() as i64,
                error: error.to_owned(),
                max_attempts: self.cfg.max_attempts,
                attempts: attempts.max(1),
            });
        }
    }

    /// The wait before attempt number `attempt + 1`: exponential from `retry_initial`, capped at
    /// `retry_max`, with jitter.
    fn backoff(&self, attempt: u32) -> Duration {
        ExponentialBuilder::default()
            .with_min_delay(self.cfg.retry_initial)
            .with_max_delay(self.cfg.retry_max)
            .with_jitter()
            .without_max_times()
            .build()
            .nth(attempt.min(32) as usize)
            .unwrap_or(self.cfg.retry_max)
    }

    fn count(&self, counter: &AtomicU32, batch: &[RecordRows]) {
        counter.fetch_add(batch.len() as u32, Ordering::Relaxed);
    }
}

/// The dead letter of a row whose stored value cannot be read.
fn unreadable_value_error(field: &str, cause: &str) -> String {
    format!(
        "the stored value for field {field:?} could not be read, so it was not sent (as a null it \
         would have cleared Pendo's value): {cause}"
    )
}

/// Whether a record's rows only clear fields (null values).
fn only_clears(rows: &[OutboxEntry]) -> bool {
    rows.iter()
        .all(|r| Value::from_stored(&r.value).is_ok_and(|v| v.is_null()))
}

fn settle_all(
    (_, rows): RecordRows,
    outcomes: &mut Vec<(OutboxEntry, Settlement)>,
    mut settlement: impl FnMut(&OutboxEntry) -> Settlement,
) {
    for entry in rows {
        let s = settlement(&entry);
        outcomes.push((entry, s));
    }
}

fn release(batch: Vec<RecordRows>, outcomes: &mut Vec<(OutboxEntry, Settlement)>) {
    for record in batch {
        settle_all(record, outcomes, |_| Settlement::Release);
    }
}

fn split_onto(mut batch: Vec<RecordRows>, stack: &mut Vec<Vec<RecordRows>>) {
    let second = batch.split_off(batch.len() / 2);
    stack.push(second);
    stack.push(batch);
}
