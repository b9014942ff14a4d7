//! The console (DESIGN "The console"): web pages on the admin port for the RevOps analyst who
//! asks "is the sync healthy, what is stuck, why is this account wrong?".
//!
//! It owns the pages and their assets and nothing else: the overview renders the status model
//! (the same document as `status --format json`, `/v1/status` and the gauges of `/metrics`), the
//! lists page through the state by key, the provenance page renders [`crate::why`], and every
//! action is a `fetch` from `console.js` to the JSON routes of the admin port, so a page never
//! changes anything by itself and an action needs exactly what the API needs. A person signs
//! in once with a token (`/signin`, a plain form: the token travels in a POST body, never in a
//! URL); the session is a signed cookie and every action carries its `X-CSRF-Token` (see
//! [`super::auth`]).
//!
//! All assets are compiled into the binary: the service often runs where no CDN is reachable.

mod views;

use std::sync::Arc;

use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use maud::Markup;
use serde::Deserialize;

use super::Shared;
use super::auth::{Auth, Caller};
use crate::domain::{Kind, now_ms};
use crate::store::{InvalidCursor, OutboxCursor, QueueState};

const CSS: &str = include_str!("console.css");
const JS: &str = include_str!("console.js");

/// The console's routes (read-only: actions go to the `/v1` routes).
pub fn router() -> Router<Shared> {
    Router::new()
        .route("/", get(overview))
        .route("/queue/{state}", get(list))
        .route("/why", get(search))
        .route("/why/{kind}/{id}", get(why))
        .route("/why/{kind}/{id}/live", get(why_live))
        .route("/holds", get(holds))
        .route("/holds/{id}", get(hold))
        .route("/signin", get(sign_in_form).post(sign_in))
        .route("/signout", post(sign_out))
        .route("/session", get(session))
        .route("/assets/console.css", get(|| asset("text/css", CSS)))
        .route("/assets/console.js", get(|| asset("text/javascript", JS)))
}

async fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            // Assets change with the binary; a restart must not leave an old script running.
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

fn page(markup: Markup) -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        markup.into_string(),
    )
        .into_response()
}

fn problem(status: StatusCode, title: &str, message: &str) -> Response {
    let mut resp = page(views::problem(title, message, now_ms()));
    *resp.status_mut() = status;
    resp
}

fn failed(e: impl std::fmt::Display) -> Response {
    problem(
        StatusCode::INTERNAL_SERVER_ERROR,
        "The state could not be read",
        &e.to_string(),
    )
}

async fn overview(State(service): State<Shared>) -> Response {
    match crate::status::status_report(&service.settings, &service.store).await {
        Ok(report) => page(views::overview(&report, now_ms())),
        Err(e) => failed(e),
    }
}

#[derive(Debug, Default, Deserialize)]
struct ListParams {
    #[serde(default)]
    id: String,
    /// The last row of the previous page (JSON, from the "next page" link).
    after: Option<String>,
}

async fn list(
    State(service): State<Shared>,
    Path(state): Path<String>,
    Query(params): Query<ListParams>,
) -> Response {
    let Some((state, label)) = views::LISTS.iter().find(|(s, _)| *s == state) else {
        return problem(
            StatusCode::NOT_FOUND,
            "No such list",
            "the lists are pending, unmatched, dead, invalid, held and staged",
        );
    };
    let id = params.id.trim();
    let prefix = (!id.is_empty()).then_some(id);
    let now = now_ms();
    let bad_cursor = || {
        problem(
            StatusCode::BAD_REQUEST,
            "Bad page link",
            "the `after` parameter is not a page link of this list: start from the first page",
        )
    };
    if *state == "invalid" {
        let Ok(after) = cursor::<InvalidCursor>(params.after.as_deref()) else {
            return bad_cursor();
        };
        return match service
            .store
            .invalid_page(prefix, after.as_ref(), views::PAGE_SIZE)
            .await
        {
            Ok(p) => page(views::invalid_list(
                |m| service.settings.mapping(m).ok().map(|m| m.kind),
                id,
                &p,
                after.is_some(),
                now,
            )),
            Err(e) => failed(e),
        };
    }
    let queue_state = match *state {
        "staged" => QueueState::Staged,
        "pending" => QueueState::Pending,
        "held" => QueueState::Held,
        "unmatched" => QueueState::Unmatched,
        _ => QueueState::Dead,
    };
    let Ok(after) = cursor::<OutboxCursor>(params.after.as_deref()) else {
        return bad_cursor();
    };
    match service
        .store
        .outbox_page(queue_state, prefix, after.as_ref(), views::PAGE_SIZE)
        .await
    {
        Ok(p) => page(views::outbox_list(
            state,
            label,
            id,
            &p,
            after.is_some(),
            now,
        )),
        Err(e) => failed(e),
    }
}

