//! The Pendo simulator: a loopback server speaking the parts of Pendo's Engage API that the sync
//! uses (token verify, metadata schema, the bulk custom-value write, aggregation audits), written
//! from `reference/pendo-api.md` §1–3.
//!
//! It owns what Pendo would hold (visitors, accounts and their custom values), the request log,
//! and the fault knobs: a token-bucket rate limit, random 5xx (WAF-style HTML 503), "applied but
//! answered 500", dropped connections, latency and a FIFO of scripted statuses for the bulk
//! endpoint. Undocumented behaviour is chosen to be the harshest plausible one (partial 200s,
//! 400 for the whole batch on an undeclared field, 403 with an empty body).
//!
//! Control routes under `/_sim/pendo/` (no auth, not rate limited, not recorded):
//! - `GET /_sim/pendo/values/{kind}`: [`PendoSim::values`] as JSON.
//! - `GET /_sim/pendo/requests` / `DELETE`: the request log / clear it.
//! - `POST /_sim/pendo/faults`: a [`PendoFaults`] as JSON, e.g.
//!   `{"error_rate":0.1,"drop_rate":0.05,"latency_ms":20,"status_script":[429,500]}`
//!   (missing keys take their defaults, so `{}` switches every fault off).

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::connect_info::{ConnectInfo, Connected};
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State as AxState};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::{IncomingStream, Listener};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::domain::{FieldType, Kind};
use crate::sim::SimServer;

/// Pendo publishes no size cap for a bulk write; this only bounds memory.
const BODY_LIMIT: usize = 256 << 20;
const KEY_HEADER: &str = "x-pendo-integration-key";
const FORMAT_ERROR: &str =
    "The format is unacceptable due to malformed JSON or missing field mappings.";
const HTML_503: &str = "<html><head><title>503 Service Unavailable</title></head><body>\
    <center><h1>503 Service Unavailable</h1></center></body></html>";

#[derive(Debug, Clone)]
pub struct PendoSimConfig {
    /// The only key accepted in `x-pendo-integration-key`.
    pub integration_key: String,
    /// What token/verify reports; bulk writes without it get 403 with an empty body.
    pub write_access: bool,
    /// Declared custom fields: (kind, field key, Pendo `Type` such as "string", "number",
    /// "boolean", "date"). An unrecognised `Type` accepts any value.
    pub schema: Vec<(Kind, String, String)>,
    /// `None` = unlimited.
    pub rate_limit: Option<SimRateLimit>,
    /// Pendo's `errors` element type is unknown: objects `{"id","error"}` (false) or strings
    /// `"<id>: <text>"` (true). Clients must cope with both.
    pub errors_as_strings: bool,
}

/// Pendo's rate limit is undocumented (reference/pendo-api.md, 2), so the simulator offers the
/// two shapes an edge limiter takes.
#[derive(Debug, Clone)]
pub struct SimRateLimit {
    pub requests_per_second: f64,
    /// The token bucket's size: how many requests may arrive at once after a pause. Unused by
    /// a window.
    pub burst: u32,
    /// Send `Retry-After: <seconds>` on 429 (Pendo documents no such header).
    pub retry_after: bool,
    /// `None`: a token bucket of `burst` tokens refilled at the rate. With a burst of 1 it is
    /// the strictest edge there is: two arrivals closer than one period are refused, so a
    /// client's timing jitter alone draws 429s from it. `Some(w)`: a sliding window, at most
    /// `requests_per_second × w` arrivals in any span of `w` (the plain meaning of "R
    /// requests per second"; HubSpot counts over 10 seconds): a client that sends more than
    /// the rate is refused, one whose requests arrive a few milliseconds late or early is not.
    pub window: Option<Duration>,
}

/// Fault knobs. As JSON (for `POST /_sim/pendo/faults`) the latency is `latency_ms`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PendoFaults {
    /// Probability a request gets an HTML 503 and is not applied.
    pub error_rate: f64,
    /// Probability a bulk write is applied but answered 500.
    pub applied_then_500_rate: f64,
    /// Probability the connection is closed with no response; the request is not applied.
    pub drop_rate: f64,
    #[serde(rename = "latency_ms", deserialize_with = "millis")]
    pub latency: Duration,
    /// Statuses the next bulk writes answer, one consumed per bulk request (after rate limit,
    /// auth and the random faults), without applying anything.
    pub status_script: Vec<u16>,
    /// Bodies the next bulk writes answer with 200, one consumed per bulk request, without
    /// applying anything (a proxy or a Pendo bug answering `{}`, or counts that do not add up).
    #[serde(default)]
    pub ok_body_script: Vec<String>,
    /// A bulk write of more records than this is answered 413 (Payload Too Large), without
    /// applying anything, as a proxy before Pendo with a body cap would. `None`: no cap.
    #[serde(default)]
    pub max_batch_records: Option<usize>,
    /// Ids whose elements every bulk write refuses with a per-record error (in the configured
    /// `errors` shape), not applied, while the rest of the batch is.
    #[serde(default)]
    pub error_ids: Vec<String>,
}

fn millis<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    u64::deserialize(d).map(Duration::from_millis)
}

#[derive(Debug, Clone, Serialize)]
pub struct RecordedRequest {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    /// The status answered; 0 when the connection was dropped without an answer.
    pub status: u16,
    /// Wall-clock epoch milliseconds at receipt.
    pub at_ms: i64,
    /// The parsed JSON body of a POST (None if absent or not JSON).
    pub body: Option<Value>,
}

impl RecordedRequest {
    /// The (id, field, value) triples a bulk custom-value write carried (none for other
    /// requests): what tests count and compare.
    pub fn written_values(&self) -> Vec<(String, String, Value)> {
        if !self.path.contains("/custom/value") {
            return Vec::new();
        }
        let mut out = Vec::new();
        for item in self
            .body
            .as_ref()
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let id = item["visitorId"]
                .as_str()
                .or(item["accountId"].as_str())
                .unwrap_or_default();
            for (field, value) in item["values"].as_object().into_iter().flatten() {
                out.push((id.to_owned(), field.clone(), value.clone()));
            }
        }
        out
    }
}

/// Handle to one simulated Pendo subscription; clones share state.
#[derive(Debug, Clone)]
pub struct PendoSim {
    inner: Arc<Mutex<State>>,
}

#[derive(Debug)]
struct State {
    config: PendoSimConfig,
    faults: PendoFaults,
    entities: BTreeMap<Kind, BTreeMap<String, Entity>>,
    requests: Vec<RecordedRequest>,
    bucket: Option<(f64, Instant)>,
    /// The arrivals a [`SimRateLimit::window`] admitted within the last window, oldest first.
    window_log: std::collections::VecDeque<Instant>,
}

#[derive(Debug)]
struct Entity {
    custom: BTreeMap<String, Value>,
    last_updated: i64,
    /// `metadata.auto.firstvisit`: when Pendo came to know the id (epoch ms).
    first_visit: i64,
}

impl Default for Entity {
    /// An id Pendo comes to know now.
    fn default() -> Self {
        let now = now_ms();
        Entity {
            custom: BTreeMap::new(),
            last_updated: now,
            first_visit: now,
        }
    }
}

