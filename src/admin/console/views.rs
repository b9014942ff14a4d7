//! The console's HTML, as maud templates: every interpolated value is escaped by the template
//! engine (CRM ids and values are untrusted), and nothing here uses `PreEscaped` on data. No
//! inline script or style: the page's behaviour is `/assets/console.js`, its look
//! `/assets/console.css`, so the Content-Security-Policy can forbid everything inline.
//!
//! Every number the overview shows from the status model carries `data-status`, the JSON
//! pointer of the same number in `status --format json` (and `data-value` where the text is a
//! friendlier form of it, such as "12 s ago"), so the browser tests can check them all.

use maud::{DOCTYPE, Markup, html};

use crate::domain::Kind;
use crate::status::StatusReport;
use crate::store::{
    ChartSlot, Hold, InvalidCursor, InvalidRecord, OutboxCursor, OutboxEntry, Page, RunRecord,
};
use crate::why::{FieldStory, WhyReport};

/// The lists the console pages through, in the order of the navigation.
pub const LISTS: [(&str, &str); 6] = [
    ("pending", "Pending"),
    ("unmatched", "Unmatched"),
    ("dead", "Dead"),
    ("invalid", "Invalid"),
    ("held", "Held"),
    ("staged", "Staged"),
];

/// Rows per list page.
pub const PAGE_SIZE: u32 = 50;

/// `2026-11-20 14:02:01 UTC`.
fn when(ms: i64) -> String {
    crate::why::when(ms)
}

/// "12 s ago", "5 min ago", "3 h ago", "2 d ago".
fn ago(now: i64, at: i64) -> String {
    let s = (now - at).max(0) / 1000;
    match s {
        0..120 => format!("{s} s ago"),
        120..7_200 => format!("{} min ago", s / 60),
        7_200..172_800 => format!("{} h ago", s / 3_600),
        _ => format!("{} d ago", s / 86_400),
    }
}

/// A stored value as a person reads it.
fn value(stored: Option<&str>) -> String {
    match stored {
        None | Some("null") => "(none)".to_owned(),
        Some(text) => crate::domain::display_stored(text),
    }
}

/// `/why/{kind}/{id}`, the id percent-encoded as one path segment: everything but unreserved
/// characters is encoded, and an id of dots (`.`, `..`) too, which a URL library would read as
/// a relative step and drop.
pub fn why_href(kind: Kind, id: &str) -> String {
    let dots_only = !id.is_empty() && id.bytes().all(|b| b == b'.');
    let mut out = format!("/why/{}/", kind.as_str());
    for b in id.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'~') || (b == b'.' && !dots_only)
        {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `path?k=v&...`, the values form-encoded; pairs with an empty value are left out.
fn href(path: &str, pairs: &[(&str, &str)]) -> String {
    let mut q = url::form_urlencoded::Serializer::new(String::new());
    let mut any = false;
    for (k, v) in pairs.iter().filter(|(_, v)| !v.is_empty()) {
        q.append_pair(k, v);
        any = true;
    }
    if any {
        format!("{path}?{}", q.finish())
    } else {
        path.to_owned()
    }
}

fn layout(title: &str, active: &str, now: i64, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { "pendo-sync · " (title) }
                link rel="stylesheet" href="/assets/console.css";
                script src="/assets/console.js" defer {}
            }
            body {
                header {
                    a.brand href="/" { "pendo-sync" }
                    nav {
                        a href="/" class=[(active == "overview").then_some("active")] { "Overview" }
                        @for (state, label) in LISTS {
                            a href={ "/queue/" (state) } class=[(active == state).then_some("active")] { (label) }
                        }
                        a href="/holds" class=[(active == "holds").then_some("active")] { "Holds" }
                    }
                    form.search method="get" action="/why" {
                        select name="kind" aria-label="kind" {
                            option value="account" { "account" }
                            option value="visitor" { "visitor" }
                        }
                        input type="search" name="id" placeholder="Pendo id" aria-label="Pendo id" required;
                        button type="submit" { "Why?" }
                    }
                    // Filled in by console.js from /session: who this browser is signed in as.
                    div #session {
                        span #session-state {}
                        " "
                        a #signin-link href="/signin" { "Sign in" }
                        button #signout type="button" hidden { "Sign out" }
                    }
                }
                noscript { p.note { "Reading needs no JavaScript; actions (resync, retry, drop, approve, reject) do, to send the session's cross-site-request token." } }
                main { (body) }
                footer { "read from the state at " (when(now)) }
            }
        }
    }
}

