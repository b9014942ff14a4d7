//! Salesforce simulator: the OAuth token endpoint (JWT bearer, client credentials, refresh token
//! with optional rotation), REST `query`/`queryAll` with `nextRecordsUrl` paging over a snapshot,
//! `describe`, `limits`, and Bulk API 2.0 query jobs with CSV results and `Sforce-Locator`.
//!
//! It answers with the shapes in `reference/crm-apis.md` (error arrays with `errorCode`,
//! `Sforce-Limit-Info` on every `/services/data` response, 401 `INVALID_SESSION_ID`, 403
//! `REQUEST_LIMIT_EXCEEDED`) and understands the SOQL subset the connector emits: a field list or
//! `COUNT()`, `WHERE` with comparisons, `AND`/`OR`/`NOT` and parentheses, `ORDER BY`, `LIMIT`.
//! `Id` compares as in Salesforce: a 15-character id matches the 18-character one it abbreviates,
//! and a literal that is not an id shape is refused (`INVALID_QUERY_FILTER_OPERATOR`).
//!
//! Records are flat JSON objects; a relationship is a nested object (`{"Owner":{"Email":..}}`).
//! The schema `describe` reports is derived from the data plus whatever tests declare.

// Handlers return a ready-made error `Response` as their `Err`; boxing it would only add noise.
#![allow(clippy::result_large_err)]

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State as AxState};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use chrono::{DateTime, Utc};
use serde_json::{Map, Value, json};

use super::SimServer;

/// How the simulated org is set up.
#[derive(Debug, Clone)]
pub struct SalesforceSimConfig {
    pub client_id: String,
    pub client_secret: String,
    pub username: String,
    /// Public half of the key the JWT bearer assertion must be signed with (PEM).
    pub jwt_public_key_pem: Option<String>,
    /// The `aud` a JWT bearer assertion must carry, compared verbatim as Salesforce does:
    /// `https://login.salesforce.com` for a production org (whatever host the token is requested
    /// from), `https://test.salesforce.com` for a sandbox, or an Experience Cloud site URL.
    pub jwt_audience: String,
    /// The refresh token currently valid for the refresh-token grant.
    pub refresh_token: String,
    /// Issue a new refresh token on every refresh (and invalidate the old one).
    pub rotate_refresh_token: bool,
    /// Daily API request allocation reported in `Sforce-Limit-Info`.
    pub daily_limit: u64,
    /// Access tokens older than this get 401 `INVALID_SESSION_ID`.
    pub token_ttl: Option<Duration>,
    /// Records per REST query page (Salesforce's default is 2,000).
    pub page_size: usize,
}

impl Default for SalesforceSimConfig {
    fn default() -> Self {
        SalesforceSimConfig {
            client_id: "sim-client-id".into(),
            client_secret: "sim-client-secret".into(),
            username: "integration@example.com".into(),
            jwt_public_key_pem: None,
            jwt_audience: "https://login.salesforce.com".into(),
            refresh_token: "sim-refresh-token".into(),
            rotate_refresh_token: false,
            daily_limit: 100_000,
            token_ttl: None,
            page_size: 2000,
        }
    }
}

/// Faults injected into data calls (`/services/data/...`), after the auth and limit checks.
#[derive(Debug, Clone, Default)]
pub struct SalesforceFault {
    /// Share of data calls answered 503 (0.0..=1.0).
    pub error_rate: f64,
    /// Answers served, in order, to the next data calls: status and body (JSON if it starts
    /// with `[` or `{`, else served as HTML).
    pub forced: VecDeque<(u16, String)>,
}

#[derive(Debug, Clone)]
struct Row {
    fields: Map<String, Value>,
    modstamp: DateTime<Utc>,
    deleted: bool,
}

#[derive(Debug)]
struct Job {
    columns: Vec<String>,
    rows: Vec<Vec<String>>,
    polls: u32,
    operation: String,
    object: String,
}

#[derive(Debug)]
struct SimState {
    cfg: SalesforceSimConfig,
    objects: BTreeMap<String, BTreeMap<String, Row>>,
    declared: BTreeMap<String, BTreeMap<String, String>>,
    tokens: HashMap<String, Instant>,
    refresh_token: String,
    api_used: u64,
    requests: Vec<(String, String, u16)>,
    cursors: HashMap<String, Vec<Value>>,
    jobs: HashMap<String, Job>,
    fault: SalesforceFault,
    seq: u64,
}

/// A shared handle on one simulated org. Clones share state.
#[derive(Debug, Clone)]
pub struct SalesforceSim {
    state: Arc<Mutex<SimState>>,
}

type Answer = Result<Response, Response>;

fn sf_error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        axum::Json(json!([{ "message": message, "errorCode": code }])),
    )
        .into_response()
}

fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response {
    (
        status,
        axum::Json(json!({ "error": error, "error_description": description })),
    )
        .into_response()
}

/// `2026-11-01T10:00:00.000+0000`, the REST JSON form.
fn format_rest(dt: DateTime<Utc>) -> String {
    dt.format("%Y-%m-%dT%H:%M:%S%.3f+0000").to_string()
}