impl Entity {
    /// Stores `v` exactly as received; `null` unsets the field.
    fn apply(&mut self, field: String, v: Value) {
        self.last_updated = now_ms();
        if v.is_null() {
            self.custom.remove(&field);
        } else {
            self.custom.insert(field, v);
        }
    }
}

impl State {
    fn entities(&mut self, kind: Kind) -> &mut BTreeMap<String, Entity> {
        self.entities.entry(kind).or_default()
    }

    /// `Some(None)` = declared with a `Type` we don't know (accepts anything); `None` = undeclared.
    fn field_type(&self, kind: Kind, field: &str) -> Option<Option<FieldType>> {
        let (_, _, ty) = self
            .config
            .schema
            .iter()
            .find(|(k, f, _)| *k == kind && f == field)?;
        let all = [
            FieldType::String,
            FieldType::Number,
            FieldType::Boolean,
            FieldType::Date,
        ];
        Some(all.into_iter().find(|t| t.compatible_with_pendo(ty)))
    }

    /// Takes a token for a request that arrived at `now`, or answers how many whole seconds
    /// until one is available.
    fn take_token(&mut self, now: Instant) -> Result<(), u64> {
        let Some(rl) = &self.config.rate_limit else {
            return Ok(());
        };
        if let Some(window) = rl.window {
            let cap = (rl.requests_per_second * window.as_secs_f64())
                .floor()
                .max(1.0) as usize;
            let log = &mut self.window_log;
            while log
                .front()
                .is_some_and(|first| now.saturating_duration_since(*first) >= window)
            {
                log.pop_front();
            }
            if log.len() < cap {
                log.push_back(now);
                return Ok(());
            }
            // Free again when the oldest admitted arrival leaves the window.
            let free_in = (log[0] + window).saturating_duration_since(now);
            return Err(free_in.as_secs_f64().ceil().clamp(1.0, 3600.0) as u64);
        }
        let (cap, rps) = (f64::from(rl.burst.max(1)), rl.requests_per_second.max(0.0));
        let (tokens, last) = self.bucket.unwrap_or((cap, now));
        // Two requests may take the lock in the other order than they arrived: time never
        // runs backwards for the bucket.
        let now = now.max(last);
        let tokens = (tokens + now.duration_since(last).as_secs_f64() * rps).min(cap);
        if tokens >= 1.0 {
            self.bucket = Some((tokens - 1.0, now));
            return Ok(());
        }
        self.bucket = Some((tokens, now));
        let wait = ((1.0 - tokens) / rps).ceil();
        Err(if wait.is_finite() {
            wait.clamp(1.0, 3600.0) as u64
        } else {
            3600
        })
    }
}

impl PendoSim {
    pub fn new(config: PendoSimConfig) -> Self {
        let state = State {
            config,
            faults: PendoFaults::default(),
            entities: BTreeMap::new(),
            requests: Vec::new(),
            bucket: None,
            window_log: std::collections::VecDeque::new(),
        };
        PendoSim {
            inner: Arc::new(Mutex::new(state)),
        }
    }

    /// A poisoned lock only means a test panicked elsewhere; the state itself stays consistent.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The routes, with state. Served through [`PendoSim::start`] the drop fault really closes the
    /// connection; served any other way it degrades to an (unapplied) HTML 503.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/api/v1/token/verify", get(verify))
            .route("/api/v1/metadata/schema/{kind}", get(schema))
            .route("/api/v1/metadata/{kind}/custom/value", post(bulk))
            .route("/api/v1/aggregation", post(aggregation))
            .route("/_sim/pendo/values/{kind}", get(sim_values))
            .route(
                "/_sim/pendo/requests",
                get(sim_requests).delete(sim_reset_requests),
            )
            .route("/_sim/pendo/faults", post(sim_faults))
            // Unknown paths still pass the gate: authenticated, limited and recorded like Pendo's.
            .fallback(|| async { StatusCode::NOT_FOUND })
            // The gate buffers bodies itself; no 2 MB default cap (Pendo publishes none).
            .layer(DefaultBodyLimit::max(BODY_LIMIT))
            .layer(middleware::from_fn_with_state(self.clone(), gate))
            .with_state(self.clone())
    }

    /// Serves on `addr` with a listener whose connections can be killed by the drop fault.
    pub async fn start(&self, addr: SocketAddr) -> io::Result<SimServer> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let token = CancellationToken::new();
        let stop = token.clone();
        let app = self
            .router()
            .into_make_service_with_connect_info::<ConnKill>();
        let task = tokio::spawn(async move {
            let _ = axum::serve(KillableListener(listener), app)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await;
        });
        Ok(SimServer {
            addr,
            token,
            task: Some(task),
        })
    }

    pub fn set_faults(&self, f: PendoFaults) {
        self.lock().faults = f;
    }

    /// Makes an id known (visitors and accounts exist only when added or created); its
    /// `firstvisit` is now.
    pub fn add_entity(&self, kind: Kind, id: &str) {
        self.lock().entities(kind).entry(id.to_owned()).or_default();
    }

    /// Makes an id known with a `firstvisit` in the past: an id created through the API (which
    /// may not set it) or whose first events were processed late. A filter on `firstvisit`
    /// since a recent time does not find it.
    pub fn add_entity_first_visited(&self, kind: Kind, id: &str, first_visit_ms: i64) {
        self.lock()
            .entities(kind)
            .entry(id.to_owned())
            .or_default()
            .first_visit = first_visit_ms;
    }

    /// Deletes an id and its values (a clean-up in Pendo): it is unknown until added or created.
    pub fn remove_entity(&self, kind: Kind, id: &str) {
        self.lock().entities(kind).remove(id);
    }

    /// Whether Pendo knows the id.
    pub fn has_entity(&self, kind: Kind, id: &str) -> bool {
        self.lock().entities(kind).contains_key(id)
    }

    /// What Pendo holds (None = unset or unknown entity).
    pub fn value(&self, kind: Kind, id: &str, field: &str) -> Option<Value> {
        self.lock()
            .entities(kind)
            .get(id)?
            .custom
            .get(field)
            .cloned()
    }

    /// id -> field -> value for every known entity (entities without values map to `{}`).
    pub fn values(&self, kind: Kind) -> BTreeMap<String, BTreeMap<String, Value>> {
        self.lock()
            .entities(kind)
            .iter()
            .map(|(id, e)| (id.clone(), e.custom.clone()))
            .collect()
    }

    /// An edit made in Pendo behind the sync's back. Creates the entity if needed; `null` unsets.
    pub fn set_value(&self, kind: Kind, id: &str, field: &str, v: Value) {
        let mut st = self.lock();
        let entity = st.entities(kind).entry(id.to_owned()).or_default();
        entity.apply(field.to_owned(), v);
    }

    /// Wipes every custom value of `kind`; the entities stay known.
    pub fn clear_all_values(&self, kind: Kind) {
        for e in self.lock().entities(kind).values_mut() {
            e.custom.clear();
        }
    }

    /// Every non-`/_sim` request, rejected ones included, in the order they were answered.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.lock().requests.clone()
    }

    pub fn reset_requests(&self) {
        self.lock().requests.clear();
    }

    /// Rate limit, auth and the random faults, in that order (a real edge limits before auth).
    fn admit(&self, key_ok: bool, arrived: Instant) -> Admission {
        let mut st = self.lock();
        if let Err(secs) = st.take_token(arrived) {
            let retry = st.config.rate_limit.as_ref().is_some_and(|r| r.retry_after);
            return Admission::Answer(too_many_requests(retry.then_some(secs)));
        }
        if !key_ok {
            return Admission::Answer(StatusCode::FORBIDDEN.into_response());
        }
        if roll(st.faults.drop_rate) {
            return Admission::Drop;
        }
        if roll(st.faults.error_rate) {
            return Admission::Answer(html_503());
        }
        Admission::Pass
    }
}

