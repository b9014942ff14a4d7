//! A loopback HubSpot CRM: objects (list with opaque `after` cursors, `archived=true`, search with
//! filters — at most 5 groups, 10 filters per group, 25 in all — one sort, `limit` ≤ 200 and the
//! 10,000-result offset cap, and one record by id: 404 `OBJECT_NOT_FOUND` when absent, or archived
//! and not asked for with `archived=true`), owners (active ones by default, archived ones with
//! `archived=true`), properties and the OAuth token endpoint, under both `v3` and dated
//! (`/crm/objects/2026-03/...`) paths.
//!
//! It reproduces what the connector must cope with, from `reference/crm-apis.md` §f–j: every
//! property value is a string (dates as ISO-8601), 401 and 429 bodies are HubSpot's own, the
//! ten-secondly rolling limit sends `X-HubSpot-RateLimit-*` headers (with or without
//! `Retry-After`), search has its own per-second limit and no rate headers, and a daily limit
//! answers `DAILY`. Faults (5xx, HTML pages, forced 429s) are switched on per test.
//! The state is readable over HTTP at `GET /_sim/hubspot/records/{object}` (no auth, not counted).

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

use super::SimServer;

/// How the simulated portal is set up.
#[derive(Debug, Clone)]
pub struct HubspotSimConfig {
    /// The private-app token accepted as `Authorization: Bearer ...`.
    pub access_token: String,
    /// OAuth app: tokens issued by `/oauth/.../token` are accepted too.
    pub oauth: Option<SimOauth>,
    /// Ten-secondly limit on non-search calls per `window_ms`; 0 = unlimited.
    pub requests_per_10s: u32,
    /// Length of the "ten-secondly" rolling window (tests shorten it); sent as
    /// `X-HubSpot-RateLimit-Interval-Milliseconds`.
    pub window_ms: u64,
    /// `Some(secs)`: ten-secondly 429s carry `Retry-After: secs`; `None`: no Retry-After (HubSpot
    /// does not always send it).
    pub retry_after: Option<u64>,
    /// Send that `Retry-After` as an HTTP date (`now + secs`, whole seconds) instead of
    /// delta-seconds; RFC 9110 allows both and proxies rewrite one into the other.
    pub retry_after_as_date: bool,
    /// Search requests per second; 0 = unlimited.
    pub search_per_second: u32,
    /// Requests per day (all endpoints); 0 = unlimited.
    pub daily_limit: u64,
    /// Search cannot page past this many results (HubSpot: 10,000).
    pub search_cap: usize,
}

impl Default for HubspotSimConfig {
    fn default() -> Self {
        HubspotSimConfig {
            access_token: "pat-na1-sim-token".into(),
            oauth: None,
            requests_per_10s: 190,
            window_ms: 10_000,
            retry_after: None,
            retry_after_as_date: false,
            search_per_second: 5,
            daily_limit: 0,
            search_cap: 10_000,
        }
    }
}

/// A simulated OAuth app.
#[derive(Debug, Clone)]
pub struct SimOauth {
    pub client_id: String,
    pub client_secret: String,
    pub refresh_token: String,
    /// Issue a new refresh token on every refresh (the old one stops working).
    pub rotate: bool,
    /// `expires_in` of issued access tokens, seconds.
    pub expires_in: u64,
}

/// Faults served before normal processing; each counter is used up one request at a time.
#[derive(Debug, Clone, Default)]
pub struct SimFaults {
    /// Next N API requests answer 503.
    pub server_errors: u32,
    /// Next N API requests answer 200 with an HTML page.
    pub html_pages: u32,
    /// Next N non-search requests answer 429 TEN_SECONDLY_ROLLING.
    pub ten_secondly_429s: u32,
    /// Next N search requests answer 429 "You have reached your secondly limit.".
    pub secondly_429s: u32,
    /// Next N API requests answer 429 `DAILY` ("You have reached your daily limit.", daily
    /// headers at 0 remaining), as a portal whose daily allowance is used up.
    pub daily_429s: u32,
}

/// One request as the simulator saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimRequest {
    pub method: String,
    pub path: String,
    pub status: u16,
    pub at_ms: u64,
}

#[derive(Debug, Clone)]
struct Rec {
    props: BTreeMap<String, String>,
    created_ms: u64,
    modified_ms: u64,
    archived_ms: Option<u64>,
}

#[derive(Debug, Clone)]
struct Owner {
    id: String,
    email: String,
    first: String,
    last: String,
    /// A deactivated user: listed only with `archived=true`.
    archived: bool,
    updated_ms: u64,
}

