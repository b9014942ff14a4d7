//! The admin port (`admin.listen`, loopback by default) and its two clients.
//!
//! Server (axum), for `pendo-sync run`:
//!
//! | route | answers |
//! |---|---|
//! | `GET /healthz` | 200 while the process is alive |
//! | `GET /readyz` | 200, or 503 with `{"ready": false, "reasons": [...]}` (see [`Service::readiness`]) |
//! | `GET /metrics` | Prometheus text; outbox gauges refreshed from the state file first |
//! | `GET /v1/status` | the document of `status --format json` |
//! | `POST /v1/resync` | operator; optional `mapping`, `kind` (JSON body or query); 202 with an id |
//! | `GET /v1/resync/{id}` | that resync's progress: state, records read, changes, pushed |
//! | `GET /v1/why/{kind}/{id}` | one id's provenance (`why --format json`); `?live=true` needs the operator |
//! | `GET /v1/holds`, `GET /v1/holds/{id}` | the guard's holds |
//! | `POST /v1/holds/{id}/approve|reject` | operator; `{"reason": "..."}` optional |
//! | `POST /v1/queue/retry|drop` | operator; `{"state", "kind", "id"}` (drop: a state or an id) |
//! | `GET /`, `/queue/{state}`, `/why/...`, `/holds/...`, `/assets/...` | the console ([`console`]) |
//! | `GET|POST /signin`, `POST /signout`, `GET /session` | the console's sign-in ([`auth`]) |
//!
//! Every answer carries a strict Content-Security-Policy (scripts and styles from this origin
//! only, no framing), `X-Content-Type-Options: nosniff` and `Referrer-Policy: no-referrer`.
//!
//! Who may do what is [`auth`]'s: the probes and `/metrics` answer anyone; reading CRM data (the
//! console, `/v1/*`) needs the viewer or operator role where `admin.read_auth` is on (the default
//! off loopback); actions need the operator role, and without any way to get it (no
//! `admin.token`) they answer 403: an open port on a shared host must not let anyone start a
//! full resync.
//!
//! Clients, for the CLI: [`hand_off_resync`] (`resync` while a service holds the state file) and
//! [`healthcheck`] (the Docker HEALTHCHECK; the slim image has no curl).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use secrecy::ExposeSecret;
use serde::Deserialize;
use serde_json::json;
use tokio::net::TcpListener;

use crate::app::AppError;
use crate::cli::KindArg;
use crate::config::{ConfigError, Settings};
use crate::domain::Kind;
use crate::service::Service;
use crate::store::{QueueFilter, QueueState};

pub mod auth;
mod console;

use auth::{Auth, Caller};

type Shared = Arc<Service>;

/// Serves the admin routes until the service's token is cancelled.
pub async fn serve(service: Shared, listener: TcpListener) -> std::io::Result<()> {
    let stop = service.cancel.clone();
    let auth = Auth::new(&service.settings.admin, service.admin_tokens());
    if !auth.reads_need_credentials() && !service.settings.admin.is_loopback() {
        tracing::warn!(
            listen = %service.settings.admin.listen,
            "admin.read_auth = false on a port beyond loopback: anyone who reaches it reads CRM data."
        );
    }
    if auth.reads_need_credentials()
        && !auth.sign_in_possible()
        && service.settings.admin.trusted_user_header.is_none()
    {
        tracing::warn!(
            "Reading the console and /v1 needs a credential here, and none is configured: set admin.token or admin.viewer_token (or a trusted sign-in proxy)."
        );
    }
    axum::serve(
        listener,
        router(service, auth).into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(stop.cancelled_owned())
    .await
}

pub fn router(service: Shared, auth: Auth) -> Router {
    let auth = Arc::new(auth);
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/status", get(status))
        .route("/v1/resync", post(resync))
        .route("/v1/resync/{id}", get(resync_progress))
        .route("/v1/why/{kind}/{id}", get(why))
        .route("/v1/holds", get(holds_list))
        .route("/v1/holds/{id}", get(hold_show))
        .route("/v1/holds/{id}/{decision}", post(hold_decide))
        .route("/v1/queue/{action}", post(queue_action))
        .merge(console::router())
        .layer(axum::middleware::from_fn_with_state(
            auth.clone(),
            auth::gate,
        ))
        .layer(Extension(auth))
        .layer(axum::middleware::map_response(security_headers))
        .with_state(service)
}

/// The console shows CRM data: no script but ours runs (`script-src 'self'`, no inline), nothing
/// frames it (clickjacking an approve button), and no URL leaks to another site.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'";

async fn security_headers(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        header::HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        header::HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        header::HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        header::X_FRAME_OPTIONS,
        header::HeaderValue::from_static("DENY"),
    );
    resp
}

