//! The status model: one document that `status`, `GET /v1/status` and the console read, built
//! from the state file by one set of queries; and the narrow part of it the state gauges of
//! `/metrics` read in the background ([`gauge_figures`]).

use serde::Serialize;

use crate::app::AppError;
use crate::config::Settings;
use crate::domain::now_ms;
use crate::pendo::writer::PAUSED_KEY;
use crate::store::Store;

/// Cycles listed per mapping (`mappings[].recent_runs`).
pub const RECENT_RUNS: u32 = 5;
/// The chart: the last 24 hours in 96 slots of 15 minutes, aligned to the quarter hour. Per
/// cycle would be 1,440 bars a day per mapping at the default poll interval.
pub const CHART_SLOTS: usize = 96;
pub const CHART_SLOT_MS: i64 = 15 * 60 * 1_000;

/// The status document (`status --format json`, `GET /v1/status`, the console's overview).
#[derive(Debug, Serialize)]
pub struct StatusReport {
    /// When these numbers were read.
    pub generated_at: String,
    pub state_file: String,
    pub writer_paused: Option<String>,
    /// Values (kind, id, field) per outbox state.
    pub outbox: std::collections::BTreeMap<&'static str, i64>,
    /// Visitors and accounts (kind, id) per outbox state: what an operator counts.
    pub outbox_ids: std::collections::BTreeMap<&'static str, i64>,
    pub oldest_pending_seconds: Option<f64>,
    /// When the oldest pending change was enqueued.
    pub oldest_pending_at: Option<String>,
    pub invalid_records: i64,
    pub mappings: Vec<MappingStatus>,
    /// Holds of the guard waiting for a person (`holds show ID`).
    pub open_holds: Vec<OpenHold>,
    pub quota: serde_json::Map<String, serde_json::Value>,
    /// The provenance history (`why`): events kept, and for how long.
    pub history: HistoryStatus,
    /// The last 24 hours in 15-minute slots, oldest first: the cycles that started in each, how
    /// many failed, the changes they found, and the Pendo requests sent (retries included).
    pub chart: Vec<crate::store::ChartSlot>,
}

#[derive(Debug, Serialize)]
pub struct HistoryStatus {
    pub events: i64,
    pub retention: String,
}

#[derive(Debug, Serialize)]
pub struct MappingStatus {
    pub name: String,
    pub kind: crate::domain::Kind,
    pub watermark: Option<String>,
    pub watermark_updated_at: Option<String>,
    pub last_run: Option<crate::store::RunRecord>,
    pub last_success_at: Option<String>,
    /// Seconds since the last successful cycle finished.
    pub freshness_seconds: Option<f64>,
    /// Values of this mapping under an open hold.
    pub held_values: i64,
    /// The last cycles, newest first.
    pub recent_runs: Vec<crate::store::RunRecord>,
    /// The last successful reconcile and any failures since.
    pub reconcile: Option<ReconcileStatus>,
}

#[derive(Debug, Serialize)]
pub struct OpenHold {
    pub id: i64,
    pub mapping: String,
    pub reason: String,
    pub held_values: i64,
    pub created_at: String,
}

#[derive(Debug, Serialize)]
pub struct ReconcileStatus {
    pub last_success_at: Option<String>,
    pub failures: u32,
    pub last_error: Option<String>,
    pub failed_at: Option<String>,
    pub retry_at: Option<String>,
}

pub fn iso(ms: i64) -> String {
    crate::domain::iso8601_from_ms(ms)
}

fn seconds_since(now: i64, at: i64) -> f64 {
    (now - at).max(0) as f64 / 1000.0
}

