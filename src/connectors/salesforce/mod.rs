//! The Salesforce connector: OAuth login, SOQL pulls over REST `queryAll` (and Bulk API 2.0 for
//! large full pulls), single-record reads by Id (`why --live`), the daily API budget, and
//! `check` against `describe`.
//!
//! This module owns the HTTP plumbing every Salesforce call goes through ([`SalesforceConnector::send`]):
//! the shared rate limiter (before every attempt, token calls included), the request metric, the
//! `Sforce-Limit-Info` reading, one re-login on 401 `INVALID_SESSION_ID`, waiting out 403
//! `REQUEST_LIMIT_EXCEEDED`, and retries of 5xx and network failures. The submodules own login
//! ([`auth`]), query text and records ([`soql`]), the pull state machine ([`pull`]) and Bulk
//! 2.0 ([`bulk`]).

mod auth;
mod bulk;
mod pull;
mod soql;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex as StdMutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;

use crate::config::{ConfigError, SalesforceSettings};
use crate::connectors::SharedKv;
use crate::connectors::{
    BoxFuture, CheckFinding, Connector, ConnectorError, Pull, PullSpec, RawRecord,
};
use crate::limiter::RateLimiter;

use auth::{Credentials, Session};

pub(crate) const API: &str = "salesforce";

/// The kv key holding the latest `Sforce-Limit-Info` reading.
pub const QUOTA_KEY: &str = "quota.salesforce";

/// How long a pull paused by the daily budget asks the engine to wait.
const BUDGET_WAIT: Duration = Duration::from_secs(300);
/// Attempts for 5xx / network failures, and for 403 REQUEST_LIMIT_EXCEEDED.
const MAX_ATTEMPTS: u32 = 4;

/// Delays between attempts. Tests shorten them with [`SalesforceConnector::with_backoff`].
#[derive(Debug, Clone, Copy)]
struct Backoff {
    /// First wait after a 5xx or network failure; doubles per attempt.
    transient: Duration,
    /// First wait after 403 REQUEST_LIMIT_EXCEEDED (concurrent-request limits clear in seconds).
    limit: Duration,
    /// First wait between Bulk job status polls; grows to 10x.
    poll: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct QuotaReading {
    used: u64,
    limit: u64,
    at_ms: i64,
}

/// A Salesforce org as a [`Connector`]. One per process: its limiter and session are shared
/// by every pull and mapping.
pub struct SalesforceConnector {
    settings: SalesforceSettings,
    creds: Credentials,
    /// The JWT bearer assertion's `aud`: `salesforce.jwt_audience`, else derived from the kind
    /// of org `login_url` points at ([`auth::jwt_audience_for`]).
    jwt_audience: String,
    client: reqwest::Client,
    limiter: RateLimiter,
    store: Option<SharedKv>,
    session: tokio::sync::Mutex<Option<Session>>,
    /// A rotated refresh token the state file did not take (no store, or the write failed).
    /// A token the store holds is read from there before each login instead, so a rotation by
    /// another process sharing the state is seen.
    rotated_refresh: tokio::sync::Mutex<Option<SecretString>>,
    quota: StdMutex<Option<QuotaReading>>,
    quota_dirty: AtomicBool,
    backoff: Backoff,
}

impl fmt::Debug for SalesforceConnector {
    // Written by hand: credentials, tokens and the session must never reach a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SalesforceConnector")
            .field("login_url", &self.settings.login_url)
            .field("api_version", &self.settings.api_version)
            .field("auth", &self.settings.auth)
            .field("quota", &self.quota())
            .finish_non_exhaustive()
    }
}

/// A response that was not retried away: status, headers and body text.
pub(super) struct Answer {
    status: u16,
    body: String,
    headers: reqwest::header::HeaderMap,
}

