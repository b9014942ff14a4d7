//! `pendo-sync audit`: a dry-run, field-level drift report between the CRM, the shadow copy and
//! (with `--against pendo`) what Pendo holds now.
//!
//! This module owns the audit end to end: the full CRM pull, the classification of every
//! (Pendo id, field) pair, the paged read of Pendo's aggregation API, and the four report formats.
//!
//! It writes nothing anywhere (DESIGN.md guarantee 6): the state file is opened read-only (and
//! not created when absent: the audit then runs against an empty shadow), connectors get no store
//! (so no quota reading or rotated token is written), Pendo is only read through
//! `POST /api/v1/aggregation`, and no run history is recorded. The one file it writes is the
//! report, and only where `--output` asks.
//!
//! Classes, per (id, field):
//! - `in_sync`: the CRM, the shadow (and Pendo, when read) agree;
//! - `pending`: the CRM differs from the shadow (or from what the outbox holds): a sync sends it;
//! - `drift`: the shadow equals the CRM but Pendo holds something else (edited in Pendo, or
//!   written by another integration); only a `resync` repairs it, since a sync trusts the shadow;
//! - `unmatched`: Pendo does not know the id, so a value for it cannot land;
//! - `orphan`: the shadow holds a value of this mapping for an id gone from the CRM;
//! - `invalid`: the CRM record is set aside (bad value, no id, ambiguous id), one row per record.
//!
//! Null and absent are the same everywhere (Pendo holds nothing), as in [`crate::diff`].

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::IsTerminal;
use std::path::PathBuf;

use serde::Serialize;
use serde_json::Value as Json;

use crate::app::{AppError, Connectors};
use crate::config::{ConfigError, MappingSettings, OnDelete, Settings};
use crate::connectors::PullSpec;
use crate::domain::{FieldType, Kind, iso8601_from_ms, now_ms};
use crate::mapping::{Mapping, RecordError};
use crate::pendo::PendoClient;
use crate::store::Store;

/// Pendo rows per aggregation page: PostHog's figure, far inside the 5-minute / 4 GB caps for a
/// select of a few custom fields.
pub const PENDO_PAGE_SIZE: usize = 5_000;

/// Rows the table format shows; the other formats show every difference.
const TABLE_ROWS: usize = 20;

/// Progress is logged (off a terminal) every this many records or Pendo rows.
const LOG_EVERY: u64 = 5_000;

/// The command line of `pendo-sync audit`.
#[derive(Debug, Clone, clap::Args)]
pub struct AuditArgs {
    /// Only this mapping.
    #[arg(long)]
    pub mapping: Option<String>,
    /// Compare the CRM with the shadow copy only, or also with what Pendo holds now.
    #[arg(long, value_enum, default_value_t = Against::Shadow)]
    pub against: Against,
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
    /// Write the report to this file instead of stdout.
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Exit 3 when anything is pending, drifted, orphaned or unmatched.
    #[arg(long)]
    pub fail_on_drift: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Against {
    Shadow,
    Pendo,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
    Csv,
    Markdown,
}

/// What [`audit`] compares, for library callers and tests.
#[derive(Debug, Clone)]
pub struct AuditOptions {
    pub mapping: Option<String>,
    pub against: Against,
    /// Rows per Pendo aggregation page.
    pub page_size: usize,
}

impl Default for AuditOptions {
    fn default() -> Self {
        AuditOptions {
            mapping: None,
            against: Against::Shadow,
            page_size: PENDO_PAGE_SIZE,
        }
    }
}

/// The class of one (id, field) pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Class {
    InSync,
    Pending,
    Drift,
    Unmatched,
    Orphan,
    Invalid,
}

impl Class {
    pub const ALL: [Class; 6] = [
        Class::InSync,
        Class::Pending,
        Class::Drift,
        Class::Unmatched,
        Class::Orphan,
        Class::Invalid,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Class::InSync => "in_sync",
            Class::Pending => "pending",
            Class::Drift => "drift",
            Class::Unmatched => "unmatched",
            Class::Orphan => "orphan",
            Class::Invalid => "invalid",
        }
    }

    /// Whether `--fail-on-drift` fails on this class. Invalid records are reported but do not
    /// fail the audit: they are the CRM's data problem, already set aside, not a sync gap.
    pub fn is_drift(self) -> bool {
        matches!(
            self,
            Class::Pending | Class::Drift | Class::Unmatched | Class::Orphan
        )
    }
}

/// One differing (id, field). Values are human text ([`Value::display`]); `None` is null/absent.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuditRow {
    pub mapping: String,
    pub kind: Kind,
    /// The Pendo id (empty for a record that has none).
    pub id: String,
    /// The CRM record id, when a CRM record is involved.
    pub crm_id: Option<String>,
    /// The Pendo field (for a record without an id: the CRM id path).
    pub field: String,
    pub crm: Option<String>,
    pub shadow: Option<String>,
    /// Only with `--against pendo`: `Some(None)` means Pendo holds nothing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pendo: Option<Option<String>>,
    pub class: Class,
    pub note: String,
    /// The history's last event for this (id, field): was the value never sent, sent and
    /// refused, or confirmed and later changed in Pendo? (`why` tells the whole story.)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_event: Option<LastEvent>,
}

/// An event of the history as the audit's report shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LastEvent {
    pub event: crate::store::Event,
    pub at: String,
    pub summary: String,
}