fn parse_dt(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .or_else(|_| DateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f%z"))
        .ok()
        .map(|d| d.with_timezone(&Utc))
}

impl SalesforceSim {
    pub fn new(cfg: SalesforceSimConfig) -> Self {
        let refresh_token = cfg.refresh_token.clone();
        SalesforceSim {
            state: Arc::new(Mutex::new(SimState {
                cfg,
                objects: BTreeMap::new(),
                declared: BTreeMap::new(),
                tokens: HashMap::new(),
                refresh_token,
                api_used: 0,
                requests: Vec::new(),
                cursors: HashMap::new(),
                jobs: HashMap::new(),
                fault: SalesforceFault::default(),
                seq: 0,
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, SimState> {
        // A panicking test thread must not wedge every later assertion.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn router(&self) -> Router {
        Router::new()
            .route("/services/oauth2/token", post(token))
            .route("/services/data/{v}/query", get(query))
            .route("/services/data/{v}/queryAll", get(query_all))
            .route("/services/data/{v}/query/{locator}", get(query_more))
            .route("/services/data/{v}/limits", get(limits))
            .route("/services/data/{v}/sobjects/{obj}/describe", get(describe))
            .route("/services/data/{v}/jobs/query", post(create_job))
            .route("/services/data/{v}/jobs/query/{id}", get(job_info))
            .route(
                "/services/data/{v}/jobs/query/{id}/results",
                get(job_results),
            )
            .route("/_sim/salesforce/records/{object}", get(sim_records))
            .layer(middleware::from_fn_with_state(self.clone(), track))
            .with_state(self.clone())
    }

    pub async fn start(&self, addr: SocketAddr) -> std::io::Result<SimServer> {
        SimServer::start(self.router(), addr).await
    }

    /// Inserts or replaces a record, stamped now.
    pub fn upsert(&self, object: &str, id: &str, fields: Value) {
        self.upsert_at(object, id, fields, Utc::now());
    }

    /// Inserts or replaces a record with an explicit `SystemModstamp`.
    pub fn upsert_at(&self, object: &str, id: &str, fields: Value, modstamp: DateTime<Utc>) {
        let mut fields = match fields {
            Value::Object(m) => m,
            _ => Map::new(),
        };
        fields.insert("Id".into(), Value::String(id.into()));
        self.lock()
            .objects
            .entry(object.into())
            .or_default()
            .insert(
                id.into(),
                Row {
                    fields,
                    modstamp,
                    deleted: false,
                },
            );
    }

    /// Changes one top-level field and bumps `SystemModstamp`.
    pub fn set_field(&self, object: &str, id: &str, field: &str, value: Value) {
        let mut st = self.lock();
        if let Some(row) = st.objects.get_mut(object).and_then(|o| o.get_mut(id)) {
            row.fields.insert(field.into(), value);
            row.modstamp = Utc::now();
        }
    }

    /// Moves a record to the recycle bin: `IsDeleted = true`, `SystemModstamp` bumped.
    pub fn delete(&self, object: &str, id: &str) {
        let mut st = self.lock();
        if let Some(row) = st.objects.get_mut(object).and_then(|o| o.get_mut(id)) {
            row.deleted = true;
            row.modstamp = Utc::now();
        }
    }

    /// Every record of `object` (deleted ones too) with `Id`, `SystemModstamp` and `IsDeleted`.
    pub fn records(&self, object: &str) -> Vec<Value> {
        let st = self.lock();
        st.objects
            .get(object)
            .map(|o| o.values().map(|r| Value::Object(full_view(r))).collect())
            .unwrap_or_default()
    }

    /// Declares fields on an object (`("Plan_Tier__c", "picklist")`, `("OwnerId", "reference")`)
    /// so `describe` and queries know them before any record carries them.
    pub fn declare_fields(&self, object: &str, fields: &[(&str, &str)]) {
        let mut st = self.lock();
        let decl = st.declared.entry(object.into()).or_default();
        for (name, ty) in fields {
            decl.insert((*name).into(), (*ty).into());
        }
    }

    pub fn set_api_usage(&self, used: u64) {
        self.lock().api_used = used;
    }

    /// `(used, limit)` of the daily API allocation.
    pub fn api_usage(&self) -> (u64, u64) {
        let st = self.lock();
        (st.api_used, st.cfg.daily_limit)
    }

    /// Every request served so far (except `/_sim` routes): method, path, status.
    pub fn requests(&self) -> Vec<(String, String, u16)> {
        self.lock().requests.clone()
    }

    /// Invalidates every issued access token: the next data call gets 401 `INVALID_SESSION_ID`.
    pub fn expire_tokens(&self) {
        self.lock().tokens.clear();
    }

    pub fn set_fault(&self, fault: SalesforceFault) {
        self.lock().fault = fault;
    }

    /// The refresh token the org accepts now (changes on rotation).
    pub fn current_refresh_token(&self) -> String {
        self.lock().refresh_token.clone()
    }

    /// Seeds `accounts` Accounts and `contacts` Contacts, deterministically by index.
    pub fn seed_demo(&self, accounts: usize, contacts: usize) {
        const TIERS: [&str; 3] = ["Starter", "Growth", "Enterprise"];
        const TITLES: [&str; 4] = ["CTO", "VP Sales", "Engineer", "Product Manager"];
        for i in 0..accounts {
            let owner = i % 5;
            self.upsert(
                "Account",
                &account_id(i),
                json!({
                    "Name": format!("Customer {i:04}"),
                    "Type": if i % 10 == 9 { "Prospect" } else { "Customer" },
                    "Plan_Tier__c": TIERS[i % 3],
                    "ARR__c": ((i % 50) as f64 + 1.0) * 1200.0,
                    "Owner": {"Email": format!("owner{owner}@example.com"), "Name": format!("Owner {owner}")},
                    "Renewal_Date__c": "2027-03-31",
                    "Strategic__c": i % 7 == 0,
                }),
            );
        }
        for j in 0..contacts {
            let acct = if accounts == 0 { 0 } else { j % accounts };
            self.upsert(
                "Contact",
                &format!("003SIM{j:012}"),
                json!({
                    "FirstName": format!("Pat{j}"),
                    "LastName": "Example",
                    "Email": format!("contact{j}@customer{acct}.example.com"),
                    "AccountId": account_id(acct),
                    "Title": TITLES[j % TITLES.len()],
                }),
            );
        }
    }
}

/// The id `seed_demo` gives Account number `i`.
pub fn account_id(i: usize) -> String {
    format!("001SIM{i:012}")
}

fn full_view(r: &Row) -> Map<String, Value> {
    let mut m = r.fields.clone();
    m.insert(
        "SystemModstamp".into(),
        Value::String(format_rest(r.modstamp)),
    );
    m.insert("IsDeleted".into(), Value::Bool(r.deleted));
    m
}

// ---- middleware: request log and Sforce-Limit-Info ---------------------------------------------

async fn track(AxState(sim): AxState<SalesforceSim>, req: Request, next: Next) -> Response {
    let method = req.method().to_string();
    let path = req.uri().path().to_owned();
    let mut resp = next.run(req).await;
    if path.starts_with("/_sim/") {
        return resp;
    }
    let mut st = sim.lock();
    st.requests
        .push((method, path.clone(), resp.status().as_u16()));
    if path.starts_with("/services/data/") {
        let info = format!("api-usage={}/{}", st.api_used, st.cfg.daily_limit);
        if let Ok(v) = HeaderValue::from_str(&info) {
            resp.headers_mut().insert("sforce-limit-info", v);
        }
    }
    resp
}

impl SalesforceSim {
    /// The checks every data call passes: a live bearer token, the daily allocation, injected
    /// faults. `counted` calls add one to the daily usage.
    fn gate(
        &self,
        headers: &HeaderMap,
        counted: bool,
    ) -> Result<MutexGuard<'_, SimState>, Response> {
        let mut st = self.lock();
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        let live = st
            .tokens
            .get(token)
            .is_some_and(|issued| st.cfg.token_ttl.is_none_or(|ttl| issued.elapsed() < ttl));
        if !live {
            return Err(sf_error(
                StatusCode::UNAUTHORIZED,
                "INVALID_SESSION_ID",
                "Session expired or invalid",
            ));
        }
        if st.api_used >= st.cfg.daily_limit {
            return Err(sf_error(
                StatusCode::FORBIDDEN,
                "REQUEST_LIMIT_EXCEEDED",
                "TotalRequests Limit exceeded.",
            ));
        }
        if let Some((status, body)) = st.fault.forced.pop_front() {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let ctype = if body.starts_with('[') || body.starts_with('{') {
                "application/json"
            } else {
                "text/html"
            };
            return Err((status, [(header::CONTENT_TYPE, ctype)], body).into_response());
        }
        if st.fault.error_rate > 0.0 && fastrand::f64() < st.fault.error_rate {
            return Err(sf_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "SERVER_UNAVAILABLE",
                "Service unavailable",
            ));
        }
        if counted {
            st.api_used += 1;
        }
        Ok(st)
    }
}

fn own_origin(headers: &HeaderMap) -> String {
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("127.0.0.1");
    format!("http://{host}")
}

// ---- OAuth -------------------------------------------------------------------------------------

#[derive(serde::Deserialize)]
struct JwtClaims {
    iss: String,
    sub: String,
    aud: String,
    exp: u64,
}

async fn token(AxState(sim): AxState<SalesforceSim>, headers: HeaderMap, body: Bytes) -> Response {
    let form: HashMap<String, String> = url::form_urlencoded::parse(&body).into_owned().collect();
    let basic = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(base64_decode)
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| s.split_once(':').map(|(a, b)| (a.to_owned(), b.to_owned())));
    let client_id = form
        .get("client_id")
        .cloned()
        .or_else(|| basic.as_ref().map(|b| b.0.clone()));
    let client_secret = form
        .get("client_secret")
        .cloned()
        .or_else(|| basic.as_ref().map(|b| b.1.clone()));
    let origin = own_origin(&headers);
    let mut st = sim.lock();
    let bad = |e: &str, d: &str| oauth_error(StatusCode::BAD_REQUEST, e, d);
    let mut new_refresh = None;
    match form.get("grant_type").map(String::as_str) {
        Some("urn:ietf:params:oauth:grant-type:jwt-bearer") => {
            let Some(pem) = st.cfg.jwt_public_key_pem.clone() else {
                return bad("invalid_grant", "invalid assertion");
            };
            let Ok(key) = jsonwebtoken::DecodingKey::from_rsa_pem(pem.as_bytes()) else {
                return bad("invalid_grant", "invalid assertion");
            };
            let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
            validation.leeway = 0;
            validation.validate_aud = false;
            let assertion = form.get("assertion").map(String::as_str).unwrap_or("");
            let claims = match jsonwebtoken::decode::<JwtClaims>(assertion, &key, &validation) {
                Ok(d) => d.claims,
                Err(e) if matches!(e.kind(), jsonwebtoken::errors::ErrorKind::ExpiredSignature) => {
                    return bad("invalid_grant", "expired authorization code");
                }
                Err(_) => return bad("invalid_grant", "invalid assertion"),
            };
            if claims.iss != st.cfg.client_id {
                return bad("invalid_client_id", "client identifier invalid");
            }
            if claims.sub != st.cfg.username {
                return bad("invalid_grant", "user hasn't approved this consumer");
            }
            // The audience names the kind of org, not the host the assertion was POSTed to:
            // a My Domain or instance URL here is refused (reference §a1).
            if claims.aud != st.cfg.jwt_audience {
                return bad("invalid_grant", "audience is invalid");
            }
            // Salesforce wants the assertion to expire within 3 minutes; allow a little skew.
            if claims.exp > jsonwebtoken::get_current_timestamp() + 300 {
                return bad("invalid_grant", "invalid assertion");
            }
        }
        Some("client_credentials") => {
            if client_id.as_deref() != Some(st.cfg.client_id.as_str())
                || client_secret.as_deref() != Some(st.cfg.client_secret.as_str())
            {
                return bad("invalid_client", "invalid client credentials");
            }
        }
        Some("refresh_token") => {
            if client_id.as_deref() != Some(st.cfg.client_id.as_str()) {
                return bad("invalid_client_id", "client identifier invalid");
            }
            if client_secret.as_deref() != Some(st.cfg.client_secret.as_str()) {
                return bad("invalid_client", "invalid client credentials");
            }
            if form.get("refresh_token") != Some(&st.refresh_token) {
                return bad("invalid_grant", "expired access/refresh token");
            }
            if st.cfg.rotate_refresh_token {
                let t = format!("5Aep861SIM{}", random_hex(24));
                st.refresh_token = t.clone();
                new_refresh = Some(t);
            }
        }
        _ => return bad("unsupported_grant_type", "grant type not supported"),
    }
    st.seq += 1;
    let access = format!("00DSIM000000001!{}", random_hex(40));
    st.tokens.insert(access.clone(), Instant::now());
    let mut answer = json!({
        "access_token": access,
        "signature": random_hex(32),
        "scope": "api",
        "instance_url": origin,
        "id": format!("{origin}/id/00DSIM000000001AAA/005SIM000000001AAA"),
        "token_type": "Bearer",
        "issued_at": Utc::now().timestamp_millis().to_string(),
    });
    if let Some(t) = new_refresh {
        answer["refresh_token"] = Value::String(t);
    }
    axum::Json(answer).into_response()
}

fn random_hex(n: usize) -> String {
    (0..n).map(|_| fastrand::alphanumeric()).collect()
}

/// Standard base64 (HTTP Basic credentials); `None` on bad input.
fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let (mut buf, mut bits) = (0u32, 0u32);
    for c in s.trim().bytes().filter(|&c| c != b'=') {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32;
        buf = (buf << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((buf >> bits) as u8);
            buf &= (1 << bits) - 1;
        }
    }
    Some(out)
}

// ---- REST query --------------------------------------------------------------------------------

async fn query(
    AxState(sim): AxState<SalesforceSim>,
    Path(v): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    run_query(&sim, &v, &q, &headers, false).unwrap_or_else(|e| e)
}

async fn query_all(
    AxState(sim): AxState<SalesforceSim>,
    Path(v): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    run_query(&sim, &v, &q, &headers, true).unwrap_or_else(|e| e)
}

fn run_query(
    sim: &SalesforceSim,
    v: &str,
    q: &HashMap<String, String>,
    headers: &HeaderMap,
    all: bool,
) -> Answer {
    let mut st = sim.gate(headers, true)?;
    let text = q.get("q").ok_or_else(|| {
        sf_error(
            StatusCode::BAD_REQUEST,
            "MALFORMED_QUERY",
            "missing q parameter",
        )
    })?;
    let soql =
        parse_soql(text).map_err(|m| sf_error(StatusCode::BAD_REQUEST, "MALFORMED_QUERY", &m))?;
    let rows = execute(&st, &soql, all)?;
    if soql.count {
        return Ok(
            axum::Json(json!({"totalSize": rows.len(), "done": true, "records": []}))
                .into_response(),
        );
    }
    // Resolve the columns once: schema derivation scans every row.
    let columns = soql
        .fields
        .iter()
        .map(|f| resolve_path(&st, &soql.object, f))
        .collect::<Result<Vec<_>, _>>()?;
    let records: Vec<Value> = rows
        .iter()
        .map(|r| render_rest(v, &soql.object, &columns, r))
        .collect();
    st.seq += 1;
    let locator = format!("01gSIM{:012}", st.seq);
    st.cursors.insert(locator.clone(), records);
    Ok(page_answer(&st, v, &locator, 0))
}

fn page_answer(st: &SimState, v: &str, locator: &str, offset: usize) -> Response {
    let all = &st.cursors[locator];
    let end = (offset + st.cfg.page_size.max(1)).min(all.len());
    let mut body = json!({
        "totalSize": all.len(),
        "done": end >= all.len(),
        "records": all[offset.min(end)..end],
    });
    if end < all.len() {
        body["nextRecordsUrl"] = Value::String(format!("/services/data/{v}/query/{locator}-{end}"));
    }
    axum::Json(body).into_response()
}

async fn query_more(
    AxState(sim): AxState<SalesforceSim>,
    Path((v, locator)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let st = match sim.gate(&headers, true) {
        Ok(st) => st,
        Err(e) => return e,
    };
    let parsed = locator
        .rsplit_once('-')
        .and_then(|(l, o)| Some((l.to_owned(), o.parse::<usize>().ok()?)));
    match parsed {
        Some((l, offset)) if st.cursors.contains_key(&l) => page_answer(&st, &v, &l, offset),
        _ => sf_error(
            StatusCode::BAD_REQUEST,
            "INVALID_QUERY_LOCATOR",
            "invalid query locator",
        ),
    }
}

async fn limits(AxState(sim): AxState<SalesforceSim>, headers: HeaderMap) -> Response {
    // Reading the limits does not count against them (so a paused client can see them free up).
    match sim.gate(&headers, false) {
        Ok(st) => axum::Json(json!({
            "DailyApiRequests": {"Max": st.cfg.daily_limit, "Remaining": st.cfg.daily_limit.saturating_sub(st.api_used)}
        }))
        .into_response(),
        Err(e) => e,
    }
}

// ---- describe and schema -----------------------------------------------------------------------

#[derive(Debug, Clone)]
struct FieldDesc {
    name: String,
    ty: String,
    relationship: Option<String>,
    reference_to: Option<String>,
}

/// The object a relationship name points to (`Owner` -> `User`, `Foo__r` -> `Foo__c`).
fn relationship_target(rel: &str) -> String {
    match rel {
        "Owner" | "CreatedBy" | "LastModifiedBy" => "User".into(),
        r if r.ends_with("__r") => format!("{}__c", &r[..r.len() - 3]),
        r => r.into(),
    }
}

fn reference_field(rel: &str) -> FieldDesc {
    let name = match rel.strip_suffix("__r") {
        Some(base) => format!("{base}__c"),
        None => format!("{rel}Id"),
    };
    FieldDesc {
        name,
        ty: "reference".into(),
        relationship: Some(rel.into()),
        reference_to: Some(relationship_target(rel)),
    }
}

fn infer_type(v: &Value) -> &'static str {
    match v {
        Value::Bool(_) => "boolean",
        Value::Number(_) => "double",
        Value::String(s)
            if s.len() == 10 && chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d").is_ok() =>
        {
            "date"
        }
        Value::String(s) if parse_dt(s).is_some() => "datetime",
        _ => "string",
    }
}

/// Known fields of `object`, keyed by lower-case name (SOQL names are case-insensitive).
/// `None` when the org has no such object.
fn schema(st: &SimState, object: &str) -> Option<BTreeMap<String, FieldDesc>> {
    let mut out = BTreeMap::new();
    let mut known = false;
    let add = |out: &mut BTreeMap<String, FieldDesc>, d: FieldDesc| {
        out.entry(d.name.to_ascii_lowercase()).or_insert(d);
    };
    let simple = |name: &str, ty: &str| FieldDesc {
        name: name.into(),
        ty: ty.into(),
        relationship: None,
        reference_to: None,
    };
    if let Some(decl) = st.declared.get(object) {
        known = true;
        for (name, ty) in decl {
            if ty == "reference" {
                let rel = match name.strip_suffix("__c") {
                    Some(base) => format!("{base}__r"),
                    None => name.strip_suffix("Id").unwrap_or(name).to_owned(),
                };
                add(&mut out, reference_field(&rel));
            } else {
                add(&mut out, simple(name, ty));
            }
        }
    }
    let scan = |out: &mut BTreeMap<String, FieldDesc>, m: &Map<String, Value>| {
        for (k, v) in m {
            match v {
                Value::Object(_) => add(out, reference_field(k)),
                Value::Null => {}
                v => add(out, simple(k, infer_type(v))),
            }
        }
    };
    for (obj, rows) in &st.objects {
        for row in rows.values() {
            if obj == object {
                known = true;
                scan(&mut out, &row.fields);
            }
            // Parent records seen through a relationship tell us the parent's fields.
            for (k, v) in &row.fields {
                if let Value::Object(nested) = v
                    && relationship_target(k) == object
                {
                    known = true;
                    scan(&mut out, nested);
                }
            }
        }
    }
    if !known {
        return None;
    }
    add(&mut out, simple("Id", "id"));
    add(&mut out, simple("SystemModstamp", "datetime"));
    add(&mut out, simple("IsDeleted", "boolean"));
    Some(out)
}

/// Resolves a dotted path on `object` to canonical segment names, or an `INVALID_FIELD` answer.
fn resolve_path(st: &SimState, object: &str, path: &str) -> Result<Vec<String>, Response> {
    let no_such = || {
        sf_error(
            StatusCode::BAD_REQUEST,
            "INVALID_FIELD",
            &format!(
                "No such column '{path}' on entity '{object}'. If you are attempting to use a custom field, be sure to append the '__c' after the custom field name."
            ),
        )
    };
    let segments: Vec<&str> = path.split('.').collect();
    let mut current = object.to_owned();
    let mut canon = Vec::new();
    for (i, seg) in segments.iter().enumerate() {
        let fields = schema(st, &current).ok_or_else(no_such)?;
        if i + 1 == segments.len() {
            let f = fields.get(&seg.to_ascii_lowercase()).ok_or_else(no_such)?;
            canon.push(f.name.clone());
        } else {
            let f = fields
                .values()
                .find(|f| {
                    f.relationship
                        .as_deref()
                        .is_some_and(|r| r.eq_ignore_ascii_case(seg))
                })
                .ok_or_else(no_such)?;
            canon.push(f.relationship.clone().unwrap_or_default());
            current = f.reference_to.clone().unwrap_or_default();
        }
    }
    Ok(canon)
}

async fn describe(
    AxState(sim): AxState<SalesforceSim>,
    Path((_v, obj)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let st = match sim.gate(&headers, true) {
        Ok(st) => st,
        Err(e) => return e,
    };
    let Some(fields) = schema(&st, &obj) else {
        return sf_error(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            "The requested resource does not exist",
        );
    };
    let fields: Vec<Value> = fields
        .values()
        .map(|f| {
            json!({
                "name": f.name,
                "type": f.ty,
                "relationshipName": f.relationship,
                "referenceTo": f.reference_to.iter().collect::<Vec<_>>(),
            })
        })
        .collect();
    axum::Json(json!({"name": obj, "queryable": true, "fields": fields})).into_response()
}

// ---- SOQL subset -------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Word(String),
    Str(String),
    Op(String),
    LParen,
    RParen,
    Comma,
}

fn tokenize(text: &str) -> Result<Vec<Tok>, String> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            c if c.is_whitespace() => i += 1,
            '(' => {
                out.push(Tok::LParen);
                i += 1;
            }
            ')' => {
                out.push(Tok::RParen);
                i += 1;
            }
            ',' => {
                out.push(Tok::Comma);
                i += 1;
            }
            '\'' => {
                let mut s = String::new();
                i += 1;
                loop {
                    match chars.get(i) {
                        None => return Err("unterminated string literal".into()),
                        Some('\\') => {
                            s.extend(chars.get(i + 1));
                            i += 2;
                        }
                        Some('\'') => {
                            i += 1;
                            break;
                        }
                        Some(&ch) => {
                            s.push(ch);
                            i += 1;
                        }
                    }
                }
                out.push(Tok::Str(s));
            }
            '=' | '!' | '<' | '>' => {
                let two: String = chars[i..(i + 2).min(chars.len())].iter().collect();
                let op = if ["!=", "<=", ">=", "<>"].contains(&two.as_str()) {
                    two
                } else {
                    c.to_string()
                };
                if op == "!" {
                    return Err("unexpected '!'".into());
                }
                i += op.len();
                out.push(Tok::Op(if op == "<>" { "!=".into() } else { op }));
            }
            c if c.is_alphanumeric() || c == '_' || c == '-' || c == '.' => {
                let start = i;
                while i < chars.len() && (chars[i].is_alphanumeric() || "_-.:+".contains(chars[i]))
                {
                    i += 1;
                }
                out.push(Tok::Word(chars[start..i].iter().collect()));
            }
            other => return Err(format!("unexpected token '{other}'")),
        }
    }
    Ok(out)
}