/// A key as one JSON-pointer token (RFC 6901: `~` and `/` escaped).
fn pointer_token(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

/// A count from the status document, tagged with its JSON pointer.
fn stat(pointer: &str, n: i64) -> Markup {
    html! { span data-status=(pointer) { (n) } }
}

/// A time from the status document: "12 s ago", tagged with the pointer and the exact value.
fn stat_time(pointer: &str, iso: Option<&str>, now: i64) -> Markup {
    match iso
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .map(|d| d.timestamp_millis())
    {
        Some(ms) => html! {
            time datetime=(iso.unwrap_or_default()) data-status=(pointer) data-value=(iso.unwrap_or_default()) title=(when(ms)) { (ago(now, ms)) }
        },
        None => html! { span.muted data-status=(pointer) data-value="null" { "never" } },
    }
}

fn run_result(r: &RunRecord) -> Markup {
    html! {
        @match (r.ok, &r.error) {
            (None, _) => span.muted { "running" },
            (Some(true), _) => span.good { "ok" },
            (Some(false), Some(e)) => span.bad title=(e) { "failed: " (e) },
            (Some(false), None) => span.bad { "failed" },
        }
    }
}

pub fn overview(report: &StatusReport, now: i64) -> Markup {
    let body = html! {
        div.toolbar {
            label { input #auto-refresh type="checkbox"; " refresh every 10 s" }
        }
        section #health {
            h2 { "Health" }
            dl.cards {
                div {
                    dt { "Writer" }
                    dd #writer-state {
                        @match &report.writer_paused {
                            None => span.good data-status="/writer_paused" data-value="null" { "running" },
                            Some(reason) => span.bad data-status="/writer_paused" data-value=(reason) { "paused: " (reason) },
                        }
                    }
                }
                div {
                    dt { "Oldest pending change" }
                    dd #oldest-pending { (stat_time("/oldest_pending_at", report.oldest_pending_at.as_deref(), now)) }
                }
                div {
                    dt { a href="/holds" { "Open holds" } }
                    dd #open-holds { span data-status="/open_holds/length" class=[(!report.open_holds.is_empty()).then_some("bad")] { (report.open_holds.len()) } }
                }
                div {
                    dt { a href="/queue/invalid" { "Records set aside" } }
                    dd { (stat("/invalid_records", report.invalid_records)) }
                }
                div {
                    dt { "History events" }
                    dd { (stat("/history/events", report.history.events)) " kept " (report.history.retention) }
                }
            }
        }
        section #chart {
            h2 { "Changes and Pendo requests, last 24 h" }
            (chart(&report.chart))
        }
        section #mappings {
            h2 { "Mappings" }
            table {
                thead { tr { th { "mapping" } th { "kind" } th { "last success" } th { "held values" } th { "last cycles (newest first)" } } }
                tbody {
                    @for (i, m) in report.mappings.iter().enumerate() {
                        tr data-mapping=(m.name) {
                            td { (m.name) }
                            td { (m.kind) }
                            td.freshness { (stat_time(&format!("/mappings/{i}/last_success_at"), m.last_success_at.as_deref(), now)) }
                            td { (stat(&format!("/mappings/{i}/held_values"), m.held_values)) }
                            td {
                                @if m.recent_runs.is_empty() { span.muted { "no cycle yet" } }
                                @else {
                                    table.runs {
                                        thead { tr { th { "started" } th { "mode" } th { "pulled" } th { "changes" } th { "set aside" } th { "result" } } }
                                        tbody {
                                            @for (j, r) in m.recent_runs.iter().enumerate() {
                                                tr {
                                                    td title=(when(r.started_at)) { (ago(now, r.started_at)) }
                                                    td { (r.mode) }
                                                    td { (stat(&format!("/mappings/{i}/recent_runs/{j}/pulled"), r.pulled)) }
                                                    td { (stat(&format!("/mappings/{i}/recent_runs/{j}/changes"), r.changes)) }
                                                    td { (stat(&format!("/mappings/{i}/recent_runs/{j}/invalid"), r.invalid)) }
                                                    td { (run_result(r)) }
                                                }
                                            }
                                        }
                                    }
                                }
                                @if let Some(rec) = &m.reconcile {
                                    @if rec.failures > 0 {
                                        p.bad { (rec.failures) " reconcile(s) failed in a row: " (rec.last_error.as_deref().unwrap_or("unknown error")) }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        section #outbox {
            h2 { "Outbox" }
            table {
                thead { tr { th { "state" } th.num { "values" } th.num { "visitors / accounts" } } }
                tbody {
                    @for (state, n) in &report.outbox {
                        tr data-state=(state) {
                            td { a href={ "/queue/" (state) } { (state) } }
                            td.num { (stat(&format!("/outbox/{state}"), *n)) }
                            td.num { (stat(&format!("/outbox_ids/{state}"), report.outbox_ids.get(state).copied().unwrap_or(0))) }
                        }
                    }
                }
            }
        }
        section #holds {
            h2 { "Open holds" }
            @if report.open_holds.is_empty() { p.muted { "none: the guard passed every cycle" } }
            @else {
                table {
                    thead { tr { th { "hold" } th { "mapping" } th { "tripped" } th.num { "held values" } th { "opened" } } }
                    tbody {
                        @for (i, h) in report.open_holds.iter().enumerate() {
                            tr {
                                td { a href={ "/holds/" (h.id) } { "#" (h.id) } }
                                td { (h.mapping) }
                                td { (h.reason) }
                                td.num { (stat(&format!("/open_holds/{i}/held_values"), h.held_values)) }
                                td { (h.created_at) }
                            }
                        }
                    }
                }
            }
        }
        section #quota {
            h2 { "CRM quota" }
            @if report.quota.is_empty() { p.muted { "no reading yet" } }
            @else {
                dl.cards {
                    @for (source, reading) in &report.quota {
                        div {
                            dt { (source) }
                            dd {
                                @match reading.as_object() {
                                    Some(o) => @for (k, v) in o {
                                        @let raw = v.as_str().map_or_else(|| v.to_string(), str::to_owned);
                                        @let text = match (k.strip_suffix("_ms"), v.as_i64()) {
                                            (Some(name), Some(ms)) => format!("{name}: {}", when(ms)),
                                            _ => format!("{k}: {raw}"),
                                        };
                                        span.kv data-status={ "/quota/" (pointer_token(source)) "/" (pointer_token(k)) } data-value=(raw) { (text) } " "
                                    },
                                    None => (reading.to_string()),
                                }
                            }
                        }
                    }
                }
            }
        }
        section #actions {
            h2 { "Resync" }
            p.muted { "Reads every record of the chosen mappings and sends each value again, even those Pendo is known to hold. Needs the operator role." }
            form #resync-form data-action="/v1/resync" data-follow="resync" data-confirm="Start a full resync?" {
                label { "mapping " select name="mapping" {
                    option value="" { "all mappings" }
                    @for m in &report.mappings { option value=(m.name) { (m.name) } }
                } }
                " "
                label { "kind " select name="kind" {
                    option value="" { "both" }
                    option value="account" { "account" }
                    option value="visitor" { "visitor" }
                } }
                " "
                button type="submit" { "Resync" }
                " "
                output {}
            }
        }
    };
    layout("overview", "overview", now, body)
}

/// Changes found (left bar) and Pendo requests (right bar) per slot of the last 24 hours, as
/// inline SVG: presentation attributes and classes only, which a strict CSP allows. Each bar
/// carries its status pointer, like every number of the overview.
fn chart(slots: &[ChartSlot]) -> Markup {
    const W: f64 = 960.0;
    const H: f64 = 160.0;
    const TOP: f64 = 14.0;
    const BOTTOM: f64 = 18.0;
    if slots.is_empty() {
        return html! { p.muted { "no chart" } };
    }
    let max = slots
        .iter()
        .map(|c| c.changes.max(c.pendo_requests))
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    let slot = W / slots.len() as f64;
    let bar = (slot / 2.0 - 1.0).clamp(0.5, 24.0);
    let scale = |n: i64| (n as f64 / max) * (H - TOP - BOTTOM);
    let total_changes: i64 = slots.iter().map(|c| c.changes).sum();
    let total_requests: i64 = slots.iter().map(|c| c.pendo_requests).sum();
    let cycles: i64 = slots.iter().map(|c| c.cycles).sum();
    let time = |ms: i64| {
        chrono::DateTime::from_timestamp_millis(ms)
            .map(|d| d.format("%H:%M").to_string())
            .unwrap_or_default()
    };
    html! {
        p.legend {
            span.key.changes {} " changes found: " span #chart-changes { (total_changes) }
            "  "
            span.key.requests {} " Pendo requests: " span #chart-requests { (total_requests) }
            "  in " span #chart-cycles { (cycles) } " cycle(s); one pair of bars per "
            ((slots[0].to - slots[0].from) / 60_000) " minutes (UTC)"
        }
        svg #cycle-chart viewBox={ "0 0 " (W) " " (H) } width="100%" role="img" aria-label="changes found and Pendo requests over the last 24 hours" xmlns="http://www.w3.org/2000/svg" {
            text x="0" y="10" class="axis" { "max " (max) }
            line x1="0" y1=(H - BOTTOM) x2=(W) y2=(H - BOTTOM) class="base" {}
            @for (i, c) in slots.iter().enumerate() {
                @let x = i as f64 * slot;
                g class=[(c.failed > 0).then_some("failed")] {
                    title { (time(c.from)) "–" (time(c.to)) ": " (c.cycles) " cycle(s)"
                        @if c.failed > 0 { " (" (c.failed) " failed)" }
                        ", " (c.changes) " change(s), " (c.pendo_requests) " Pendo request(s)" }
                    rect class="changes" data-status={ "/chart/" (i) "/changes" } data-value=(c.changes) x=(x) y=(H - BOTTOM - scale(c.changes)) width=(bar) height=(scale(c.changes)) {}
                    rect class="requests" data-status={ "/chart/" (i) "/pendo_requests" } data-value=(c.pendo_requests) x=(x + bar + 1.0) y=(H - BOTTOM - scale(c.pendo_requests)) width=(bar) height=(scale(c.pendo_requests)) {}
                }
            }
            text x="0" y=(H - 4.0) class="axis" { (when(slots[0].from)) }
            text x=(W) y=(H - 4.0) class="axis end" { (when(slots[slots.len() - 1].to)) }
        }
    }
}