/// Builds the status document: the one set of queries every reader shares.
pub async fn status_report(settings: &Settings, store: &Store) -> Result<StatusReport, AppError> {
    // One read transaction: the numbers agree with each other, whatever commits meanwhile.
    let mut snap = store.snapshot().await?;
    let now = now_ms();
    let watermarks = snap.watermarks().await?;
    let held = snap.held_values_by_mapping().await?;
    let mut mappings = Vec::new();
    for m in &settings.mappings {
        let wm = watermarks.iter().find(|(name, _, _)| *name == m.name);
        let recent_runs = snap.recent_runs(&m.name, RECENT_RUNS).await?;
        let last_success = snap.last_success_at(&m.name).await?;
        let reconcile = crate::schedule::ReconcileRecord::load_in(&mut snap, &m.name)
            .await?
            .map(|r| ReconcileStatus {
                last_success_at: r.at_ms.map(iso),
                failures: r.failures,
                last_error: r.last_error,
                failed_at: r.failed_at_ms.map(iso),
                retry_at: r.retry_at_ms.map(iso),
            });
        mappings.push(MappingStatus {
            reconcile,
            name: m.name.clone(),
            kind: m.kind,
            watermark: wm.map(|(_, w, _)| w.0.clone()),
            watermark_updated_at: wm.map(|(_, _, at)| iso(*at)),
            last_run: recent_runs.first().cloned(),
            last_success_at: last_success.map(iso),
            freshness_seconds: last_success.map(|at| seconds_since(now, at)),
            held_values: held.get(&m.name).copied().unwrap_or(0),
            recent_runs,
        });
    }
    let mut quota = serde_json::Map::new();
    for source in ["salesforce", "hubspot"] {
        if let Some(v) = snap.kv_get(&format!("quota.{source}")).await? {
            quota.insert(source.into(), v);
        }
    }
    let outbox = snap.outbox_summary().await?;
    let report = StatusReport {
        generated_at: iso(now),
        state_file: store.path().display().to_string(),
        writer_paused: paused_reason(&mut snap).await?,
        oldest_pending_seconds: outbox.oldest_pending_at.map(|at| seconds_since(now, at)),
        oldest_pending_at: outbox.oldest_pending_at.map(iso),
        outbox: outbox.values,
        outbox_ids: outbox.ids,
        invalid_records: snap.invalid_count().await?,
        mappings,
        open_holds: snap
            .holds(true)
            .await?
            .into_iter()
            .map(|h| OpenHold {
                id: h.id,
                mapping: h.mapping,
                reason: h.reason,
                held_values: h.held_values,
                created_at: iso(h.created_at),
            })
            .collect(),
        quota,
        history: HistoryStatus {
            events: snap.history_count().await?,
            retention: match settings.history.retention.as_secs() {
                // As it is written in the config (humantime would say "2months 29days 2h…").
                s if s % 86_400 == 0 => format!("{}d", s / 86_400),
                _ => humantime::format_duration(settings.history.retention).to_string(),
            },
        },
        chart: snap
            .chart(
                // The end of the current slot: slots stay put between two reads.
                (now / CHART_SLOT_MS + 1) * CHART_SLOT_MS,
                CHART_SLOT_MS,
                CHART_SLOTS,
            )
            .await?,
    };
    snap.close().await?;
    Ok(report)
}

/// What the state gauges of `/metrics` show: the few reads they need of the status model, in
/// one read transaction.
#[derive(Debug, Clone)]
pub struct GaugeFigures {
    /// Values per outbox state.
    pub outbox: std::collections::BTreeMap<&'static str, i64>,
    /// When the oldest pending change was enqueued: a scrape turns it into an age.
    pub oldest_pending_at: Option<i64>,
    pub open_holds: usize,
    /// Values under an open hold, per configured mapping.
    pub held_values: Vec<(String, i64)>,
    pub history_events: i64,
    pub writer_paused: bool,
}

/// Reads [`GaugeFigures`].
pub async fn gauge_figures(settings: &Settings, store: &Store) -> Result<GaugeFigures, AppError> {
    let mut snap = store.snapshot().await?;
    let held = snap.held_values_by_mapping().await?;
    let outbox = snap.outbox_summary().await?;
    Ok(GaugeFigures {
        outbox: outbox.values,
        oldest_pending_at: outbox.oldest_pending_at,
        open_holds: snap.holds(true).await?.len(),
        held_values: settings
            .mappings
            .iter()
            .map(|m| (m.name.clone(), held.get(&m.name).copied().unwrap_or(0)))
            .collect(),
        history_events: snap.history_count().await?,
        writer_paused: paused_reason(&mut snap).await?.is_some(),
    })
}

/// Why the writer is paused, if it is (the record `pendo::writer` keeps under [`PAUSED_KEY`]).
async fn paused_reason(snap: &mut crate::store::Snapshot) -> Result<Option<String>, AppError> {
    Ok(snap
        .kv_get(PAUSED_KEY)
        .await?
        .and_then(|v| v.get("reason").and_then(|r| r.as_str()).map(str::to_owned)))
}