async fn readyz(State(service): State<Shared>) -> Response {
    // A standby is ready to take over when it can read the state: its work is waiting.
    if !service.is_leader() {
        return match service.store.ping().await {
            Ok(()) => (
                StatusCode::OK,
                axum::Json(json!({"ready": true, "role": "standby"})),
            )
                .into_response(),
            Err(e) => (
                StatusCode::SERVICE_UNAVAILABLE,
                axum::Json(json!({"ready": false, "role": "standby", "reasons": [format!("{} not usable: {e}", crate::store::state_kind(service.store.path()))]})),
            )
                .into_response(),
        };
    }
    match service.readiness().await {
        Ok(()) => (
            StatusCode::OK,
            axum::Json(json!({"ready": true, "role": "leader"})),
        )
            .into_response(),
        Err(reasons) => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"ready": false, "reasons": reasons})),
        )
            .into_response(),
    }
}

async fn metrics(State(service): State<Shared>) -> Response {
    let Some(handle) = service.metrics_handle() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "metrics recorder not installed\n",
        )
            .into_response();
    };
    // The gauges that describe the state are as of their last read (a second after a change
    // of this process's, five seconds at most): a scrape reads nothing from the state, so it
    // costs the same at any size and answers while the state does not.
    service.state_gauges_for_scrape().await;
    service.refresh_leader_gauge();
    handle.run_upkeep();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        handle.render(),
    )
        .into_response()
}

async fn status(State(service): State<Shared>) -> Response {
    match crate::status::status_report(&service.settings, &service.store).await {
        Ok(report) => axum::Json(report).into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            axum::Json(json!({"error": e.to_string()})),
        )
            .into_response(),
    }
}

/// `mapping` and `kind`, from the query string or a JSON body (the body wins).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ResyncParams {
    mapping: Option<String>,
    kind: Option<String>,
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, axum::Json(json!({"error": message}))).into_response()
}

/// A POST's optional JSON body: `empty()` when it sent none, else the body parsed; the error
/// is the 400's message.
fn json_body<T: serde::de::DeserializeOwned>(
    body: &Bytes,
    empty: impl FnOnce() -> T,
) -> Result<T, String> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(empty());
    }
    serde_json::from_slice(body).map_err(|e| format!("bad JSON body: {e}"))
}