/// Gives each row of a mapping's rows the last event of its (id, field).
async fn attach_last_events(
    store: &Store,
    kind: Kind,
    rows: &mut [AuditRow],
) -> Result<(), AppError> {
    let ids: Vec<&str> = rows
        .iter()
        .filter(|r| !r.id.is_empty())
        .map(|r| r.id.as_str())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    if ids.is_empty() {
        return Ok(());
    }
    let last: HashMap<(String, String), LastEvent> = store
        .last_event_per_field(kind, &ids)
        .await?
        .into_iter()
        .map(|e| {
            let shown = LastEvent {
                event: e.event,
                at: iso8601_from_ms(e.at),
                summary: crate::why::summary(&e),
            };
            ((e.pendo_id, e.field), shown)
        })
        .collect();
    for r in rows.iter_mut() {
        r.last_event = last.get(&(r.id.clone(), r.field.clone())).cloned();
    }
    Ok(())
}

/// Counts for one mapping.
#[derive(Debug, Clone, Serialize)]
pub struct MappingSummary {
    pub mapping: String,
    pub kind: Kind,
    pub source: &'static str,
    /// CRM records read (deleted ones included).
    pub records: u64,
    /// Pendo rows read (only with `--against pendo`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pendo_rows: Option<u64>,
    pub counts: BTreeMap<Class, u64>,
    /// What the guard would do with the changes a reconcile would make now ("would hold: …"),
    /// if it would hold them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guard: Option<String>,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct AuditReport {
    pub against: Against,
    pub generated_at: String,
    pub state_file: String,
    /// False when the state file does not exist yet: the shadow was taken as empty.
    pub state_file_exists: bool,
    pub mappings: Vec<MappingSummary>,
    pub totals: BTreeMap<Class, u64>,
    /// Every pair that is not `in_sync`, per mapping in (class, id, field) order.
    pub rows: Vec<AuditRow>,
}

impl AuditReport {
    /// Whether `--fail-on-drift` exits 3.
    pub fn has_drift(&self) -> bool {
        self.totals.iter().any(|(c, n)| c.is_drift() && *n > 0)
    }

    pub fn count(&self, class: Class) -> u64 {
        self.totals.get(&class).copied().unwrap_or(0)
    }
}

fn zero_counts() -> BTreeMap<Class, u64> {
    Class::ALL.iter().map(|c| (*c, 0)).collect()
}

// ---- the command ---------------------------------------------------------------------------

/// `pendo-sync audit`: builds store-less connectors, audits, writes the report, picks the exit code.
pub async fn run(settings: std::sync::Arc<Settings>, args: AuditArgs) -> Result<u8, AppError> {
    if let Some(name) = &args.mapping {
        settings.mapping(name)?;
    }
    // No store: connectors then keep neither quota readings nor rotated refresh tokens.
    let connectors = crate::connectors::build(&settings, None)?;
    run_with(&settings, &connectors, &args).await
}

/// [`run`] with the connectors given (tests use the fixture CRM).
pub async fn run_with(
    settings: &Settings,
    connectors: &Connectors,
    args: &AuditArgs,
) -> Result<u8, AppError> {
    if let Some(path) = &args.output {
        refuse_state_paths(settings, path)?;
    }
    let options = AuditOptions {
        mapping: args.mapping.clone(),
        against: args.against,
        page_size: PENDO_PAGE_SIZE,
    };
    let report = audit(settings, connectors, &options).await?;
    let text = render(&report, args.format);
    match &args.output {
        Some(path) => {
            std::fs::write(path, &text).map_err(|e| {
                AppError::Runtime(format!(
                    "cannot write the report to {}: {e}",
                    path.display()
                ))
            })?;
            tracing::info!(path = %path.display(), rows = report.rows.len(), "Audit report written.");
        }
        None => print!("{text}"),
    }
    Ok(if args.fail_on_drift && report.has_drift() {
        3
    } else {
        0
    })
}

/// `--output` must never be the state file (or its WAL companions): the audit writes nothing there.
fn refuse_state_paths(settings: &Settings, output: &std::path::Path) -> Result<(), AppError> {
    let state = &settings.state.path;
    let canonical = |p: &std::path::Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_owned());
    let out = canonical(output);
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let mut p = state.clone().into_os_string();
        p.push(suffix);
        if canonical(std::path::Path::new(&p)) == out {
            return Err(AppError::Config(ConfigError::new(
                "--output",
                format!(
                    "{} is the state file; the audit writes nothing there",
                    output.display()
                ),
            )));
        }
    }
    Ok(())
}

// ---- the audit -----------------------------------------------------------------------------