#[derive(Debug, Clone)]
enum Lit {
    Str(String),
    Num(f64),
    Bool(bool),
    Null,
    DateTime(DateTime<Utc>),
}

#[derive(Debug, Clone)]
enum Cond {
    And(Box<Cond>, Box<Cond>),
    Or(Box<Cond>, Box<Cond>),
    Not(Box<Cond>),
    Cmp(String, String, Lit),
}

#[derive(Debug, Clone)]
struct Soql {
    count: bool,
    fields: Vec<String>,
    object: String,
    cond: Option<Cond>,
    order: Vec<(String, bool)>,
    limit: Option<usize>,
}

struct Parser {
    toks: Vec<Tok>,
    pos: usize,
}

impl Parser {
    fn peek_kw(&self, kw: &str) -> bool {
        matches!(self.toks.get(self.pos), Some(Tok::Word(w)) if w.eq_ignore_ascii_case(kw))
    }
    fn expect_kw(&mut self, kw: &str) -> Result<(), String> {
        if self.peek_kw(kw) {
            self.pos += 1;
            Ok(())
        } else {
            Err(format!("expected {kw} near token {}", self.pos + 1))
        }
    }
    fn next(&mut self) -> Option<Tok> {
        let t = self.toks.get(self.pos).cloned();
        self.pos += 1;
        t
    }
    fn word(&mut self) -> Result<String, String> {
        match self.next() {
            Some(Tok::Word(w)) => Ok(w),
            other => Err(format!("expected a name, found {other:?}")),
        }
    }
    fn or(&mut self) -> Result<Cond, String> {
        let mut left = self.and()?;
        while self.peek_kw("OR") {
            self.pos += 1;
            left = Cond::Or(Box::new(left), Box::new(self.and()?));
        }
        Ok(left)
    }
    fn and(&mut self) -> Result<Cond, String> {
        let mut left = self.unary()?;
        while self.peek_kw("AND") {
            self.pos += 1;
            left = Cond::And(Box::new(left), Box::new(self.unary()?));
        }
        Ok(left)
    }
    fn unary(&mut self) -> Result<Cond, String> {
        if self.peek_kw("NOT") {
            self.pos += 1;
            return Ok(Cond::Not(Box::new(self.unary()?)));
        }
        if self.toks.get(self.pos) == Some(&Tok::LParen) {
            self.pos += 1;
            let c = self.or()?;
            if self.next() != Some(Tok::RParen) {
                return Err("expected ')'".into());
            }
            return Ok(c);
        }
        let field = self.word()?;
        let op = match self.next() {
            Some(Tok::Op(op)) => op,
            other => {
                return Err(format!(
                    "expected an operator after {field}, found {other:?}"
                ));
            }
        };
        let lit = match self.next() {
            Some(Tok::Str(s)) => Lit::Str(s),
            Some(Tok::Word(w)) => {
                if w.eq_ignore_ascii_case("null") {
                    Lit::Null
                } else if w.eq_ignore_ascii_case("true") || w.eq_ignore_ascii_case("false") {
                    Lit::Bool(w.eq_ignore_ascii_case("true"))
                } else if let Some(dt) = w.contains('T').then(|| parse_dt(&w)).flatten() {
                    Lit::DateTime(dt)
                } else if let Ok(n) = w.parse::<f64>() {
                    Lit::Num(n)
                } else if chrono::NaiveDate::parse_from_str(&w, "%Y-%m-%d").is_ok() {
                    Lit::Str(w)
                } else {
                    return Err(format!("unexpected literal {w}"));
                }
            }
            other => return Err(format!("expected a value, found {other:?}")),
        };
        Ok(Cond::Cmp(field, op, lit))
    }
}

