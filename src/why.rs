//! `why <kind> <id>`: the provenance of the values Pendo holds for one id (DESIGN guarantee 11,
//! "Provenance"), for the CLI and `GET /v1/why/{kind}/{id}` alike.
//!
//! It owns no state: it reads the shadow, the outbox, the claims and the history of one entity
//! (a few indexed reads), and with `live` asks the CRM for the record and Pendo for its values
//! now, through the same clients and limiters as the sync, then says whether the three agree.
//! Every value shown came from a CRM or from Pendo: the table form escapes control characters,
//! so a value cannot rewrite the operator's terminal.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::Settings;
use crate::connectors::{Connectors, PullSpec};
use crate::domain::Kind;
use crate::mapping::{Mapping, stored_from_pendo};
use crate::pendo::PendoClient;
use crate::store::{Event, HistoryEvent, OutboxEntry, QueueFilter, QueueState, Store, StoreError};

/// Events listed when `--limit` is not given.
pub const DEFAULT_LIMIT: u32 = 10;

#[derive(Debug, Clone, Default)]
pub struct WhyOptions {
    pub field: Option<String>,
    pub limit: u32,
    pub live: bool,
}

/// What `live` reads through.
pub struct LiveSources<'a> {
    pub connectors: &'a Connectors,
    pub pendo: &'a PendoClient,
}