/// The filter form and paging links of a list.
fn list_head(state: &str, label: &str, total: i64, id: &str) -> Markup {
    html! {
        h2 { (label) " " span.muted { "(" span #list-total { (total) } " matching)" } }
        form.filter method="get" action={ "/queue/" (state) } {
            input type="search" name="id" value=(id) placeholder="id starts with" aria-label="id starts with";
            button type="submit" { "Filter" }
            @if !id.is_empty() { " " a href={ "/queue/" (state) } { "clear" } }
        }
    }
}

fn pager(state: &str, id: &str, next: Option<String>, paged: bool) -> Markup {
    html! {
        p.pager {
            @if paged { a #first-page href=(href(&format!("/queue/{state}"), &[("id", id)])) { "← first page" } " " }
            @if let Some(after) = next { a #next-page href=(href(&format!("/queue/{state}"), &[("id", id), ("after", &after)])) { "next page →" } }
        }
    }
}

/// A button that POSTs `body` to an action with the token (console.js).
fn action(path: &str, label: &str, fields: &[(&str, &str)], confirm: Option<&str>) -> Markup {
    html! {
        form.inline data-action=(path) data-confirm=[confirm] {
            @for (k, v) in fields { input type="hidden" name=(k) value=(v); }
            button type="submit" { (label) }
            output {}
        }
    }
}

pub fn outbox_list(
    state: &str,
    label: &str,
    id: &str,
    page: &Page<OutboxEntry, OutboxCursor>,
    paged: bool,
    now: i64,
) -> Markup {
    let retryable = matches!(state, "pending" | "unmatched" | "dead");
    let next = page
        .next
        .as_ref()
        .map(|c| serde_json::to_string(c).expect("a cursor serializes"));
    let body = html! {
        (list_head(state, label, page.total, id))
        // The bulk actions act on the whole state: offered on the unfiltered list only, where
        // the count they name is the count they act on.
        @if page.total > 0 && id.is_empty() {
            div.bulk {
                @if retryable {
                    (action("/v1/queue/retry", &format!("retry all {state}"), &[("state", state)], Some(&format!("Make all {} {state} values due now?", page.total))))
                }
                (action("/v1/queue/drop", &format!("drop all {state}"), &[("state", state)], Some(&format!("Drop all {} {state} values? They will not be sent.", page.total))))
            }
        }
        table #list {
            thead { tr { th { "kind" } th { "id" } th { "field" } th { "value" } th { "mapping" } th.num { "attempts" } th { "next try" } th { "last error" } th { "queued" } th { "" } } }
            tbody {
                @for e in &page.rows {
                    tr {
                        td { (e.kind) }
                        td.id { a href=(why_href(e.kind, &e.pendo_id)) { (e.pendo_id) } }
                        td { (e.field) }
                        td.value { (value(Some(&e.value))) }
                        td { (e.mapping) }
                        td.num { (e.attempts) }
                        @if state == "unmatched" {
                            td { "when Pendo knows the id" }
                        } @else {
                            td title=(when(e.next_attempt_at)) { (if e.next_attempt_at <= now { "due".to_owned() } else { when(e.next_attempt_at) }) }
                        }
                        td.error { (e.last_error.as_deref().unwrap_or("")) }
                        td title=(when(e.enqueued_at)) { (ago(now, e.enqueued_at)) }
                        td.actions {
                            @if retryable { (action("/v1/queue/retry", "retry", &[("state", state), ("kind", e.kind.as_str()), ("id", &e.pendo_id)], None)) }
                            (action("/v1/queue/drop", "drop", &[("state", state), ("kind", e.kind.as_str()), ("id", &e.pendo_id)], Some("Drop this id's queued values? They will not be sent.")))
                        }
                    }
                }
            }
        }
        @if page.rows.is_empty() { p.muted { "nothing here" } }
        (pager(state, id, next, paged))
    };
    layout(label, state, now, body)
}

pub fn invalid_list(
    kind_of: impl Fn(&str) -> Option<Kind>,
    id: &str,
    page: &Page<InvalidRecord, InvalidCursor>,
    paged: bool,
    now: i64,
) -> Markup {
    let next = page
        .next
        .as_ref()
        .map(|c| serde_json::to_string(c).expect("a cursor serializes"));
    let body = html! {
        (list_head("invalid", "Invalid (set aside)", page.total, id))
        p.muted { "Records a mapping could not map (missing id, a value of the wrong type, an id two records claim). They are kept out of Pendo until the CRM record is fixed; the next cycle that maps one cleanly removes it from here." }
        table #list {
            thead { tr { th { "mapping" } th { "CRM id" } th { "Pendo id" } th { "reason" } th { "detail" } th { "seen" } th { "" } } }
            tbody {
                @for r in &page.rows {
                    tr {
                        td { (r.mapping) }
                        td.id { (r.crm_id) }
                        td.id {
                            @if let Some(p) = &r.pendo_id {
                                @match kind_of(&r.mapping) {
                                    Some(k) => a href=(why_href(k, p)) { (p) },
                                    None => (p),
                                }
                            }
                        }
                        td { (r.reason) }
                        td.error { (r.detail) }
                        td title=(when(r.seen_at)) { (ago(now, r.seen_at)) }
                        td.actions { (action("/v1/queue/drop", "drop", &[("state", "invalid"), ("mapping", &r.mapping), ("id", &r.crm_id)], Some("Forget this record? It is listed again if the next pull still cannot map it."))) }
                    }
                }
            }
        }
        @if page.rows.is_empty() { p.muted { "nothing here" } }
        (pager("invalid", id, next, paged))
    };
    layout("invalid", "invalid", now, body)
}

pub fn holds(holds: &[Hold], now: i64) -> Markup {
    let body = html! {
        h2 { "Holds" }
        p.muted { "The guard holds a cycle's changes when they would clear or overwrite more of Pendo than its limits allow. Nothing held is sent until someone approves it." }
        table #holds-list {
            thead { tr { th { "hold" } th { "mapping" } th { "kind" } th { "state" } th { "tripped" } th.num { "values" } th { "opened" } th { "decided" } } }
            tbody {
                @for h in holds {
                    tr data-state=(h.state) {
                        td { a href={ "/holds/" (h.id) } { "#" (h.id) } }
                        td { (h.mapping) }
                        td { (h.kind) }
                        td class=[(h.state == "open").then_some("bad")] { (h.state) }
                        td { (h.reason) }
                        td.num { (h.held_values) }
                        td title=(when(h.created_at)) { (ago(now, h.created_at)) }
                        td { @if let (Some(at), Some(by)) = (h.decided_at, &h.decided_by) { (when(at)) " by " (by) } }
                    }
                }
            }
        }
        @if holds.is_empty() { p.muted { "no hold yet" } }
    };
    layout("holds", "holds", now, body)
}

pub fn hold(h: &Hold, now: i64) -> Markup {
    let body = html! {
        h2 { "Hold #" (h.id) " " span #hold-state class=[(h.state == "open").then_some("bad")] { (h.state) } }
        dl.cards {
            div { dt { "mapping" } dd { (h.mapping) " (" (h.kind) ")" } }
            div { dt { "opened" } dd { (when(h.created_at)) ", " (h.cycles) " cycle(s) joined" } }
            div { dt { "values held" } dd #hold-values { (h.held_values) } }
            @if let (Some(at), Some(by)) = (h.decided_at, &h.decided_by) {
                div { dt { "decided" } dd { (when(at)) " by " (by) @if let Some(r) = &h.decision_reason { ": " (r) } } }
            }
        }
        h3 { "What tripped it" }
        p #hold-reason { (h.reason) }
        table {
            thead { tr { th { "field" } th.num { "sets" } th.num { "clears" } th.num { "overwrites" } th.num { "of covered" } th.num { "in mapping" } } }
            tbody {
                @for (field, c) in &h.counts {
                    tr { td { (field) } td.num { (c.sets) } td.num { (c.clears) } td.num { (c.overwrites) } td.num { (c.covered) } td.num { (c.mapping_values()) } }
                }
            }
        }
        h3 { "Sample (" (h.sample.len()) " of the held changes)" }
        table #hold-sample {
            thead { tr { th { "id" } th { "field" } th { "Pendo holds" } th { "would become" } } }
            tbody {
                @for c in &h.sample {
                    tr {
                        td.id { a href=(why_href(h.kind, &c.id)) { (c.id) } }
                        td { (c.field) }
                        td.value { (value(c.from.as_deref())) }
                        td.value { (value(Some(&c.to))) }
                    }
                }
            }
        }
        @if h.state == "open" {
            h3 { "Decide" }
            div.decide {
                form #approve-form data-action={ "/v1/holds/" (h.id) "/approve" } data-confirm="Approve: send every held value to Pendo?" {
                    input type="text" name="reason" placeholder="why (kept with the hold)" aria-label="reason";
                    button type="submit" { "Approve" }
                    output {}
                }
                form #reject-form data-action={ "/v1/holds/" (h.id) "/reject" } data-confirm="Reject: drop every held value?" {
                    input type="text" name="reason" placeholder="why (kept with the hold)" aria-label="reason";
                    button type="submit" { "Reject" }
                    output {}
                }
            }
        }
    };
    layout(&format!("hold {}", h.id), "holds", now, body)
}

