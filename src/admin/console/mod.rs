//! The console (DESIGN "The console"): web pages on the admin port for the RevOps analyst who
//! asks "is the sync healthy, what is stuck, why is this account wrong?".
//!
//! It owns the pages and their assets and nothing else: the overview renders the status model
//! (the same document as `status --format json`, `/v1/status` and the gauges of `/metrics`), the
//! lists page through the state by key, the provenance page renders [`crate::why`], and every
//! action is a `fetch` from `console.js` to the JSON routes of the admin port with the admin
//! token, so a page never changes anything by itself and an action needs exactly what the API
//! needs. The token is typed once and kept in the tab's sessionStorage: never in a URL (logs,
//! history, Referer) nor a cookie (a cross-site form could ride on it).
//!
//! All assets are compiled into the binary: the service often runs where no CDN is reachable.

mod views;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use maud::Markup;
use serde::Deserialize;

use super::Shared;
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

/// "Check live": spends CRM and Pendo quota, so it needs the token, like `/v1/why?live=true`.
async fn why_live(
    State(service): State<Shared>,
    headers: HeaderMap,
    Path((kind, id)): Path<(String, String)>,
) -> Response {
    if let Some(refused) = super::refuse_without_token(&service, &headers) {
        return refused;
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