enum Admission {
    Pass,
    Answer(Response),
    Drop,
}

fn roll(rate: f64) -> bool {
    rate > 0.0 && fastrand::f64() < rate
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn error_json(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, axum::Json(json!({ "error": msg.into() }))).into_response()
}

fn html_503() -> Response {
    let html = [(header::CONTENT_TYPE, "text/html; charset=utf-8")];
    (StatusCode::SERVICE_UNAVAILABLE, html, HTML_503).into_response()
}

fn too_many_requests(retry_after_secs: Option<u64>) -> Response {
    let mut resp = error_json(StatusCode::TOO_MANY_REQUESTS, "Too Many Requests");
    if let Some(secs) = retry_after_secs {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from(secs));
    }
    resp
}

/// Every request except `/_sim/...` passes here: rate limit, auth and random faults (decided on
/// arrival), latency, and the log.
async fn gate(AxState(sim): AxState<PendoSim>, req: Request, next: Next) -> Response {
    if req.uri().path().starts_with("/_sim/") {
        return next.run(req).await;
    }
    // The arrival, as an edge limiter sees it: before waiting for this server's state lock,
    // which a request applying its values holds for milliseconds.
    let arrived = Instant::now();
    let at_ms = now_ms();
    let (parts, body) = req.into_parts();
    let (key, latency) = {
        let st = sim.lock();
        (st.config.integration_key.clone(), st.faults.latency)
    };
    let key_ok = parts.headers.get(KEY_HEADER).map(|v| v.as_bytes()) == Some(key.as_bytes());
    // Admitted (or not) as the request arrives, as an edge limiter counts it: not after its
    // body was read and parsed, which would add this server's own load to the client's timing.
    let admission = sim.admit(key_ok, arrived);
    // A body that fails to arrive is treated as empty; the handler then answers 400.
    let bytes = axum::body::to_bytes(body, BODY_LIMIT)
        .await
        .unwrap_or_default();
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let mut record = RecordedRequest {
        method: parts.method.to_string(),
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().map(str::to_owned),
        status: 0,
        at_ms,
        body: (parts.method == axum::http::Method::POST)
            .then(|| serde_json::from_slice(&bytes).ok())
            .flatten(),
    };
    let kill = parts.extensions.get::<ConnectInfo<ConnKill>>().cloned();
    let resp = match admission {
        Admission::Pass => {
            next.run(Request::from_parts(parts, Body::from(bytes)))
                .await
        }
        Admission::Answer(resp) => resp,
        Admission::Drop => match kill {
            Some(ConnectInfo(kill)) => {
                // The connection refuses all further I/O, so hyper drops it instead of writing
                // this response: the client sees the socket close with no answer.
                kill.0.store(true, Ordering::SeqCst);
                sim.lock().requests.push(record);
                return StatusCode::SERVICE_UNAVAILABLE.into_response();
            }
            None => html_503(),
        },
    };
    record.status = resp.status().as_u16();
    sim.lock().requests.push(record);
    resp
}

async fn verify(AxState(sim): AxState<PendoSim>) -> Response {
    let write = sim.lock().config.write_access;
    axum::Json(json!({ "valid": true, "writeAccess": write })).into_response()
}

async fn schema(AxState(sim): AxState<PendoSim>, Path(kind): Path<String>) -> Response {
    let Some(kind) = Kind::parse(&kind) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let st = sim.lock();
    let custom: serde_json::Map<String, Value> = st
        .config
        .schema
        .iter()
        .filter(|(k, _, _)| *k == kind)
        .map(|(_, field, ty)| {
            let spec = json!({
                "Type": ty, "DisplayName": field, "ElementType": "", "ElementFormat": "",
                "Dirty": false, "isHidden": false, "isDeleted": false, "isCalculated": false,
                "isPerApp": false, "neverIndex": false,
            });
            (field.clone(), spec)
        })
        .collect();
    axum::Json(json!({ "custom": custom, "agent": {}, "auto": {} })).into_response()
}

/// The answer a scripted status gets: the same bodies and headers the real paths would send.
fn scripted(code: u16, rate_limit: Option<&SimRateLimit>) -> Response {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    match status.as_u16() {
        // Retry-After unless a configured limiter says it never sends one.
        429 => too_many_requests(rate_limit.is_none_or(|r| r.retry_after).then_some(1)),
        401 | 403 => status.into_response(),
        503 => html_503(),
        408 => error_json(status, "The call took too long and timed out."),
        400 => error_json(status, FORMAT_ERROR),
        _ => error_json(status, status.canonical_reason().unwrap_or("error")),
    }
}

type Batch = Vec<(String, serde_json::Map<String, Value>)>;

fn parse_batch(kind: Kind, body: &[u8]) -> Result<Batch, String> {
    let Ok(Value::Array(items)) = serde_json::from_slice::<Value>(body) else {
        return Err(format!("{FORMAT_ERROR} (expected a JSON array)"));
    };
    let id_key = kind.id_key();
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| {
            let id = item.get(id_key).and_then(Value::as_str);
            let values = item.get("values").and_then(Value::as_object);
            match (id, values) {
                (Some(id), Some(values)) => Ok((id.to_owned(), values.clone())),
                _ => Err(format!(
                    "{FORMAT_ERROR} (element {i} needs a string \"{id_key}\" and a \"values\" object)"
                )),
            }
        })
        .collect()
}

/// Why `v` can't be stored in a field of type `ty`, if it can't. `null` always fits (it clears).
fn type_error(ty: Option<FieldType>, field: &str, v: &Value) -> Option<String> {
    let fits = match (ty, v) {
        (_, Value::Null) | (None, _) => true,
        (Some(FieldType::String), v) => !v.is_object() && !v.is_array(),
        (Some(FieldType::Number), Value::String(s)) => {
            s.trim().parse::<f64>().is_ok_and(f64::is_finite)
        }
        (Some(FieldType::Number), v) => v.is_number(),
        (Some(FieldType::Boolean), v) => v.is_boolean(),
        (Some(FieldType::Date), Value::String(s)) => is_iso_date(s),
        (Some(FieldType::Date), v) => v.is_number(),
    };
    let ty = ty.map_or("any", FieldType::as_str);
    (!fits).then(|| format!("value {v} for field \"{field}\" is not a valid {ty}"))
}

fn is_iso_date(s: &str) -> bool {
    chrono::DateTime::parse_from_rfc3339(s).is_ok()
        || chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f").is_ok()
        || chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d").is_ok()
}

