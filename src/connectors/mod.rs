//! The connector seam: how raw CRM records enter pendo-sync.
//!
//! A [`Connector`] turns a [`PullSpec`] (one mapping's object, fields, filter and starting point)
//! into a [`Pull`]: a sequence of [`Page`]s of [`RawRecord`]s. Connectors know their CRM's paths,
//! paging, auth and limits; they know nothing of Pendo, the shadow or the outbox.
//!
//! # Contract
//!
//! - **Pages arrive in watermark order.** Each page may carry a [`Watermark`]: "every change up to
//!   here has been delivered, in this page or an earlier one". The engine stores it in the same
//!   transaction as the page's changes, so it must never be ahead of the page's records.
//! - **At-least-once.** A pull may deliver a record twice (overlap, restarts, ties); the engine's
//!   diff makes that harmless. It must never skip one: ties in the cursor field, late commits and
//!   search caps are the connector's problem, solved with compound cursors and `overlap`.
//! - **Watermarks never move backward.** A pull started from watermark `w` only yields watermarks
//!   at or after `w` (the overlap re-reads, it does not rewind what is stored).
//! - **Full pulls** (`since: None`) yield every record that matches the mapping's filter, and no
//!   watermark is required (the engine keeps the one it has unless the pull gives a newer one).
//! - **Deleted records** arrive with `deleted: true` and their last known fields when the CRM
//!   exposes them (Salesforce `IsDeleted`, HubSpot archived), so the engine can map their Pendo id.
//! - **Errors are classified by the connector** into [`ConnectorError`] kinds; the engine decides
//!   what happens next from the kind alone.

pub mod fixture;
pub mod hubspot;
pub mod salesforce;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::{MappingSettings, Transform};

/// A boxed, `Send` future: connectors are chosen at run time from config, so the seam is
/// object-safe.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// An opaque, connector-defined resume point (for Salesforce a `(SystemModstamp, Id)` pair, for
/// HubSpot an epoch-ms timestamp plus an id). Stored as text in the state DB.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Watermark(pub String);

impl Watermark {
    /// Where this mark stands, for the store's "never backward" check: the connectors' own
    /// formats are a bare sequence number (fixture), `{"ts": RFC 3339, "id"}` (Salesforce) and
    /// `{"ms": epoch ms, "id"}` (HubSpot). `None` for anything else (then it is not compared).
    pub fn position(&self) -> Option<(i64, String)> {
        if let Ok(n) = self.0.trim().parse::<i64>() {
            return Some((n, String::new()));
        }
        let v: serde_json::Value = serde_json::from_str(&self.0).ok()?;
        let id = v
            .get("id")
            .and_then(|i| i.as_str())
            .unwrap_or("")
            .to_owned();
        if let Some(ms) = v.get("ms").and_then(serde_json::Value::as_i64) {
            return Some((ms, id));
        }
        let ts = v.get("ts").and_then(|t| t.as_str())?;
        let at = chrono::DateTime::parse_from_rfc3339(ts).ok()?;
        Some((at.timestamp_millis(), id))
    }

    /// Whether this mark is behind `other` (both readable and this one earlier).
    pub fn is_behind(&self, other: &Watermark) -> bool {
        matches!((self.position(), other.position()), (Some(a), Some(b)) if a < b)
    }
}

/// One CRM field the connector must fetch for a mapping.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FieldRequest {
    /// Dotted CRM path, e.g. `Owner.Email` or `hubspot_owner_id`.
    pub path: String,
    /// A connector-side lookup applied to the raw value (HubSpot owners).
    pub transform: Option<Transform>,
}

impl FieldRequest {
    /// The key under which the connector puts this field's value in [`RawRecord::fields`]: the
    /// path itself, or `path#transform` when a transform applies (a mapping can use one CRM field
    /// twice with different transforms).
    pub fn key(&self) -> String {
        match self.transform {
            None => self.path.clone(),
            Some(t) => format!("{}#{}", self.path, t.as_str()),
        }
    }
}

/// What one pull is asked to read.
#[derive(Debug, Clone)]
pub struct PullSpec {
    pub mapping: String,
    /// CRM object: `Account`, `Contact`, `companies`, `contacts`, ...
    pub object: String,
    /// Every field the mapping needs, the id field included. Deduplicated.
    pub fields: Vec<FieldRequest>,
    /// Salesforce: a SOQL condition. HubSpot: `property=value` pairs.
    pub filter: Option<String>,
    /// `None`: a full pull. `Some(w)`: changes since `w` (re-reading `overlap` behind it).
    pub since: Option<Watermark>,
    pub overlap: Duration,
}

