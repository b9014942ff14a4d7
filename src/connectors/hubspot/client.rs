//! The HubSpot HTTP layer: path building for `v3` and dated API versions, Bearer / OAuth auth,
//! the two shared limiters, retries, and the classification of every failure into a
//! [`ConnectorError`]. Nothing here knows about pulls or watermarks.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use reqwest::header::HeaderMap;
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};

use crate::config::{ConfigError, HubspotAuth, HubspotSettings};
use crate::connectors::ConnectorError;
use crate::connectors::SharedKv;
use crate::limiter::RateLimiter;

pub(super) const API: &str = "hubspot";
const AUTH_HINT: &str = "check hubspot.access_token: the private app token or service key, and its crm.objects.*.read scopes";
const OAUTH_HINT: &str = "check hubspot.client_id, hubspot.client_secret and hubspot.refresh_token (the grant may have been revoked)";
/// Store key of a rotated OAuth refresh token.
pub(super) const REFRESH_KEY: &str = "hubspot.refresh_token";
/// Store key of the latest rate-limit reading.
pub(super) const QUOTA_KEY: &str = "quota.hubspot";
/// Attempts for 5xx, timeouts and dropped connections before giving up with `Transient`.
const MAX_FAILURES: u32 = 4;
/// Rate-limit waits (429 ten-secondly / secondly) before giving up with `RateLimited`.
const MAX_RATE_WAITS: u32 = 20;
/// The shortest wait after the daily limit is used up (see [`daily_reset_wait`]).
const DAILY_MIN_WAIT: Duration = Duration::from_secs(5 * 60);