fn field_story(f: &FieldStory) -> Markup {
    html! {
        tr data-field=(f.field) {
            th scope="row" { (f.field) }
            td {
                @if let Some(s) = &f.source {
                    (s.mapping) ": " (s.crm) " " (s.object) "." (s.from)
                    @for id in &s.crm_ids { br; span.id { (id) } }
                } @else { span.muted { "no mapping claims it" } }
            }
            td.value {
                @if let Some(m) = &f.last_mapped {
                    (value(m.value.as_deref()))
                    br; span.muted title=(when(m.at)) { (m.event.as_str()) " " (when(m.at)) }
                    @if let Some(at) = m.crm_modified_at { br; span.muted { "CRM modified " (when(at)) } }
                } @else { span.muted { "—" } }
            }
            td.value {
                @if let Some(c) = &f.confirmed {
                    (value(c.value.as_deref()))
                    br; span.muted { (when(c.at)) @if let Some(b) = c.batch { ", batch #" (b) } }
                } @else { span.muted { "nothing confirmed" } }
            }
            td.value {
                @if let Some(q) = &f.queued {
                    (value(q.value.as_deref())) br;
                    span class=[matches!(q.state, crate::store::QueueState::Dead | crate::store::QueueState::Held).then_some("bad")] { (q.state.as_str()) }
                    ", " (q.attempts) " attempt(s)"
                    @if let Some(e) = &q.last_error { br; span.error { (e) } }
                } @else { span.muted { "nothing queued" } }
            }
            td.live { @if let Some(l) = &f.live { (live_field(l)) } }
        }
    }
}