fn parse_soql(text: &str) -> Result<Soql, String> {
    let mut p = Parser {
        toks: tokenize(text)?,
        pos: 0,
    };
    p.expect_kw("SELECT")?;
    let mut fields = Vec::new();
    let mut count = false;
    loop {
        let w = p.word()?;
        if w.eq_ignore_ascii_case("COUNT") {
            if p.next() != Some(Tok::LParen) || p.next() != Some(Tok::RParen) {
                return Err("expected COUNT()".into());
            }
            count = true;
        } else {
            fields.push(w);
        }
        if p.toks.get(p.pos) == Some(&Tok::Comma) {
            p.pos += 1;
        } else {
            break;
        }
    }
    p.expect_kw("FROM")?;
    let object = p.word()?;
    let mut soql = Soql {
        count,
        fields,
        object,
        cond: None,
        order: Vec::new(),
        limit: None,
    };
    if p.peek_kw("WHERE") {
        p.pos += 1;
        soql.cond = Some(p.or()?);
    }
    if p.peek_kw("ORDER") {
        p.pos += 1;
        p.expect_kw("BY")?;
        loop {
            let f = p.word()?;
            let mut asc = true;
            if p.peek_kw("ASC") {
                p.pos += 1;
            } else if p.peek_kw("DESC") {
                p.pos += 1;
                asc = false;
            }
            soql.order.push((f, asc));
            if p.toks.get(p.pos) == Some(&Tok::Comma) {
                p.pos += 1;
            } else {
                break;
            }
        }
    }
    if p.peek_kw("LIMIT") {
        p.pos += 1;
        soql.limit = Some(
            p.word()?
                .parse()
                .map_err(|_| "LIMIT needs a number".to_owned())?,
        );
    }
    if p.pos < p.toks.len() {
        return Err(format!("unexpected token {:?}", p.toks[p.pos]));
    }
    Ok(soql)
}