/// One data request, relative to the session's `instance_url`.
pub(super) struct Req {
    method: reqwest::Method,
    path: String,
    query: Vec<(&'static str, String)>,
    json: Option<Value>,
}

impl Req {
    fn get(path: impl Into<String>) -> Req {
        Req {
            method: reqwest::Method::GET,
            path: path.into(),
            query: Vec::new(),
            json: None,
        }
    }
}

/// The first ~160 characters of a body, on one line: enough to recognise an HTML error page.
pub(super) fn excerpt(body: &str) -> String {
    let flat: String = body.split_whitespace().collect::<Vec<_>>().join(" ");
    let mut out: String = flat.chars().take(160).collect();
    if flat.chars().count() > 160 {
        out.push('…');
    }
    if out.is_empty() {
        "(empty body)".into()
    } else {
        out
    }
}

/// `(errorCode, message)` of Salesforce's `[{"message":..,"errorCode":..}]` error body.
pub(super) fn error_code(body: &str) -> Option<(String, String)> {
    let v: Value = serde_json::from_str(body).ok()?;
    let first = v.as_array().and_then(|a| a.first()).unwrap_or(&v);
    Some((
        first["errorCode"].as_str()?.to_owned(),
        first["message"].as_str().unwrap_or("").to_owned(),
    ))
}

/// Reads `api-usage=USED/LIMIT` out of `Sforce-Limit-Info`, whatever else the header carries
/// (`; api-bursts=1/750`, `per-app-api-usage=...`).
pub fn parse_limit_info(header: &str) -> Option<(u64, u64)> {
    header.split([';', ',']).find_map(|part| {
        let (name, value) = part.trim().split_once('=')?;
        if !name.trim().eq_ignore_ascii_case("api-usage") {
            return None;
        }
        let (used, limit) = value.trim().split_once('/')?;
        let digits = |s: &str| {
            s.trim()
                .chars()
                .take_while(char::is_ascii_digit)
                .collect::<String>()
        };
        Some((digits(used).parse().ok()?, digits(limit).parse().ok()?))
    })
}

impl SalesforceConnector {
    /// Resolves the configured secrets and builds the one client and limiter this org gets.
    /// `store` keeps the rotated refresh token and the latest quota reading.
    pub fn new(
        settings: &SalesforceSettings,
        store: Option<SharedKv>,
    ) -> Result<Self, ConfigError> {
        let creds = Credentials::from_settings(settings)?;
        let login = url::Url::parse(&settings.login_url).map_err(|e| {
            ConfigError::new("salesforce.login_url", format!("is not a valid URL ({e})"))
        })?;
        let jwt_audience = match &settings.jwt_audience {
            Some(aud) => aud.trim().trim_end_matches('/').to_owned(),
            None => auth::jwt_audience_for(&login).to_owned(),
        };
        let client = reqwest::Client::builder()
            .timeout(settings.timeout)
            .user_agent(concat!("pendo-sync/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| {
                ConfigError::new("salesforce", format!("cannot build the HTTP client: {e}"))
            })?;
        Ok(SalesforceConnector {
            limiter: RateLimiter::per_second(settings.requests_per_second),
            settings: settings.clone(),
            creds,
            jwt_audience,
            client,
            store,
            session: tokio::sync::Mutex::new(None),
            rotated_refresh: tokio::sync::Mutex::new(None),
            quota: StdMutex::new(None),
            quota_dirty: AtomicBool::new(false),
            backoff: Backoff {
                transient: Duration::from_secs(1),
                limit: Duration::from_secs(5),
                poll: Duration::from_secs(2),
            },
        })
    }

    /// Sets the first wait of every backoff (retries, limit waits, Bulk polls); for tests.
    pub fn with_backoff(mut self, base: Duration) -> Self {
        self.backoff = Backoff {
            transient: base,
            limit: base,
            poll: base,
        };
        self
    }

    /// The latest daily API reading `(used, limit)`, if any response carried one.
    pub fn quota(&self) -> Option<(u64, u64)> {
        let q = *self.quota.lock().unwrap_or_else(|e| e.into_inner());
        q.map(|q| (q.used, q.limit))
    }

    fn data_path(&self, rest: &str) -> String {
        format!("/services/data/{}/{rest}", self.settings.api_version)
    }

    fn note_quota(&self, used: u64, limit: u64) {
        let reading = QuotaReading {
            used,
            limit,
            at_ms: chrono::Utc::now().timestamp_millis(),
        };
        *self.quota.lock().unwrap_or_else(|e| e.into_inner()) = Some(reading);
        self.quota_dirty.store(true, Ordering::Relaxed);
    }