/// Audits the selected mappings. Reads the CRM, the state file (read-only) and, with
/// [`Against::Pendo`], Pendo's aggregation API; writes nothing.
pub async fn audit(
    settings: &Settings,
    connectors: &Connectors,
    options: &AuditOptions,
) -> Result<AuditReport, AppError> {
    let selected: Vec<&MappingSettings> = match &options.mapping {
        Some(name) => vec![settings.mapping(name)?],
        None => settings.mappings.iter().collect(),
    };
    let path = &settings.state.path;
    let store = if path.exists() {
        Some(Store::open_read_only(path).await?)
    } else {
        tracing::warn!(path = %path.display(), "The state file does not exist yet: auditing against an empty shadow.");
        None
    };
    let pendo = match options.against {
        Against::Shadow => None,
        Against::Pendo => {
            let key = settings
                .pendo
                .integration_key_source
                .resolve("pendo.integration_key")?;
            Some(PendoClient::new(&settings.pendo, key))
        }
    };
    let mut report = AuditReport {
        against: options.against,
        generated_at: iso8601_from_ms(now_ms()),
        state_file: path.display().to_string(),
        state_file_exists: store.is_some(),
        mappings: Vec::new(),
        totals: zero_counts(),
        rows: Vec::new(),
    };
    let result = async {
        for m in selected {
            let connector = connectors.get(&m.source).ok_or_else(|| {
                AppError::Config(ConfigError::new(
                    m.source.as_str(),
                    "no connector configured for this source",
                ))
            })?;
            let audit = MappingAudit {
                settings,
                m,
                mapping: Mapping::new(m),
                store: store.as_ref(),
                pendo: pendo.as_ref(),
                page_size: options.page_size.max(1),
            };
            let (summary, mut rows) = audit.run(connector.as_ref()).await?;
            if let Some(store) = &store {
                attach_last_events(store, m.kind, &mut rows).await?;
            }
            for (c, n) in &summary.counts {
                *report.totals.entry(*c).or_default() += n;
            }
            report.mappings.push(summary);
            report.rows.extend(rows);
        }
        Ok::<(), AppError>(())
    }
    .await;
    if let Some(store) = &store {
        store.close().await;
    }
    result.map(|()| report)
}

/// What the audit knows about one Pendo id of one mapping; vectors are parallel to
/// [`Mapping::fields`] and hold canonical stored text, `None` for null/absent.
struct Tracked {
    /// `None` for an id gone from the CRM (an orphan candidate).
    crm_id: Option<String>,
    /// The CRM's values; a field the mapping leaves alone (empty with `on_null = "keep"`) is `None`
    /// in `managed`.
    crm: Vec<Option<String>>,
    managed: Vec<bool>,
    shadow: Vec<Option<String>>,
    /// What the outbox holds, as stored (`"null"` is a queued clear).
    queued: Vec<Option<String>>,
    /// Filled by the Pendo scan; `None` when Pendo did not list the id (or was not read).
    pendo: Option<Vec<Option<String>>>,
}

struct MappingAudit<'a> {
    settings: &'a Settings,
    m: &'a MappingSettings,
    mapping: Mapping,
    store: Option<&'a Store>,
    pendo: Option<&'a PendoClient>,
    page_size: usize,
}

/// A shadow value as canonical stored text; a stored clear (`null`) and absence are the same.
fn stored_text(stored: &serde_json::Value) -> Option<String> {
    (!stored.is_null()).then(|| stored.to_string())
}

fn display(stored: Option<&str>) -> Option<String> {
    stored.map(crate::domain::display_stored)
}

/// Pendo's value as canonical stored text for the field's type: Pendo may hold a date as epoch
/// ms or as an ISO string, a number as a string, so the CRM's coercion applies. A value that does
/// not coerce is kept as its JSON text: it differs from anything the CRM can map to.
fn pendo_stored(v: &Json, ty: FieldType) -> Option<String> {
    crate::mapping::stored_from_pendo(v, ty)
}