fn lookup(view: &Map<String, Value>, path: &[String]) -> Value {
    let mut cur = match view.get(&path[0]) {
        Some(v) => v,
        None => return Value::Null,
    };
    for seg in &path[1..] {
        cur = match cur.get(seg) {
            Some(v) => v,
            None => return Value::Null,
        };
    }
    cur.clone()
}

fn cmp_values(a: &Value, b: &Value) -> std::cmp::Ordering {
    use std::cmp::Ordering;
    match (a, b) {
        (Value::Null, Value::Null) => Ordering::Equal,
        (Value::Null, _) => Ordering::Less,
        (_, Value::Null) => Ordering::Greater,
        (Value::Number(x), Value::Number(y)) => x
            .as_f64()
            .unwrap_or(0.0)
            .partial_cmp(&y.as_f64().unwrap_or(0.0))
            .unwrap_or(Ordering::Equal),
        (Value::Bool(x), Value::Bool(y)) => x.cmp(y),
        (x, y) => x.as_str().unwrap_or("").cmp(y.as_str().unwrap_or("")),
    }
}

/// Whether a resolved path is the record's own `Id`.
fn is_id(path: &[String]) -> bool {
    matches!(path, [only] if only == "Id")
}

/// What Salesforce accepts as an id literal: 15 or 18 letters and digits.
fn id_shaped(s: &str) -> bool {
    matches!(s.len(), 15 | 18) && s.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// `Id = 'literal'` as Salesforce decides it: the 15-character form of an id (the one the
/// classic UI shows) is the case-sensitive prefix of its 18-character form, and matches it.
fn same_id(have: &str, lit: &str) -> bool {
    match (have.len(), lit.len()) {
        (18, 15) => have.get(..15) == Some(lit),
        _ => have == lit,
    }
}

/// The first `Id` literal in `cond` that is not an id shape (Salesforce refuses the whole query:
/// `invalid ID field: ...`).
fn bad_id_literal<'c>(cond: &'c Cond, paths: &HashMap<String, Vec<String>>) -> Option<&'c str> {
    match cond {
        Cond::And(a, b) | Cond::Or(a, b) => {
            bad_id_literal(a, paths).or_else(|| bad_id_literal(b, paths))
        }
        Cond::Not(a) => bad_id_literal(a, paths),
        Cond::Cmp(f, _, Lit::Str(s)) if is_id(&paths[f]) && !id_shaped(s) => Some(s.as_str()),
        Cond::Cmp(..) => None,
    }
}