impl PullSpec {
    /// The fields a mapping needs, deduplicated, id first.
    pub fn for_mapping(
        m: &MappingSettings,
        since: Option<Watermark>,
        overlap: Duration,
    ) -> PullSpec {
        let mut fields = vec![FieldRequest {
            path: m.id.clone(),
            transform: None,
        }];
        for f in m.fields.values() {
            let req = FieldRequest {
                path: f.from.clone(),
                transform: f.transform,
            };
            if !fields.contains(&req) {
                fields.push(req);
            }
        }
        PullSpec {
            mapping: m.name.clone(),
            object: m.object.clone(),
            fields,
            filter: m.filter.clone(),
            since,
            overlap,
        }
    }

    pub fn is_full(&self) -> bool {
        self.since.is_none()
    }
}

/// One CRM record as the connector read it.
#[derive(Debug, Clone, PartialEq)]
pub struct RawRecord {
    /// The CRM's own record id (for reports; the Pendo id comes from the mapping's `id` field).
    pub crm_id: String,
    /// JSON object: keys are [`FieldRequest::key`]s, values as the CRM sent them (Salesforce:
    /// typed JSON, relationship paths as nested objects or null; HubSpot: strings).
    pub fields: serde_json::Value,
    /// The record was deleted or archived in the CRM.
    pub deleted: bool,
    /// When the CRM last changed the record (Unix ms; Salesforce `SystemModstamp`, HubSpot
    /// `hs_lastmodifieddate`/`updatedAt`), if the answer said: kept in the history (`why`).
    pub modified_at: Option<i64>,
}

/// One page of a pull.
#[derive(Debug, Clone, Default)]
pub struct Page {
    pub records: Vec<RawRecord>,
    /// Everything up to here has been delivered; stored with this page's changes.
    pub watermark: Option<Watermark>,
}

/// A running pull. Dropping it abandons the pull; nothing is committed by the connector.
pub trait Pull: Send {
    /// The next page, or `None` when the pull is complete.
    fn next_page(&mut self) -> BoxFuture<'_, Result<Option<Page>, ConnectorError>>;
}

/// What `check` found about one mapped field or setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckFinding {
    pub ok: bool,
    /// What was checked, e.g. `salesforce login` or `Account.ARR__c`.
    pub subject: String,
    pub detail: String,
}

/// A CRM source of raw records.
pub trait Connector: Send + Sync {
    /// `salesforce`, `hubspot`, `fixture`: the `api` label on metrics.
    fn source(&self) -> &'static str;

    /// Starts a pull. Network work may begin here or in the first `next_page`.
    fn pull<'a>(
        &'a self,
        spec: PullSpec,
    ) -> BoxFuture<'a, Result<Box<dyn Pull + 'a>, ConnectorError>>;

    /// Logs in and verifies each field in `spec` exists on its object, one finding per item.
    fn check<'a>(
        &'a self,
        spec: &'a PullSpec,
    ) -> BoxFuture<'a, Result<Vec<CheckFinding>, ConnectorError>>;

    /// Reads one record of `spec.object` by its CRM id, with the fields of `spec` (the same
    /// keys, transforms and value shapes a pull delivers, so the mapping maps it the same way),
    /// through the connector's limiter and retry policy. `Ok(None)` when the CRM has no such
    /// record (or it is deleted/archived: then return it with `deleted: true` if the API says
    /// so cheaply, else None). `spec.since` and `spec.filter` are ignored.
    ///
    /// For `why --live`: what the CRM holds *now*, beside what the last pull stored. An id that
    /// cannot be one of the CRM's ids is `Ok(None)` without a request.
    fn fetch<'a>(
        &'a self,
        spec: &'a PullSpec,
        crm_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<RawRecord>, ConnectorError>>;
}