/// The endpoints the connector uses. Path building lives in [`Client::path`] only.
pub(super) enum Endpoint<'a> {
    Objects(&'a str),
    Search(&'a str),
    Owners,
    Properties(&'a str),
    Token,
}

struct OAuth {
    client_id: String,
    client_secret: SecretString,
    configured_refresh: SecretString,
    /// The access token and when to stop using it.
    cached: tokio::sync::Mutex<Option<(SecretString, Instant)>>,
}

enum Auth {
    Token(SecretString),
    OAuth(Box<OAuth>),
}

/// One HubSpot portal's client: a reqwest client, the limiters and the credentials.
pub(super) struct Client {
    http: reqwest::Client,
    base: String,
    version: String,
    auth: Auth,
    general: RateLimiter,
    search: RateLimiter,
    store: Option<SharedKv>,
    /// The latest rate-limit reading not yet written to the store.
    quota: Mutex<Option<Value>>,
    /// Set when HubSpot said the portal's daily limit is used up: until then no call is sent
    /// (every one would be another 429 counted against the portal). A Tokio instant, so tests
    /// can move past it with paused time.
    daily_until: Mutex<Option<tokio::time::Instant>>,
}

/// What one response means for the retry loop.
enum Verdict {
    Done(Value),
    Retry(Duration, bool),
    Unauthorized(String),
    /// 429 for the daily limit: nothing is retried in-process; calls stop for `wait`.
    Daily {
        wait: Duration,
        message: String,
    },
    Fail(ConnectorError),
}

impl Client {
    pub(super) fn new(s: &HubspotSettings, store: Option<SharedKv>) -> Result<Client, ConfigError> {
        let auth = match s.auth {
            HubspotAuth::Token => {
                Auth::Token(s.access_token_source.resolve("hubspot.access_token")?)
            }
            HubspotAuth::Oauth => Auth::OAuth(Box::new(OAuth {
                client_id: s.client_id.clone().ok_or_else(|| {
                    ConfigError::new("hubspot.client_id", "is required when auth = \"oauth\"")
                })?,
                client_secret: s.client_secret_source.resolve("hubspot.client_secret")?,
                configured_refresh: s.refresh_token_source.resolve("hubspot.refresh_token")?,
                cached: tokio::sync::Mutex::new(None),
            })),
        };
        let http = reqwest::Client::builder()
            .timeout(s.timeout)
            .user_agent(concat!("pendo-sync/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| {
                ConfigError::new("hubspot", format!("cannot build an HTTP client: {e}"))
            })?;
        Ok(Client {
            http,
            base: s.base_url.trim_end_matches('/').to_owned(),
            version: s.api_version.clone(),
            auth,
            general: RateLimiter::new(s.requests_per_10s as f64, Duration::from_secs(10), 1),
            search: RateLimiter::per_second(s.search_requests_per_second),
            store,
            quota: Mutex::new(None),
            daily_until: Mutex::new(None),
        })
    }

    /// The URL of an endpoint. Assumption (reference §k): `v3` paths are
    /// `/crm/v3/{objects|owners|properties}/...`, dated versions put the version after the
    /// resource family (`/crm/objects/2026-03/contacts`, `/crm/owners/2026-03`,
    /// `/crm/properties/2026-03/contacts`, `/oauth/2026-03/token`).
    pub(super) fn path(&self, ep: Endpoint<'_>) -> String {
        let v = &self.version;
        let dated = v != "v3";
        let p = match ep {
            Endpoint::Objects(o) if dated => format!("/crm/objects/{v}/{o}"),
            Endpoint::Objects(o) => format!("/crm/v3/objects/{o}"),
            Endpoint::Search(o) if dated => format!("/crm/objects/{v}/{o}/search"),
            Endpoint::Search(o) => format!("/crm/v3/objects/{o}/search"),
            Endpoint::Owners if dated => format!("/crm/owners/{v}"),
            Endpoint::Owners => "/crm/v3/owners".to_owned(),
            Endpoint::Properties(o) if dated => format!("/crm/properties/{v}/{o}"),
            Endpoint::Properties(o) => format!("/crm/v3/properties/{o}"),
            Endpoint::Token if dated => format!("/oauth/{v}/token"),
            Endpoint::Token => "/oauth/v3/token".to_owned(),
        };
        format!("{}{p}", self.base)
    }

    pub(super) async fn get(
        &self,
        url: &str,
        query: &[(&str, String)],
        mapping: &str,
    ) -> Result<Value, ConnectorError> {
        self.call(reqwest::Method::GET, url, query, None, false, mapping)
            .await
    }

    pub(super) async fn post(
        &self,
        url: &str,
        body: &Value,
        search: bool,
        mapping: &str,
    ) -> Result<Value, ConnectorError> {
        self.call(reqwest::Method::POST, url, &[], Some(body), search, mapping)
            .await
    }

    /// One API call with limiter, auth, retries and classification. Every attempt, retries
    /// included, waits on the general limiter (and the search limiter for searches).
    async fn call(
        &self,
        method: reqwest::Method,
        url: &str,
        query: &[(&str, String)],
        body: Option<&Value>,
        search: bool,
        mapping: &str,
    ) -> Result<Value, ConnectorError> {
        let mut failures = 0;
        let mut rate_waits = 0;
        let mut refreshed = false;
        loop {
            if let Some(wait) = self.daily_wait_left() {
                return Err(ConnectorError::RateLimited {
                    api: API,
                    message: "the portal's daily API limit is used up; no HubSpot call is sent until it resets".into(),
                    wait,
                });
            }
            let token = self.bearer().await?;
            let mut req = self
                .http
                .request(method.clone(), url)
                .bearer_auth(token.expose_secret());
            if !query.is_empty() {
                req = req.query(query);
            }
            if let Some(b) = body {
                req = req.json(b);
            }
            match self.send(req, search, mapping).await {
                Verdict::Done(v) => return Ok(v),
                Verdict::Retry(wait, is_rate) => {
                    if is_rate {
                        rate_waits += 1;
                        if rate_waits > MAX_RATE_WAITS {
                            return Err(ConnectorError::RateLimited {
                                api: API,
                                message: format!("still throttled after {MAX_RATE_WAITS} waits"),
                                wait,
                            });
                        }
                        tokio::time::sleep(wait).await;
                    } else {
                        failures += 1;
                        if failures >= MAX_FAILURES {
                            return Err(ConnectorError::Transient {
                                api: API,
                                message: format!("{url}: failed {failures} times"),
                            });
                        }
                        // Linear backoff with jitter, as HubSpot's own SDK does for 5xx.
                        tokio::time::sleep(
                            wait * failures + Duration::from_millis(fastrand::u64(0..100)),
                        )
                        .await;
                    }
                }
                Verdict::Unauthorized(message) => match &self.auth {
                    // An OAuth token can die early (revoked, clock skew): refresh once, then stop.
                    Auth::OAuth(o) if !refreshed => {
                        refreshed = true;
                        *o.cached.lock().await = None;
                    }
                    Auth::OAuth(_) => {
                        return Err(ConnectorError::Auth {
                            api: API,
                            message,
                            hint: OAUTH_HINT.into(),
                        });
                    }
                    Auth::Token(_) => {
                        return Err(ConnectorError::Auth {
                            api: API,
                            message,
                            hint: AUTH_HINT.into(),
                        });
                    }
                },
                Verdict::Daily { wait, message } => {
                    return Err(self.daily_exhausted(wait, message));
                }
                Verdict::Fail(e) => return Err(e),
            }
        }
    }

    /// Remembers that the daily limit is used up for `wait` (every call until then is refused
    /// without being sent) and logs it.
    fn daily_exhausted(&self, wait: Duration, message: String) -> ConnectorError {
        let until = tokio::time::Instant::now() + wait;
        *self.daily_until.lock().unwrap_or_else(|e| e.into_inner()) = Some(until);
        tracing::warn!(
            wait_s = wait.as_secs(),
            "hubspot daily API limit used up; no HubSpot call until it resets"
        );
        ConnectorError::RateLimited {
            api: API,
            message,
            wait,
        }
    }

    /// How long calls must still wait for the daily limit to reset, if they must.
    fn daily_wait_left(&self) -> Option<Duration> {
        let mut until = self.daily_until.lock().unwrap_or_else(|e| e.into_inner());
        let left = (*until)?.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            *until = None;
            return None;
        }
        Some(left)
    }

    /// Sends one attempt (after the limiters) and judges the answer.
    async fn send(&self, req: reqwest::RequestBuilder, search: bool, mapping: &str) -> Verdict {
        self.general.acquire().await;
        if search {
            self.search.acquire().await;
        }
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => {
                crate::metrics::record_request(API, None);
                tracing::warn!(error = %e.without_url(), "hubspot request failed; retrying");
                return Verdict::Retry(Duration::from_millis(500), false);
            }
        };
        let status = resp.status().as_u16();
        crate::metrics::record_request(API, Some(status));
        let headers = resp.headers().clone();
        self.note_quota(&headers);
        let text = match crate::http::body_text(resp, crate::http::MAX_BODY_BYTES).await {
            Ok(t) => t,
            Err(e) if e.is_too_large() => {
                return Verdict::Fail(ConnectorError::Protocol {
                    api: API,
                    message: e.to_string(),
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "hubspot response body failed; retrying");
                return Verdict::Retry(Duration::from_millis(500), false);
            }
        };
        classify(status, &headers, &text, mapping)
    }

    /// The bearer token: the static one, or a cached / freshly refreshed OAuth access token.
    async fn bearer(&self) -> Result<SecretString, ConnectorError> {
        let o = match &self.auth {
            Auth::Token(t) => return Ok(t.clone()),
            Auth::OAuth(o) => o,
        };
        let mut cached = o.cached.lock().await;
        if let Some((t, until)) = &*cached
            && Instant::now() < *until
        {
            return Ok(t.clone());
        }
        let (token, until) = self.refresh(o).await?;
        *cached = Some((token.clone(), until));
        Ok(token)
    }

    /// Exchanges a refresh token for an access token. A rotated refresh token is kept in the
    /// store and preferred next time; if the stored one is refused, the configured one is tried
    /// (an operator may have issued a new grant).
    async fn refresh(&self, o: &OAuth) -> Result<(SecretString, Instant), ConnectorError> {
        let mut candidates: Vec<SecretString> = Vec::new();
        if let Some(store) = &self.store {
            match store.get(REFRESH_KEY).await {
                Ok(Some(Value::String(s))) if s != o.configured_refresh.expose_secret() => {
                    candidates.push(SecretString::from(s))
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the stored HubSpot refresh token")
                }
            }
        }
        candidates.push(o.configured_refresh.clone());
        let url = self.path(Endpoint::Token);
        let mut last_error = String::new();
        for refresh in candidates {
            let mut failures = 0;
            let answer = loop {
                let form = [
                    ("grant_type", "refresh_token"),
                    ("client_id", o.client_id.as_str()),
                    ("client_secret", o.client_secret.expose_secret()),
                    ("refresh_token", refresh.expose_secret()),
                ];
                match self
                    .send(self.http.post(&url).form(&form), false, "oauth")
                    .await
                {
                    Verdict::Done(v) => break Some(v),
                    Verdict::Retry(wait, is_rate) => {
                        failures += u32::from(!is_rate);
                        if failures >= MAX_FAILURES {
                            return Err(ConnectorError::Transient {
                                api: API,
                                message: "the OAuth token endpoint keeps failing".into(),
                            });
                        }
                        tokio::time::sleep(wait).await;
                    }
                    Verdict::Unauthorized(m) => {
                        last_error = m;
                        break None;
                    }
                    Verdict::Fail(ConnectorError::Mapping { message, .. }) => {
                        last_error = message;
                        break None;
                    }
                    Verdict::Daily { wait, message } => {
                        return Err(self.daily_exhausted(wait, message));
                    }
                    Verdict::Fail(e) => return Err(e),
                }
            };
            let Some(v) = answer else { continue };
            let access = v["access_token"]
                .as_str()
                .filter(|s| !s.is_empty())
                .ok_or_else(|| ConnectorError::Protocol {
                    api: API,
                    message: "the OAuth token answer has no access_token".into(),
                })?;
            let expires_in = v["expires_in"].as_u64().unwrap_or(1800);
            // Refresh a minute early so a token never expires mid-request.
            let until = Instant::now()
                + Duration::from_secs(expires_in.saturating_sub(60).max(expires_in / 2));
            if let Some(new_refresh) = v["refresh_token"].as_str()
                && new_refresh != refresh.expose_secret()
            {
                match &self.store {
                    Some(store) => {
                        if let Err(e) = store
                            .set(REFRESH_KEY, &Value::String(new_refresh.to_owned()))
                            .await
                        {
                            tracing::error!(error = %e, "cannot store HubSpot's rotated refresh token");
                        }
                    }
                    None => tracing::warn!(
                        "HubSpot rotated the refresh token but there is no state file to keep it"
                    ),
                }
            }
            return Ok((SecretString::from(access.to_owned()), until));
        }
        Err(ConnectorError::Auth {
            api: API,
            message: format!("the OAuth refresh was refused: {last_error}"),
            hint: OAUTH_HINT.into(),
        })
    }

    /// Remembers the latest `X-HubSpot-RateLimit-*` reading (written out by [`Client::flush_quota`]).
    fn note_quota(&self, h: &HeaderMap) {
        let num = |name: &str| {
            h.get(name)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
        };
        let daily = num("x-hubspot-ratelimit-daily");
        let remaining = num("x-hubspot-ratelimit-daily-remaining");
        if daily.is_none() && remaining.is_none() {
            return;
        }
        let reading = json!({
            "daily_limit": daily,
            "daily_remaining": remaining,
            "interval_max": num("x-hubspot-ratelimit-max"),
            "interval_remaining": num("x-hubspot-ratelimit-remaining"),
            "at_ms": chrono::Utc::now().timestamp_millis(),
        });
        *self.quota.lock().unwrap_or_else(|e| e.into_inner()) = Some(reading);
    }

    /// Writes the latest quota reading to the store (called once per page).
    pub(super) async fn flush_quota(&self) {
        let reading = self.quota.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let (Some(store), Some(reading)) = (&self.store, reading)
            && let Err(e) = store.set(QUOTA_KEY, &reading).await
        {
            tracing::warn!(error = %e, "cannot record the HubSpot quota reading");
        }
    }
}

/// How long to stop calling after a daily-limit 429. HubSpot resets the daily limit at midnight
/// in the portal's time zone (reference §j), but no response says which zone or when:
/// `X-HubSpot-RateLimit-Daily` and `-Daily-Remaining` carry counts only, and HubSpot documents no
/// reset header. So the wait runs to the next midnight UTC — early or late by the portal's UTC
/// offset; a portal still exhausted then answers one more 429 and waits for the next one — and
/// never less than [`DAILY_MIN_WAIT`], so a limit hit just before midnight UTC is not probed in
/// a tight loop.
fn daily_reset_wait() -> Duration {
    until_midnight_utc().max(DAILY_MIN_WAIT)
}

/// Until the next midnight UTC.
fn until_midnight_utc() -> Duration {
    let now = chrono::Utc::now();
    let next = (now.date_naive() + chrono::Days::new(1))
        .and_hms_opt(0, 0, 0)
        .expect("midnight exists")
        .and_utc();
    (next - now).to_std().unwrap_or(Duration::from_secs(3600))
}

fn header_u64(h: &HeaderMap, name: &str) -> Option<u64> {
    h.get(name)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

/// `Retry-After` as delta-seconds or an HTTP date (RFC 9110 allows both).
fn retry_after(h: &HeaderMap) -> Option<Duration> {
    h.get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(crate::limiter::parse_retry_after)
}

/// Judges one answer. `Retry(wait, true)` is a rate-limit wait, `Retry(wait, false)` a failure.
fn classify(status: u16, headers: &HeaderMap, text: &str, mapping: &str) -> Verdict {
    let body: Option<Value> = serde_json::from_str(text).ok();
    let message = body
        .as_ref()
        .and_then(|b| b["message"].as_str().or(b["error_description"].as_str()))
        .unwrap_or("")
        .to_owned();
    match status {
        200..=299 => match body {
            Some(v) if v.is_object() => Verdict::Done(v),
            _ => Verdict::Fail(ConnectorError::Protocol {
                api: API,
                message: format!(
                    "expected a JSON object, got {:?}",
                    text.chars().take(80).collect::<String>()
                ),
            }),
        },
        401 => Verdict::Unauthorized(format!("401 {message}")),
        // A malformed token can come back as Cloudflare's 530 (reference §f).
        530 => Verdict::Unauthorized("530: the token was not accepted".into()),
        403 => Verdict::Fail(ConnectorError::Auth {
            api: API,
            message: format!("403 {message}"),
            hint: AUTH_HINT.into(),
        }),
        429 => {
            let policy = body
                .as_ref()
                .and_then(|b| b["policyName"].as_str())
                .unwrap_or("");
            // The daily limit: named by policyName, or, in a 429 without one, by the daily
            // headers reading zero (or the message).
            let daily = policy == "DAILY"
                || (policy.is_empty()
                    && (header_u64(headers, "x-hubspot-ratelimit-daily-remaining") == Some(0)
                        || message.contains("daily limit")));
            if daily {
                let what = if message.is_empty() {
                    "429 DAILY".to_owned()
                } else {
                    message.clone()
                };
                return Verdict::Daily {
                    wait: daily_reset_wait(),
                    message: format!(
                        "the portal's daily API limit is used up ({what}); HubSpot resets it at midnight in the portal's time zone, pulls resume after the next midnight UTC"
                    ),
                };
            }
            if policy == "SECONDLY" || message.contains("secondly limit") {
                let wait = retry_after(headers).unwrap_or(Duration::from_secs(1));
                return Verdict::Retry(wait, true);
            }
            // Ten-secondly (or unknown): Retry-After if given (seconds or an HTTP date), else
            // the advertised window.
            let wait = retry_after(headers)
                .or_else(|| {
                    header_u64(headers, "x-hubspot-ratelimit-interval-milliseconds")
                        .map(Duration::from_millis)
                })
                .unwrap_or(Duration::from_secs(10));
            tracing::info!(
                policy,
                wait_ms = wait.as_millis() as u64,
                "hubspot rate limit; waiting"
            );
            Verdict::Retry(wait, true)
        }
        500..=599 => Verdict::Retry(Duration::from_millis(300), false),
        400 | 404 | 409 | 422 => Verdict::Fail(ConnectorError::Mapping {
            api: API,
            mapping: mapping.to_owned(),
            message: if message.is_empty() {
                format!("HTTP {status}")
            } else {
                format!("HTTP {status}: {message}")
            },
        }),
        _ => Verdict::Fail(ConnectorError::Protocol {
            api: API,
            message: format!(
                "unexpected HTTP {status}: {}",
                text.chars().take(120).collect::<String>()
            ),
        }),
    }
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("base", &self.base)
            .field("version", &self.version)
            .field(
                "auth",
                &matches!(self.auth, Auth::OAuth(_))
                    .then_some("oauth")
                    .unwrap_or("token"),
            )
            .finish_non_exhaustive()
    }
}