    /// Writes the latest quota reading to the state file, if it changed: called once per page.
    pub(super) async fn persist_quota(&self) {
        let Some(store) = &self.store else { return };
        if !self.quota_dirty.swap(false, Ordering::Relaxed) {
            return;
        }
        let q = *self.quota.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(q) = q {
            let v = serde_json::json!({"used": q.used, "limit": q.limit, "at_ms": q.at_ms});
            if let Err(e) = store.set(QUOTA_KEY, &v).await {
                tracing::warn!(error = %e, "cannot record the salesforce quota reading");
            }
        }
    }

    fn over_budget(&self) -> Option<f64> {
        let (used, limit) = self.quota()?;
        if limit == 0 {
            return None;
        }
        let pct = used as f64 * 100.0 / limit as f64;
        (pct >= self.settings.max_daily_api_percent).then_some(pct)
    }

    /// Refuses to send while the last reading is over `max_daily_api_percent`. The reading may
    /// be stale (the 24-hour window keeps moving), so once per pull we ask `/limits` — a call
    /// that does not count against the allocation — before giving up.
    async fn ensure_budget(&self, probed: &mut bool) -> Result<(), ConnectorError> {
        if self.over_budget().is_none() {
            return Ok(());
        }
        if !*probed {
            *probed = true;
            let ans = Box::pin(self.send(&Req::get(self.data_path("limits")), None)).await?;
            if ans.status == 200
                && let Ok(v) = serde_json::from_str::<Value>(&ans.body)
                && let (Some(max), Some(rem)) = (
                    v["DailyApiRequests"]["Max"].as_u64(),
                    v["DailyApiRequests"]["Remaining"].as_u64(),
                )
            {
                self.note_quota(max.saturating_sub(rem), max);
            }
        }
        match self.over_budget() {
            None => Ok(()),
            Some(pct) => {
                self.persist_quota().await;
                Err(ConnectorError::RateLimited {
                    api: API,
                    message: format!(
                        "daily API use at {pct:.0}% of limit, above salesforce.max_daily_api_percent ({}%)",
                        self.settings.max_daily_api_percent
                    ),
                    wait: BUDGET_WAIT,
                })
            }
        }
    }

    /// Sends one data request through the limiter, re-logging in once on 401 and retrying
    /// 5xx, network failures and 403 REQUEST_LIMIT_EXCEEDED with backoff. `budget` (pulls only)
    /// enforces the daily API budget before every attempt.
    pub(super) async fn send(
        &self,
        req: &Req,
        mut budget: Option<&mut bool>,
    ) -> Result<Answer, ConnectorError> {
        let mut relogged = false;
        let mut failures = 0u32;
        let mut limited = 0u32;
        let mut session = self.session().await?;
        loop {
            if let Some(probed) = budget.as_deref_mut() {
                self.ensure_budget(probed).await?;
            }
            self.limiter.acquire().await;
            let mut rb = self
                .client
                .request(
                    req.method.clone(),
                    format!("{}{}", session.instance_url, req.path),
                )
                .bearer_auth(session.access_token.expose_secret());
            if !req.query.is_empty() {
                rb = rb.query(&req.query);
            }
            if let Some(j) = &req.json {
                rb = rb.json(j);
            }
            let sent = rb.send().await;
            let (status, headers, body) = match sent {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    crate::metrics::record_request(API, Some(status));
                    let headers = resp.headers().clone();
                    match crate::http::body_text(resp, crate::http::MAX_BODY_BYTES).await {
                        Ok(body) => (status, headers, body),
                        Err(e) if e.is_too_large() => {
                            return Err(ConnectorError::Protocol {
                                api: API,
                                message: e.to_string(),
                            });
                        }
                        Err(e) => (0, headers, e.to_string()),
                    }
                }
                Err(e) => {
                    crate::metrics::record_request(API, None);
                    (
                        0,
                        reqwest::header::HeaderMap::new(),
                        e.without_url().to_string(),
                    )
                }
            };
            if let Some((used, limit)) = headers
                .get("sforce-limit-info")
                .and_then(|v| v.to_str().ok())
                .and_then(parse_limit_info)
            {
                self.note_quota(used, limit);
            }
            let code = error_code(&body).map(|c| c.0);
            if status == 401
                && !relogged
                && code.as_deref().is_none_or(|c| c == "INVALID_SESSION_ID")
            {
                relogged = true;
                session = self.relogin(session.generation).await?;
                continue;
            }
            if status == 401 {
                return Err(ConnectorError::Auth {
                    api: API,
                    message: "the session was refused right after logging in".into(),
                    hint: "check that the connected app's OAuth scopes include api and the user has API Enabled".into(),
                });
            }
            if status == 403 && code.as_deref() == Some("REQUEST_LIMIT_EXCEEDED") {
                if limited + 1 < MAX_ATTEMPTS {
                    let wait = self.backoff.limit * 2u32.pow(limited);
                    limited += 1;
                    tracing::warn!(?wait, "salesforce REQUEST_LIMIT_EXCEEDED; waiting");
                    tokio::time::sleep(wait).await;
                    continue;
                }
                return Err(ConnectorError::RateLimited {
                    api: API,
                    message: "REQUEST_LIMIT_EXCEEDED: TotalRequests Limit exceeded".into(),
                    wait: BUDGET_WAIT,
                });
            }
            if status == 0 || status >= 500 {
                if failures + 1 < MAX_ATTEMPTS {
                    let wait = self.backoff.transient * 2u32.pow(failures)
                        + Duration::from_millis(fastrand::u64(0..100));
                    failures += 1;
                    tracing::warn!(status, ?wait, path = %req.path, "salesforce request failed; retrying");
                    tokio::time::sleep(wait).await;
                    continue;
                }
                let what = if status == 0 {
                    body
                } else {
                    format!("HTTP {status}")
                };
                return Err(ConnectorError::Transient {
                    api: API,
                    message: format!(
                        "{} {} failed {MAX_ATTEMPTS} times: {what}",
                        req.method, req.path
                    ),
                });
            }
            return Ok(Answer {
                status,
                body,
                headers,
            });
        }
    }