fn eval(cond: &Cond, view: &Map<String, Value>, paths: &HashMap<String, Vec<String>>) -> bool {
    use std::cmp::Ordering;
    match cond {
        Cond::And(a, b) => eval(a, view, paths) && eval(b, view, paths),
        Cond::Or(a, b) => eval(a, view, paths) || eval(b, view, paths),
        Cond::Not(a) => !eval(a, view, paths),
        Cond::Cmp(field, op, Lit::Str(s)) if is_id(&paths[field]) && (op == "=" || op == "!=") => {
            let same = lookup(view, &paths[field])
                .as_str()
                .is_some_and(|have| same_id(have, s));
            same == (op == "=")
        }
        Cond::Cmp(field, op, lit) => {
            let v = lookup(view, &paths[field]);
            let ord = match lit {
                Lit::DateTime(dt) => match v.as_str().and_then(parse_dt) {
                    Some(x) => x.cmp(dt),
                    None => return false,
                },
                Lit::Null => cmp_values(&v, &Value::Null),
                _ if v.is_null() => return op == "!=",
                Lit::Str(s) => cmp_values(&v, &Value::String(s.clone())),
                Lit::Num(n) => cmp_values(&v, &json!(n)),
                Lit::Bool(b) => cmp_values(&v, &Value::Bool(*b)),
            };
            match op.as_str() {
                "=" => ord == Ordering::Equal,
                "!=" => ord != Ordering::Equal,
                "<" => ord == Ordering::Less,
                "<=" => ord != Ordering::Greater,
                ">" => ord == Ordering::Greater,
                ">=" => ord != Ordering::Less,
                _ => false,
            }
        }
    }
}