impl MappingAudit<'_> {
    fn name(&self) -> &str {
        &self.m.name
    }

    fn kind(&self) -> Kind {
        self.mapping.kind
    }

    async fn run(
        &self,
        connector: &dyn crate::connectors::Connector,
    ) -> Result<(MappingSummary, Vec<AuditRow>), AppError> {
        let mut ticker = Ticker::new(self.name());
        let mut rows = Vec::new();
        let mut counts = zero_counts();
        let (mut tracked, records, not_orphans) = self
            .pull(connector, &mut rows, &mut counts, &mut ticker)
            .await?;
        self.load_state(&mut tracked).await?;
        self.find_orphans(&mut tracked, &not_orphans).await?;
        let pendo_rows = match self.pendo {
            Some(client) => Some(self.scan_pendo(client, &mut tracked, &mut ticker).await?),
            None => None,
        };
        self.classify(&tracked, &mut rows, &mut counts);
        let guard = crate::guard::evaluate(
            &self.mapping.guard,
            self.kind(),
            &self.guard_counts(&tracked),
        )
        .map(|t| format!("would hold: {}", t.summary()));
        rows.sort_by(|a, b| {
            (a.class, &a.id, &a.field, &a.crm_id).cmp(&(b.class, &b.id, &b.field, &b.crm_id))
        });
        ticker.finish(records, rows.len() as u64);
        Ok((
            MappingSummary {
                mapping: self.m.name.clone(),
                kind: self.kind(),
                source: connector.source(),
                records,
                pendo_rows,
                counts,
                guard,
            },
            rows,
        ))
    }

    /// Per field, what a reconcile would change against the shadow (first fills, clears,
    /// overwrites) and the values the shadow holds (with `--against pendo`, Pendo's values where
    /// the shadow holds none): what the guard would judge.
    fn guard_counts(
        &self,
        tracked: &HashMap<String, Tracked>,
    ) -> BTreeMap<String, crate::guard::FieldCounts> {
        let mut out: BTreeMap<String, crate::guard::FieldCounts> = BTreeMap::new();
        let clears_orphans = self.mapping.on_delete == crate::config::OnDelete::Clear;
        for t in tracked.values() {
            for (i, f) in self.mapping.fields.iter().enumerate() {
                let c = out.entry(f.pendo_field.clone()).or_default();
                // Against Pendo, what Pendo holds stands where the shadow holds nothing: what
                // the guard's adoption before a first push would put there.
                let pendo = t.pendo.as_ref().and_then(|p| p[i].as_deref());
                let shadow = t.shadow[i].as_deref().or(pendo);
                if shadow.is_some() {
                    c.covered += 1;
                }
                let crm = match &t.crm_id {
                    None if clears_orphans => None,
                    None => continue,
                    Some(_) if !t.managed[i] => continue,
                    Some(_) => t.crm[i].as_deref(),
                };
                match (shadow, crm) {
                    (Some(_), None) => c.clears += 1,
                    (Some(a), Some(b)) if a != b => c.overwrites += 1,
                    (None, Some(_)) => c.sets += 1,
                    _ => {}
                }
            }
        }
        // The audit covers the whole mapping.
        for c in out.values_mut() {
            c.total = c.covered;
        }
        out
    }

    /// The full CRM pull, mapped. Returns the live records by Pendo id, the number of records
    /// read, and the Pendo ids that must not count as orphans (records set aside are still in the
    /// CRM). Invalid records become rows here.
    async fn pull(
        &self,
        connector: &dyn crate::connectors::Connector,
        rows: &mut Vec<AuditRow>,
        counts: &mut BTreeMap<Class, u64>,
        ticker: &mut Ticker,
    ) -> Result<(HashMap<String, Tracked>, u64, HashSet<String>), AppError> {
        let connector_error = |e| AppError::Runtime(format!("mapping {}: {e}", self.name()));
        let spec = PullSpec::for_mapping(self.m, None, self.settings.schedule.overlap);
        let mut pull = connector.pull(spec).await.map_err(connector_error)?;
        let n = self.mapping.fields.len();
        let mut live: HashMap<String, Tracked> = HashMap::new();
        // Pendo id → every CRM record claiming it with different values (the engine holds them all back).
        let mut ambiguous: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut invalid: Vec<RecordError> = Vec::new();
        let mut records = 0u64;
        while let Some(page) = pull.next_page().await.map_err(connector_error)? {
            records += page.records.len() as u64;
            for raw in &page.records {
                let rec = match self.mapping.map(raw) {
                    Ok(rec) if rec.deleted => continue, // gone: an orphan if the shadow holds it
                    Ok(rec) => rec,
                    Err(e) => {
                        if !raw.deleted {
                            invalid.push(e);
                        }
                        continue;
                    }
                };
                let crm: Vec<Option<String>> = rec
                    .values
                    .iter()
                    .map(|v| v.as_ref().filter(|v| !v.is_null()).map(|v| v.to_stored()))
                    .collect();
                let managed: Vec<bool> = rec.values.iter().map(Option::is_some).collect();
                if let Some(claimants) = ambiguous.get_mut(&rec.pendo_id) {
                    claimants.push(rec.crm_id);
                    continue;
                }
                match live.get_mut(&rec.pendo_id) {
                    Some(prev) if prev.crm_id.as_deref() != Some(rec.crm_id.as_str()) => {
                        if prev.crm != crm || prev.managed != managed {
                            let prev = live.remove(&rec.pendo_id).expect("present");
                            ambiguous.insert(
                                rec.pendo_id.clone(),
                                vec![prev.crm_id.expect("live records have a CRM id"), rec.crm_id],
                            );
                        }
                    }
                    // The same record twice (at-least-once delivery): the later read wins.
                    Some(prev) => {
                        prev.crm = crm;
                        prev.managed = managed;
                    }
                    None => {
                        live.insert(
                            rec.pendo_id,
                            Tracked {
                                crm_id: Some(rec.crm_id),
                                crm,
                                managed,
                                shadow: vec![None; n],
                                queued: vec![None; n],
                                pendo: None,
                            },
                        );
                    }
                }
            }
            ticker.records(records, invalid.len() as u64);
        }

        let mut not_orphans: HashSet<String> = HashSet::new();
        let set_aside: HashSet<String> = match self.store {
            Some(store) => store
                .invalid_records(Some(self.name()))
                .await?
                .into_iter()
                .map(|r| r.crm_id)
                .collect(),
            None => HashSet::new(),
        };
        let state_note = |crm_id: &str| {
            if set_aside.contains(crm_id) {
                "set aside in the state file"
            } else {
                "new: the next sync sets it aside"
            }
        };
        for (pendo_id, crm_ids) in &ambiguous {
            not_orphans.insert(pendo_id.clone());
            for crm_id in crm_ids {
                rows.push(AuditRow {
                    mapping: self.name().to_owned(),
                    kind: self.kind(),
                    id: pendo_id.clone(),
                    crm_id: Some(crm_id.clone()),
                    field: self.mapping.id_path.clone(),
                    crm: None,
                    shadow: None,
                    pendo: None,
                    class: Class::Invalid,
                    note: format!(
                        "ambiguous_id: {} CRM records map to this Pendo id with different values; none is sent ({})",
                        crm_ids.len(),
                        state_note(crm_id)
                    ),
                    last_event: None,
                });
            }
        }
        for e in invalid {
            let (id, field) = match &e {
                RecordError::MissingId { id_path, .. } => (String::new(), id_path.clone()),
                RecordError::BadValue {
                    pendo_id, field, ..
                } => (pendo_id.clone(), field.clone()),
            };
            if !id.is_empty() {
                not_orphans.insert(id.clone());
            }
            rows.push(AuditRow {
                mapping: self.name().to_owned(),
                kind: self.kind(),
                id,
                crm_id: Some(e.crm_id().to_owned()),
                field,
                crm: None,
                shadow: None,
                pendo: None,
                class: Class::Invalid,
                note: format!("{}: {} ({})", e.reason(), e, state_note(e.crm_id())),
                last_event: None,
            });
        }
        let invalid_rows = rows.iter().filter(|r| r.class == Class::Invalid).count() as u64;
        *counts.entry(Class::Invalid).or_default() += invalid_rows;
        Ok((live, records, not_orphans))
    }

    /// Fills in the shadow and outbox values of the live records.
    async fn load_state(&self, tracked: &mut HashMap<String, Tracked>) -> Result<(), AppError> {
        let Some(store) = self.store else {
            return Ok(());
        };
        let ids: Vec<String> = tracked.keys().cloned().collect();
        for chunk in ids.chunks(5_000) {
            let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
            let shadow = store.load_shadow(self.kind(), &refs).await?;
            let outbox = store.load_outbox_values(self.kind(), &refs).await?;
            for id in chunk {
                let t = tracked.get_mut(id).expect("id from the map");
                for (i, f) in self.mapping.fields.iter().enumerate() {
                    t.shadow[i] = shadow
                        .get(id)
                        .and_then(|s| s.get(&f.pendo_field))
                        .and_then(stored_text);
                    t.queued[i] = outbox.get(id).and_then(|o| o.get(&f.pendo_field)).cloned();
                }
            }
        }
        Ok(())
    }

    /// Walks the whole shadow of the mapping's kind: an id the pull did not see that holds one of
    /// this mapping's fields has left the CRM (or the filter). Fields are mapped once per kind
    /// (config validation), so a value of this field was written for this mapping.
    async fn find_orphans(
        &self,
        tracked: &mut HashMap<String, Tracked>,
        not_orphans: &HashSet<String>,
    ) -> Result<(), AppError> {
        let Some(store) = self.store else {
            return Ok(());
        };
        let n = self.mapping.fields.len();
        let mut after: Option<String> = None;
        loop {
            let page = store
                .shadow_page(self.kind(), after.as_deref(), 2_000)
                .await?;
            let Some((last, _)) = page.last() else { break };
            after = Some(last.clone());
            let mut found: Vec<(String, Vec<Option<String>>)> = Vec::new();
            for (id, shadow) in page {
                if tracked.contains_key(&id) || not_orphans.contains(&id) {
                    continue;
                }
                let values: Vec<Option<String>> = self
                    .mapping
                    .fields
                    .iter()
                    .map(|f| shadow.get(&f.pendo_field).and_then(stored_text))
                    .collect();
                if values.iter().any(Option::is_some) {
                    found.push((id, values));
                }
            }
            let ids: Vec<&str> = found.iter().map(|(id, _)| id.as_str()).collect();
            let outbox = store.load_outbox_values(self.kind(), &ids).await?;
            for (id, shadow) in found {
                let queued = self
                    .mapping
                    .fields
                    .iter()
                    .map(|f| outbox.get(&id).and_then(|o| o.get(&f.pendo_field)).cloned())
                    .collect();
                tracked.insert(
                    id,
                    Tracked {
                        crm_id: None,
                        crm: vec![None; n],
                        managed: vec![false; n],
                        shadow,
                        queued,
                        pendo: None,
                    },
                );
            }
        }
        Ok(())
    }

    /// Reads Pendo's current values of this mapping's fields, page by page
    /// ([`crate::pendo::values::ValuePages`]), and attaches them to the tracked ids. Ids Pendo
    /// lists that the audit does not track are not ours and are skipped.
    async fn scan_pendo(
        &self,
        client: &PendoClient,
        tracked: &mut HashMap<String, Tracked>,
        ticker: &mut Ticker,
    ) -> Result<u64, AppError> {
        use crate::pendo::values::{Retry, ValuePages, alias};
        let kind = self.kind();
        let id_key = kind.id_key();
        let fields: Vec<&str> = self
            .mapping
            .fields
            .iter()
            .map(|f| f.pendo_field.as_str())
            .collect();
        let aliases: Vec<String> = fields.iter().map(|f| alias(kind, f)).collect();
        let retry = Retry {
            initial: self.settings.pendo.retry_initial,
            max: self.settings.pendo.retry_max,
            attempts: 6,
        };
        let label = format!("audit-{}", self.name());
        let mut pages = ValuePages::new(client, kind, &fields, self.page_size, retry, &label);
        let mut read = 0u64;
        while let Some(page) = pages.next().await.map_err(|e| {
            AppError::Runtime(format!(
                "mapping {}: reading Pendo's {}s: {e}",
                self.name(),
                kind
            ))
        })? {
            read += page.len() as u64;
            for row in page {
                let Some(id) = crate::pendo::client::row_id(&row, id_key) else {
                    continue;
                };
                let Some(t) = tracked.get_mut(&id) else {
                    continue;
                };
                if t.pendo.is_some() {
                    continue; // listed twice across pages (an entity added mid-scan shifts skip)
                }
                t.pendo = Some(
                    aliases
                        .iter()
                        .zip(&self.mapping.fields)
                        .map(|(alias, f)| {
                            pendo_stored(row.get(alias).unwrap_or(&Json::Null), f.field_type)
                        })
                        .collect(),
                );
            }
            ticker.pendo_rows(read);
        }
        Ok(read)
    }

    /// Sorts every tracked (id, field) into its class; rows for all but `in_sync`.
    fn classify(
        &self,
        tracked: &HashMap<String, Tracked>,
        rows: &mut Vec<AuditRow>,
        counts: &mut BTreeMap<Class, u64>,
    ) {
        let read_pendo = self.pendo.is_some();
        for (id, t) in tracked {
            for (i, f) in self.mapping.fields.iter().enumerate() {
                let crm = t.crm[i].as_deref();
                let shadow = t.shadow[i].as_deref();
                let queued = t.queued[i].as_deref();
                let pendo = t.pendo.as_ref().map(|p| p[i].as_deref());
                let verdict = match &t.crm_id {
                    None => self.orphan(shadow, queued),
                    Some(_) if !t.managed[i] => None, // empty with on_null = "keep": not ours to judge
                    Some(_) => self.live(crm, shadow, queued, read_pendo, pendo),
                };
                let Some((class, note)) = verdict else {
                    if t.crm_id.is_some() {
                        *counts.entry(Class::InSync).or_default() += 1;
                    }
                    continue;
                };
                *counts.entry(class).or_default() += 1;
                if class == Class::InSync {
                    continue;
                }
                rows.push(AuditRow {
                    mapping: self.name().to_owned(),
                    kind: self.kind(),
                    id: id.clone(),
                    crm_id: t.crm_id.clone(),
                    field: f.pendo_field.clone(),
                    crm: display(crm),
                    shadow: display(shadow),
                    pendo: read_pendo.then(|| display(pendo.flatten())),
                    class,
                    note,
                    last_event: None,
                });
            }
        }
    }

    fn live(
        &self,
        crm: Option<&str>,
        shadow: Option<&str>,
        queued: Option<&str>,
        read_pendo: bool,
        pendo: Option<Option<&str>>,
    ) -> Option<(Class, String)> {
        let crm_text = crm.unwrap_or("null");
        let queued_note = || match queued {
            None => "not queued: the next sync sends it".to_owned(),
            Some(q) if q == crm_text => "queued in the outbox".to_owned(),
            Some(q) => format!(
                "the outbox holds an older value ({}); the next sync replaces it",
                display(Some(q)).unwrap_or_default()
            ),
        };
        if read_pendo && pendo.is_none() && crm.is_some() {
            let note = if queued.is_some() {
                "Pendo does not know this id; the queued value waits for it (pendo.create_missing creates it)"
            } else {
                "Pendo does not know this id (pendo.create_missing creates it)"
            };
            return Some((Class::Unmatched, note.to_owned()));
        }
        if crm != shadow || queued.is_some_and(|q| q != crm_text) {
            return Some((Class::Pending, queued_note()));
        }
        if pendo.is_some_and(|p| p != crm) {
            return Some((
                Class::Drift,
                "changed in Pendo since it confirmed the CRM value (an edit, or another integration); `resync` repairs it".to_owned(),
            ));
        }
        Some((Class::InSync, String::new()))
    }

    fn orphan(&self, shadow: Option<&str>, queued: Option<&str>) -> Option<(Class, String)> {
        shadow?;
        let note = match (self.mapping.on_delete, queued) {
            (OnDelete::Keep, _) => "gone from the CRM; on_delete = \"keep\" leaves Pendo's value",
            (OnDelete::Clear, Some("null")) => "gone from the CRM; a clear is queued in the outbox",
            (OnDelete::Clear, _) => {
                "gone from the CRM; the next reconcile (or resync) clears it in Pendo"
            }
        };
        Some((Class::Orphan, note.to_owned()))
    }
}

