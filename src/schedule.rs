//! When a mapping reconciles: the schedule `run` follows every poll interval and `sync` follows
//! once per invocation (`sync` is one scheduled step of `run`).
//!
//! A reconcile (a full pull) is due when `schedule.reconcile_interval` has passed since the last
//! successful one. A failed reconcile is retried with backoff, from one poll interval doubling up
//! to the reconcile interval, and incremental cycles run in between: one failing full pull must
//! not turn every poll into a full pull (all freshness gone, the CRM's API quota burned).
//!
//! The schedule's clock is tokio's, so its tests run on paused time; what it persists (the last
//! success, the failures) is wall-clock, in the state file's kv as `reconcile.<mapping>`, so a
//! restart neither reconciles at once nor forgets a failure, and `status` can show it.

use std::future::Future;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::domain::now_ms;
use crate::engine::Mode;
use crate::store::{Store, StoreError};

/// Gauge: consecutive failed reconciles of a mapping (0 once one succeeds).
pub const RECONCILE_FAILURES: &str = "pendo_sync_reconcile_failures";

/// What the state file remembers of a mapping's reconciles (`reconcile.<mapping>` in kv).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ReconcileRecord {
    /// Wall-clock ms of the last successful reconcile (or of the first time the state was
    /// served, which starts the clock).
    pub at_ms: Option<i64>,
    /// Consecutive failures since then.
    #[serde(default)]
    pub failures: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_at_ms: Option<i64>,
    /// When the service tries again (wall-clock ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_at_ms: Option<i64>,
}

fn key(mapping: &str) -> String {
    format!("reconcile.{mapping}")
}

impl ReconcileRecord {
    pub async fn load(store: &Store, mapping: &str) -> Result<Option<ReconcileRecord>, StoreError> {
        Ok(store
            .kv_get(&key(mapping))
            .await?
            .and_then(|v| serde_json::from_value(v).ok()))
    }

    /// [`ReconcileRecord::load`] through a snapshot (the status model).
    pub async fn load_in(
        snapshot: &mut crate::store::Snapshot,
        mapping: &str,
    ) -> Result<Option<ReconcileRecord>, StoreError> {
        Ok(snapshot
            .kv_get(&key(mapping))
            .await?
            .and_then(|v| serde_json::from_value(v).ok()))
    }

    pub async fn save(&self, store: &Store, mapping: &str) -> Result<(), StoreError> {
        store
            .kv_set(
                &key(mapping),
                &serde_json::to_value(self).expect("a record serializes"),
            )
            .await
    }

    /// Forgets the record of a mapping removed from the configuration.
    pub async fn forget(store: &Store, mapping: &str) -> Result<(), StoreError> {
        store.kv_delete(&key(mapping)).await
    }

    /// The record for this mapping, starting the clock now if the state file has none (a fresh
    /// state's first incremental cycle reads everything anyway).
    pub async fn load_or_start(
        store: &Store,
        mapping: &str,
    ) -> Result<ReconcileRecord, StoreError> {
        match Self::load(store, mapping).await? {
            Some(r) if r.at_ms.is_some() => Ok(r),
            _ => {
                let r = ReconcileRecord {
                    at_ms: Some(now_ms()),
                    ..ReconcileRecord::default()
                };
                r.save(store, mapping).await?;
                Ok(r)
            }
        }
    }

    /// Time since the last success (wall clock).
    pub fn age(&self) -> Duration {
        Duration::from_millis((now_ms() - self.at_ms.unwrap_or_else(now_ms)).max(0) as u64)
    }

    /// Whether a one-off step (`sync`) should reconcile now. Cron is its own backoff: a failed
    /// reconcile leaves `at_ms` where it was, so the next `sync` tries again.
    pub fn due(&self, interval: Duration) -> bool {
        self.age() >= interval
    }