/// Sets the state gauges from `figures`; the oldest pending change's age as of `now` (ms).
pub fn set_gauges(figures: &GaugeFigures, now: i64) {
    use crate::metrics::{HELD_VALUES, HISTORY_EVENTS, HOLDS_OPEN, OLDEST_PENDING, OUTBOX_VALUES};
    for (state, n) in &figures.outbox {
        metrics::gauge!(OUTBOX_VALUES, "state" => *state).set(*n as f64);
    }
    metrics::gauge!(OLDEST_PENDING).set(
        figures
            .oldest_pending_at
            .map_or(0.0, |at| seconds_since(now, at)),
    );
    metrics::gauge!(HOLDS_OPEN).set(figures.open_holds as f64);
    for (mapping, n) in &figures.held_values {
        metrics::gauge!(HELD_VALUES, "mapping" => mapping.clone()).set(*n as f64);
    }
    metrics::gauge!(HISTORY_EVENTS).set(figures.history_events as f64);
    metrics::gauge!(crate::metrics::WRITER_PAUSED).set(if figures.writer_paused {
        1.0
    } else {
        0.0
    });
}

/// A stored JSON value as a person reads it (`(none)` for nothing).
fn shown(stored: Option<&str>) -> String {
    match stored {
        None => "(none)".to_owned(),
        Some(text) => crate::domain::display_stored(text),
    }
}

/// Prints one hold as `holds show` does. CRM values are shown as text (this is a terminal).
/// Prints [`hold_text`].
pub fn print_hold(h: &crate::store::Hold) {
    print!("{}", hold_text(h));
}

/// What `holds show` prints for a hold.
pub fn hold_text(h: &crate::store::Hold) -> String {
    use std::fmt::Write;
    // Writing to a String cannot fail.
    let mut out = String::new();
    // CRM values and operators' text: escaped for the terminal.
    let p = crate::why::printable;
    let _ = writeln!(
        out,
        "hold {}  mapping {}  {}  {}",
        h.id,
        p(&h.mapping),
        h.kind,
        h.state.to_uppercase()
    );
    let _ = writeln!(
        out,
        "  created   {} ({} cycle(s) joined)",
        iso(h.created_at),
        h.cycles
    );
    let _ = writeln!(out, "  tripped   {}", p(&h.reason));
    let _ = writeln!(out, "  values    {}", h.held_values);
    let _ = writeln!(
        out,
        "  per field                sets    clears  overwrites  of covered  in mapping"
    );
    for (field, c) in &h.counts {
        let _ = writeln!(
            out,
            "    {field:<20} {:>8}  {:>8}  {:>10}  {:>10}  {:>10}",
            c.sets,
            c.clears,
            c.overwrites,
            c.covered,
            c.mapping_values()
        );
    }
    let _ = writeln!(out, "  sample ({} of the held changes)", h.sample.len());
    for c in &h.sample {
        let _ = writeln!(
            out,
            "    {:<28} {:<18} {} -> {}",
            p(&c.id),
            p(&c.field),
            p(&shown(c.from.as_deref())),
            p(&shown(Some(&c.to)))
        );
    }
    if let (Some(at), Some(who)) = (h.decided_at, &h.decided_by) {
        let _ = writeln!(
            out,
            "  decided   {} by {}{}",
            iso(at),
            p(who),
            h.decision_reason
                .as_deref()
                .map(|r| format!(": {}", p(r)))
                .unwrap_or_default()
        );
    }
    out
}

#[cfg(test)]
mod hold_text_tests {
    use super::*;

    /// CRM values in a hold's sample cannot steer the terminal that shows them.
    #[test]
    fn a_hold_s_sample_is_escaped() {
        let hold = crate::store::Hold {
            id: 1,
            mapping: "m".into(),
            kind: crate::domain::Kind::Account,
            state: "open".into(),
            created_at: 0,
            updated_at: 0,
            reason: "plantier: 3 of 3 overwritten".into(),
            counts: Default::default(),
            sample: vec![crate::guard::SampleChange {
                id: "acct\u{1b}]0;owned\u{7}".into(),
                field: "plantier".into(),
                from: Some("\"Growth\"".into()),
                to: "\"\u{1b}[2JGold\u{202e}\"".into(),
            }],
            cycles: 1,
            held_values: 3,
            decided_at: Some(0),
            decided_by: Some("ops".into()),
            decision_reason: Some("fine\r\n".into()),
        };
        let text = hold_text(&hold);
        assert!(
            !text.contains('\u{1b}') && !text.contains('\u{202e}'),
            "{text:?}"
        );
        assert!(text.contains("\\u{1b}[2JGold"), "{text}");
    }
}