async fn bulk(
    AxState(sim): AxState<PendoSim>,
    Path(kind): Path<String>,
    Query(query): Query<BTreeMap<String, String>>,
    body: Bytes,
) -> Response {
    let Some(kind) = Kind::parse(&kind) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let create = query.get("create").is_some_and(|v| v == "true");
    let mut st = sim.lock();
    if !st.faults.status_script.is_empty() {
        let code = st.faults.status_script.remove(0);
        return scripted(code, st.config.rate_limit.as_ref());
    }
    if !st.faults.ok_body_script.is_empty() {
        let body = st.faults.ok_body_script.remove(0);
        return (
            StatusCode::OK,
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response();
    }
    if !st.config.write_access {
        return StatusCode::FORBIDDEN.into_response();
    }
    let batch = match parse_batch(kind, &body) {
        Ok(batch) => batch,
        Err(msg) => return error_json(StatusCode::BAD_REQUEST, msg),
    };
    if let Some(max) = st.faults.max_batch_records
        && batch.len() > max
    {
        return error_json(StatusCode::PAYLOAD_TOO_LARGE, "Request Entity Too Large");
    }
    // One undeclared field fails the whole call, as the legacy docs describe.
    for field in batch.iter().flat_map(|(_, values)| values.keys()) {
        if st.field_type(kind, field).is_none() {
            let msg = format!("{FORMAT_ERROR} Unknown custom field \"{field}\" for {kind}.");
            return error_json(StatusCode::BAD_REQUEST, msg);
        }
    }
    let total = batch.len();
    let (mut missing, mut errors) = (Vec::new(), Vec::new());
    for (id, values) in batch {
        if !create && !st.entities(kind).contains_key(&id) {
            missing.push(id);
            continue;
        }
        let bad = if st.faults.error_ids.contains(&id) {
            Some("refused by the simulator (faults.error_ids)".to_owned())
        } else {
            values
                .iter()
                .find_map(|(f, v)| type_error(st.field_type(kind, f).flatten(), f, v))
        };
        if let Some(text) = bad {
            errors.push(if st.config.errors_as_strings {
                json!(format!("{id}: {text}"))
            } else {
                json!({ "id": id, "error": text })
            });
            continue;
        }
        let entity = st.entities(kind).entry(id).or_default();
        entity.last_updated = now_ms();
        for (field, v) in values {
            entity.apply(field, v);
        }
    }
    if roll(st.faults.applied_then_500_rate) {
        return error_json(StatusCode::INTERNAL_SERVER_ERROR, "Internal Server Error");
    }
    let failed = missing.len() + errors.len();
    axum::Json(json!({
        "total": total, "updated": total - failed, "failed": failed,
        "missing": missing, "errors": errors,
        // Real responses may carry keys clients don't know; idmsvc's model hints at this one.
        "kind": kind.as_str(),
    }))
    .into_response()
}

async fn aggregation(AxState(sim): AxState<PendoSim>, body: Bytes) -> Response {
    let Ok(req) = serde_json::from_slice::<Value>(&body) else {
        return error_json(StatusCode::BAD_REQUEST, "malformed JSON");
    };
    let Some(pipeline) = req.pointer("/request/pipeline").and_then(Value::as_array) else {
        return error_json(StatusCode::BAD_REQUEST, "request.pipeline must be an array");
    };
    let mut st = sim.lock();
    match run_pipeline(&mut st, pipeline) {
        Ok(rows) => axum::Json(json!({ "startTime": now_ms(), "results": rows })).into_response(),
        Err(msg) => error_json(StatusCode::BAD_REQUEST, msg),
    }
}

/// Runs the subset of Pendo's pipeline language the sync sends: a visitors/accounts source
/// followed by `identified`, `filter` (see [`parse_filter`]), `select`, `sort`, `skip` and
/// `limit`, each applied in pipeline order. Rows carry `metadata.custom.*` and
/// `metadata.auto.{firstvisit,lastupdated}`.
fn run_pipeline(st: &mut State, pipeline: &[Value]) -> Result<Vec<Value>, String> {
    let source = pipeline.first().and_then(|s| s.get("source"));
    let kind = match source {
        Some(s) if s.get("accounts").is_some() => Kind::Account,
        Some(s) if s.get("visitors").is_some() => Kind::Visitor,
        _ => return Err("the first stage must be a visitors or accounts source".into()),
    };
    let id_key = kind.id_key();
    let (from, take, stages) = page_in_id_order(&pipeline[1..], id_key);
    let mut rows: Vec<Value> = st
        .entities(kind)
        .iter()
        .skip(from)
        .take(take)
        .map(|(id, e)| {
            let auto = json!({ "lastupdated": e.last_updated, "firstvisit": e.first_visit });
            json!({ id_key: id, "metadata": { "custom": e.custom, "auto": auto } })
        })
        .collect();
    for stage in &stages {
        let Some((name, arg)) = stage.as_object().and_then(|o| o.iter().next()) else {
            return Err(format!("stage {stage} is not an object"));
        };
        let count = || arg.as_u64().map(|n| n as usize);
        match name.as_str() {
            // Every simulated visitor and account is identified.
            "identified" => {}
            "filter" => {
                let conditions = parse_filter(arg.as_str().ok_or("filter takes a string")?)?;
                rows.retain(|row| {
                    conditions
                        .iter()
                        .all(|(path, op, lit)| op.holds(cmp_json(lookup(row, path), Some(lit))))
                });
            }
            "select" => {
                let sel = arg.as_object().ok_or("select takes an object")?;
                rows = rows.iter().map(|row| select(row, sel)).collect();
            }
            "sort" => {
                let keys: Vec<&str> = arg
                    .as_array()
                    .map(|a| a.iter().filter_map(Value::as_str).collect())
                    .ok_or("sort takes an array of field names")?;
                rows.sort_by(|a, b| {
                    keys.iter()
                        .map(|k| match k.strip_prefix('-') {
                            Some(k) => cmp_json(lookup(b, k), lookup(a, k)),
                            None => cmp_json(lookup(a, k), lookup(b, k)),
                        })
                        .find(|o| o.is_ne())
                        .unwrap_or(std::cmp::Ordering::Equal)
                });
            }
            "skip" => {
                let n = count().ok_or("skip takes a count")?;
                rows.drain(..n.min(rows.len()));
            }
            "limit" => rows.truncate(count().ok_or("limit takes a count")?),
            other => return Err(format!("unknown pipeline stage \"{other}\"")),
        }
    }
    Ok(rows)
}

/// The paged reads of every entity (no filter, sorted by id, `skip` then `limit`) need only
/// their page's rows: the entities are kept in id order, so the page is cut before any row is
/// built (a million-entity read otherwise builds and sorts a million rows per page). Returns
/// (rows to skip, rows to take, the stages still to run); anything else runs every stage.
fn page_in_id_order<'p>(stages: &'p [Value], id_key: &str) -> (usize, usize, Vec<&'p Value>) {
    let name = |s: &Value| {
        s.as_object()
            .and_then(|o| o.iter().next())
            .map(|(k, v)| (k.clone(), v.clone()))
    };
    let mut skip = None;
    let mut limit = None;
    for (i, stage) in stages.iter().enumerate() {
        match name(stage) {
            Some((k, _)) if k == "identified" || k == "select" => {}
            Some((k, v)) if k == "sort" && v == json!([id_key]) && skip.is_none() => {}
            Some((k, v)) if k == "skip" && skip.is_none() && limit.is_none() => {
                skip = v.as_u64().map(|n| (i, n as usize));
            }
            Some((k, v)) if k == "limit" && limit.is_none() => {
                limit = v.as_u64().map(|n| (i, n as usize));
            }
            _ => return (0, usize::MAX, stages.iter().collect()),
        }
    }
    let cut: Vec<usize> = [skip, limit].iter().flatten().map(|(i, _)| *i).collect();
    (
        skip.map_or(0, |(_, n)| n),
        limit.map_or(usize::MAX, |(_, n)| n),
        stages
            .iter()
            .enumerate()
            .filter(|(i, _)| !cut.contains(i))
            .map(|(_, s)| s)
            .collect(),
    )
}