fn live_field(l: &crate::why::LiveField) -> Markup {
    html! {
        span class=(if l.agree { "good" } else { "bad" }) { (l.verdict) }
        br; "CRM: " (l.crm.as_deref().unwrap_or("(none)"))
        br; "Pendo: " (l.pendo.as_deref().unwrap_or("(none)"))
    }
}

pub fn why(r: &WhyReport, now: i64) -> Markup {
    let live_url = format!("{}/live", why_href(r.kind, &r.id));
    let body = html! {
        h2 { "Why does Pendo say that? " span.muted { (r.kind) " " } span #why-id { (r.id) } }
        div.toolbar {
            button #check-live type="button" data-live=(live_url) { "Check live" }
            span.muted { " reads the CRM record and Pendo's values now (a few rate-limited requests; needs the operator role)" }
        }
        div #live {}
        table #why-fields {
            thead { tr { th { "field" } th { "source" } th { "last mapped" } th { "Pendo confirmed" } th { "queued" } th { "" } } }
            tbody { @for f in &r.fields { (field_story(f)) } }
        }
        h3 { "Last events" }
        table #why-events {
            thead { tr { th { "when" } th { "field" } th { "event" } th { "what happened" } } }
            tbody {
                @for e in &r.events {
                    tr {
                        td { (when(e.event.at)) }
                        td { (e.event.field) }
                        td { (e.event.event.as_str()) }
                        td { (e.summary) }
                    }
                }
            }
        }
    };
    layout(&format!("why {} {}", r.kind, r.id), "", now, body)
}

