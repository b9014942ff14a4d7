//! How values for ids Pendo does not know yet find their way back (DESIGN.md, "Ids Pendo does
//! not know yet"). This module owns the two reads of Pendo's ids that turn `unmatched` outbox
//! rows back into `pending` ones; the writer never re-sends an unmatched row blindly.
//!
//! - **Discovery**, at most every [`DiscoveryConfig::every`]: one aggregation read of the ids
//!   whose `metadata.auto.firstvisit` is at or after the last discovery, less
//!   [`DISCOVERY_OVERLAP`] (Pendo processes a visitor's first events some time after they
//!   happened, and `firstvisit` is the events' time, not the processing's).
//! - **The full check**, every [`DiscoveryConfig::full_every`] (`pendo.unmatched_retry`): every
//!   id Pendo knows, paged. It catches what discovery cannot see: ids created through the API
//!   (which may not set `firstvisit`) and ids processed later than the overlap.
//!
//! Ids found that have unmatched rows become pending at once, one statement per page of ids.
//! A kind without unmatched rows is not read at all. The time of each kind's last read is kept
//! in the state (kv), so a `sync` run by cron keeps the same pace as a service, and a restart
//! does not read again early. On a state never checked in full (a fresh state, or one from
//! before this module) the full check's clock starts when rows are first found unmatched: the
//! answers that made them unmatched were that moment's check. Discovery starts at once.

use std::time::Duration;

use crate::domain::{Kind, now_ms};
use crate::metrics::UNMATCHED_FOUND;
use crate::store::{Store, StoreError};

use super::{PendoClient, PendoError};

/// How far behind the last discovery the next one looks again.
pub const DISCOVERY_OVERLAP: Duration = Duration::from_secs(3600);

/// Ids per aggregation page (PostHog's page size for the same endpoint).
pub const ID_PAGE: usize = 5000;

/// When the reads run.
#[derive(Debug, Clone, Copy)]
pub struct DiscoveryConfig {
    /// Between two discoveries: the poll interval, and never less than
    /// `pendo.discovery_interval` (default a minute).
    pub every: Duration,
    /// Between two full checks: `pendo.unmatched_retry`.
    pub full_every: Duration,
}

/// What one pass did, per kind summed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Found {
    /// Aggregation requests made.
    pub requests: u64,
    /// Unmatched values made pending.
    pub promoted: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("reading Pendo's {kind} ids: {source}")]
    Pendo {
        kind: Kind,
        #[source]
        source: PendoError,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn key(kind: Kind, what: &str) -> String {
    format!("unmatched.{what}_at.{kind}")
}

/// Runs whichever reads are due, for every kind with unmatched rows. A failed read is an error
/// for this pass only: its time is not recorded, so the next pass tries again.
pub async fn pass(
    store: &Store,
    client: &PendoClient,
    cfg: DiscoveryConfig,
) -> Result<Found, DiscoveryError> {
    let mut found = Found::default();
    for kind in Kind::ALL {
        if !store.has_unmatched(kind).await? {
            continue;
        }
        let now = now_ms();
        let read_at = |what: &'static str| {
            let key = key(kind, what);
            async move { Ok::<_, StoreError>(store.kv_get(&key).await?.and_then(|v| v.as_i64())) }
        };
        let full_at = match read_at("checked").await? {
            Some(at) => at,
            None => {
                // Never checked in full: the sends that found these ids missing were the check.
                store.kv_set(&key(kind, "checked"), &now.into()).await?;
                now
            }
        };
        let discovered_at = read_at("discovered").await?;
        let elapsed = |at: i64| Duration::from_millis((now - at).max(0) as u64);
        let filter = if elapsed(full_at) >= cfg.full_every {
            None
        } else if discovered_at.is_none_or(|at| elapsed(at) >= cfg.every) {
            let since = discovered_at.unwrap_or(now) - DISCOVERY_OVERLAP.as_millis() as i64;
            Some(format!("metadata.auto.firstvisit >= {since}"))
        } else {
            continue;
        };
        let how = if filter.is_some() {
            "discovery"
        } else {
            "full_check"
        };
        let (requests, promoted) = read_ids(store, client, kind, filter.as_deref(), now).await?;
        found.requests += requests;
        found.promoted += promoted;
        metrics::counter!(UNMATCHED_FOUND, "kind" => kind.as_str(), "how" => how)
            .increment(promoted);
        // A full check is a discovery too.
        let done: &[&str] = match how {
            "discovery" => &["discovered"],
            _ => &["checked", "discovered"],
        };
        for what in done {
            store.kv_set(&key(kind, what), &now.into()).await?;
        }
        if promoted > 0 {
            tracing::info!(kind = %kind, values = promoted, how, "Pendo knows ids it did not know before; their values are sent now.");
        } else {
            tracing::debug!(kind = %kind, requests, how, "Read Pendo's ids; none of the unmatched ones is known yet.");
        }
    }
    Ok(found)
}

/// Pages through the ids `filter` selects and promotes the unmatched rows of each page.
/// Returns (requests, values promoted).
async fn read_ids(
    store: &Store,
    client: &PendoClient,
    kind: Kind,
    filter: Option<&str>,
    now: i64,
) -> Result<(u64, u64), DiscoveryError> {
    let (mut requests, mut promoted, mut skip) = (0, 0, 0);
    loop {
        let ids = client
            .ids_page(kind, filter, skip, ID_PAGE)
            .await
            .map_err(|source| DiscoveryError::Pendo { kind, source })?;
        requests += 1;
        promoted += store.promote_unmatched(kind, &ids, now).await?;
        // An id added while the pages are read shifts them by one: one id may be read twice
        // or not at all this time; the next read finds it.
        skip += ids.len();
        if ids.len() < ID_PAGE {
            return Ok((requests, promoted));
        }
    }
}