#[derive(Debug, Default)]
struct SimState {
    cfg: Option<HubspotSimConfig>,
    /// object → numeric id → record
    objects: BTreeMap<String, BTreeMap<u64, Rec>>,
    /// object → property name → type
    properties: BTreeMap<String, BTreeMap<String, String>>,
    owners: Vec<Owner>,
    issued_tokens: Vec<(String, u64)>,
    refresh_token: Option<String>,
    token_seq: u64,
    faults: SimFaults,
    general_window: VecDeque<u64>,
    search_window: VecDeque<u64>,
    daily_used: u64,
    last_modified: u64,
    log: Vec<SimRequest>,
}

impl SimState {
    fn cfg(&self) -> &HubspotSimConfig {
        self.cfg.as_ref().expect("sim configured")
    }
}

/// A handle on the simulated portal; clones share state.
#[derive(Debug, Clone)]
pub struct HubspotSim(Arc<Mutex<SimState>>);

fn now_ms() -> u64 {
    chrono::Utc::now().timestamp_millis().max(0) as u64
}

fn iso(ms: u64) -> String {
    chrono::DateTime::from_timestamp_millis(ms as i64)
        .unwrap_or_default()
        .format("%Y-%m-%dT%H:%M:%S%.3fZ")
        .to_string()
}

/// The modification-date property: contacts use `lastmodifieddate`, other objects
/// `hs_lastmodifieddate` (reference §h).
fn modified_prop(object: &str) -> &'static str {
    if object == "contacts" {
        "lastmodifieddate"
    } else {
        "hs_lastmodifieddate"
    }
}

const KNOWN_OBJECTS: &[&str] = &["contacts", "companies", "deals", "tickets"];

impl HubspotSim {
    pub fn new(cfg: HubspotSimConfig) -> HubspotSim {
        let mut st = SimState {
            refresh_token: cfg.oauth.as_ref().map(|o| o.refresh_token.clone()),
            ..SimState::default()
        };
        st.cfg = Some(cfg);
        for (object, names) in [
            (
                "contacts",
                &[
                    "email",
                    "firstname",
                    "lastname",
                    "lifecyclestage",
                    "hubspot_owner_id",
                ][..],
            ),
            (
                "companies",
                &[
                    "name",
                    "domain",
                    "plan_tier",
                    "annualrevenue",
                    "hubspot_owner_id",
                ][..],
            ),
        ] {
            let props = st.properties.entry(object.into()).or_default();
            for n in names {
                props.insert((*n).into(), "string".into());
            }
            for n in ["hs_object_id", "createdate", modified_prop(object)] {
                props.insert(
                    n.into(),
                    if n == "hs_object_id" {
                        "number"
                    } else {
                        "datetime"
                    }
                    .into(),
                );
            }
        }
        HubspotSim(Arc::new(Mutex::new(st)))
    }

    fn lock(&self) -> MutexGuard<'_, SimState> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Creates or updates a record; it is stamped "modified now" (strictly later than any earlier
    /// change, so ordering is deterministic).
    pub fn upsert(&self, object: &str, id: u64, props: Value) {
        let mut st = self.lock();
        let ms = now_ms().max(st.last_modified + 1);
        st.last_modified = ms;
        drop(st);
        self.upsert_at(object, id, props, ms);
    }

    /// Creates or updates a record with an explicit modification time (ties, old records).
    /// `props` is a JSON object of string (or null, which removes the value) properties.
    pub fn upsert_at(&self, object: &str, id: u64, props: Value, modified_ms: u64) {
        let mut st = self.lock();
        st.last_modified = st.last_modified.max(modified_ms);
        let declared = st.properties.entry(object.to_owned()).or_default();
        let mut updates = Vec::new();
        if let Value::Object(map) = props {
            for (k, v) in map {
                declared.entry(k.clone()).or_insert_with(|| "string".into());
                let v = match v {
                    Value::Null => None,
                    Value::String(s) => Some(s),
                    other => Some(other.to_string()),
                };
                updates.push((k, v));
            }
        }
        let rec = st
            .objects
            .entry(object.to_owned())
            .or_default()
            .entry(id)
            .or_insert(Rec {
                props: BTreeMap::new(),
                created_ms: modified_ms,
                modified_ms,
                archived_ms: None,
            });
        rec.modified_ms = modified_ms;
        for (k, v) in updates {
            match v {
                Some(v) => rec.props.insert(k, v),
                None => rec.props.remove(&k),
            };
        }
    }

    /// Archives (soft-deletes) a record: it leaves list and search, and appears in `archived=true`.
    pub fn archive(&self, object: &str, id: u64) {
        let mut st = self.lock();
        let ms = now_ms().max(st.last_modified + 1);
        st.last_modified = ms;
        if let Some(rec) = st.objects.get_mut(object).and_then(|o| o.get_mut(&id)) {
            rec.archived_ms = Some(ms);
        }
    }