// ---- progress ------------------------------------------------------------------------------

/// Progress on stderr: an in-place line on a terminal, `info` logs every few thousand otherwise.
struct Ticker {
    mapping: String,
    tty: bool,
    logged_records: u64,
    logged_rows: u64,
}

impl Ticker {
    fn new(mapping: &str) -> Ticker {
        Ticker {
            mapping: mapping.to_owned(),
            tty: std::io::stderr().is_terminal(),
            logged_records: 0,
            logged_rows: 0,
        }
    }

    fn records(&mut self, read: u64, set_aside: u64) {
        if self.tty {
            eprint!(
                "\r\x1b[2Kaudit {}: {read} CRM records read, {set_aside} set aside",
                self.mapping
            );
        } else if read / LOG_EVERY > self.logged_records / LOG_EVERY {
            self.logged_records = read;
            tracing::info!(mapping = %self.mapping, records = read, set_aside, "Audit: reading the CRM.");
        }
    }

    fn pendo_rows(&mut self, read: u64) {
        if self.tty {
            eprint!("\r\x1b[2Kaudit {}: {read} Pendo rows read", self.mapping);
        } else if read / LOG_EVERY > self.logged_rows / LOG_EVERY {
            self.logged_rows = read;
            tracing::info!(mapping = %self.mapping, rows = read, "Audit: reading Pendo.");
        }
    }