    /// Records a reconcile's outcome; `retry_in` is the service's backoff after a failure.
    pub async fn record(
        store: &Store,
        mapping: &str,
        outcome: Result<(), &str>,
        retry_in: Option<Duration>,
    ) -> Result<ReconcileRecord, StoreError> {
        let mut r = Self::load(store, mapping).await?.unwrap_or_default();
        let now = now_ms();
        match outcome {
            Ok(()) => {
                r = ReconcileRecord {
                    at_ms: Some(now),
                    ..ReconcileRecord::default()
                };
            }
            Err(e) => {
                r.at_ms.get_or_insert(now);
                r.failures += 1;
                r.last_error = Some(e.to_owned());
                r.failed_at_ms = Some(now);
                r.retry_at_ms = retry_in.map(|d| now + d.as_millis() as i64);
            }
        }
        metrics::gauge!(RECONCILE_FAILURES, "mapping" => mapping.to_owned()).set(r.failures as f64);
        r.save(store, mapping).await?;
        Ok(r)
    }
}

/// The service's reconcile schedule for one mapping, on tokio's clock.
#[derive(Debug, Clone)]
pub struct ReconcileSchedule {
    poll: Duration,
    interval: Duration,
    next_at: Instant,
    failures: u32,
}

impl ReconcileSchedule {
    /// `since_last`: time since the last successful reconcile (from the state file).
    /// `failures`: consecutive failures remembered there (the backoff continues after a restart).
    pub fn new(poll: Duration, interval: Duration, since_last: Duration, failures: u32) -> Self {
        let now = Instant::now();
        let mut s = ReconcileSchedule {
            poll,
            interval,
            next_at: now + interval.saturating_sub(since_last),
            failures: 0,
        };
        if failures > 0 && since_last >= interval {
            // The backoff continues from the remembered failures; a restart tries at once (the
            // failure may have been this process's), as next_at already says.
            s.failures = failures;
        }
        s
    }

    /// The backoff after `failures` consecutive failures: one poll interval, doubling, capped at
    /// the reconcile interval.
    fn backoff(&self) -> Duration {
        let exp = self.failures.saturating_sub(1).min(30);
        self.poll
            .saturating_mul(1u32 << exp)
            .min(self.interval)
            .max(self.poll.min(self.interval))
    }

    /// The mode of the cycle that starts at `now`.
    pub fn mode(&self, now: Instant) -> Mode {
        if now >= self.next_at {
            Mode::Reconcile
        } else {
            Mode::Incremental
        }
    }

    pub fn succeeded(&mut self, now: Instant) {
        self.failures = 0;
        self.next_at = now + self.interval;
    }

    /// Records a failure; returns the wait before the next try.
    pub fn failed(&mut self, now: Instant) -> Duration {
        self.failures += 1;
        let wait = self.backoff();
        self.next_at = now + wait;
        wait
    }

    pub fn failures(&self) -> u32 {
        self.failures
    }
}