    /// A 2xx answer's JSON, or the classified error of anything else.
    pub(super) fn json(&self, ans: Answer, mapping: &str) -> Result<Value, ConnectorError> {
        if !(200..300).contains(&ans.status) {
            return Err(classify(&ans, mapping));
        }
        serde_json::from_str(&ans.body).map_err(|e| ConnectorError::Protocol {
            api: API,
            message: format!("expected JSON ({e}); got: {}", excerpt(&ans.body)),
        })
    }

    /// [`Connector::fetch`]: one `queryAll` by Id, sent like a pull's queries (limiter, session,
    /// retries, the daily budget) and read by the pull's [`soql::flatten`], so the record has
    /// the keys, nesting and `modified_at` a pull gives it. An id that is not a Salesforce id
    /// is `None` without a request: it cannot name a record, and it never reaches the SOQL text.
    async fn fetch_one(
        &self,
        spec: &PullSpec,
        crm_id: &str,
    ) -> Result<Option<RawRecord>, ConnectorError> {
        if !soql::is_record_id(crm_id) {
            return Ok(None);
        }
        let mut req = Req::get(self.data_path("queryAll"));
        req.query.push(("q", soql::fetch_query(spec, crm_id)));
        let mut probed = false;
        let ans = self.send(&req, Some(&mut probed)).await;
        self.persist_quota().await;
        let body = self.json(ans?, &spec.mapping)?;
        let Some(record) = body["records"].as_array().and_then(|r| r.first()) else {
            return Ok(None);
        };
        let (raw, _) =
            soql::flatten(record, &spec.fields).ok_or_else(|| ConnectorError::Protocol {
                api: API,
                message: "a record without Id/SystemModstamp".into(),
            })?;
        Ok(Some(raw))
    }

    async fn check_inner(&self, spec: &PullSpec) -> Vec<CheckFinding> {
        let mut out = Vec::new();
        match self.session().await {
            Ok(_) => out.push(CheckFinding {
                ok: true,
                subject: "salesforce login".into(),
                detail: format!(
                    "logged in via {:?} at {}",
                    self.settings.auth, self.settings.login_url
                ),
            }),
            Err(e) => {
                out.push(CheckFinding {
                    ok: false,
                    subject: "salesforce login".into(),
                    detail: e.to_string(),
                });
                return out;
            }
        }
        // describe per object, fetched once per check.
        let mut described: HashMap<String, Result<Vec<Value>, String>> = HashMap::new();
        let root = spec.object.clone();
        if let Err(e) = self.describe(&root, &mut described).await {
            out.push(CheckFinding {
                ok: false,
                subject: format!("salesforce {root}"),
                detail: e,
            });
            return out;
        }
        for f in &spec.fields {
            let subject = format!("{root}.{}", f.path);
            let (ok, detail) = match self.resolve_field(&root, &f.path, &mut described).await {
                Ok(ty) => (true, format!("exists ({ty})")),
                Err(e) => (false, e),
            };
            out.push(CheckFinding {
                ok,
                subject,
                detail,
            });
        }
        out
    }