    fn finish(&self, records: u64, differences: u64) {
        if self.tty {
            eprintln!(
                "\r\x1b[2Kaudit {}: {records} CRM records read, {differences} differences",
                self.mapping
            );
        } else {
            tracing::info!(mapping = %self.mapping, records, differences, "Audit of the mapping finished.");
        }
    }
}

// ---- rendering -----------------------------------------------------------------------------

/// The report as text in `format`.
pub fn render(report: &AuditReport, format: Format) -> String {
    match format {
        Format::Table => render_table(report),
        Format::Json => {
            let mut s = serde_json::to_string_pretty(report).expect("the report serializes");
            s.push('\n');
            s
        }
        Format::Csv => render_csv(report),
        Format::Markdown => render_markdown(report),
    }
}

fn shown_classes(report: &AuditReport) -> Vec<Class> {
    Class::ALL
        .into_iter()
        .filter(|c| {
            report.against == Against::Pendo || !matches!(c, Class::Drift | Class::Unmatched)
        })
        .collect()
}

fn row_cells(report: &AuditReport, r: &AuditRow) -> Vec<String> {
    let v = |s: &Option<String>| s.clone().unwrap_or_default();
    let mut cells = vec![
        r.mapping.clone(),
        r.kind.to_string(),
        r.id.clone(),
        r.field.clone(),
        v(&r.crm),
        v(&r.shadow),
    ];
    if report.against == Against::Pendo {
        cells.push(r.pendo.clone().flatten().unwrap_or_default());
    }
    cells.push(r.class.as_str().to_owned());
    cells.push(r.note.clone());
    cells
}