/// A mapping's loop: a cycle every `poll` (the tick, delayed when a cycle runs long), in the mode
/// the schedule says; a failed reconcile is followed at once by an incremental cycle. `cycle` runs one and says how it went (`None`: stop). `on_reconcile`
/// hears every reconcile's outcome with the backoff before the next try (after a failure).
pub async fn mapping_loop<C, CF, R, RF>(
    mut schedule: ReconcileSchedule,
    cancel: &CancellationToken,
    mut cycle: C,
    mut on_reconcile: R,
) where
    C: FnMut(Mode) -> CF,
    CF: Future<Output = Option<Result<(), String>>>,
    R: FnMut(Result<(), String>, Option<Duration>) -> RF,
    RF: Future<Output = ()>,
{
    let mut ticker = tokio::time::interval(schedule.poll);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let mode = schedule.mode(Instant::now());
        let Some(result) = cycle(mode).await else {
            return;
        };
        if mode == Mode::Reconcile {
            let retry = match &result {
                Ok(()) => {
                    schedule.succeeded(Instant::now());
                    None
                }
                Err(e) => {
                    let wait = schedule.failed(Instant::now());
                    tracing::error!(
                        error = %e,
                        failures = schedule.failures(),
                        retry_in = %humantime::format_duration(wait),
                        "Reconcile failed; incremental cycles go on, the reconcile is tried again after a backoff."
                    );
                    Some(wait)
                }
            };
            let failed = result.is_err();
            on_reconcile(result, retry).await;
            // The changes of the time the reconcile took still go out now, not a backoff later.
            if failed && cycle(Mode::Incremental).await.is_none() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    const POLL: Duration = Duration::from_secs(60);
    const DAY: Duration = Duration::from_secs(24 * 3600);

    /// A failing reconcile backs off (1, 2, 4, 8 … poll intervals, capped at the reconcile
    /// interval) with incremental cycles every poll interval in between; once it succeeds, the
    /// next one comes a reconcile interval later.
    #[tokio::test(start_paused = true)]
    async fn a_failing_reconcile_backs_off_and_incrementals_go_on() {
        let start = Instant::now();
        let log: Arc<Mutex<Vec<(u64, Mode)>>> = Arc::default();
        let outcomes: Arc<Mutex<Vec<Option<Duration>>>> = Arc::default();
        let cancel = CancellationToken::new();
        // The reconcile fails until minute 20, then works.
        let schedule = ReconcileSchedule::new(POLL, DAY, DAY, 0);
        let (l, o, c) = (log.clone(), outcomes.clone(), cancel.clone());
        let run = mapping_loop(
            schedule,
            &cancel,
            move |mode| {
                let l = l.clone();
                let c = c.clone();
                async move {
                    let minute = start.elapsed().as_secs() / 60;
                    l.lock().unwrap().push((minute, mode));
                    if minute >= 26 * 60 {
                        c.cancel();
                    }
                    match mode {
                        Mode::Reconcile if minute < 20 => Some(Err("CRM said 500".to_owned())),
                        _ => Some(Ok(())),
                    }
                }
            },
            move |_, retry| {
                o.lock().unwrap().push(retry);
                async {}
            },
        );
        run.await;
        let log = log.lock().unwrap();
        // Each failed reconcile is followed at once by an incremental cycle.
        for (i, (at, mode)) in log.iter().enumerate() {
            if *mode == Mode::Reconcile && *at < 20 {
                assert_eq!(log[i + 1], (*at, Mode::Incremental), "{:?}", &log[i..i + 2]);
            }
        }
        let reconciles: Vec<u64> = log
            .iter()
            .filter(|(_, m)| *m == Mode::Reconcile)
            .map(|(at, _)| *at)
            .collect();
        // Minute 0 fails (retry in 1), 1 fails (2), 3 fails (4), 7 fails (8), 15 fails (16),
        // 31 succeeds; the next comes a day later.
        assert_eq!(reconciles, vec![0, 1, 3, 7, 15, 31, 31 + 24 * 60]);
        let incrementals = log.iter().filter(|(_, m)| *m == Mode::Incremental).count();
        assert!(
            incrementals > 25 * 60,
            "incremental cycles ran between: {incrementals}"
        );
        let waits: Vec<Option<Duration>> = outcomes.lock().unwrap().clone();
        assert_eq!(
            waits[..6],
            [
                Some(POLL),
                Some(POLL * 2),
                Some(POLL * 4),
                Some(POLL * 8),
                Some(POLL * 16),
                None
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_backoff_is_capped_at_the_reconcile_interval() {
        let mut s = ReconcileSchedule::new(POLL, Duration::from_secs(600), Duration::ZERO, 0);
        let waits: Vec<Duration> = (0..6).map(|_| s.failed(Instant::now())).collect();
        assert_eq!(
            waits,
            [60, 120, 240, 480, 600, 600].map(Duration::from_secs)
        );
        s.succeeded(Instant::now());
        assert_eq!(s.mode(Instant::now()), Mode::Incremental);
        tokio::time::advance(Duration::from_secs(600)).await;
        assert_eq!(s.mode(Instant::now()), Mode::Reconcile);
    }

    #[tokio::test(start_paused = true)]
    async fn a_restart_keeps_the_clock_of_the_last_success() {
        let s = ReconcileSchedule::new(POLL, DAY, DAY - Duration::from_secs(3600), 0);
        assert_eq!(s.mode(Instant::now()), Mode::Incremental);
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert_eq!(s.mode(Instant::now()), Mode::Reconcile);
    }
}