/// The `after` parameter of a "next page" link: none, or a cursor of this list.
fn cursor<C: serde::de::DeserializeOwned>(after: Option<&str>) -> Result<Option<C>, ()> {
    after
        .map(|a| serde_json::from_str(a).map_err(|_| ()))
        .transpose()
}

#[derive(Debug, Default, Deserialize)]
struct SearchParams {
    #[serde(default)]
    kind: String,
    #[serde(default)]
    id: String,
}

/// The search box: `/why?kind=account&id=X` → `/why/account/X`.
async fn search(Query(params): Query<SearchParams>) -> Response {
    let kind = Kind::parse(&params.kind).unwrap_or(Kind::Account);
    let id = params.id.trim();
    if id.is_empty() {
        return problem(
            StatusCode::BAD_REQUEST,
            "No id",
            "type a Pendo id to look up",
        );
    }
    Redirect::to(&views::why_href(kind, id)).into_response()
}

/// Events the provenance page lists.
const WHY_EVENTS: u32 = 25;

async fn why(State(service): State<Shared>, Path((kind, id)): Path<(String, String)>) -> Response {
    let Some(kind) = Kind::parse(&kind) else {
        return problem(
            StatusCode::NOT_FOUND,
            "No such kind",
            "ids are looked up as /why/account/ID or /why/visitor/ID",
        );
    };
    let options = crate::why::WhyOptions {
        field: None,
        limit: WHY_EVENTS,
        live: false,
    };
    match service.why(kind, &id, &options).await {
        Ok(report) => page(views::why(&report, now_ms())),
        Err(e @ crate::why::WhyError::Unknown { .. }) => {
            problem(StatusCode::NOT_FOUND, "Unknown id", &e.to_string())
        }
        Err(e) => failed(e),
    }
}