    /// Every record of `object` as the API would show it (all properties), archived ones included.
    pub fn records(&self, object: &str) -> Vec<Value> {
        let st = self.lock();
        st.objects
            .get(object)
            .map(|o| {
                o.iter()
                    .map(|(id, r)| render(object, *id, r, None))
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn add_owner(&self, id: &str, email: &str, first: &str, last: &str) {
        self.lock().owners.push(Owner {
            id: id.into(),
            email: email.into(),
            first: first.into(),
            last: last.into(),
            archived: false,
            updated_ms: now_ms(),
        });
    }

    /// Hides a property from the API, as a rename, a deletion or a token that lost access to it
    /// does: HubSpot then omits it from every response (asked-for or not) without an error.
    pub fn hide_property(&self, object: &str, name: &str) {
        if let Some(props) = self.lock().properties.get_mut(object) {
            props.remove(name);
        }
    }

    /// Changes an owner's e-mail (as when the user's login changes). Records keep pointing at
    /// the owner id; only the owners endpoint shows the new address.
    pub fn set_owner_email(&self, id: &str, email: &str) {
        let mut st = self.lock();
        if let Some(o) = st.owners.iter_mut().find(|o| o.id == id) {
            o.email = email.into();
            o.updated_ms = now_ms();
        }
    }

    /// Archives an owner (the user was deactivated): it leaves `GET /crm/v3/owners` and appears
    /// with `archived=true` only. Records it owns keep their `hubspot_owner_id`.
    pub fn archive_owner(&self, id: &str) {
        let mut st = self.lock();
        if let Some(o) = st.owners.iter_mut().find(|o| o.id == id) {
            o.archived = true;
            o.updated_ms = now_ms();
        }
    }

    pub fn declare_property(&self, object: &str, name: &str, kind: &str) {
        self.lock()
            .properties
            .entry(object.into())
            .or_default()
            .insert(name.into(), kind.into());
    }

    /// Every request served so far (API and token calls; not `/_sim`).
    pub fn requests(&self) -> Vec<SimRequest> {
        self.lock().log.clone()
    }

    pub fn set_fault(&self, faults: SimFaults) {
        self.lock().faults = faults;
    }

    /// Issued OAuth access tokens stop working (as if they expired early).
    pub fn expire_tokens(&self) {
        self.lock().issued_tokens.clear();
    }

    /// The refresh token the portal currently accepts.
    pub fn current_refresh_token(&self) -> Option<String> {
        self.lock().refresh_token.clone()
    }

    /// Demo data: three owners, `companies` companies (ids 1001..) and `contacts` contacts
    /// (ids 5001..).
    pub fn seed_demo(&self, companies: usize, contacts: usize) {
        let owners = [
            ("101", "ada@example.com", "Ada", "Lovelace"),
            ("102", "alan@example.com", "Alan", "Turing"),
            ("103", "grace@example.com", "Grace", "Hopper"),
        ];
        for (id, email, first, last) in owners {
            self.add_owner(id, email, first, last);
        }
        let tiers = ["starter", "pro", "enterprise"];
        for i in 0..companies {
            self.upsert(
                "companies",
                1001 + i as u64,
                json!({
                    "name": format!("Company {}", i + 1),
                    "domain": format!("company{}.example", i + 1),
                    "plan_tier": tiers[i % 3],
                    "annualrevenue": ((i + 1) * 12_000).to_string(),
                    "hubspot_owner_id": owners[i % 3].0,
                }),
            );
        }
        let stages = ["lead", "opportunity", "customer"];
        for i in 0..contacts {
            let id = 5001 + i as u64;
            self.upsert(
                "contacts",
                id,
                json!({
                    "email": format!("user{}@company{}.example", i + 1, i % companies.max(1) + 1),
                    "firstname": format!("User{}", i + 1),
                    "lastname": "Example",
                    "lifecyclestage": stages[i % 3],
                    "hubspot_owner_id": owners[i % 3].0,
                }),
            );
        }
    }

    pub fn router(&self) -> Router {
        Router::new()
            .route("/crm/v3/objects/{object}", get(list))
            .route("/crm/v3/objects/{object}/search", post(search))
            // A static segment outranks a parameter, so `…/search` stays the search route (a
            // GET there is 405, as it is at HubSpot) and any other segment is a record id.
            .route("/crm/v3/objects/{object}/{id}", get(read))
            .route("/crm/v3/owners", get(owners))
            .route("/crm/v3/owners/", get(owners))
            .route("/crm/v3/properties/{object}", get(properties))
            .route("/crm/objects/{version}/{object}", get(list))
            .route("/crm/objects/{version}/{object}/search", post(search))
            .route("/crm/objects/{version}/{object}/{id}", get(read))
            .route("/crm/owners/{version}", get(owners))
            .route("/crm/properties/{version}/{object}", get(properties))
            .route("/oauth/{version}/token", post(token))
            .route("/_sim/hubspot/records/{object}", get(readback))
            .with_state(self.clone())
    }

    pub async fn start(&self, addr: SocketAddr) -> std::io::Result<SimServer> {
        SimServer::start(self.router(), addr).await
    }
}

/// The API's view of a record: string properties (only `wanted` ones when given, plus the system
/// ones HubSpot always returns).
fn render(object: &str, id: u64, r: &Rec, wanted: Option<&[String]>) -> Value {
    let mut props = serde_json::Map::new();
    let system = [
        ("hs_object_id", id.to_string()),
        ("createdate", iso(r.created_ms)),
        (modified_prop(object), iso(r.modified_ms)),
    ];
    match wanted {
        None => {
            for (k, v) in &r.props {
                props.insert(k.clone(), Value::String(v.clone()));
            }
        }
        Some(wanted) => {
            for k in wanted {
                // HubSpot returns requested properties without a value as null.
                let v = r
                    .props
                    .get(k)
                    .map_or(Value::Null, |v| Value::String(v.clone()));
                props.insert(k.clone(), v);
            }
        }
    }
    for (k, v) in system {
        props.insert(k.into(), Value::String(v));
    }
    let mut out = json!({
        "id": id.to_string(),
        "properties": props,
        "createdAt": iso(r.created_ms),
        "updatedAt": iso(r.modified_ms),
        "archived": r.archived_ms.is_some(),
    });
    if let Some(at) = r.archived_ms {
        out["archivedAt"] = Value::String(iso(at));
    }
    out
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Class {
    General,
    Search,
}

fn error_body(status: StatusCode, body: Value) -> Response {
    (status, axum::Json(body)).into_response()
}

fn validation(message: String) -> Response {
    error_body(
        StatusCode::BAD_REQUEST,
        json!({"status":"error","message":message,"correlationId":"sim-correlation","category":"VALIDATION_ERROR"}),
    )
}

/// HubSpot's 404 for a record id it does not have (or an archived one not asked for).
fn object_not_found() -> Response {
    error_body(
        StatusCode::NOT_FOUND,
        json!({"status":"error","message":"resource not found","correlationId":"sim-correlation","category":"OBJECT_NOT_FOUND"}),
    )
}

fn rate_429(policy: &str, message: &str) -> Response {
    error_body(
        StatusCode::TOO_MANY_REQUESTS,
        json!({"status":"error","message":message,"errorType":"RATE_LIMIT","correlationId":"sim-correlation","policyName":policy,"requestId":"sim-request"}),
    )
}

/// The daily limit's 429 (reference §j); private-app calls also see the daily headers at zero.
fn daily_429(cfg: &HubspotSimConfig, oauth_token: bool) -> Response {
    let mut r = rate_429("DAILY", "You have reached your daily limit.");
    if !oauth_token {
        let daily = if cfg.daily_limit == 0 {
            1_000_000
        } else {
            cfg.daily_limit
        };
        let h = r.headers_mut();
        h.insert("x-hubspot-ratelimit-daily", HeaderValue::from(daily));
        h.insert(
            "x-hubspot-ratelimit-daily-remaining",
            HeaderValue::from(0u64),
        );
    }
    r
}

/// HubSpot's search filter limits since 2024-08-26 (reference §h): filter groups (ORed),
/// filters per group (ANDed), filters in all.
const MAX_FILTER_GROUPS: usize = 5;
const MAX_FILTERS_PER_GROUP: usize = 10;
const MAX_FILTERS: usize = 25;

/// Auth, faults and limits for one API request, then `f`, then rate headers and the log entry.
fn serve(
    sim: &HubspotSim,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    class: Class,
    f: impl FnOnce(&mut SimState) -> Response,
) -> Response {
    let mut st = sim.lock();
    let now = now_ms();
    let resp = gate_and_run(&mut st, now, headers, class, f);
    st.log.push(SimRequest {
        method: method.to_string(),
        path: uri.path().to_owned(),
        status: resp.status().as_u16(),
        at_ms: now,
    });
    resp
}

fn gate_and_run(
    st: &mut SimState,
    now: u64,
    headers: &HeaderMap,
    class: Class,
    f: impl FnOnce(&mut SimState) -> Response,
) -> Response {
    let bearer = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let cfg = st.cfg().clone();
    let oauth_token = st
        .issued_tokens
        .iter()
        .any(|(t, exp)| t == bearer && *exp > now);
    if !(bearer == cfg.access_token || oauth_token) {
        return error_body(
            StatusCode::UNAUTHORIZED,
            json!({"status":"error","message":"Authentication credentials not found. This API supports OAuth 2.0 authentication and you can find more details at https://developers.hubspot.com/docs/methods/auth/oauth-overview","correlationId":"sim-correlation","category":"INVALID_AUTHENTICATION"}),
        );
    }
    let forced_daily = st.faults.daily_429s > 0;
    if forced_daily {
        st.faults.daily_429s -= 1;
    }
    if forced_daily || (cfg.daily_limit > 0 && st.daily_used >= cfg.daily_limit) {
        return daily_429(&cfg, oauth_token);
    }
    st.daily_used += 1;
    if st.faults.server_errors > 0 {
        st.faults.server_errors -= 1;
        return error_body(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"status":"error","message":"Service unavailable","category":"SERVICE_UNAVAILABLE"}),
        );
    }
    if st.faults.html_pages > 0 {
        st.faults.html_pages -= 1;
        return (
            StatusCode::OK,
            [("content-type", "text/html")],
            "<html><body>502 Bad Gateway</body></html>",
        )
            .into_response();
    }
    match class {
        Class::Search => {
            while st
                .search_window
                .front()
                .is_some_and(|t| now.saturating_sub(*t) >= 1000)
            {
                st.search_window.pop_front();
            }
            let forced = st.faults.secondly_429s > 0;
            if forced
                || (cfg.search_per_second > 0
                    && st.search_window.len() >= cfg.search_per_second as usize)
            {
                st.faults.secondly_429s = st.faults.secondly_429s.saturating_sub(1);
                // Search 429s carry no rate-limit headers (reference §j).
                return rate_429("SECONDLY", "You have reached your secondly limit.");
            }
            st.search_window.push_back(now);
            f(st)
        }
        Class::General => {
            while st
                .general_window
                .front()
                .is_some_and(|t| now.saturating_sub(*t) >= cfg.window_ms)
            {
                st.general_window.pop_front();
            }
            let forced = st.faults.ten_secondly_429s > 0;
            let over = cfg.requests_per_10s > 0
                && st.general_window.len() >= cfg.requests_per_10s as usize;
            let mut resp = if forced || over {
                st.faults.ten_secondly_429s = st.faults.ten_secondly_429s.saturating_sub(1);
                let mut r = rate_429(
                    "TEN_SECONDLY_ROLLING",
                    "You have reached your ten_secondly_rolling limit.",
                );
                if let Some(secs) = cfg.retry_after {
                    let value = if cfg.retry_after_as_date {
                        let at =
                            std::time::SystemTime::now() + std::time::Duration::from_secs(secs);
                        HeaderValue::from_str(&httpdate::fmt_http_date(at)).ok()
                    } else {
                        Some(HeaderValue::from(secs))
                    };
                    if let Some(v) = value {
                        r.headers_mut().insert("retry-after", v);
                    }
                }
                r
            } else {
                st.general_window.push_back(now);
                f(st)
            };
            let h = resp.headers_mut();
            let max = if cfg.requests_per_10s == 0 {
                1000
            } else {
                cfg.requests_per_10s as u64
            };
            h.insert(
                "x-hubspot-ratelimit-interval-milliseconds",
                HeaderValue::from(cfg.window_ms),
            );
            h.insert("x-hubspot-ratelimit-max", HeaderValue::from(max));
            h.insert(
                "x-hubspot-ratelimit-remaining",
                HeaderValue::from(max.saturating_sub(st.general_window.len() as u64)),
            );
            // OAuth-authorised calls carry no daily headers (there is no daily limit for them).
            if !oauth_token {
                let daily = if cfg.daily_limit == 0 {
                    1_000_000
                } else {
                    cfg.daily_limit
                };
                h.insert("x-hubspot-ratelimit-daily", HeaderValue::from(daily));
                h.insert(
                    "x-hubspot-ratelimit-daily-remaining",
                    HeaderValue::from(daily.saturating_sub(st.daily_used)),
                );
            }
            resp
        }
    }
}

/// `None` for a known object, else the 400 HubSpot answers for an unknown object type.
fn unknown_object(st: &SimState, object: &str) -> Option<Response> {
    if KNOWN_OBJECTS.contains(&object) || st.objects.contains_key(object) {
        None
    } else {
        Some(validation(format!(
            "Unable to infer object type from: {object}"
        )))
    }
}

fn split_list(v: Option<&String>) -> Option<Vec<String>> {
    v.map(|s| {
        s.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect()
    })
}

/// The `properties` query parameter, without the ones the object does not declare (HubSpot
/// ignores unknown and hidden properties without an error).
fn requested(st: &SimState, object: &str, q: &BTreeMap<String, String>) -> Option<Vec<String>> {
    split_list(q.get("properties")).map(|w| {
        let declared = st.properties.get(object);
        w.into_iter()
            .filter(|p| declared.is_some_and(|d| d.contains_key(p)))
            .collect::<Vec<_>>()
    })
}

/// One record by id, rendered as list renders it. Like list, `archived` (default false) selects
/// live or archived records only, so an archived record is 404 unless `archived=true`.
fn read_impl(st: &mut SimState, object: &str, id: &str, q: &BTreeMap<String, String>) -> Response {
    if let Some(r) = unknown_object(st, object) {
        return r;
    }
    let archived = q.get("archived").is_some_and(|a| a == "true");
    let wanted = requested(st, object, q);
    let found = id
        .parse::<u64>()
        .ok()
        .and_then(|n| st.objects.get(object)?.get(&n).map(|r| (n, r)))
        .filter(|(_, r)| r.archived_ms.is_some() == archived);
    match found {
        Some((n, r)) => {
            axum::Json(render(object, n, r, Some(wanted.as_deref().unwrap_or(&[])))).into_response()
        }
        None => object_not_found(),
    }
}

fn list_impl(st: &mut SimState, object: &str, q: &BTreeMap<String, String>) -> Response {
    if let Some(r) = unknown_object(st, object) {
        return r;
    }
    let limit = q
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .unwrap_or(10)
        .clamp(1, 100);
    let archived = q.get("archived").is_some_and(|a| a == "true");
    // The cursor is opaque to clients: the next id, in hex.
    let start = match q.get("after") {
        None => 0,
        Some(a) => match u64::from_str_radix(a, 16) {
            Ok(v) => v,
            Err(_) => return validation(format!("Invalid after cursor: {a}")),
        },
    };
    let wanted = requested(st, object, q);
    let empty = BTreeMap::new();
    let recs = st.objects.get(object).unwrap_or(&empty);
    let mut iter = recs
        .range(start..)
        .filter(|(_, r)| r.archived_ms.is_some() == archived);
    let page: Vec<Value> = iter
        .by_ref()
        .take(limit)
        .map(|(id, r)| render(object, *id, r, Some(wanted.as_deref().unwrap_or(&[]))))
        .collect();
    let mut body = json!({ "results": page });
    if let Some((next, _)) = iter.next() {
        let after = format!("{next:x}");
        body["paging"] = json!({"next": {"after": after, "link": format!("?after={after}")}});
    }
    axum::Json(body).into_response()
}

/// A property value for comparisons: numbers (and ISO dates, as epoch ms) compare numerically.
fn comparable(s: &str) -> Result<f64, &str> {
    if let Ok(n) = s.parse::<f64>() {
        return Ok(n);
    }
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|d| d.timestamp_millis() as f64)
        .map_err(|_| s)
}

/// A sort key: absent, numeric, or text.
type SortKey = Option<Result<f64, String>>;

fn prop_value(object: &str, id: u64, r: &Rec, name: &str) -> Option<String> {
    match name {
        "hs_object_id" => Some(id.to_string()),
        "createdate" => Some(r.created_ms.to_string()),
        n if n == modified_prop(object) => Some(r.modified_ms.to_string()),
        n => r.props.get(n).cloned(),
    }
}

fn compare(a: &str, b: &str) -> std::cmp::Ordering {
    match (comparable(a), comparable(b)) {
        (Ok(x), Ok(y)) => x.total_cmp(&y),
        _ => a.cmp(b),
    }
}

fn search_impl(st: &mut SimState, object: &str, body: &[u8]) -> Response {
    use std::cmp::Ordering;
    if let Some(r) = unknown_object(st, object) {
        return r;
    }
    let Ok(req) = serde_json::from_slice::<Value>(body) else {
        return validation("Invalid input JSON on line 1".into());
    };
    let limit = req["limit"].as_u64().unwrap_or(10) as usize;
    if limit > 200 {
        return validation(format!("limit must be at most 200, got {limit}"));
    }
    let after: usize = match &req["after"] {
        Value::Null => 0,
        Value::String(s) => s.parse().unwrap_or(0),
        Value::Number(n) => n.as_u64().unwrap_or(0) as usize,
        _ => 0,
    };
    let cap = st.cfg().search_cap;
    if after + limit > cap {
        return validation(format!(
            "There was a problem with the request. Search results are limited to {cap} total results; after + limit = {}",
            after + limit
        ));
    }
    let declared = st.properties.get(object).cloned().unwrap_or_default();
    let groups: Vec<Vec<(String, String, String)>> = req["filterGroups"]
        .as_array()
        .map(|gs| {
            gs.iter()
                .map(|g| {
                    g["filters"]
                        .as_array()
                        .map(|fs| {
                            fs.iter()
                                .map(|f| {
                                    (
                                        f["propertyName"].as_str().unwrap_or("").to_owned(),
                                        f["operator"].as_str().unwrap_or("").to_owned(),
                                        match &f["value"] {
                                            Value::String(s) => s.clone(),
                                            v => v.to_string(),
                                        },
                                    )
                                })
                                .collect()
                        })
                        .unwrap_or_default()
                })
                .collect()
        })
        .unwrap_or_default();
    if groups.len() > MAX_FILTER_GROUPS {
        return validation(format!(
            "There was a problem with the request. filterGroups: at most {MAX_FILTER_GROUPS} filter groups are allowed, got {}",
            groups.len()
        ));
    }
    if let Some((i, g)) = groups
        .iter()
        .enumerate()
        .find(|(_, g)| g.len() > MAX_FILTERS_PER_GROUP)
    {
        return validation(format!(
            "There was a problem with the request. filterGroups[{i}].filters: at most {MAX_FILTERS_PER_GROUP} filters are allowed in a filter group, got {}",
            g.len()
        ));
    }
    let total: usize = groups.iter().map(Vec::len).sum();
    if total > MAX_FILTERS {
        return validation(format!(
            "There was a problem with the request. filterGroups: at most {MAX_FILTERS} filters are allowed in all, got {total}"
        ));
    }
    for (p, op, _) in groups.iter().flatten() {
        if !declared.contains_key(p) {
            return validation(format!("Property \"{p}\" does not exist on {object}"));
        }
        if !["EQ", "NEQ", "GT", "GTE", "LT", "LTE"].contains(&op.as_str()) {
            return validation(format!("Unsupported operator {op}"));
        }
    }
    let sorts = req["sorts"].as_array().cloned().unwrap_or_default();
    if sorts.len() > 1 {
        return validation("Only one sort is supported".into());
    }
    let sort = sorts.first().map(|s| {
        (
            s["propertyName"]
                .as_str()
                .unwrap_or("hs_object_id")
                .to_owned(),
            s["direction"].as_str() == Some("DESCENDING"),
        )
    });
    let empty = BTreeMap::new();
    let recs = st.objects.get(object).unwrap_or(&empty);
    let matches = |id: u64, r: &Rec| {
        groups.is_empty()
            || groups.iter().any(|g| {
                g.iter().all(|(p, op, v)| {
                    let Some(have) = prop_value(object, id, r, p) else {
                        return op == "NEQ";
                    };
                    let ord = compare(&have, v);
                    match op.as_str() {
                        "EQ" => ord == Ordering::Equal,
                        "NEQ" => ord != Ordering::Equal,
                        "GT" => ord == Ordering::Greater,
                        "GTE" => ord != Ordering::Less,
                        "LT" => ord == Ordering::Less,
                        _ => ord != Ordering::Greater,
                    }
                })
            })
    };
    // Search never returns archived records.
    let mut hits: Vec<(u64, &Rec)> = recs
        .iter()
        .filter(|(id, r)| r.archived_ms.is_none() && matches(**id, r))
        .map(|(id, r)| (*id, r))
        .collect();
    if let Some((p, desc)) = &sort {
        // Keys computed once; a stable sort over id order returns ties by id, one valid order.
        let mut keyed: Vec<(SortKey, u64, &Rec)> = hits
            .into_iter()
            .map(|(id, r)| {
                (
                    prop_value(object, id, r, p).map(|v| comparable(&v).map_err(str::to_owned)),
                    id,
                    r,
                )
            })
            .collect();
        keyed.sort_by(|(a, _, _), (b, _, _)| {
            let o = match (a, b) {
                (Some(Ok(x)), Some(Ok(y))) => x.total_cmp(y),
                (Some(Err(x)), Some(Err(y))) => x.cmp(y),
                (Some(x), Some(y)) => x.is_err().cmp(&y.is_err()),
                (x, y) => x.is_some().cmp(&y.is_some()),
            };
            if *desc { o.reverse() } else { o }
        });
        hits = keyed.into_iter().map(|(_, id, r)| (id, r)).collect();
    }
    let wanted: Vec<String> = req["properties"]
        .as_array()
        .map(|ps| {
            ps.iter()
                .filter_map(|p| p.as_str())
                .filter(|p| declared.contains_key(*p))
                .map(String::from)
                .collect()
        })
        .unwrap_or_default();
    let total = hits.len();
    let results: Vec<Value> = hits
        .iter()
        .skip(after)
        .take(limit)
        .map(|(id, r)| render(object, *id, r, Some(&wanted)))
        .collect();
    let mut body = json!({"total": total, "results": results});
    if after + limit < total {
        body["paging"] = json!({"next": {"after": (after + limit).to_string()}});
    }
    axum::Json(body).into_response()
}

/// `GET /crm/v3/objects/{object}` and the dated `/crm/objects/{version}/{object}` alike.
async fn list(
    State(sim): State<HubspotSim>,
    Path(path): Path<BTreeMap<String, String>>,
    Query(q): Query<BTreeMap<String, String>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    serve(&sim, &method, &uri, &headers, Class::General, |st| {
        list_impl(st, object_of(&path), &q)
    })
}

/// `GET /crm/v3/objects/{object}/{id}` and the dated `/crm/objects/{version}/{object}/{id}`.
async fn read(
    State(sim): State<HubspotSim>,
    Path(path): Path<BTreeMap<String, String>>,
    Query(q): Query<BTreeMap<String, String>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let id = path.get("id").map_or("", String::as_str);
    serve(&sim, &method, &uri, &headers, Class::General, |st| {
        read_impl(st, object_of(&path), id, &q)
    })
}

/// `POST …/{object}/search`, v3 or dated.
async fn search(
    State(sim): State<HubspotSim>,
    Path(path): Path<BTreeMap<String, String>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    serve(&sim, &method, &uri, &headers, Class::Search, |st| {
        search_impl(st, object_of(&path), &body)
    })
}

async fn owners(
    State(sim): State<HubspotSim>,
    Query(q): Query<BTreeMap<String, String>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    serve(&sim, &method, &uri, &headers, Class::General, |st| {
        let limit = q
            .get("limit")
            .and_then(|l| l.parse::<usize>().ok())
            .unwrap_or(100)
            .clamp(1, 500);
        let start = q
            .get("after")
            .and_then(|a| a.parse::<usize>().ok())
            .unwrap_or(0);
        // As HubSpot: `archived` defaults to false and lists active owners only; `true` lists
        // only archived ones.
        let archived = q.get("archived").is_some_and(|a| a == "true");
        let listed: Vec<&Owner> = st
            .owners
            .iter()
            .filter(|o| o.archived == archived)
            .collect();
        let results: Vec<Value> = listed
            .iter()
            .skip(start)
            .take(limit)
            .map(|o| {
                let user_id = o.id.parse::<u64>().unwrap_or(0) + 9_000_000;
                // A deactivated user has no active user id any more.
                let active_user_id = if o.archived {
                    Value::Null
                } else {
                    json!(user_id)
                };
                json!({"id": o.id, "email": o.email, "firstName": o.first, "lastName": o.last,
                       "userId": active_user_id, "userIdIncludingInactive": user_id,
                       "type": "PERSON", "archived": o.archived,
                       "createdAt": "2019-10-30T03:30:17.883Z", "updatedAt": iso(o.updated_ms)})
            })
            .collect();
        let mut body = json!({ "results": results });
        if start + limit < listed.len() {
            body["paging"] = json!({"next": {"after": (start + limit).to_string()}});
        }
        axum::Json(body).into_response()
    })
}

fn properties_impl(st: &mut SimState, object: &str) -> Response {
    if let Some(r) = unknown_object(st, object) {
        return r;
    }
    let results: Vec<Value> = st
        .properties
        .get(object)
        .map(|ps| {
            ps.iter()
                .map(|(n, t)| json!({"name": n, "label": n, "type": t, "fieldType": "text", "groupName": "sim"}))
                .collect()
        })
        .unwrap_or_default();
    axum::Json(json!({ "results": results })).into_response()
}

/// `GET /crm/v3/properties/{object}` and `/crm/properties/{version}/{object}`.
async fn properties(
    State(sim): State<HubspotSim>,
    Path(path): Path<BTreeMap<String, String>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    serve(&sim, &method, &uri, &headers, Class::General, |st| {
        properties_impl(st, object_of(&path))
    })
}

/// The `{object}` segment: every route above has one (the dated ones also carry `{version}`,
/// which the simulator accepts whatever it says).
fn object_of(path: &BTreeMap<String, String>) -> &str {
    path.get("object").map_or("", String::as_str)
}

async fn token(State(sim): State<HubspotSim>, method: Method, uri: Uri, body: Bytes) -> Response {
    let mut st = sim.lock();
    let now = now_ms();
    let form: BTreeMap<String, String> = url::form_urlencoded::parse(&body).into_owned().collect();
    let resp = match st.cfg().oauth.clone() {
        None => validation("OAuth is not enabled on this portal".into()),
        Some(o) => {
            let grant_ok = form.get("grant_type").map(String::as_str) == Some("refresh_token")
                && form.get("client_id") == Some(&o.client_id)
                && form.get("client_secret") == Some(&o.client_secret)
                && form.get("refresh_token") == st.refresh_token.as_ref();
            if !grant_ok {
                error_body(
                    StatusCode::BAD_REQUEST,
                    json!({"error":"invalid_grant","error_description":"refresh token is invalid, expired or revoked","status":"BAD_REFRESH_TOKEN","message":"missing or invalid refresh token"}),
                )
            } else {
                st.token_seq += 1;
                let access = format!("sim-oauth-access-{}", st.token_seq);
                st.issued_tokens
                    .push((access.clone(), now + o.expires_in * 1000));
                if o.rotate {
                    st.refresh_token = Some(format!("sim-refresh-{}", st.token_seq));
                }
                axum::Json(json!({"token_type":"bearer","refresh_token":st.refresh_token,"access_token":access,"expires_in":o.expires_in,"token_use":"access_token"}))
                    .into_response()
            }
        }
    };
    st.log.push(SimRequest {
        method: method.to_string(),
        path: uri.path().to_owned(),
        status: resp.status().as_u16(),
        at_ms: now,
    });
    resp
}

async fn readback(State(sim): State<HubspotSim>, Path(object): Path<String>) -> Response {
    axum::Json(json!({ "results": sim.records(&object) })).into_response()
}
