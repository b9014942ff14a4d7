//! Rate limiters for the three remotes. Every request — first attempts and retries alike —
//! waits on its remote's limiter (guarantee 5), because the vendors count every call.
//!
//! A thin wrapper over governor's GCRA limiter. Note: governor waits on its own clock, not
//! Tokio's, so paused-time tests do not speed it up; tests use generous quotas instead.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Jitter, Quota};

/// The share of a configured rate the limiter actually uses. It paces *sends*; the remote counts
/// *arrivals*, and two requests sent exactly one period apart can arrive a few milliseconds
/// closer (scheduling, connection reuse). Without headroom a strict limit on the other side
/// answers a 429 now and then, and each costs a Retry-After wait far longer than the 5% spent
/// here (measured in BENCHMARKS.md, end-to-end push).
pub const HEADROOM: f64 = 0.95;

/// A shared limiter: clone it into every task that talks to the same remote.
#[derive(Clone)]
pub struct RateLimiter {
    inner: Arc<DefaultDirectRateLimiter>,
    /// Spreads simultaneous waiters a little so they do not wake in lockstep. Small: a waiter
    /// takes its turn after the jitter, so every wait adds it to the spacing (a jitter of a
    /// quarter period cost 4.5 % of the rate; BENCHMARKS.md, end-to-end push).
    jitter: Duration,
}

impl RateLimiter {
    /// Whether both handles share one budget.
    pub fn same_as(&self, other: &RateLimiter) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter").finish_non_exhaustive()
    }
}

impl RateLimiter {
    /// `count` requests per `window` less [`HEADROOM`], spaced evenly, with a burst of `burst`
    /// (at least 1).
    ///
    /// In any span of length `w` at most `burst + w / (window / count)` requests pass, so a
    /// burst of 1 keeps the measured rate within the configured one.
    pub fn new(count: f64, window: Duration, burst: u32) -> RateLimiter {
        let count = if count.is_finite() && count > 0.0 {
            count * HEADROOM
        } else {
            1.0
        };
        let period = window.div_f64(count).max(Duration::from_nanos(1));
        let burst = NonZeroU32::new(burst.max(1)).expect("burst >= 1");
        let quota = Quota::with_period(period)
            .expect("period is non-zero")
            .allow_burst(burst);
        RateLimiter {
            inner: Arc::new(DefaultDirectRateLimiter::direct(quota)),
            jitter: period.min(Duration::from_millis(20)) / 100,
        }
    }

    /// `rps` requests per second, burst 1.
    pub fn per_second(rps: f64) -> RateLimiter {
        Self::new(rps, Duration::from_secs(1), 1)
    }

    /// Waits until one request may be sent.
    pub async fn acquire(&self) {
        self.inner
            .until_ready_with_jitter(Jitter::up_to(self.jitter))
            .await;
    }
}

/// `Retry-After` as delta-seconds or an HTTP date.
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(
        when.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}