/// "Check live": spends CRM and Pendo quota, so it needs the operator, like `/v1/why?live=true`.
async fn why_live(
    State(service): State<Shared>,
    Extension(auth): Extension<Arc<Auth>>,
    Extension(caller): Extension<Caller>,
    Path((kind, id)): Path<(String, String)>,
) -> Response {
    if let Err(refused) = caller.operator(&auth) {
        return *refused;
    }
    let Some(kind) = Kind::parse(&kind) else {
        return super::error(StatusCode::NOT_FOUND, "no such kind");
    };
    let options = crate::why::WhyOptions {
        field: None,
        limit: 0,
        live: true,
    };
    match service.why(kind, &id, &options).await {
        Ok(report) => page(views::why_live(&report)),
        Err(e @ crate::why::WhyError::Unknown { .. }) => {
            super::error(StatusCode::NOT_FOUND, &e.to_string())
        }
        Err(e) => super::error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

async fn holds(State(service): State<Shared>) -> Response {
    match service.store.holds(false).await {
        Ok(mut holds) => {
            holds.sort_by_key(|h| std::cmp::Reverse(h.id));
            page(views::holds(&holds, now_ms()))
        }
        Err(e) => failed(e),
    }
}

async fn hold(State(service): State<Shared>, Path(id): Path<String>) -> Response {
    let Ok(id) = id.parse::<i64>() else {
        return problem(
            StatusCode::NOT_FOUND,
            "No such hold",
            "hold ids are numbers",
        );
    };
    match service.store.hold(id).await {
        Ok(Some(h)) => page(views::hold(&h, now_ms())),
        Ok(None) => problem(
            StatusCode::NOT_FOUND,
            "No such hold",
            &format!("no hold {id}"),
        ),
        Err(e) => failed(e),
    }
}

/// A path of this port to go to after signing in: anything else (another site, `//host`) is
/// the overview.
fn local_path(next: &str) -> &str {
    let ok = next.starts_with('/')
        && !next.starts_with("//")
        && !next.contains('\\')
        && !next.chars().any(char::is_control);
    if ok { next } else { "/" }
}

/// The sign-in page with `status` (401 where a page was refused, 200 when asked for).
pub(super) fn sign_in_page(auth: &Auth, status: StatusCode, next: &str, message: &str) -> Response {
    let mut resp = page(views::sign_in(
        local_path(next),
        message,
        auth.sign_in_possible(),
        now_ms(),
    ));
    *resp.status_mut() = status;
    resp
}

#[derive(Debug, Default, Deserialize)]
struct SignInParams {
    #[serde(default)]
    next: String,
}

async fn sign_in_form(
    Extension(auth): Extension<Arc<Auth>>,
    Query(params): Query<SignInParams>,
) -> Response {
    sign_in_page(
        &auth,
        StatusCode::OK,
        &params.next,
        "Sign in with the operator token (reads and actions) or the viewer token (reads).",
    )
}

/// `POST /signin` (a form: `token`, `next`): a session cookie and a redirect, or the form
/// again. A request from a page of another site (its `Origin` names another host) is refused.
async fn sign_in(Extension(auth): Extension<Arc<Auth>>, request: Request) -> Response {
    let headers = request.headers().clone();
    let peer = super::auth::peer(&request);
    if !same_origin(&headers) {
        return super::error(
            StatusCode::FORBIDDEN,
            "cross-site sign-in refused: sign in from this port's own page",
        );
    }
    let Ok(body) = axum::body::to_bytes(request.into_body(), 64 * 1024).await else {
        return super::error(StatusCode::BAD_REQUEST, "the form is too large");
    };
    let (mut token, mut next) = (String::new(), String::from("/"));
    for (k, v) in url::form_urlencoded::parse(&body) {
        match &*k {
            "token" => token = v.into_owned(),
            "next" => next = v.into_owned(),
            _ => {}
        }
    }
    let now = u64::try_from(now_ms() / 1000).unwrap_or(0);
    let secure = auth.behind_https_proxy(&headers, peer);
    match auth
        .sign_in(&token)
        .and_then(|role| auth.session_cookie(role, secure, now))
    {
        Some(cookie) => (
            StatusCode::SEE_OTHER,
            [
                (header::SET_COOKIE, cookie),
                (header::LOCATION, local_path(&next).to_owned()),
            ],
        )
            .into_response(),
        None => {
            // A pause per wrong guess: the tokens are long, but a loop of guesses should crawl.
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            sign_in_page(
                &auth,
                StatusCode::UNAUTHORIZED,
                &next,
                "That is not a token of this port (admin.token or admin.viewer_token).",
            )
        }
    }
}

/// Whether a request may come from this port's own page: a browser that says it comes from
/// another site (`Sec-Fetch-Site: cross-site`) or names another origin is refused. `Origin:
/// null` is what a form of our own sends under `Referrer-Policy: no-referrer`.
fn same_origin(headers: &HeaderMap) -> bool {
    let fetch_site = headers
        .get("sec-fetch-site")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if fetch_site.eq_ignore_ascii_case("cross-site") {
        return false;
    }
    let Some(origin) = headers
        .get(header::ORIGIN)
        .and_then(|v| v.to_str().ok())
        .filter(|o| *o != "null")
    else {
        return true;
    };
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    origin
        .split_once("://")
        .is_some_and(|(_, rest)| rest.eq_ignore_ascii_case(host))
}

/// `POST /signout` (from console.js, with the session's `X-CSRF-Token`): the cookie is
/// dropped by the browser.
async fn sign_out(Extension(auth): Extension<Arc<Auth>>) -> Response {
    (
        StatusCode::NO_CONTENT,
        [(header::SET_COOKIE, auth.expired_cookie())],
    )
        .into_response()
}

/// `GET /session`: who this browser is signed in as, and the value its actions carry in
/// `X-CSRF-Token` (console.js asks once per page; another site cannot read the answer).
async fn session(
    Extension(auth): Extension<Arc<Auth>>,
    Extension(caller): Extension<Caller>,
) -> Response {
    let mut resp = axum::Json(match &caller.0 {
        Some(p) => serde_json::json!({
            "signed_in": true,
            "role": p.role.as_str(),
            "who": p.who,
            "via": match p.via {
                super::auth::Via::Bearer => "bearer",
                super::auth::Via::Session(_) => "session",
                super::auth::Via::Proxy => "proxy",
            },
            "csrf": auth.csrf_token(p),
        }),
        None => serde_json::json!({
            "signed_in": false,
            "can_sign_in": auth.sign_in_possible(),
            "reads_need_credentials": auth.reads_need_credentials(),
        }),
    })
    .into_response();
    resp.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    resp
}