/// An optional `kind` parameter; the error is the 400's message.
fn kind_param(kind: Option<&str>) -> Result<Option<Kind>, String> {
    kind.map(|k| {
        Kind::parse(k).ok_or_else(|| format!("kind must be visitor or account, got {k:?}"))
    })
    .transpose()
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct WhyParams {
    field: Option<String>,
    limit: Option<u32>,
    live: Option<bool>,
}

/// `GET /v1/why/{kind}/{id}`: the JSON of `why --format json`. `?live=true` needs the operator,
/// since it spends CRM and Pendo quota.
async fn why(
    State(service): State<Shared>,
    Extension(auth): Extension<Arc<Auth>>,
    Extension(caller): Extension<Caller>,
    Path((kind, id)): Path<(String, String)>,
    Query(params): Query<WhyParams>,
) -> Response {
    let Some(kind) = Kind::parse(&kind) else {
        return error(
            StatusCode::NOT_FOUND,
            "use /v1/why/account/{id} or /v1/why/visitor/{id}",
        );
    };
    let live = params.live.unwrap_or(false);
    if live && let Err(refused) = caller.operator(&auth) {
        return *refused;
    }
    let options = crate::why::WhyOptions {
        field: params.field,
        limit: params.limit.unwrap_or(crate::why::DEFAULT_LIMIT).min(1_000),
        live,
    };
    match service.why(kind, &id, &options).await {
        Ok(report) => axum::Json(report).into_response(),
        Err(e @ crate::why::WhyError::Unknown { .. }) => {
            error(StatusCode::NOT_FOUND, &e.to_string())
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

async fn holds_list(State(service): State<Shared>) -> Response {
    match service.store.holds(false).await {
        Ok(holds) => axum::Json(json!({ "holds": holds })).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

async fn hold_show(State(service): State<Shared>, Path(id): Path<i64>) -> Response {
    match service.store.hold(id).await {
        Ok(Some(hold)) => axum::Json(hold).into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, &format!("no hold {id}")),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DecisionBody {
    reason: Option<String>,
}

/// `POST /v1/holds/{id}/approve|reject` by an operator (recorded as who decided); `{"reason": "..."}` optional.
async fn hold_decide(
    State(service): State<Shared>,
    Extension(auth): Extension<Arc<Auth>>,
    Extension(caller): Extension<Caller>,
    Path((id, decision)): Path<(i64, String)>,
    body: Bytes,
) -> Response {
    let who = match caller.operator(&auth) {
        Ok(who) => who,
        Err(refused) => return *refused,
    };
    let approve = match decision.as_str() {
        "approve" => true,
        "reject" => false,
        _ => return error(StatusCode::NOT_FOUND, "use /approve or /reject"),
    };
    let params = match json_body(&body, DecisionBody::default) {
        Ok(p) => p,
        Err(message) => return error(StatusCode::BAD_REQUEST, &message),
    };
    match service
        .decide_hold(id, approve, &who, params.reason.as_deref())
        .await
    {
        Ok(hold) => axum::Json(hold).into_response(),
        Err(crate::store::HoldError::Unknown(_)) => {
            error(StatusCode::NOT_FOUND, &format!("no hold {id}"))
        }
        Err(e @ crate::store::HoldError::Decided { .. }) => {
            error(StatusCode::CONFLICT, &e.to_string())
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct QueueParams {
    state: Option<String>,
    kind: Option<String>,
    id: Option<String>,
    /// With `state = "invalid"`: the mapping whose record it is (a CRM id can be set aside by
    /// two mappings of one object).
    mapping: Option<String>,
}

/// `POST /v1/queue/retry|drop` by an operator: `queue retry|drop` over the admin port.
/// `state = "invalid"` drops records set aside (by CRM id). A drop names a state or an id: the
/// whole outbox is not dropped by one click.
async fn queue_action(
    State(service): State<Shared>,
    Extension(auth): Extension<Arc<Auth>>,
    Extension(caller): Extension<Caller>,
    Path(action): Path<String>,
    body: Bytes,
) -> Response {
    let who = match caller.operator(&auth) {
        Ok(who) => who,
        Err(refused) => return *refused,
    };
    let retry = match action.as_str() {
        "retry" => true,
        "drop" => false,
        _ => {
            return error(
                StatusCode::NOT_FOUND,
                "use /v1/queue/retry or /v1/queue/drop",
            );
        }
    };
    let params = match json_body(&body, QueueParams::default) {
        Ok(p) => p,
        Err(message) => return error(StatusCode::BAD_REQUEST, &message),
    };
    let kind = match kind_param(params.kind.as_deref()) {
        Ok(k) => k,
        Err(message) => return error(StatusCode::BAD_REQUEST, &message),
    };
    let state = match params.state.as_deref() {
        None => None,
        Some("invalid") => {
            if retry {
                return error(
                    StatusCode::BAD_REQUEST,
                    "records set aside are not retried: fix them in the CRM, or drop them",
                );
            }
            let n = service
                .store
                .drop_invalid(params.mapping.as_deref(), params.id.as_deref())
                .await;
            return match n {
                Ok(n) => axum::Json(json!({ "dropped": n })).into_response(),
                Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
            };
        }
        Some(s) => match <QueueState as clap::ValueEnum>::from_str(s, false) {
            Ok(s) => Some(s),
            Err(_) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    &format!(
                        "state must be one of staged, pending, held, unmatched, dead, invalid; got {s:?}"
                    ),
                );
            }
        },
    };
    if params.mapping.is_some() {
        return error(
            StatusCode::BAD_REQUEST,
            "mapping selects records set aside (state \"invalid\") only",
        );
    }
    if !retry && state.is_none() && params.id.is_none() {
        return error(
            StatusCode::BAD_REQUEST,
            "name a state or an id: dropping the whole outbox is not offered here",
        );
    }
    let filter = QueueFilter {
        state,
        kind,
        pendo_id: params.id,
    };
    match service.queue_action(retry, &filter, &who).await {
        Ok(n) if retry => axum::Json(json!({ "retried": n })).into_response(),
        Ok(n) => axum::Json(json!({ "dropped": n })).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

async fn resync(
    State(service): State<Shared>,
    Extension(auth): Extension<Arc<Auth>>,
    Extension(caller): Extension<Caller>,
    Query(query): Query<ResyncParams>,
    body: Bytes,
) -> Response {
    if let Err(refused) = caller.operator(&auth) {
        return *refused;
    }
    let params = match json_body(&body, || query) {
        Ok(p) => p,
        Err(message) => return error(StatusCode::BAD_REQUEST, &message),
    };
    let kind = match kind_param(params.kind.as_deref()) {
        Ok(k) => k,
        Err(message) => return error(StatusCode::BAD_REQUEST, &message),
    };
    match service
        .request_resync(params.mapping.as_deref(), kind)
        .await
    {
        Ok(status) => (
            StatusCode::ACCEPTED,
            [(header::LOCATION, format!("/v1/resync/{}", status.id))],
            axum::Json(status),
        )
            .into_response(),
        Err(crate::service::ResyncRequestError::Invalid(e)) => error(StatusCode::BAD_REQUEST, &e),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    }
}

async fn resync_progress(State(service): State<Shared>, Path(id): Path<String>) -> Response {
    match service.resync_status(&id).await {
        Some(status) => axum::Json(status).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            "no such resync (finished jobs are kept for history.retention)",
        ),
    }
}

// ---- clients -------------------------------------------------------------------------------

/// `http://host:port` for reaching `admin.listen` from this machine: a wildcard bind address is
/// reached over loopback.
pub fn admin_url(settings: &Settings) -> Result<String, ConfigError> {
    let mut addr: SocketAddr = settings.admin.listen.parse().map_err(|_| {
        ConfigError::new("admin.listen", "must be an address such as 127.0.0.1:9464")
    })?;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        });
    }
    Ok(format!("http://{addr}"))
}

fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("the HTTP client builds")
}

/// `pendo-sync healthcheck`: 0 if `/readyz` answers 200, else 1 (with the reasons on stderr).
pub async fn healthcheck(settings: &Settings) -> Result<u8, AppError> {
    let url = format!("{}/readyz", admin_url(settings)?);
    match http_client().get(&url).send().await {
        Ok(resp) if resp.status() == reqwest::StatusCode::OK => {
            println!("ready");
            Ok(0)
        }
        Ok(resp) => {
            let status = resp.status();
            let body = resp.text().await.unwrap_or_default();
            eprintln!("not ready ({status}): {}", body.trim());
            Ok(1)
        }
        Err(e) => {
            eprintln!("not ready: cannot reach {url}: {e}");
            Ok(1)
        }
    }
}

/// `resync` while a service holds the state file: ask it over the admin port, then (unless
/// `no_wait`) follow the job until it ends. Exit 0 when it is done, 1 when it failed.
/// Sends a request to the running service's admin port: its status and JSON body (empty when
/// it sent none), or the error saying the port does not answer.
async fn ask_service(
    request: reqwest::RequestBuilder,
    base: &str,
) -> Result<(reqwest::StatusCode, serde_json::Value), AppError> {
    let resp = request.send().await.map_err(|e| {
        AppError::Runtime(format!(
            "a pendo-sync run holds the state file but its admin port {base} does not answer: {e}"
        ))
    })?;
    let status = resp.status();
    Ok((status, resp.json().await.unwrap_or_default()))
}

/// `why --live` while a `run` holds the state file: the service reads the CRM and Pendo through
/// its own clients (its limiters, and its refresh tokens: a second login from the CLI could
/// rotate a token the service still uses), and answers `GET /v1/why/...?live=true`.
pub async fn why_via_service(
    settings: &Settings,
    kind: Kind,
    id: &str,
    options: &crate::why::WhyOptions,
) -> Result<crate::why::WhyReport, AppError> {
    let base = admin_url(settings)?;
    let token = settings.admin.token_source.resolve("admin.token").map_err(|e| {
        AppError::Runtime(format!(
            "a pendo-sync run holds the state file, so `why --live` reads through its admin port, which needs the token: {e}"
        ))
    })?;
    let mut query = vec![
        ("live", "true".to_owned()),
        ("limit", options.limit.to_string()),
    ];
    if let Some(f) = &options.field {
        query.push(("field", f.clone()));
    }
    // The id is a path segment: percent-encoded, whatever characters it holds.
    let mut url = reqwest::Url::parse(&base)
        .map_err(|e| AppError::Runtime(format!("admin.listen gives no URL ({base}): {e}")))?;
    url.path_segments_mut()
        .map_err(|()| AppError::Runtime(format!("admin.listen gives no URL ({base})")))?
        .extend(["v1", "why", kind.as_str(), id]);
    let (status, body) = ask_service(
        http_client()
            .get(url)
            .query(&query)
            .bearer_auth(token.expose_secret()),
        &base,
    )
    .await?;
    if !status.is_success() {
        return Err(AppError::Runtime(body["error"].as_str().map_or_else(
            || format!("the running service answered {status}"),
            str::to_owned,
        )));
    }
    serde_json::from_value(body)
        .map_err(|e| AppError::Runtime(format!("the running service's answer: {e}")))
}

pub async fn hand_off_resync(
    settings: &Settings,
    mapping: Option<&str>,
    kind: Option<KindArg>,
    no_wait: bool,
    holder_pid: Option<u32>,
) -> Result<u8, AppError> {
    let base = admin_url(settings)?;
    let token = settings.admin.token_source.resolve("admin.token").map_err(|e| {
        AppError::Runtime(format!(
            "a pendo-sync run (pid {}) holds the state file, so this resync must go through its admin port, which needs the token: {e}",
            holder_pid.map_or_else(|| "unknown".to_owned(), |p| p.to_string())
        ))
    })?;
    let kind = kind.map(|k| Kind::from(k).as_str());
    let client = http_client();
    let (status, body) = ask_service(
        client
            .post(format!("{base}/v1/resync"))
            .bearer_auth(token.expose_secret())
            .json(&json!({"mapping": mapping, "kind": kind})),
        &base,
    )
    .await?;
    if status != reqwest::StatusCode::ACCEPTED {
        return Err(AppError::Runtime(format!(
            "the running service refused the resync ({status}): {}",
            body["error"].as_str().unwrap_or("no reason given")
        )));
    }
    let id = body["id"].as_str().unwrap_or_default().to_owned();
    println!("resync {id} handed to the running service");
    if no_wait {
        println!("follow it with: GET {base}/v1/resync/{id}");
        return Ok(0);
    }
    follow_resync(&id, || async {
        match client.get(format!("{base}/v1/resync/{id}")).send().await {
            Ok(r) if r.status().is_success() => Ok(r.json().await.unwrap_or_default()),
            Ok(r) => Err(format!(
                "the service answered {} (was it restarted?)",
                r.status()
            )),
            Err(e) => Err(e.to_string()),
        }
    })
    .await
}

/// Prints a resync's progress as it changes until it ends: exit 0 when done, 4 when done with
/// changes held by the guard (as an in-process resync), 1 when it failed. `fetch` reads the
/// job's document (the admin port's, or the state's row).
pub async fn follow_resync<F, Fut>(id: &str, mut fetch: F) -> Result<u8, AppError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<serde_json::Value, String>>,
{
    let mut last = String::new();
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let job = fetch()
            .await
            .map_err(|e| AppError::Runtime(format!("lost track of resync {id}: {e}")))?;
        let state = job["state"].as_str().unwrap_or("unknown");
        let line = format!(
            "resync {id}: {state}, {} records read, {} changes, {} pushed",
            job["records_read"], job["changes"], job["pushed"]
        );
        if line != last {
            println!("{line}");
            last = line;
        }
        match state {
            "done" => {
                let held: Vec<&str> = job["held"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|h| h.as_str())
                    .collect();
                for h in &held {
                    println!("resync {id}: HELD by the guard: {h}");
                }
                return Ok(if held.is_empty() { 0 } else { 4 });
            }
            "failed" => {
                println!(
                    "resync {id} FAILED: {}",
                    job["error"].as_str().unwrap_or("no reason given")
                );
                return Ok(1);
            }
            _ => {}
        }
    }
}