fn cond_fields(cond: &Cond, out: &mut Vec<String>) {
    match cond {
        Cond::And(a, b) | Cond::Or(a, b) => {
            cond_fields(a, out);
            cond_fields(b, out);
        }
        Cond::Not(a) => cond_fields(a, out),
        Cond::Cmp(f, _, _) => out.push(f.clone()),
    }
}

/// Runs a parsed query: the matching rows' full views, ordered and limited.
fn execute(st: &SimState, soql: &Soql, all: bool) -> Result<Vec<Map<String, Value>>, Response> {
    if schema(st, &soql.object).is_none() {
        return Err(sf_error(
            StatusCode::BAD_REQUEST,
            "INVALID_TYPE",
            &format!("sObject type '{}' is not supported.", soql.object),
        ));
    }
    let mut names = soql.fields.clone();
    if let Some(c) = &soql.cond {
        cond_fields(c, &mut names);
    }
    names.extend(soql.order.iter().map(|(f, _)| f.clone()));
    let mut paths = HashMap::new();
    for n in names {
        let canon = resolve_path(st, &soql.object, &n)?;
        paths.insert(n, canon);
    }
    if let Some(bad) = soql.cond.as_ref().and_then(|c| bad_id_literal(c, &paths)) {
        return Err(sf_error(
            StatusCode::BAD_REQUEST,
            "INVALID_QUERY_FILTER_OPERATOR",
            &format!("invalid ID field: {bad}"),
        ));
    }
    let mut rows: Vec<Map<String, Value>> = st
        .objects
        .get(&soql.object)
        .map(|o| {
            o.values()
                .filter(|r| all || !r.deleted)
                .map(full_view)
                .filter(|v| soql.cond.as_ref().is_none_or(|c| eval(c, v, &paths)))
                .collect()
        })
        .unwrap_or_default();
    rows.sort_by(|a, b| {
        for (f, asc) in &soql.order {
            let o = cmp_values(&lookup(a, &paths[f]), &lookup(b, &paths[f]));
            let o = if *asc { o } else { o.reverse() };
            if o.is_ne() {
                return o;
            }
        }
        std::cmp::Ordering::Equal
    });
    if let Some(n) = soql.limit {
        rows.truncate(n);
    }
    Ok(rows)
}

