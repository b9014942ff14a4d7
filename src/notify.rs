//! Notifications (`[notify]`): a JSON POST to a webhook when the guard holds a cycle, the writer
//! pauses, or values go dead. The body's `text` line is what Slack, Mattermost and Teams incoming
//! webhooks show; `event`, `mapping` and `details` are for machines.
//!
//! A notification never blocks or fails what caused it: it is posted from a task of its own,
//! retried a few times, rate limited per (event, mapping), and a failure is logged and counted
//! (`pendo_sync_notifications_total{event,outcome}`). The webhook URL is a secret (Slack's carry
//! their token): it is never logged, and request errors are reported without it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use secrecy::{ExposeSecret, SecretString};

use crate::config::{ConfigError, NotifyEvent, NotifySettings};

/// Counter: notifications by event and outcome (`sent`, `failed`, `rate_limited`).
pub const NOTIFICATIONS: &str = "pendo_sync_notifications_total";

/// At most one notification per (event, mapping) in this window; the rest are counted only.
const MIN_GAP: Duration = Duration::from_secs(60);
/// Attempts per notification, and the timeout of each.
const ATTEMPTS: u32 = 3;
const TIMEOUT: Duration = Duration::from_secs(10);

/// Posts notifications, or does nothing when `[notify]` has no webhook. Cheap to clone.
#[derive(Clone, Default)]
pub struct Notifier {
    inner: Option<Arc<Inner>>,
}

struct Inner {
    url: SecretString,
    events: Vec<NotifyEvent>,
    http: reqwest::Client,
    last: Mutex<HashMap<(NotifyEvent, String), Instant>>,
    /// Posts under way, so a command can wait for them before its runtime ends.
    tasks: tokio_util::task::TaskTracker,
}

impl std::fmt::Debug for Notifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notifier")
            .field("enabled", &self.inner.is_some())
            .finish_non_exhaustive()
    }
}

impl Notifier {
    /// Waits (at most `limit`) for the posts under way: a command's runtime ends when it
    /// returns, and would cancel them. Posts still running after `limit` are given up.
    pub async fn flush(&self, limit: Duration) {
        let Some(inner) = &self.inner else { return };
        let tasks = inner.tasks.clone();
        tasks.close();
        if tokio::time::timeout(limit, tasks.wait()).await.is_err() {
            tracing::warn!("Gave up waiting for a notification to be delivered.");
        }
        tasks.reopen();
    }

    pub fn from_settings(s: &NotifySettings) -> Result<Notifier, ConfigError> {
        if !s.webhook_source.is_set() {
            return Ok(Notifier::default());
        }
        let url = s.webhook_source.resolve("notify.webhook_url")?;
        let http = reqwest::Client::builder()
            .timeout(TIMEOUT)
            .user_agent(concat!("pendo-sync/", env!("CARGO_PKG_VERSION")))
            .build()
            .expect("the HTTP client builds (rustls, no custom roots)");
        Ok(Notifier {
            inner: Some(Arc::new(Inner {
                url,
                events: s.events.clone(),
                http,
                last: Mutex::default(),
                tasks: tokio_util::task::TaskTracker::new(),
            })),
        })
    }

    /// Posts `text` about `event` in the background (needs a tokio runtime); returns at once.
    pub fn notify(
        &self,
        event: NotifyEvent,
        mapping: Option<&str>,
        text: String,
        details: serde_json::Value,
    ) {
        let Some(inner) = self.inner.clone() else {
            return;
        };
        if !inner.events.contains(&event) {
            return;
        }
        let key = (event, mapping.unwrap_or("").to_owned());
        {
            let mut last = inner.last.lock().expect("notify lock");
            if last.get(&key).is_some_and(|at| at.elapsed() < MIN_GAP) {
                metrics::counter!(NOTIFICATIONS, "event" => event.as_str(), "outcome" => "rate_limited")
                    .increment(1);
                tracing::info!(
                    event = event.as_str(),
                    "A notification was left out: one was sent for this event within the last minute."
                );
                return;
            }
            last.insert(key, Instant::now());
        }
        let body = serde_json::json!({
            "text": text,
            "event": event.as_str(),
            "mapping": mapping,
            "details": details,
        });
        let tasks = inner.tasks.clone();
        tasks.spawn(async move {
            let mut error = String::new();
            for attempt in 1..=ATTEMPTS {
                let sent = inner
                    .http
                    .post(inner.url.expose_secret())
                    .json(&body)
                    .send()
                    .await;
                match sent {
                    Ok(r) if r.status().is_success() => {
                        metrics::counter!(NOTIFICATIONS, "event" => event.as_str(), "outcome" => "sent")
                            .increment(1);
                        return;
                    }
                    Ok(r) => error = format!("the webhook answered {}", r.status().as_u16()),
                    // Without the URL: it is a secret.
                    Err(e) => error = e.without_url().to_string(),
                }
                if attempt < ATTEMPTS {
                    tokio::time::sleep(Duration::from_millis(500) * 2u32.pow(attempt - 1)).await;
                }
            }
            metrics::counter!(NOTIFICATIONS, "event" => event.as_str(), "outcome" => "failed")
                .increment(1);
            tracing::warn!(event = event.as_str(), %error, "A notification could not be delivered (the webhook URL is not shown: it is a secret).");
        });
    }
}