/// A connector failure, classified once by the connector that saw it.
#[derive(Debug, thiserror::Error)]
pub enum ConnectorError {
    /// Worth retrying later (5xx, timeouts, dropped connections); the cycle ends, nothing is lost.
    #[error("{api} is unavailable: {message}")]
    Transient { api: &'static str, message: String },
    /// A quota is used up; retry after `wait`.
    #[error("{api} rate limit: {message} (retry in {wait:?})")]
    RateLimited {
        api: &'static str,
        message: String,
        wait: Duration,
    },
    /// Needs an operator: bad credentials, a revoked grant, missing permissions.
    #[error("{api} refused our credentials: {message}. {hint}")]
    Auth {
        api: &'static str,
        message: String,
        hint: String,
    },
    /// The mapping asks for something the CRM does not have (object, field, bad filter).
    #[error("{api} rejected the query for mapping {mapping}: {message}")]
    Mapping {
        api: &'static str,
        mapping: String,
        message: String,
    },
    /// The CRM answered something we cannot read (an HTML page instead of JSON, truncated JSON).
    #[error("{api} sent an unreadable answer: {message}")]
    Protocol { api: &'static str, message: String },
}

impl ConnectorError {
    /// Whether running the cycle again later may succeed without anyone changing anything.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            ConnectorError::Transient { .. }
                | ConnectorError::RateLimited { .. }
                | ConnectorError::Protocol { .. }
        )
    }
}

/// Small durable facts a connector keeps between runs: a rotated OAuth refresh token, the latest
/// quota reading. The state file provides them ([`crate::store::Store`] implements this); a dry
/// run gives its connectors a [`MemoryKv`] over a read-only state, so a token rotated during a
/// dry run lives as long as the process and nothing is written.
pub trait StateKv: Send + Sync {
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<serde_json::Value>, String>>;
    fn set<'a>(
        &'a self,
        key: &'a str,
        value: &'a serde_json::Value,
    ) -> BoxFuture<'a, Result<(), String>>;
}

/// A shared [`StateKv`].
pub type SharedKv = std::sync::Arc<dyn StateKv>;

/// Facts kept in memory, read through to `base` (a read-only state) for what was not set here.
#[derive(Default)]
pub struct MemoryKv {
    base: Option<SharedKv>,
    local: std::sync::Mutex<std::collections::HashMap<String, serde_json::Value>>,
}

impl MemoryKv {
    pub fn over(base: Option<SharedKv>) -> MemoryKv {
        MemoryKv {
            base,
            local: Default::default(),
        }
    }
}

impl StateKv for MemoryKv {
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<serde_json::Value>, String>> {
        Box::pin(async move {
            let local = self.local.lock().expect("kv lock").get(key).cloned();
            match (local, &self.base) {
                (Some(v), _) => Ok(Some(v)),
                (None, Some(base)) => base.get(key).await,
                (None, None) => Ok(None),
            }
        })
    }

    fn set<'a>(
        &'a self,
        key: &'a str,
        value: &'a serde_json::Value,
    ) -> BoxFuture<'a, Result<(), String>> {
        self.local
            .lock()
            .expect("kv lock")
            .insert(key.to_owned(), value.clone());
        Box::pin(async { Ok(()) })
    }
}

/// One connector per source, shared by every mapping of that source (and so is its limiter).
pub type Connectors =
    std::collections::HashMap<crate::config::Source, std::sync::Arc<dyn Connector>>;

/// Builds one connector per CRM source that a mapping uses (so each source has one limiter).
/// `kv` keeps their durable facts (see [`StateKv`]).
pub fn build(
    settings: &crate::config::Settings,
    store: Option<SharedKv>,
) -> Result<Connectors, crate::config::ConfigError> {
    use crate::config::{ConfigError, Source};
    let mut connectors = Connectors::new();
    for m in &settings.mappings {
        if connectors.contains_key(&m.source) {
            continue;
        }
        let missing = || ConfigError::new(m.source.as_str(), "section is missing");
        let connector: std::sync::Arc<dyn Connector> = match m.source {
            Source::Salesforce => std::sync::Arc::new(salesforce::SalesforceConnector::new(
                settings.salesforce.as_ref().ok_or_else(missing)?,
                store.clone(),
            )?),
            Source::Hubspot => std::sync::Arc::new(hubspot::HubspotConnector::new(
                settings.hubspot.as_ref().ok_or_else(missing)?,
                store.clone(),
            )?),
        };
        connectors.insert(m.source, connector);
    }
    Ok(connectors)
}