    async fn describe(
        &self,
        object: &str,
        cache: &mut HashMap<String, Result<Vec<Value>, String>>,
    ) -> Result<Vec<Value>, String> {
        if let Some(r) = cache.get(object) {
            return r.clone();
        }
        let path = self.data_path(&format!("sobjects/{object}/describe"));
        let result = match self.send(&Req::get(path), None).await {
            Ok(ans) if ans.status == 404 => Err(format!(
                "the org has no object {object} (or the user cannot see it)"
            )),
            Ok(ans) => self
                .json(ans, "check")
                .map(|v| v["fields"].as_array().cloned().unwrap_or_default())
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        cache.insert(object.to_owned(), result.clone());
        result
    }

    /// Follows a dotted path through `describe`: each relationship by `relationshipName`, the
    /// last segment by field name. Returns the field's type.
    async fn resolve_field(
        &self,
        object: &str,
        path: &str,
        cache: &mut HashMap<String, Result<Vec<Value>, String>>,
    ) -> Result<String, String> {
        let segs: Vec<&str> = path.split('.').collect();
        let mut current = object.to_owned();
        for (i, seg) in segs.iter().enumerate() {
            let fields = self.describe(&current, cache).await?;
            let last = i + 1 == segs.len();
            let key = if last { "name" } else { "relationshipName" };
            let found = fields
                .iter()
                .find(|f| f[key].as_str().is_some_and(|n| n.eq_ignore_ascii_case(seg)));
            let Some(found) = found else {
                let what = if last { "field" } else { "relationship" };
                return Err(format!("{current} has no {what} {seg}"));
            };
            if last {
                return Ok(found["type"].as_str().unwrap_or("unknown").to_owned());
            }
            current = match found["referenceTo"].get(0).and_then(Value::as_str) {
                Some(t) => t.to_owned(),
                None => {
                    return Err(format!(
                        "{current}.{seg} does not say which object it points to"
                    ));
                }
            };
        }
        Err(format!("{path} is not a field path"))
    }
}

/// Turns a non-2xx answer into the error kind the engine acts on.
fn classify(ans: &Answer, mapping: &str) -> ConnectorError {
    let code = error_code(&ans.body);
    match (ans.status, code) {
        (400, Some((c, m)))
            if matches!(
                c.as_str(),
                "MALFORMED_QUERY" | "INVALID_FIELD" | "INVALID_TYPE" | "INVALID_QUERY_FILTER_OPERATOR" | "INVALID_OPERATION"
            ) =>
        {
            ConnectorError::Mapping {
                api: API,
                mapping: mapping.to_owned(),
                message: format!("{c}: {m}"),
            }
        }
        (403, Some((c, m))) => ConnectorError::Auth {
            api: API,
            message: format!("{c}: {m}"),
            hint: "check the integration user's permissions (API Enabled, read access to the object and fields)".into(),
        },
        (status, Some((c, m))) => ConnectorError::Protocol {
            api: API,
            message: format!("HTTP {status} {c}: {m}"),
        },
        (status, None) => ConnectorError::Protocol {
            api: API,
            message: format!("HTTP {status}: {}", excerpt(&ans.body)),
        },
    }
}

impl Connector for SalesforceConnector {
    fn source(&self) -> &'static str {
        API
    }

    fn pull<'a>(
        &'a self,
        spec: PullSpec,
    ) -> BoxFuture<'a, Result<Box<dyn Pull + 'a>, ConnectorError>> {
        Box::pin(async move { Ok(Box::new(pull::SfPull::new(self, spec)?) as Box<dyn Pull + 'a>) })
    }

    fn check<'a>(
        &'a self,
        spec: &'a PullSpec,
    ) -> BoxFuture<'a, Result<Vec<CheckFinding>, ConnectorError>> {
        Box::pin(async move { Ok(self.check_inner(spec).await) })
    }

    fn fetch<'a>(
        &'a self,
        spec: &'a PullSpec,
        crm_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<RawRecord>, ConnectorError>> {
        Box::pin(self.fetch_one(spec, crm_id))
    }
}