/// The answer of "Check live": the verdict and each field's values now (a fragment the page
/// inserts; console.js parses it inertly).
pub fn why_live(r: &WhyReport) -> Markup {
    html! {
        p #verdict class=(if r.live_failed { "bad" } else { "verdict" }) { (r.verdict.as_deref().unwrap_or("no verdict")) }
        @if let Some(lines) = &r.live { ul.muted { @for l in lines { li { (l) } } } }
        table {
            thead { tr { th { "field" } th { "now" } } }
            tbody {
                @for f in &r.fields {
                    @if let Some(l) = &f.live { tr { th scope="row" { (f.field) } td { (live_field(l)) } } }
                }
            }
        }
    }
}

/// A page saying what went wrong (a 404 or a state read that failed).
/// The sign-in form: a token typed once, sent in a POST body (never a URL), for a session.
/// `next` is a path of this port (checked by the caller).
pub fn sign_in(next: &str, message: &str, possible: bool, now: i64) -> Markup {
    let body = html! {
        h2 { "Sign in" }
        p #signin-message { (message) }
        @if possible {
            form #signin-form method="post" action="/signin" {
                input type="hidden" name="next" value=(next);
                label { "Token " input #signin-token type="password" name="token" autocomplete="current-password" required; }
                " "
                button type="submit" { "Sign in" }
            }
            p.muted { "The session lasts admin.session_ttl in this browser; the token itself is not stored in it." }
        } @else {
            p #signin-none { "No token is configured on this port: set admin.token (operator) or admin.viewer_token (viewer), or put a sign-in proxy in front (admin.trusted_user_header)." }
        }
    };
    layout("sign in", "", now, body)
}