/// A comparison in a filter expression.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Eq,
    Ne,
    Ge,
    Le,
    Gt,
    Lt,
}

impl Op {
    fn holds(self, o: std::cmp::Ordering) -> bool {
        use std::cmp::Ordering::*;
        match self {
            Op::Eq => o == Equal,
            Op::Ne => o != Equal,
            Op::Ge => o != Less,
            Op::Le => o != Greater,
            Op::Gt => o == Greater,
            Op::Lt => o == Less,
        }
    }
}

/// The part of Pendo's "basic C expression syntax" filters the sync sends: comparisons
/// `<path> <op> <literal>` (op one of `== != >= <= > <`, the literal a JSON string or number)
/// joined by `&&`. `visitorId == "a&&b"` is one comparison: literals are read as JSON strings,
/// escapes included, before anything else is looked for.
fn parse_filter(expr: &str) -> Result<Vec<(String, Op, Value)>, String> {
    let bad = |why: &str| format!("the simulator cannot read the filter {expr:?}: {why}");
    let mut rest = expr.trim_start();
    let mut out = Vec::new();
    loop {
        let path_end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.'))
            .unwrap_or(rest.len());
        let path = &rest[..path_end];
        if path.is_empty() {
            return Err(bad("expected a field path"));
        }
        rest = rest[path_end..].trim_start();
        let ops = [
            ("==", Op::Eq),
            ("!=", Op::Ne),
            (">=", Op::Ge),
            ("<=", Op::Le),
            (">", Op::Gt),
            ("<", Op::Lt),
        ];
        let (token, op) = ops
            .into_iter()
            .find(|(t, _)| rest.starts_with(t))
            .ok_or_else(|| bad("expected one of == != >= <= > <"))?;
        rest = rest[token.len()..].trim_start();
        let literal_end = if rest.starts_with('"') {
            let mut escaped = false;
            rest.char_indices()
                .skip(1)
                .find(|&(_, c)| {
                    let end = c == '"' && !escaped;
                    escaped = c == '\\' && !escaped;
                    end
                })
                .map(|(i, _)| i + 1)
                .ok_or_else(|| bad("unterminated string"))?
        } else {
            rest.find(|c: char| !(c.is_ascii_digit() || "+-.eE".contains(c)))
                .unwrap_or(rest.len())
        };
        let literal: Value = serde_json::from_str(&rest[..literal_end])
            .map_err(|_| bad("expected a JSON string or number"))?;
        out.push((path.to_owned(), op, literal));
        rest = rest[literal_end..].trim_start();
        if rest.is_empty() {
            return Ok(out);
        }
        rest = rest
            .strip_prefix("&&")
            .ok_or_else(|| bad("expected && between comparisons"))?
            .trim_start();
    }
}

fn select(row: &Value, sel: &serde_json::Map<String, Value>) -> Value {
    let pick = |path: &Value| path.as_str().and_then(|p| lookup(row, p)).cloned();
    Value::Object(
        sel.iter()
            .map(|(k, path)| (k.clone(), pick(path).unwrap_or(Value::Null)))
            .collect(),
    )
}

/// `metadata.custom.plan` style paths.
fn lookup<'a>(row: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(row, |v, key| v.get(key))
}

/// A total order for sorting: missing/null < bool < number < string < anything else.
fn cmp_json(a: Option<&Value>, b: Option<&Value>) -> std::cmp::Ordering {
    let rank = |v: Option<&Value>| match v {
        None | Some(Value::Null) => 0,
        Some(Value::Bool(_)) => 1,
        Some(Value::Number(_)) => 2,
        Some(Value::String(_)) => 3,
        Some(_) => 4,
    };
    match (a, b) {
        (Some(Value::Bool(x)), Some(Value::Bool(y))) => x.cmp(y),
        (Some(Value::Number(x)), Some(Value::Number(y))) => {
            let (x, y) = (x.as_f64().unwrap_or(0.0), y.as_f64().unwrap_or(0.0));
            x.total_cmp(&y)
        }
        (Some(Value::String(x)), Some(Value::String(y))) => x.cmp(y),
        _ => rank(a).cmp(&rank(b)),
    }
}