#[derive(Debug, thiserror::Error)]
pub enum WhyError {
    /// Exit 1: the state knows nothing of this id.
    #[error("no record of {kind} {id}{}", .field.as_ref().map(|f| format!(" (field {f})")).unwrap_or_default())]
    Unknown {
        kind: Kind,
        id: String,
        field: Option<String>,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The whole answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WhyReport {
    pub kind: Kind,
    pub id: String,
    pub fields: Vec<FieldStory>,
    /// The last events, newest first.
    pub events: Vec<EventView>,
    /// With `live`: what the reads found, one line per source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub live: Option<Vec<String>>,
    /// With `live`: "CRM, pendo-sync and Pendo agree", or what differs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verdict: Option<String>,
    /// With `live`: a read failed, so the verdict is partial.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub live_failed: bool,
}

/// One field's story.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FieldStory {
    pub field: String,
    /// The mapping that writes it and where its value comes from.
    pub source: Option<FieldSource>,
    /// The last value a cycle mapped for it (detected or cleared).
    pub last_mapped: Option<Mapped>,
    /// What Pendo confirmed (the shadow), and when.
    pub confirmed: Option<Confirmed>,
    /// What waits in the outbox.
    pub queued: Option<Queued>,
    /// With `live`: the values now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub live: Option<LiveField>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FieldSource {
    pub mapping: String,
    pub crm: String,
    pub object: String,
    /// The CRM field path (`Owner.Email`, `hubspot_owner_id`).
    pub from: String,
    /// The CRM records that claim this id (more than one: ambiguous).
    pub crm_ids: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Mapped {
    pub value: Option<String>,
    pub at: i64,
    pub event: Event,
    pub cycle: Option<i64>,
    pub crm_id: Option<String>,
    pub crm_modified_at: Option<i64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Confirmed {
    pub value: Option<String>,
    /// When Pendo confirmed it (the confirmation's event; else when the record last changed).
    pub at: i64,
    pub batch: Option<i64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Queued {
    pub state: crate::store::QueueState,
    pub value: Option<String>,
    pub attempts: u32,
    pub next_attempt_at: i64,
    pub last_error: Option<String>,
    pub enqueued_at: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LiveField {
    /// The CRM record's value now, mapped (`None`: empty, or no record).
    pub crm: Option<String>,
    /// Pendo's value now.
    pub pendo: Option<String>,
    pub verdict: String,
    pub agree: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EventView {
    #[serde(flatten)]
    pub event: HistoryEvent,
    /// The event in one sentence.
    pub summary: String,
}

/// The human text of a stored value (`None` for null).
fn shown(stored: Option<&str>) -> Option<String> {
    stored
        .filter(|s| !stored_is_null(Some(s)))
        .map(crate::domain::display_stored)
}

fn stored_is_null(stored: Option<&str>) -> bool {
    stored.is_none_or(|s| s == "null")
}

/// `2026-11-20 14:02:01 UTC`.
pub fn when(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|d| d.format("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_else(|| ms.to_string())
}

fn quoted(v: Option<&str>) -> String {
    match v {
        Some(v) => format!("{v:?}"),
        None => "nothing".to_owned(),
    }
}

/// One sentence per event.
pub fn summary(e: &HistoryEvent) -> String {
    let value = quoted(shown(e.value.as_deref()).as_deref());
    let batch = |b: &crate::store::BatchInfo| {
        format!(
            "batch #{} of {} record(s), sent {}, {} attempt(s)",
            b.id,
            b.records,
            when(b.sent_at),
            b.attempts
        )
    };
    let answer = || {
        e.detail
            .clone()
            .or_else(|| e.batch.as_ref().map(|b| b.answer.clone()))
            .unwrap_or_default()
    };
    let hold = |h: &Option<crate::store::HoldInfo>| {
        h.as_ref().map_or_else(String::new, |h| {
            let mut s = format!("hold #{}", h.id);
            if let Some(by) = &h.decided_by {
                s.push_str(&format!(" by {by}"));
            }
            if let Some(r) = &h.decision_reason {
                s.push_str(&format!(" ({r})"));
            }
            s
        })
    };
    match e.event {
        Event::Detected => {
            let mut s = format!("detected {value}");
            if let Some(crm) = &e.crm_id {
                s.push_str(&format!(" in CRM record {crm}"));
            }
            if let Some(at) = e.crm_modified_at {
                s.push_str(&format!(" (modified {})", when(at)));
            }
            if let Some(m) = &e.mapping {
                s.push_str(&format!(", mapping {m}"));
            }
            if let Some(c) = e.cycle {
                s.push_str(&format!(", cycle {c}"));
            }
            s
        }
        Event::Cleared => format!(
            "clear queued: {}{}",
            e.crm_id
                .as_ref()
                .map_or_else(String::new, |c| format!("CRM record {c} ")),
            e.detail.as_deref().unwrap_or("the record left the CRM")
        ),
        Event::Superseded => format!("{value} replaced in the queue by a newer CRM value"),
        Event::Held => format!("{value} held by the guard ({})", hold(&e.hold)),
        Event::Approved => format!("{value} approved ({})", hold(&e.hold)),
        Event::Rejected => format!("{value} rejected and dropped ({})", hold(&e.hold)),
        Event::Confirmed => format!(
            "Pendo confirmed {value}{}",
            e.batch
                .as_ref()
                .map_or_else(String::new, |b| format!(" ({})", batch(b)))
        ),
        Event::AlreadyConfirmed => format!("{value} not sent: Pendo had already confirmed it"),
        Event::Missing => format!(
            "Pendo has no {} {:?}: {value} waits until Pendo knows the id{}",
            e.kind,
            e.pendo_id,
            e.batch
                .as_ref()
                .map_or_else(String::new, |b| format!(" ({})", batch(b)))
        ),
        Event::Failed => format!("sending {value} failed, retried later: {}", answer()),
        Event::Dead => format!("gave up on {value}: {}", answer()),
        Event::Retried => format!(
            "{value} made pending again ({})",
            e.detail.as_deref().unwrap_or("by an operator")
        ),
        Event::Dropped => format!(
            "{value} dropped ({})",
            e.detail.as_deref().unwrap_or("by an operator")
        ),
        Event::Withdrawn => {
            format!("{value} withdrawn: another CRM record claims this id with other values")
        }
        Event::Adopted => format!(
            "Pendo already held {value} before pendo-sync first wrote the field: adopted as confirmed"
        ),
    }
}

/// Builds the report for one id.
pub async fn explain(
    settings: &Settings,
    store: &Store,
    kind: Kind,
    id: &str,
    options: &WhyOptions,
    live: Option<LiveSources<'_>>,
) -> Result<WhyReport, WhyError> {
    let field_filter = options.field.as_deref();
    let wanted = |f: &str| field_filter.is_none_or(|w| w == f);
    let mappings: Vec<Mapping> = settings
        .mappings
        .iter()
        .filter(|m| m.kind == kind)
        .map(Mapping::new)
        .collect();

    let shadow = store.shadow_entry(kind, id).await?;
    let queued: Vec<OutboxEntry> = store
        .outbox_list(
            &QueueFilter {
                kind: Some(kind),
                pendo_id: Some(id.to_owned()),
                ..QueueFilter::default()
            },
            1_000,
        )
        .await?;
    let mut claims: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for m in &mappings {
        let found = store.load_claims(&m.name, &[id]).await?;
        if let Some(list) = found.get(id) {
            claims.insert(
                m.name.clone(),
                list.iter().map(|(c, _)| c.clone()).collect(),
            );
        }
    }
    let lasts = store
        .last_events(
            kind,
            id,
            &[Event::Detected, Event::Cleared, Event::Confirmed],
        )
        .await?;
    let events = store.history(kind, id, field_filter, options.limit).await?;
    if shadow.is_none()
        && queued.is_empty()
        && claims.is_empty()
        && lasts.is_empty()
        && events.is_empty()
    {
        return Err(WhyError::Unknown {
            kind,
            id: id.to_owned(),
            field: None,
        });
    }

    // Fields: the mapped ones, and any the state holds (a field no mapping writes any more).
    let mut names: BTreeSet<String> = BTreeSet::new();
    for m in &mappings {
        names.extend(m.fields.iter().map(|f| f.pendo_field.clone()));
    }
    if let Some((vals, _)) = &shadow {
        names.extend(vals.keys().cloned());
    }
    names.extend(queued.iter().map(|q| q.field.clone()));
    names.extend(lasts.iter().map(|e| e.field.clone()));
    names.retain(|f| wanted(f));
    if names.is_empty() {
        return Err(WhyError::Unknown {
            kind,
            id: id.to_owned(),
            field: options.field.clone(),
        });
    }

    let mut fields: Vec<FieldStory> = names
        .iter()
        .map(|field| {
            let source = mappings.iter().find_map(|m| {
                let f = m.fields.iter().find(|f| &f.pendo_field == field)?;
                let settings = settings.mapping(&m.name).ok()?;
                Some(FieldSource {
                    mapping: m.name.clone(),
                    crm: settings.source.as_str().to_owned(),
                    object: settings.object.clone(),
                    from: f.from.clone(),
                    crm_ids: claims.get(&m.name).cloned().unwrap_or_default(),
                })
            });
            let last = |events: &[Event]| {
                lasts
                    .iter()
                    .filter(|e| &e.field == field && events.contains(&e.event))
                    .max_by_key(|e| e.id)
            };
            let last_mapped = last(&[Event::Detected, Event::Cleared]).map(|e| Mapped {
                value: shown(e.value.as_deref()),
                at: e.at,
                event: e.event,
                cycle: e.cycle,
                crm_id: e.crm_id.clone(),
                crm_modified_at: e.crm_modified_at,
            });
            let confirmed = shadow.as_ref().and_then(|(vals, confirmed_at)| {
                let v = vals.get(field)?;
                let stored = (!v.is_null()).then(|| v.to_string());
                let event = last(&[Event::Confirmed]);
                Some(Confirmed {
                    value: shown(stored.as_deref()),
                    at: event.map_or(*confirmed_at, |e| e.at),
                    batch: event.and_then(|e| e.batch.as_ref().map(|b| b.id)),
                })
            });
            let queued = queued.iter().find(|q| &q.field == field).map(|q| Queued {
                state: q.state,
                value: shown(Some(&q.value)),
                attempts: q.attempts,
                next_attempt_at: q.next_attempt_at,
                last_error: q.last_error.clone(),
                enqueued_at: q.enqueued_at,
            });
            FieldStory {
                field: field.clone(),
                source,
                last_mapped,
                confirmed,
                queued,
                live: None,
            }
        })
        .collect();

    let mut report = WhyReport {
        kind,
        id: id.to_owned(),
        fields: Vec::new(),
        events: events
            .into_iter()
            .map(|event| EventView {
                summary: summary(&event),
                event,
            })
            .collect(),
        live: None,
        verdict: None,
        live_failed: false,
    };
    if let (true, Some(sources)) = (options.live, live) {
        check_live(
            settings,
            &mappings,
            &claims,
            &shadow,
            &mut fields,
            &mut report,
            sources,
        )
        .await;
    }
    report.fields = fields;
    Ok(report)
}

/// What the live CRM read found for one field.
enum CrmNow {
    /// Not compared, and why (no claim, a deleted record kept by `on_delete`, re-pointed...).
    NotRead,
    /// Two or more records claim the id: nothing is sent until one remains.
    Ambiguous(String),
    /// The record's mapped value now (stored text; `None`: empty or cleared).
    Value(Option<String>),
}

/// Reads the CRM records and Pendo's values now and judges each field.
async fn check_live(
    settings: &Settings,
    mappings: &[Mapping],
    claims: &BTreeMap<String, Vec<String>>,
    shadow: &Option<(crate::store::ShadowRecord, i64)>,
    fields: &mut [FieldStory],
    report: &mut WhyReport,
    sources: LiveSources<'_>,
) {
    let kind = report.kind;
    let id = report.id.clone();
    let mut lines = Vec::new();
    let mut crm_now: BTreeMap<String, CrmNow> = BTreeMap::new();
    for m in mappings {
        let Ok(ms) = settings.mapping(&m.name) else {
            continue;
        };
        let mine: Vec<&str> = m
            .fields
            .iter()
            .map(|f| f.pendo_field.as_str())
            .filter(|f| fields.iter().any(|s| s.field == *f))
            .collect();
        if mine.is_empty() {
            continue;
        }
        let crm = ms.source.as_str();
        let mut set = |now: &dyn Fn() -> CrmNow| {
            for f in &mine {
                crm_now.insert((*f).to_owned(), now());
            }
        };
        let Some(crm_ids) = claims.get(&m.name).filter(|c| !c.is_empty()) else {
            lines.push(format!(
                "{crm}: no CRM record of mapping {} claims this id now: not compared",
                m.name
            ));
            continue;
        };
        if crm_ids.len() > 1 {
            let text = format!(
                "{} CRM records claim this id ({}): nothing is sent until only one remains",
                crm_ids.len(),
                crm_ids.join(", ")
            );
            lines.push(format!("{crm}: {text}"));
            set(&|| CrmNow::Ambiguous(text.clone()));
            continue;
        }
        let Some(connector) = sources.connectors.get(&ms.source) else {
            continue;
        };
        let spec = PullSpec::for_mapping(ms, None, Duration::ZERO);
        let crm_id = &crm_ids[0];
        match connector.fetch(&spec, crm_id).await {
            Ok(Some(raw)) if !raw.deleted => match m.map(&raw) {
                Ok(rec) if rec.pendo_id != id => lines.push(format!(
                    "{crm}: {} {crm_id} now maps to Pendo id {:?}: not compared",
                    ms.object, rec.pendo_id
                )),
                Ok(rec) => {
                    lines.push(format!(
                        "{crm}: {} {crm_id} read{}",
                        ms.object,
                        raw.modified_at
                            .map_or_else(String::new, |at| format!(", modified {}", when(at)))
                    ));
                    for (f, v) in m.fields.iter().zip(rec.values) {
                        if !mine.contains(&f.pendo_field.as_str()) {
                            continue;
                        }
                        // `None` (an empty value under on_null = "keep") leaves Pendo as it is:
                        // the CRM says nothing about this field, so it is not compared.
                        if let Some(v) = v {
                            crm_now.insert(
                                f.pendo_field.clone(),
                                CrmNow::Value((!v.is_null()).then(|| v.to_stored())),
                            );
                        }
                    }
                }
                Err(e) => lines.push(format!("{crm}: {e}")),
            },
            Ok(_) if m.on_delete == crate::config::OnDelete::Keep => lines.push(format!(
                "{crm}: {} {crm_id} was deleted; on_delete = \"keep\" leaves Pendo as it is: not compared",
                ms.object
            )),
            Ok(_) => {
                lines.push(format!(
                    "{crm}: {} {crm_id} no longer exists (deleted or archived): its values are cleared",
                    ms.object
                ));
                set(&|| CrmNow::Value(None));
            }
            Err(e) => {
                report.live_failed = true;
                lines.push(format!("{crm}: read failed: {e}"));
            }
        }
    }

    let names: Vec<String> = fields.iter().map(|f| f.field.clone()).collect();
    let types: BTreeMap<&str, crate::domain::FieldType> = mappings
        .iter()
        .flat_map(|m| {
            m.fields
                .iter()
                .map(|f| (f.pendo_field.as_str(), f.field_type))
        })
        .collect();
    let pendo_now = match sources
        .pendo
        .entity_values(kind, &id, &names, settings.pendo.retry_max)
        .await
    {
        Ok(Some(values)) => {
            lines.push(format!("pendo: {kind} {id:?} read"));
            Some(values)
        }
        Ok(None) => {
            lines.push(format!("pendo: Pendo has no {kind} {id:?}"));
            Some(serde_json::Map::new())
        }
        Err(e) => {
            report.live_failed = true;
            lines.push(format!("pendo: read failed: {e}"));
            None
        }
    };

    let mut disagreements = Vec::new();
    let mut all_compared = pendo_now.is_some();
    for story in fields.iter_mut() {
        let f = story.field.as_str();
        let confirmed: Option<String> = shadow
            .as_ref()
            .and_then(|(vals, _)| vals.get(f))
            .filter(|v| !v.is_null())
            .map(|v| v.to_string());
        let pendo: Option<Option<String>> = pendo_now.as_ref().map(|values| {
            let v = values.get(f).unwrap_or(&serde_json::Value::Null);
            match types.get(f) {
                Some(ty) => stored_from_pendo(v, *ty),
                None => (!v.is_null()).then(|| v.to_string()),
            }
        });
        let crm = crm_now.get(f).unwrap_or(&CrmNow::NotRead);
        if matches!(crm, CrmNow::NotRead) {
            all_compared = false;
        }
        let (agree, verdict) = judge(
            f,
            crm,
            confirmed.as_deref(),
            pendo.as_ref().map(Option::as_deref),
            story,
        );
        if !agree {
            disagreements.push(format!("{f}: {verdict}"));
        }
        story.live = Some(LiveField {
            crm: match crm {
                CrmNow::Value(v) => v.as_deref().and_then(|s| shown(Some(s))),
                _ => None,
            },
            pendo: pendo.flatten().as_deref().and_then(|s| shown(Some(s))),
            verdict,
            agree,
        });
    }
    report.verdict = Some(if !disagreements.is_empty() {
        disagreements.join("; ")
    } else if all_compared && !report.live_failed {
        "CRM, pendo-sync and Pendo agree".to_owned()
    } else {
        "what could be compared agrees; not every source was read or compared (see above)"
            .to_owned()
    });
    report.live = Some(lines);
}

/// One field's verdict from the CRM's value now, the shadow (what Pendo confirmed), and Pendo's
/// value now (`None`: not read). Values are stored text; `Some(None)` is "holds nothing".
fn judge(
    field: &str,
    crm: &CrmNow,
    confirmed: Option<&str>,
    pendo: Option<Option<&str>>,
    story: &FieldStory,
) -> (bool, String) {
    let show = |v: Option<&str>| quoted(shown(v).as_deref());
    let confirmed_when = story
        .confirmed
        .as_ref()
        .map_or_else(String::new, |c| format!(" on {}", when(c.at)));
    let same =
        |a: Option<&str>, b: Option<&str>| a == b || (stored_is_null(a) && stored_is_null(b));
    let queued = story.queued.as_ref();
    let state = |q: &Queued| {
        format!(
            "{}, {} attempt(s){}",
            q.state.as_str(),
            q.attempts,
            q.last_error
                .as_deref()
                .map_or_else(String::new, |e| format!(", last error: {e}"))
        )
    };
    if let CrmNow::Ambiguous(text) = crm {
        return (false, text.clone());
    }
    if let Some(pendo) = pendo
        && !same(pendo, confirmed)
    {
        // Pendo may hold a value that was sent and applied, but whose answer was lost (a
        // timeout, a 5xx, a crash before the settle): it is still queued, not an edit.
        if let Some(q) = queued
            && shown(pendo) == q.value
        {
            return (
                false,
                format!(
                    "Pendo holds the queued {} ({}): sent, but Pendo's confirmation has not been recorded yet",
                    show(pendo),
                    state(q)
                ),
            );
        }
        return (
            false,
            match confirmed {
                Some(_) => format!(
                    "Pendo was edited after pendo-sync confirmed {}{confirmed_when}: Pendo holds {} now",
                    show(confirmed),
                    show(pendo)
                ),
                None => format!(
                    "Pendo holds {}, which pendo-sync never confirmed for {field}",
                    show(pendo)
                ),
            },
        );
    }
    if let CrmNow::Value(crm) = crm
        && !same(crm.as_deref(), confirmed)
    {
        let crm = crm.as_deref();
        let text = match queued {
            Some(q) if shown(crm) == q.value => format!(
                "the CRM's {} is queued ({}), not yet confirmed by Pendo",
                show(crm),
                state(q)
            ),
            _ => format!(
                "the CRM holds {} now, pendo-sync last confirmed {}: the next cycle picks it up",
                show(crm),
                show(confirmed)
            ),
        };
        return (false, text);
    }
    (true, "agree".to_owned())
}

/// Replaces control and format characters (ESC, CR, bidirectional overrides, zero-width
/// marks...) with escapes: CRM and Pendo values are untrusted and must neither steer the
/// terminal that shows them nor reorder the line they are on.
pub fn printable(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            if c.is_control() || is_format(c) {
                c.escape_unicode().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect()
}

/// Unicode format characters (category Cf) that change how a line is shown.
fn is_format(c: char) -> bool {
    matches!(c,
        '\u{00AD}' | '\u{061C}' | '\u{180E}' | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}'
        | '\u{2060}'..='\u{206F}' | '\u{FEFF}' | '\u{FFF9}'..='\u{FFFB}')
}

/// The table form.
pub fn render_table(r: &WhyReport) -> String {
    let p = |s: &str| printable(s);
    let opt = |v: &Option<String>| v.as_deref().map_or_else(|| "(nothing)".to_owned(), p);
    let mut out = format!("{} {}\n", r.kind, p(&r.id));
    if let Some(v) = &r.verdict {
        out.push_str(&format!("verdict: {}\n", p(v)));
    }
    for line in r.live.iter().flatten() {
        out.push_str(&format!("  live  {}\n", p(line)));
    }
    for f in &r.fields {
        out.push_str(&format!("\n{}\n", p(&f.field)));
        match &f.source {
            Some(s) => out.push_str(&format!(
                "  source     mapping {} ← {} {}.{}{}\n",
                p(&s.mapping),
                s.crm,
                p(&s.object),
                p(&s.from),
                if s.crm_ids.is_empty() {
                    String::new()
                } else {
                    format!(" (record {})", p(&s.crm_ids.join(", ")))
                }
            )),
            None => out.push_str("  source     no mapping writes this field now\n"),
        }
        if let Some(m) = &f.last_mapped {
            out.push_str(&format!(
                "  mapped     {} at {}{}\n",
                opt(&m.value),
                when(m.at),
                m.crm_modified_at
                    .map_or_else(String::new, |t| format!(" (CRM modified {})", when(t)))
            ));
        }
        match &f.confirmed {
            Some(c) => out.push_str(&format!(
                "  confirmed  {} at {}\n",
                opt(&c.value),
                when(c.at)
            )),
            None => out.push_str("  confirmed  nothing\n"),
        }
        if let Some(q) = &f.queued {
            out.push_str(&format!(
                "  queued     {} ({}, {} attempt(s), next {}{})\n",
                opt(&q.value),
                q.state.as_str(),
                q.attempts,
                if q.state == QueueState::Unmatched {
                    "once Pendo knows the id".to_owned()
                } else {
                    when(q.next_attempt_at)
                },
                q.last_error
                    .as_deref()
                    .map_or_else(String::new, |e| format!(", last error: {}", p(e)))
            ));
        }
        if let Some(l) = &f.live {
            out.push_str(&format!(
                "  now        CRM {} · Pendo {} · {}\n",
                opt(&l.crm),
                opt(&l.pendo),
                p(&l.verdict)
            ));
        }
    }
    if !r.events.is_empty() {
        out.push_str("\nevents (newest first)\n");
        for e in &r.events {
            out.push_str(&format!(
                "  {}  {:<18} {:<17} {}\n",
                when(e.event.at),
                p(&e.event.field),
                e.event.event.as_str(),
                p(&e.summary)
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(printable("a\u{1b}[2Jb\r\n"), "a\\u{1b}[2Jb\\u{d}\\u{a}");
        assert_eq!(printable("Growth · ü"), "Growth · ü");
        // A right-to-left override would reorder the rest of the operator's line.
        assert_eq!(printable("a\u{202E}b\u{200B}"), "a\\u{202e}b\\u{200b}");
    }
}