/// A record as REST returns it: `attributes`, requested fields, relationships nested.
fn render_rest(v: &str, object: &str, columns: &[Vec<String>], view: &Map<String, Value>) -> Value {
    let id = view.get("Id").and_then(Value::as_str).unwrap_or("");
    let mut rec = Map::new();
    rec.insert(
        "attributes".into(),
        json!({"type": object, "url": format!("/services/data/{v}/sobjects/{object}/{id}")}),
    );
    for canon in columns {
        let value = lookup(view, canon);
        if canon.len() == 1 {
            rec.insert(canon[0].clone(), value);
            continue;
        }
        // Relationship: null when the lookup is empty, else a nested object with attributes.
        let parent = lookup(view, &canon[..1]);
        if !parent.is_object() {
            rec.insert(canon[0].clone(), Value::Null);
            continue;
        }
        let slot = rec
            .entry(canon[0].clone())
            .or_insert_with(|| json!({"attributes": {"type": relationship_target(&canon[0])}}));
        let mut cursor = slot;
        for seg in &canon[1..canon.len() - 1] {
            cursor = cursor
                .as_object_mut()
                .expect("relationship slot is an object")
                .entry(seg.clone())
                .or_insert_with(|| json!({}));
        }
        if let Some(m) = cursor.as_object_mut() {
            m.insert(canon[canon.len() - 1].clone(), value);
        }
    }
    Value::Object(rec)
}

// ---- Bulk API 2.0 ------------------------------------------------------------------------------

fn csv_cell(v: &Value) -> String {
    let s = match v {
        Value::Null => return String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    // Bulk CSV writes date-times as 2026-11-01T10:00:00.000Z.
    let s = match parse_dt(&s) {
        Some(dt) if s.contains('T') => dt.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string(),
        _ => s,
    };
    format!("\"{}\"", s.replace('"', "\"\""))
}

async fn create_job(
    AxState(sim): AxState<SalesforceSim>,
    Path(_v): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut st = match sim.gate(&headers, true) {
        Ok(st) => st,
        Err(e) => return e,
    };
    let req: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let operation = req["operation"].as_str().unwrap_or("").to_owned();
    if operation != "query" && operation != "queryAll" {
        return sf_error(
            StatusCode::BAD_REQUEST,
            "INVALIDJOB",
            "operation must be query or queryAll",
        );
    }
    let soql = match parse_soql(req["query"].as_str().unwrap_or("")) {
        Ok(s) if !s.count => s,
        Ok(_) => {
            return sf_error(
                StatusCode::BAD_REQUEST,
                "INVALIDJOB",
                "aggregate queries are not supported",
            );
        }
        Err(m) => return sf_error(StatusCode::BAD_REQUEST, "MALFORMED_QUERY", &m),
    };
    let rows = match execute(&st, &soql, operation == "queryAll") {
        Ok(r) => r,
        Err(e) => return e,
    };
    let mut paths = Vec::new();
    for f in &soql.fields {
        match resolve_path(&st, &soql.object, f) {
            Ok(p) => paths.push(p),
            Err(e) => return e,
        }
    }
    let rows = rows
        .iter()
        .map(|view| paths.iter().map(|p| csv_cell(&lookup(view, p))).collect())
        .collect();
    st.seq += 1;
    let id = format!("750SIM{:012}", st.seq);
    st.jobs.insert(
        id.clone(),
        Job {
            columns: soql.fields.clone(),
            rows,
            polls: 0,
            operation: operation.clone(),
            object: soql.object.clone(),
        },
    );
    axum::Json(json!({
        "id": id, "operation": operation, "object": soql.object, "state": "UploadComplete",
        "contentType": "CSV", "lineEnding": "LF", "columnDelimiter": "COMMA", "concurrencyMode": "Parallel",
    }))
    .into_response()
}

async fn job_info(
    AxState(sim): AxState<SalesforceSim>,
    Path((_v, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let mut st = match sim.gate(&headers, true) {
        Ok(st) => st,
        Err(e) => return e,
    };
    let Some(job) = st.jobs.get_mut(&id) else {
        return sf_error(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            "The requested resource does not exist",
        );
    };
    job.polls += 1;
    // The first poll finds the job still running, as real jobs mostly are.
    let state = if job.polls == 1 {
        "InProgress"
    } else {
        "JobComplete"
    };
    axum::Json(json!({
        "id": id, "operation": job.operation, "object": job.object, "state": state,
        "numberRecordsProcessed": if state == "JobComplete" { job.rows.len() } else { 0 },
    }))
    .into_response()
}

async fn job_results(
    AxState(sim): AxState<SalesforceSim>,
    Path((_v, id)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let st = match sim.gate(&headers, true) {
        Ok(st) => st,
        Err(e) => return e,
    };
    let Some(job) = st.jobs.get(&id) else {
        return sf_error(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            "The requested resource does not exist",
        );
    };
    if job.polls < 2 {
        return sf_error(StatusCode::BAD_REQUEST, "INVALIDJOB", "job is not complete");
    }
    let start: usize = q.get("locator").and_then(|l| l.parse().ok()).unwrap_or(0);
    let max: usize = q
        .get("maxRecords")
        .and_then(|m| m.parse().ok())
        .unwrap_or(usize::MAX);
    let end = start.saturating_add(max.max(1)).min(job.rows.len());
    let mut csv = job
        .columns
        .iter()
        .map(|c| format!("\"{c}\""))
        .collect::<Vec<_>>()
        .join(",");
    csv.push('\n');
    for row in &job.rows[start.min(end)..end] {
        csv.push_str(&row.join(","));
        csv.push('\n');
    }
    let locator = if end < job.rows.len() {
        end.to_string()
    } else {
        "null".into()
    };
    (
        [
            (header::CONTENT_TYPE, "text/csv".to_owned()),
            (header::HeaderName::from_static("sforce-locator"), locator),
            (
                header::HeaderName::from_static("sforce-numberofrecords"),
                (end - start.min(end)).to_string(),
            ),
        ],
        csv,
    )
        .into_response()
}

async fn sim_records(AxState(sim): AxState<SalesforceSim>, Path(object): Path<String>) -> Response {
    axum::Json(sim.records(&object)).into_response()
}