async fn sim_values(AxState(sim): AxState<PendoSim>, Path(kind): Path<String>) -> Response {
    match Kind::parse(&kind) {
        Some(kind) => axum::Json(sim.values(kind)).into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn sim_requests(AxState(sim): AxState<PendoSim>) -> Response {
    axum::Json(sim.requests()).into_response()
}

async fn sim_reset_requests(AxState(sim): AxState<PendoSim>) -> StatusCode {
    sim.reset_requests();
    StatusCode::NO_CONTENT
}

async fn sim_faults(AxState(sim): AxState<PendoSim>, body: Bytes) -> Response {
    match serde_json::from_slice::<PendoFaults>(&body) {
        Ok(faults) => {
            sim.set_faults(faults);
            StatusCode::NO_CONTENT.into_response()
        }
        Err(e) => error_json(StatusCode::BAD_REQUEST, e.to_string()),
    }
}

/// Per-connection kill switch, reachable from handlers as `ConnectInfo<ConnKill>`.
#[derive(Debug, Clone, Default)]
struct ConnKill(Arc<AtomicBool>);

impl Connected<IncomingStream<'_, KillableListener>> for ConnKill {
    fn connect_info(stream: IncomingStream<'_, KillableListener>) -> Self {
        stream.io().kill.clone()
    }
}

/// A TCP listener whose streams fail all I/O once their [`ConnKill`] is set. hyper then gives up
/// on the connection and drops it, closing the socket without having written a byte.
struct KillableListener(TcpListener);

impl Listener for KillableListener {
    type Io = KillableStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (KillableStream, SocketAddr) {
        loop {
            match self.0.accept().await {
                Ok((inner, addr)) => {
                    let kill = ConnKill::default();
                    return (KillableStream { inner, kill }, addr);
                }
                // e.g. out of file descriptors: back off instead of spinning, as axum does.
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.0.local_addr()
    }
}

struct KillableStream {
    inner: TcpStream,
    kill: ConnKill,
}

impl KillableStream {
    fn check(&self) -> io::Result<()> {
        if self.kill.0.load(Ordering::SeqCst) {
            Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "dropped by fault",
            ))
        } else {
            Ok(())
        }
    }
}

impl AsyncRead for KillableStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.check()?;
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for KillableStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.check()?;
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.check()?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.check()?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    const KEY: &str = "test-key";
    const VERIFY: &str = "/api/v1/token/verify";
    const BULK: &str = "/api/v1/metadata/account/custom/value";
    const AGG: &str = "/api/v1/aggregation";

    fn config() -> PendoSimConfig {
        let field = |k, f: &str, t: &str| (k, f.to_owned(), t.to_owned());
        PendoSimConfig {
            integration_key: KEY.into(),
            write_access: true,
            schema: vec![
                field(Kind::Account, "plan", "string"),
                field(Kind::Account, "arr", "number"),
                field(Kind::Account, "active", "boolean"),
                field(Kind::Account, "renewal", "date"),
                field(Kind::Visitor, "role", "string"),
            ],
            rate_limit: None,
            errors_as_strings: false,
        }
    }

    struct Fixture {
        sim: PendoSim,
        server: SimServer,
        http: reqwest::Client,
    }

    struct Answer {
        status: u16,
        headers: reqwest::header::HeaderMap,
        text: String,
    }

    impl Answer {
        fn json(&self) -> Value {
            serde_json::from_str(&self.text).unwrap_or(Value::Null)
        }
    }

    impl Fixture {
        async fn new(config: PendoSimConfig) -> Fixture {
            let sim = PendoSim::new(config);
            let server = sim.start(([127, 0, 0, 1], 0).into()).await.unwrap();
            let http = reqwest::Client::new();
            Fixture { sim, server, http }
        }

        fn faults(&self, f: PendoFaults) -> &Self {
            self.sim.set_faults(f);
            self
        }

        async fn call(
            &self,
            method: reqwest::Method,
            path: &str,
            key: Option<&str>,
            body: Option<&[u8]>,
        ) -> reqwest::Result<Answer> {
            let mut req = self
                .http
                .request(method, format!("{}{path}", self.server.url()));
            if let Some(key) = key {
                req = req.header(KEY_HEADER, key);
            }
            if let Some(body) = body {
                req = req.body(body.to_vec());
            }
            let resp = req.send().await?;
            let (status, headers) = (resp.status().as_u16(), resp.headers().clone());
            let text = resp.text().await?;
            Ok(Answer {
                status,
                headers,
                text,
            })
        }

        async fn get(&self, path: &str) -> Answer {
            let key = (!path.starts_with("/_sim")).then_some(KEY);
            self.call(reqwest::Method::GET, path, key, None)
                .await
                .unwrap()
        }

        async fn try_post(&self, path: &str, body: &Value) -> reqwest::Result<Answer> {
            let key = (!path.starts_with("/_sim")).then_some(KEY);
            let body = body.to_string();
            self.call(reqwest::Method::POST, path, key, Some(body.as_bytes()))
                .await
        }

        async fn post(&self, path: &str, body: &Value) -> Answer {
            self.try_post(path, body).await.unwrap()
        }

        fn plan(&self, id: &str) -> Option<Value> {
            self.sim.value(Kind::Account, id, "plan")
        }
    }

    fn set_plan(id: &str) -> Value {
        json!([{ "accountId": id, "values": { "plan": "Pro" } }])
    }

    #[tokio::test]
    async fn auth_verify_and_schema() {
        let f = Fixture::new(config()).await;
        for key in [None, Some("wrong")] {
            let answer = f
                .call(reqwest::Method::GET, VERIFY, key, None)
                .await
                .unwrap();
            assert_eq!((answer.status, answer.text.as_str()), (403, ""));
        }
        let verify = f.get(VERIFY).await.json();
        assert_eq!(verify, json!({ "valid": true, "writeAccess": true }));
        let schema = f.get("/api/v1/metadata/schema/account").await.json();
        assert_eq!(schema["custom"]["arr"]["Type"], "number");
        assert_eq!(schema["custom"]["plan"]["DisplayName"], "plan");
        assert_eq!(schema["custom"].as_object().unwrap().len(), 4);
        let unknown = f
            .call(reqwest::Method::GET, "/api/v1/nope", None, None)
            .await;
        assert_eq!(unknown.unwrap().status, 403, "auth comes before routing");
        assert_eq!(f.get("/api/v1/nope").await.status, 404);
        let statuses: Vec<u16> = f.sim.requests().iter().map(|r| r.status).collect();
        assert_eq!(statuses, [403, 403, 200, 200, 403, 404]);
    }

    #[tokio::test]
    async fn partial_200_reports_missing_and_errors_in_both_shapes() {
        for errors_as_strings in [false, true] {
            let f = Fixture::new(PendoSimConfig {
                errors_as_strings,
                ..config()
            })
            .await;
            for id in ["a", "b", "c", "d"] {
                f.sim.add_entity(Kind::Account, id);
            }
            let batch = json!([
                { "accountId": "a", "values": { "plan": "Pro", "arr": "12.5", "renewal": 1_700_000_000_000_i64 } },
                { "accountId": "b", "values": { "arr": "lots" } },
                { "accountId": "c", "values": { "active": "yes", "plan": "Free" } },
                { "accountId": "d", "values": { "renewal": "2026-03-31T00:00:00Z", "active": false } },
                { "accountId": "ghost", "values": { "plan": "Pro" } },
            ]);
            let answer = f.post(BULK, &batch).await;
            let body = answer.json();
            assert_eq!(answer.status, 200);
            let counts = [&body["total"], &body["updated"], &body["failed"]];
            assert_eq!(counts, [5, 2, 3]);
            assert_eq!(body["missing"], json!(["ghost"]));
            assert_eq!(body["kind"], "account");
            let errors = body["errors"].as_array().unwrap();
            assert_eq!(errors.len(), 2);
            if errors_as_strings {
                assert!(errors[0].as_str().unwrap().starts_with("b: "));
            } else {
                assert_eq!(errors[1]["id"], "c");
                assert!(errors[1]["error"].as_str().unwrap().contains("active"));
            }
            assert_eq!(f.sim.value(Kind::Account, "a", "arr"), Some(json!("12.5")));
            assert_eq!(
                f.sim.value(Kind::Account, "d", "active"),
                Some(json!(false))
            );
            assert_eq!(f.plan("c"), None, "an element with an error is not applied");
            assert!(!f.sim.values(Kind::Account).contains_key("ghost"));
        }
    }

    #[tokio::test]
    async fn bad_batches_are_rejected_whole() {
        let f = Fixture::new(config()).await;
        f.sim.add_entity(Kind::Account, "a");
        let undeclared = json!([
            { "accountId": "a", "values": { "plan": "Pro" } },
            { "accountId": "a", "values": { "colour": "red" } },
        ]);
        let answer = f.post(BULK, &undeclared).await;
        assert_eq!(answer.status, 400);
        assert!(answer.json()["error"].as_str().unwrap().contains("colour"));
        let not_array = json!({ "accountId": "a", "values": {} });
        let wrong_id_key = json!([{ "visitorId": "a", "values": {} }]);
        assert_eq!(f.post(BULK, &not_array).await.status, 400);
        assert_eq!(f.post(BULK, &wrong_id_key).await.status, 400);
        let malformed = f
            .call(reqwest::Method::POST, BULK, Some(KEY), Some(b"[{"))
            .await;
        assert_eq!(malformed.unwrap().status, 400);
        assert_eq!(f.plan("a"), None);
    }

    #[tokio::test]
    async fn create_true_creates_and_null_clears() {
        let f = Fixture::new(config()).await;
        let path = "/api/v1/metadata/visitor/custom/value";
        let set = json!([{ "visitorId": "v1", "values": { "role": "admin" } }]);
        assert_eq!(f.post(path, &set).await.json()["missing"], json!(["v1"]));
        let answer = f.post(&format!("{path}?create=true"), &set).await;
        assert_eq!(answer.json()["updated"], 1);
        assert_eq!(
            f.sim.value(Kind::Visitor, "v1", "role"),
            Some(json!("admin"))
        );
        let clear = json!([{ "visitorId": "v1", "values": { "role": null } }]);
        assert_eq!(f.post(path, &clear).await.json()["updated"], 1);
        assert_eq!(f.sim.values(Kind::Visitor)["v1"], BTreeMap::new());
        let last = f.sim.requests().pop().unwrap();
        assert_eq!((last.path.as_str(), last.body), (path, Some(clear)));
        // Bigger than axum's 2 MB default body cap: still accepted.
        let big: Vec<Value> = (0..5_000)
            .map(|i| json!({ "visitorId": format!("v{i}"), "values": { "role": "x".repeat(500) } }))
            .collect();
        let answer = f
            .post(&format!("{path}?create=true"), &Value::Array(big))
            .await;
        assert_eq!(answer.json()["updated"], 5_000);
    }

    #[tokio::test]
    async fn writes_without_write_access_are_forbidden() {
        let f = Fixture::new(PendoSimConfig {
            write_access: false,
            ..config()
        })
        .await;
        f.sim.add_entity(Kind::Account, "a");
        assert_eq!(f.get(VERIFY).await.json()["writeAccess"], false);
        let answer = f.post(BULK, &set_plan("a")).await;
        assert_eq!((answer.status, answer.text.as_str()), (403, ""));
        assert_eq!(f.plan("a"), None);
    }

    #[tokio::test]
    async fn aggregation_select_sort_skip_limit() {
        let f = Fixture::new(config()).await;
        for (id, plan) in [("c", "Pro"), ("a", "Free"), ("d", "Pro"), ("b", "Team")] {
            f.sim.set_value(Kind::Account, id, "plan", json!(plan));
        }
        f.sim.add_entity(Kind::Account, "e");
        let query = |stages: Value| {
            let mut pipeline = vec![
                json!({ "source": { "accounts": null } }),
                json!({ "identified": "accountId" }),
            ];
            pipeline.extend(stages.as_array().unwrap().iter().cloned());
            let request = json!({ "pipeline": pipeline });
            json!({ "response": { "mimeType": "application/json" }, "request": request })
        };
        let select =
            json!({ "select": { "accountId": "accountId", "plan": "metadata.custom.plan" } });
        let stages =
            json!([select, { "sort": ["-plan", "accountId"] }, { "skip": 1 }, { "limit": 3 }]);
        let body = f.post(AGG, &query(stages)).await.json();
        assert!(body["startTime"].is_i64());
        let expected = json!([
            { "accountId": "c", "plan": "Pro" },
            { "accountId": "d", "plan": "Pro" },
            { "accountId": "a", "plan": "Free" },
        ]);
        assert_eq!(body["results"], expected);
        let body = f
            .post(AGG, &query(json!([{ "sort": ["accountId"] }, select])))
            .await
            .json();
        assert_eq!(
            body["results"][4],
            json!({ "accountId": "e", "plan": null })
        );
        let row = &f.post(AGG, &query(json!([{ "limit": 1 }]))).await.json()["results"][0];
        assert_eq!(row["accountId"], "a");
        assert_eq!(row["metadata"]["custom"], json!({ "plan": "Free" }));
        assert!(row["metadata"]["auto"]["lastupdated"].is_i64());
        assert_eq!(
            f.post(AGG, &query(json!([{ "group": {} }]))).await.status,
            400
        );
    }

    /// Discovery's filter (`firstvisit` at or after a time) and `why --live`'s (an id that
    /// holds what looks like an operator) both read right; an unreadable filter is a 400.
    #[tokio::test]
    async fn aggregation_filters_compare_and_join_with_and() {
        let f = Fixture::new(config()).await;
        f.sim.add_entity_first_visited(Kind::Account, "old", 1_000);
        f.sim
            .add_entity_first_visited(Kind::Account, "a&&b == \"x\"", 5_000);
        f.sim.add_entity(Kind::Account, "new");
        let f = &f;
        let ids = |filter: &str| {
            let request = json!({ "pipeline": [
                { "source": { "accounts": null } },
                { "identified": "accountId" },
                { "filter": filter },
                { "select": { "accountId": "accountId" } },
            ]});
            let body =
                json!({ "response": { "mimeType": "application/json" }, "request": request });
            async move { f.post(AGG, &body).await }
        };
        let found = |answer: Answer| -> Vec<String> {
            let rows = answer.json()["results"].as_array().unwrap().clone();
            rows.iter()
                .map(|r| r["accountId"].as_str().unwrap().to_owned())
                .collect()
        };
        assert_eq!(
            found(ids("metadata.auto.firstvisit >= 5000").await),
            ["a&&b == \"x\"", "new"]
        );
        assert_eq!(
            found(ids("metadata.auto.firstvisit>1000 && metadata.auto.firstvisit < 6000").await),
            ["a&&b == \"x\""]
        );
        assert_eq!(
            found(ids(r#"accountId == "a&&b == \"x\"""#).await),
            ["a&&b == \"x\""]
        );
        assert_eq!(
            found(ids(r#"accountId != "old" && accountId != "new""#).await).len(),
            1
        );
        for bad in [
            "accountId",
            "accountId == ",
            "accountId ~ 1",
            "a == 1 || b == 2",
            r#"a == "open"#,
        ] {
            assert_eq!(ids(bad).await.status, 400, "{bad}");
        }
    }

    #[tokio::test]
    async fn rate_limit_answers_429_with_or_without_retry_after() {
        for retry_after in [true, false] {
            let limit = SimRateLimit {
                requests_per_second: 0.5,
                burst: 2,
                retry_after,
                window: None,
            };
            let f = Fixture::new(PendoSimConfig {
                rate_limit: Some(limit),
                ..config()
            })
            .await;
            assert_eq!(f.get(VERIFY).await.status, 200);
            assert_eq!(f.get(VERIFY).await.status, 200);
            let answer = f.get(VERIFY).await;
            assert_eq!(answer.status, 429);
            assert_eq!(answer.json(), json!({ "error": "Too Many Requests" }));
            let header = answer
                .headers
                .get("retry-after")
                .map(|v| v.to_str().unwrap());
            assert_eq!(header.is_some(), retry_after);
            assert!(header.is_none_or(|secs| secs.parse::<u64>().unwrap() >= 1));
            // Control routes are neither limited nor recorded.
            assert_eq!(f.get("/_sim/pendo/requests").await.status, 200);
            let statuses: Vec<u16> = f.sim.requests().iter().map(|r| r.status).collect();
            assert_eq!(statuses, [200, 200, 429]);
        }
    }

    /// Arrivals one period apart give or take a few milliseconds of jitter: a window of the
    /// rate admits them all, a bucket of one token refuses the punctual arrival after a late
    /// one; both refuse more than the rate.
    #[test]
    fn a_window_counts_the_rate_and_a_one_token_bucket_counts_jitter() {
        let limited = |window| {
            PendoSim::new(PendoSimConfig {
                rate_limit: Some(SimRateLimit {
                    requests_per_second: 20.0,
                    burst: 1,
                    retry_after: true,
                    window,
                }),
                ..config()
            })
        };
        let ms = Duration::from_millis;
        let start = Instant::now();
        // 20 arrivals 52 ms apart, every third 4 ms late.
        let arrivals: Vec<Instant> = (0..20u64)
            .map(|i| start + ms(52 * i + if i % 3 == 1 { 4 } else { 0 }))
            .collect();
        let refused = |sim: &PendoSim| {
            let mut st = sim.lock();
            arrivals
                .iter()
                .filter(|at| st.take_token(**at).is_err())
                .count()
        };
        let window = limited(Some(Duration::from_secs(1)));
        assert_eq!(refused(&window), 0);
        let bucket = limited(None);
        assert!(refused(&bucket) > 0, "a late arrival and a punctual one");

        // A 21st within the first arrival's second is over the rate: refused, free again once
        // the first leaves the window.
        let mut st = window.lock();
        assert_eq!(st.take_token(start + ms(999)), Err(1));
        assert_eq!(st.take_token(start + ms(1_000)), Ok(()));
        assert_eq!(st.take_token(start + ms(1_001)), Err(1));
    }

    #[tokio::test]
    async fn status_script_answers_in_order_without_applying() {
        let f = Fixture::new(config()).await;
        f.sim.add_entity(Kind::Account, "a");
        let status_script = vec![429, 408, 400, 401, 403, 500, 503];
        f.faults(PendoFaults {
            status_script: status_script.clone(),
            ..Default::default()
        });
        assert_eq!(
            f.get(VERIFY).await.status,
            200,
            "only bulk writes consume the script"
        );
        for expected in status_script {
            let answer = f.post(BULK, &set_plan("a")).await;
            assert_eq!(answer.status, expected);
            assert_eq!(answer.headers.contains_key("retry-after"), expected == 429);
            assert_eq!(answer.text.is_empty(), matches!(expected, 401 | 403));
            assert_eq!(f.plan("a"), None);
        }
        assert_eq!(f.post(BULK, &set_plan("a")).await.status, 200);
        assert_eq!(f.plan("a"), Some(json!("Pro")));
    }

    #[tokio::test]
    async fn a_batch_above_the_record_cap_is_answered_413_and_not_applied() {
        let f = Fixture::new(config()).await;
        for id in ["a", "b"] {
            f.sim.add_entity(Kind::Account, id);
        }
        f.faults(PendoFaults {
            max_batch_records: Some(1),
            ..Default::default()
        });
        let two = json!([
            { "accountId": "a", "values": { "plan": "Pro" } },
            { "accountId": "b", "values": { "plan": "Pro" } },
        ]);
        assert_eq!(f.post(BULK, &two).await.status, 413);
        assert_eq!(f.plan("a"), None);
        assert_eq!(f.post(BULK, &set_plan("a")).await.status, 200);
        assert_eq!(f.plan("a"), Some(json!("Pro")));
    }

    #[tokio::test]
    async fn error_rate_is_html_503_and_applied_then_500_applies() {
        let f = Fixture::new(config()).await;
        f.sim.add_entity(Kind::Account, "a");
        f.faults(PendoFaults {
            error_rate: 1.0,
            ..Default::default()
        });
        let answer = f.post(BULK, &set_plan("a")).await;
        assert_eq!(answer.status, 503);
        assert!(
            answer.headers["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/html")
        );
        assert!(answer.text.contains("503 Service Unavailable"));
        assert_eq!(f.plan("a"), None);
        f.faults(PendoFaults {
            applied_then_500_rate: 1.0,
            ..Default::default()
        });
        assert_eq!(f.post(BULK, &set_plan("a")).await.status, 500);
        assert_eq!(f.plan("a"), Some(json!("Pro")));
    }

    #[tokio::test]
    async fn dropped_connections_close_without_an_answer() {
        let f = Fixture::new(config()).await;
        f.sim.add_entity(Kind::Account, "a");
        // Warm a keep-alive connection first: the drop must also work on a pooled connection.
        assert_eq!(f.get(VERIFY).await.status, 200);
        f.faults(PendoFaults {
            drop_rate: 1.0,
            ..Default::default()
        });
        for _ in 0..3 {
            let err = f.try_post(BULK, &set_plan("a")).await.err().unwrap();
            assert!(err.status().is_none(), "{err:?}");
        }
        // On the wire: the request goes out and the socket closes without a byte coming back.
        let mut raw = TcpStream::connect(f.server.addr).await.unwrap();
        let req = format!("GET {VERIFY} HTTP/1.1\r\nhost: x\r\n{KEY_HEADER}: {KEY}\r\n\r\n");
        raw.write_all(req.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        let _ = raw.read_to_end(&mut answer).await;
        assert!(answer.is_empty());
        assert_eq!(f.plan("a"), None);
        let statuses: Vec<u16> = f.sim.requests().iter().map(|r| r.status).collect();
        assert_eq!(statuses, [200, 0, 0, 0, 0]);
        f.faults(PendoFaults::default());
        assert_eq!(f.post(BULK, &set_plan("a")).await.status, 200);
        f.server.shutdown().await;
    }

    #[tokio::test]
    async fn latency_delays_every_request() {
        let f = Fixture::new(config()).await;
        f.faults(PendoFaults {
            latency: Duration::from_millis(150),
            ..Default::default()
        });
        let started = Instant::now();
        assert_eq!(f.get(VERIFY).await.status, 200);
        assert!(started.elapsed() >= Duration::from_millis(150));
    }

    #[tokio::test]
    async fn control_routes_read_state_and_set_faults() {
        let f = Fixture::new(config()).await;
        f.sim.set_value(Kind::Account, "a", "plan", json!("Pro"));
        assert_eq!(f.get(VERIFY).await.status, 200);
        let values = f.get("/_sim/pendo/values/account").await.json();
        assert_eq!(values, json!({ "a": { "plan": "Pro" } }));
        let log = f.get("/_sim/pendo/requests").await.json();
        assert_eq!(log.as_array().unwrap().len(), 1);
        assert_eq!(log[0]["path"], VERIFY);
        let faults = json!({ "latency_ms": 5, "status_script": [408] });
        assert_eq!(f.post("/_sim/pendo/faults", &faults).await.status, 204);
        assert_eq!(f.post(BULK, &json!([])).await.status, 408);
        assert_eq!(
            f.post("/_sim/pendo/faults", &json!({ "nope": 1 }))
                .await
                .status,
            400
        );
        let reset = f.call(reqwest::Method::DELETE, "/_sim/pendo/requests", None, None);
        assert_eq!(reset.await.unwrap().status, 204);
        assert!(f.sim.requests().is_empty());
        f.sim.clear_all_values(Kind::Account);
        assert_eq!(f.sim.values(Kind::Account)["a"], BTreeMap::new());
    }
}