pub fn problem(title: &str, message: &str, now: i64) -> Markup {
    layout(
        title,
        "",
        now,
        html! { h2 { (title) } p #problem { (message) } },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_become_one_escaped_path_segment() {
        assert_eq!(
            why_href(Kind::Account, "a/b?c#d e"),
            "/why/account/a%2Fb%3Fc%23d%20e"
        );
        assert_eq!(why_href(Kind::Account, ".."), "/why/account/%2E%2E");
        assert_eq!(why_href(Kind::Account, "."), "/why/account/%2E");
        assert_eq!(
            why_href(Kind::Visitor, "a.b@x.io"),
            "/why/visitor/a.b%40x.io"
        );
        assert_eq!(why_href(Kind::Account, "é"), "/why/account/%C3%A9");
    }

    #[test]
    fn ages_read_naturally() {
        assert_eq!(ago(10_000, 0), "10 s ago");
        assert_eq!(ago(600_000, 0), "10 min ago");
        assert_eq!(ago(3 * 3_600_000, 0), "3 h ago");
        assert_eq!(ago(3 * 86_400_000, 0), "3 d ago");
    }

    /// maud escapes what it interpolates, in text and in attributes.
    #[test]
    fn crm_values_are_escaped_in_text_and_attributes() {
        let hostile = "\"><script>alert(1)</script><img src=x onerror=alert(2)>";
        let page = problem("t", hostile, 0).into_string();
        assert!(!page.contains("<script>alert"), "{page}");
        assert!(page.contains("&lt;script&gt;"), "{page}");
        let form = action("/x", "go", &[("id", hostile)], None).into_string();
        assert!(
            form.contains("value=\"&quot;&gt;&lt;script&gt;") && !form.contains("<script"),
            "{form}"
        );
    }
}