fn row_header(report: &AuditReport) -> Vec<&'static str> {
    let mut h = vec!["mapping", "kind", "id", "field", "crm", "shadow"];
    if report.against == Against::Pendo {
        h.push("pendo");
    }
    h.extend(["class", "note"]);
    h
}

/// One line of text: control characters (newlines in CRM values) would break the layout.
fn flat(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

fn clip(s: &str, max: usize) -> String {
    let s = flat(s);
    if s.chars().count() <= max {
        s
    } else {
        let mut cut: String = s.chars().take(max - 1).collect();
        cut.push('…');
        cut
    }
}

fn aligned(lines: &[Vec<String>]) -> String {
    let cols = lines.iter().map(Vec::len).max().unwrap_or(0);
    let width: Vec<usize> = (0..cols)
        .map(|i| {
            lines
                .iter()
                .filter_map(|l| l.get(i))
                .map(|c| c.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for l in lines {
        let cells: Vec<String> = l
            .iter()
            .enumerate()
            .map(|(i, c)| {
                if i + 1 == l.len() {
                    c.clone()
                } else {
                    format!("{c:<w$}", w = width[i])
                }
            })
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

fn render_table(report: &AuditReport) -> String {
    let classes = shown_classes(report);
    let mut out = format!(
        "audit against {} (dry run: nothing was written or sent){}\n\n",
        match report.against {
            Against::Shadow => "the shadow copy",
            Against::Pendo => "the shadow copy and Pendo",
        },
        if report.state_file_exists {
            ""
        } else {
            "; no state file yet, so the shadow is empty"
        }
    );
    let mut lines = vec![
        ["mapping", "kind", "records"]
            .iter()
            .map(|s| s.to_string())
            .chain(classes.iter().map(|c| c.as_str().to_owned()))
            .collect::<Vec<_>>(),
    ];
    for m in &report.mappings {
        lines.push(
            [m.mapping.clone(), m.kind.to_string(), m.records.to_string()]
                .into_iter()
                .chain(classes.iter().map(|c| m.counts[c].to_string()))
                .collect(),
        );
    }
    out.push_str(&aligned(&lines));
    for m in &report.mappings {
        if let Some(guard) = &m.guard {
            out.push_str(&format!("\n{}: the guard {guard}\n", m.mapping));
        }
    }
    if report.rows.is_empty() {
        out.push_str("\nno differences\n");
        return out;
    }
    out.push_str(&format!(
        "\n{} of {} differences (--format json|csv|markdown lists them all):\n\n",
        report.rows.len().min(TABLE_ROWS),
        report.rows.len()
    ));
    let header = row_header(report);
    let mut lines = vec![header.iter().map(|s| s.to_string()).collect::<Vec<_>>()];
    for r in report.rows.iter().take(TABLE_ROWS) {
        let cells = row_cells(report, r);
        let last = cells.len() - 1;
        lines.push(
            cells
                .iter()
                .enumerate()
                .map(|(i, c)| clip(c, if i == last { 100 } else { 32 }))
                .collect(),
        );
    }
    out.push_str(&aligned(&lines));
    out
}

/// One CSV cell. A cell that starts with `=`, `+`, `-`, `@`, a tab or a carriage return is
/// prefixed with `'` (OWASP's advice against CSV injection): CRM values (a HubSpot form field)
/// are attacker-controlled, and a spreadsheet would run `=HYPERLINK(…)` as a formula. A
/// negative number (`-5`) gets the prefix too: the spreadsheet shows it as text, which is the
/// price OWASP asks. Then the cell is quoted if it holds a comma, a quote or a line break.
fn csv_cell(s: &str) -> String {
    let s: std::borrow::Cow<'_, str> = if s.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{s}").into()
    } else {
        s.into()
    };
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.into_owned()
    }
}

/// Header + one line per non-`in_sync` (id, field). Empty cells are null/absent.
fn render_csv(report: &AuditReport) -> String {
    let mut header = row_header(report);
    header.insert(3, "crm_id");
    let mut out = header.join(",");
    out.push('\n');
    for r in &report.rows {
        let mut cells = row_cells(report, r);
        cells.insert(3, r.crm_id.clone().unwrap_or_default());
        let line: Vec<String> = cells.iter().map(|c| csv_cell(c)).collect();
        out.push_str(&line.join(","));
        out.push('\n');
    }
    out
}

fn md_cell(s: &str) -> String {
    flat(s).replace('\\', "\\\\").replace('|', "\\|")
}

fn md_table(header: &[String], lines: &[Vec<String>]) -> String {
    let mut out = format!("| {} |\n", header.join(" | "));
    out.push_str(&format!("|{}\n", "---|".repeat(header.len())));
    for l in lines {
        let cells: Vec<String> = l.iter().map(|c| md_cell(c)).collect();
        out.push_str(&format!("| {} |\n", cells.join(" | ")));
    }
    out
}

fn render_markdown(report: &AuditReport) -> String {
    let classes = shown_classes(report);
    let mut out = format!(
        "# pendo-sync audit\n\nAgainst **{}**, {} (dry run: nothing was written or sent).\n\n## Summary\n\n",
        match report.against {
            Against::Shadow => "shadow",
            Against::Pendo => "pendo",
        },
        report.generated_at
    );
    let header: Vec<String> = ["mapping", "kind", "records"]
        .iter()
        .map(|s| s.to_string())
        .chain(classes.iter().map(|c| c.as_str().to_owned()))
        .collect();
    let lines: Vec<Vec<String>> = report
        .mappings
        .iter()
        .map(|m| {
            [m.mapping.clone(), m.kind.to_string(), m.records.to_string()]
                .into_iter()
                .chain(classes.iter().map(|c| m.counts[c].to_string()))
                .collect()
        })
        .collect();
    out.push_str(&md_table(&header, &lines));
    out.push_str("\n## Differences\n\n");
    if report.rows.is_empty() {
        out.push_str("None: everything is in sync.\n");
        return out;
    }
    let mut header: Vec<String> = row_header(report).iter().map(|s| s.to_string()).collect();
    header.push("last event".into());
    let lines: Vec<Vec<String>> = report
        .rows
        .iter()
        .map(|r| {
            let mut cells = row_cells(report, r);
            cells.push(r.last_event.as_ref().map_or_else(String::new, |e| {
                format!("{} {}: {}", e.at, e.event.as_str(), e.summary)
            }));
            cells
        })
        .collect();
    out.push_str(&md_table(&header, &lines));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn report() -> AuditReport {
        let mut totals = zero_counts();
        totals.insert(Class::Drift, 1);
        totals.insert(Class::InSync, 4);
        AuditReport {
            against: Against::Pendo,
            generated_at: "2026-01-01T00:00:00.000Z".into(),
            state_file: "/tmp/state.db".into(),
            state_file_exists: true,
            mappings: vec![MappingSummary {
                mapping: "accounts".into(),
                kind: Kind::Account,
                source: "fixture",
                records: 1,
                pendo_rows: Some(1),
                counts: totals.clone(),
                guard: None,
            }],
            totals,
            rows: vec![AuditRow {
                mapping: "accounts".into(),
                kind: Kind::Account,
                id: "a1".into(),
                crm_id: Some("c1".into()),
                field: "plantier".into(),
                crm: Some("Gold, \"big\" | tier".into()),
                shadow: Some("Gold".into()),
                pendo: Some(None),
                class: Class::Drift,
                note: "n".into(),
                last_event: None,
            }],
        }
    }

    #[test]
    fn csv_quotes_commas_and_quotes() {
        let csv = render(&report(), Format::Csv);
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(
            lines[0],
            "mapping,kind,id,crm_id,field,crm,shadow,pendo,class,note"
        );
        assert_eq!(
            lines[1],
            "accounts,account,a1,c1,plantier,\"Gold, \"\"big\"\" | tier\",Gold,,drift,n"
        );
    }

    #[test]
    fn csv_neutralises_cells_a_spreadsheet_would_run_as_formulas() {
        assert_eq!(
            csv_cell("=HYPERLINK(\"http://x\")"),
            "\"'=HYPERLINK(\"\"http://x\"\")\""
        );
        assert_eq!(csv_cell("+1+2"), "'+1+2");
        assert_eq!(csv_cell("-5"), "'-5");
        assert_eq!(csv_cell("@SUM(A1:A2)"), "'@SUM(A1:A2)");
        assert_eq!(csv_cell("\tcmd"), "'\tcmd");
        assert_eq!(csv_cell("\rcmd"), "\"'\rcmd\"");
        assert_eq!(csv_cell("=1,2"), "\"'=1,2\"");
        // Not at the start: left alone.
        assert_eq!(csv_cell("a=b"), "a=b");
        assert_eq!(csv_cell("5"), "5");
        assert_eq!(csv_cell(""), "");

        let mut r = report();
        r.rows[0].crm = Some("=cmd|' /C calc'!A0".into());
        r.rows[0].id = "@a1".into();
        let csv = render(&r, Format::Csv);
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(
            lines[1],
            "accounts,account,'@a1,c1,plantier,'=cmd|' /C calc'!A0,Gold,,drift,n"
        );
    }

    #[test]
    fn markdown_escapes_pipes() {
        let md = render(&report(), Format::Markdown);
        assert!(md.contains("Gold, \"big\" \\| tier"), "{md}");
        assert!(md.contains("| mapping | kind | records |"), "{md}");
    }

    #[test]
    fn pendo_values_normalise_to_the_field_type() {
        assert_eq!(
            pendo_stored(&json!("2026-11-01T00:00:00Z"), FieldType::Date),
            pendo_stored(&json!(1_793_491_200_000i64), FieldType::Date)
        );
        assert_eq!(
            pendo_stored(&json!("1000"), FieldType::Number),
            Some("1000".into())
        );
        assert_eq!(pendo_stored(&json!(""), FieldType::String), None);
        assert_eq!(
            pendo_stored(&json!("lots"), FieldType::Number),
            Some("\"lots\"".into())
        );
    }

    #[test]
    fn only_gaps_fail_the_audit() {
        let mut r = report();
        assert!(r.has_drift());
        r.totals.insert(Class::Drift, 0);
        r.totals.insert(Class::Invalid, 3);
        assert!(!r.has_drift());
    }
}
