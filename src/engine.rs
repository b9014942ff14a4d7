//! One sync cycle for one mapping: pull pages from the connector → map → diff against shadow and
//! outbox → commit each page's changes together with its watermark.
//!
//! The cycle never talks to Pendo; the [`crate::pendo::Writer`] drains the outbox afterwards. That
//! split is what makes a crash harmless at every step: before a page commits, nothing happened
//! (the page is read again); after, its changes are durable in the outbox.
//!
//! Modes:
//! - **incremental**: from the stored watermark (minus the connector's overlap);
//! - **reconcile**: a full pull that also clears values of records gone from the CRM (or the
//!   filter) when `on_delete = "clear"`;
//! - **resync**: a reconcile that sends every mapped value whatever the shadow says.
//!
//! With `dry_run` nothing is written: the changes are returned instead.
//!
//! Reconciles take a shortcut past unchanged records: each record's mapped values are hashed
//! ([`crate::digest`]), and a record whose digest equals the one the store kept from its last
//! empty diff (see [`Store::load_digests`]) skips the shadow load and the diff.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::BuildHasherDefault;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::OnDelete;
use crate::connectors::{Connector, ConnectorError, Page, PullSpec, RawRecord, Watermark};
use crate::diff::{clear_record, diff_record};
use crate::digest::{AlreadyHashed, DigestSeed, IdMap, id_hash, values_digest};
use crate::domain::now_ms;
use crate::guard::FieldCounts;
use crate::mapping::{MappedRecord, Mapping, RecordError};
use crate::metrics::{
    CHANGES_DETECTED, CYCLE_DURATION, INVALID_RECORDS, LAST_SUCCESS, RECORDS_PULLED,
};
use crate::store::{
    Adopted, Change, DiffState, GuardOutcome, InvalidRecord, PageCommit, Source, Store, StoreError,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Incremental,
    Reconcile,
    Resync,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Incremental => "incremental",
            Mode::Reconcile => "reconcile",
            Mode::Resync => "resync",
        }
    }

    fn full(self) -> bool {
        self != Mode::Incremental
    }

    /// What a cycle of this mode pulls, for its log line: an incremental cycle of a mapping with
    /// no watermark yet (its first, on an empty state) reads everything, and is said so.
    pub fn pull_label(self, has_watermark: bool) -> &'static str {
        match self {
            Mode::Incremental if !has_watermark => FIRST_PULL,
            mode => mode.as_str(),
        }
    }
}

/// How the log names a mapping's first pull: incremental in name, everything in fact.
pub const FIRST_PULL: &str = "full (first pull: no watermark yet)";

/// What a cycle saw and did.
#[derive(Debug, Clone, Default)]
pub struct CycleReport {
    pub mapping: String,
    pub pulled: u64,
    pub changes: u64,
    pub invalid: u64,
    pub skipped_empty_ids: u64,
    pub ambiguous: u64,
    pub deleted: u64,
    pub cleared_orphans: u64,
    pub pages: u64,
    /// Records whose values matched their stored digest, so they skipped the diff.
    pub unchanged_by_digest: u64,
    /// Only filled on dry runs: the changes that would have been enqueued.
    pub dry_run_changes: Vec<Change>,
    /// Per mapped field (parallel to the mapping's fields): this cycle's sets, clears and
    /// overwrites, and the values the shadow holds among the records it covered.
    pub field_counts: Vec<FieldCounts>,
    /// What the guard did with the cycle's staged changes (not on dry runs).
    pub guard: Option<GuardOutcome>,
    /// Dry runs: why the guard would hold this cycle, if it would.
    pub would_hold: Option<String>,
    /// Seconds the guard took to decide over the staged changes (count, then pass or hold).
    pub guard_seconds: f64,
    /// Staged values dropped because Pendo already held them (adopted before a first push).
    pub adopted: u64,
}

impl CycleReport {
    /// [`CycleReport::field_counts`] by Pendo field.
    pub fn counts_by_field(&self, mapping: &Mapping) -> BTreeMap<String, FieldCounts> {
        mapping
            .fields
            .iter()
            .zip(&self.field_counts)
            .map(|(f, c)| (f.pendo_field.clone(), *c))
            .collect()
    }

    fn add_counts(&mut self, counts: &[FieldCounts]) {
        if self.field_counts.len() < counts.len() {
            self.field_counts
                .resize(counts.len(), FieldCounts::default());
        }
        for (total, c) in self.field_counts.iter_mut().zip(counts) {
            total.sets += c.sets;
            total.clears += c.clears;
            total.overwrites += c.overwrites;
            total.covered += c.covered;
        }
    }
}

/// Counts what `changes` do to the shadow (first fills, clears, overwrites) into `counts`
/// (indexed like `mapping.fields`).
fn classify<'s>(
    mapping: &Mapping,
    changes: &[Change],
    shadow: impl Fn(&str) -> Option<&'s crate::store::ShadowRecord>,
    counts: &mut [FieldCounts],
) {
    for c in changes {
        let Some(i) = mapping.fields.iter().position(|f| f.pendo_field == c.field) else {
            continue;
        };
        let held = shadow(&c.pendo_id).and_then(|r| r.get(&c.field));
        let value = crate::domain::Value::from_stored(&c.value).ok();
        match (held, value) {
            (Some(_), Some(v)) if v.is_null() => counts[i].clears += 1,
            (Some(h), Some(v)) if !v.matches_stored(h) => counts[i].overwrites += 1,
            (Some(_), _) => {}
            (None, Some(v)) if v.is_null() => {}
            (None, _) => counts[i].sets += 1,
        }
    }
}

/// A page's coverage as the store keeps it with the staged rows: (Pendo field, values covered).
fn cover_of(mapping: &Mapping, counts: &[FieldCounts]) -> Vec<(String, u64)> {
    mapping
        .fields
        .iter()
        .zip(counts)
        .filter(|(_, c)| c.covered > 0)
        .map(|(f, c)| (f.pendo_field.clone(), c.covered))
        .collect()
}

/// Adds one covered record's held values (its shadow row) to `counts`.
fn cover_shadow(
    mapping: &Mapping,
    shadow: Option<&crate::store::ShadowRecord>,
    counts: &mut [FieldCounts],
) {
    if let Some(record) = shadow {
        for (i, f) in mapping.fields.iter().enumerate() {
            if record.contains_key(&f.pendo_field) {
                counts[i].covered += 1;
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CycleError {
    #[error("mapping {mapping}: {source}")]
    Connector {
        mapping: String,
        #[source]
        source: ConnectorError,
    },
    #[error("mapping {mapping}: {message}")]
    Adopt { mapping: String, message: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Observes progress (pages read, changes found), for progress bars and logs.
pub trait Progress: Send + Sync {
    fn page(&self, _report: &CycleReport) {}
}

impl Progress for () {}

/// What Pendo holds, by (Pendo id, field): values in the outbox's stored form.
pub type PendoHeld = HashMap<(String, String), String>;

/// Adopts what Pendo holds for fields before their first push, so that the guard judges the
/// staged values against it (DESIGN, "The guard"). The App's reads Pendo
/// ([`crate::pendo::adopt`]); a cycle run without one (the benches) adopts nothing.
pub trait Adopter: Send + Sync {
    /// Adopts Pendo's values of `fields` for `mapping`'s staged rows. At-least-once: a failed
    /// adoption leaves the rows staged, and the next cycle adopts again.
    fn adopt<'a>(
        &'a self,
        store: &'a Store,
        mapping: &'a Mapping,
        fields: &'a [&'a crate::mapping::FieldMap],
    ) -> crate::connectors::BoxFuture<'a, Result<Adopted, String>>;

    /// What Pendo holds for `fields`, by (Pendo id, field), in the outbox's stored form; for
    /// dry runs, which adopt nothing.
    fn read_held<'a>(
        &'a self,
        mapping: &'a Mapping,
        fields: &'a [&'a crate::mapping::FieldMap],
    ) -> crate::connectors::BoxFuture<'a, Result<PendoHeld, String>>;
}

/// Runs one cycle of `mapping` through `connector`.
#[allow(clippy::too_many_arguments)]
pub async fn run_cycle(
    store: &Store,
    connector: &dyn Connector,
    mapping: &Mapping,
    spec_for: impl FnOnce(Option<Watermark>) -> PullSpec,
    mode: Mode,
    dry_run: bool,
    adopter: Option<&dyn Adopter>,
    progress: &dyn Progress,
) -> Result<CycleReport, CycleError> {
    let started = Instant::now();
    let since = match mode {
        Mode::Incremental => store.watermark(&mapping.name).await?,
        _ => None,
    };
    // The run record keeps the scheduled mode; the log says what the pull was.
    let pull = mode.pull_label(since.is_some());
    let run_id = if dry_run {
        None
    } else {
        Some(store.start_run(&mapping.name, mode.as_str()).await?)
    };
    let mut report = CycleReport {
        mapping: mapping.name.clone(),
        ..CycleReport::default()
    };
    let result = pull_all(
        store,
        connector,
        mapping,
        spec_for(since),
        mode,
        dry_run,
        run_id,
        adopter,
        &mut report,
        progress,
    )
    .await;
    let seconds = started.elapsed().as_secs_f64();
    metrics::histogram!(CYCLE_DURATION, "mapping" => mapping.name.clone()).record(seconds);
    if let Some(id) = run_id {
        let error = result.as_ref().err().map(|e| e.to_string());
        store
            .finish_run(
                id,
                report.pulled,
                report.changes,
                report.invalid,
                error.as_deref(),
            )
            .await?;
    }
    match result {
        Ok(()) => {
            if !dry_run {
                metrics::gauge!(LAST_SUCCESS, "mapping" => mapping.name.clone())
                    .set(now_ms() as f64 / 1000.0);
            }
            tracing::info!(
                mapping = %mapping.name,
                mode = pull,
                pulled = report.pulled,
                changes = report.changes,
                invalid = report.invalid,
                ambiguous = report.ambiguous,
                unchanged_by_digest = report.unchanged_by_digest,
                seconds,
                "Cycle finished."
            );
            Ok(report)
        }
        Err(e) => Err(e),
    }
}

/// What one pull has seen of each Pendo id, to find ambiguous ids and, on full pulls, orphans.
///
/// Ids are kept as 64-bit hashes so a million-record pull costs a few tens of MB; a collision
/// (odds ~1e-8 at a million ids) could only hold back a record as ambiguous or skip one orphan
/// clear until the next reconcile.
#[derive(Default)]
struct Seen {
    /// pendo id hash → (crm id hash, values digest)
    ids: IdMap<(u64, u64)>,
    ambiguous: HashSet<u64, BuildHasherDefault<AlreadyHashed>>,
    /// CRM id hashes of the live records that claim a Pendo id (clean or ambiguous), and of
    /// those set aside: a full pull forgets the claims and set-aside entries of the others.
    claimants: HashSet<u64, BuildHasherDefault<AlreadyHashed>>,
    set_aside: HashSet<u64, BuildHasherDefault<AlreadyHashed>>,
    /// CRM id hashes of the records this pull saw deleted.
    deleted: HashSet<u64, BuildHasherDefault<AlreadyHashed>>,
}

/// The digest stored for a record: its values and who claims them, so a record skipped by its
/// digest is the same claimant as when the digest (and its claim) was written.
fn stored_digest(values: u64, crm_hash: u64) -> u64 {
    values ^ crm_hash.rotate_left(29).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// A record that mapped cleanly, with the hashes the rest of the cycle needs.
struct Mapped {
    rec: MappedRecord,
    pendo_hash: u64,
    crm_hash: u64,
    digest: u64,
}

/// One page after mapping: clean records, and the ones set aside (with their deleted flag).
struct MappedPage {
    /// The page's share of [`RECORDS_AHEAD`], given back when its diff is done.
    budget: Option<tokio::sync::OwnedSemaphorePermit>,
    watermark: Option<Watermark>,
    pulled: u64,
    ok: Vec<Mapped>,
    errors: Vec<(bool, RecordError)>,
}

/// Maps a page. Mapping is the pipeline's longest stage, so a page is cut in two halves mapped
/// on two blocking threads (which also free the raw records).
async fn map_page(mapping: &Arc<Mapping>, seed: &DigestSeed, page: Page) -> MappedPage {
    let Page {
        mut records,
        watermark,
    } = page;
    let pulled = records.len() as u64;
    let second = records.split_off(records.len() / 2);
    let half = |records: Vec<RawRecord>| {
        let (m, s) = (mapping.clone(), seed.clone());
        async move {
            tokio::task::spawn_blocking(move || map_records(&m, &s, records))
                .await
                .expect("mapping does not panic")
        }
    };
    let ((mut ok, mut errors), (ok2, errors2)) = tokio::join!(half(records), half(second));
    ok.extend(ok2);
    errors.extend(errors2);
    MappedPage {
        budget: None,
        watermark,
        pulled,
        ok,
        errors,
    }
}

/// Pure CPU work on owned data.
#[allow(clippy::type_complexity)]
fn map_records(
    mapping: &Mapping,
    seed: &DigestSeed,
    records: Vec<RawRecord>,
) -> (Vec<Mapped>, Vec<(bool, RecordError)>) {
    let mut ok = Vec::with_capacity(records.len());
    let mut errors = Vec::new();
    for raw in &records {
        match mapping.map(raw) {
            Ok(rec) => ok.push(Mapped {
                pendo_hash: id_hash(&rec.pendo_id),
                crm_hash: id_hash(&rec.crm_id),
                digest: values_digest(seed, &rec),
                rec,
            }),
            Err(e) => errors.push((raw.deleted, e)),
        }
    }
    (ok, errors)
}

/// One page, checked, with the shadow and outbox state of the ids it must diff.
struct Prepared {
    /// Per mapped field: values covered by the records skipped by their digest.
    skipped_cover: Vec<FieldCounts>,
    /// Held until the page's diff is done (dropped with it).
    _budget: Option<tokio::sync::OwnedSemaphorePermit>,
    watermark: Option<Watermark>,
    /// Records to diff, with their value digests.
    live: Vec<(MappedRecord, u64)>,
    gone: Vec<MappedRecord>,
    held_back: Vec<String>,
    invalid: Vec<InvalidRecord>,
    valid_crm_ids: Vec<String>,
    shadow: HashMap<String, crate::store::ShadowRecord>,
    outbox: HashMap<String, HashMap<String, String>>,
    /// The shadow sequence number of the snapshot `shadow` and `outbox` come from.
    shadow_seq: i64,
    claims: Vec<crate::store::Claim>,
    forget: Vec<String>,
}

/// What one page writes.
#[derive(Default)]
struct PageWrite {
    changes: Vec<Change>,
    unqueue: Vec<Change>,
    invalid: Vec<InvalidRecord>,
    valid_crm_ids: Vec<String>,
    watermark: Option<Watermark>,
    /// Records found in sync, for the store's digests, and the snapshot they were found in.
    digests: Vec<(String, u64)>,
    shadow_seq: i64,
    claims: Vec<crate::store::Claim>,
    forget: Vec<String>,
    /// Per mapped field: what this page's changes do, and the values it covered.
    counts: Vec<FieldCounts>,
}

/// Records the fetch-and-map side may hold ahead of the rest: enough to keep both cores busy
/// while a reconcile loads its digests (32 of Salesforce's 2,000-record query pages, some 25 MB
/// mapped). Bounded in records, not pages: a Bulk 2.0 page is 50,000 records. A page larger
/// than this runs alone. Beyond it, one more page may be in the middle of being fetched.
pub const RECORDS_AHEAD: usize = 64_000;

/// Pages in the channel: the records bound above is what limits memory; this only sizes it.
const PAGES_AHEAD: usize = 64;

/// Pages flow through a pipeline so both cores work. One side fetches page N+1 from the CRM
/// while page N is mapped on a blocking thread, and hands mapped pages over a bounded channel.
/// The other side checks page N (ambiguity, digests) and loads its shadow and outbox state
/// while page N-1 is diffed (on a blocking thread) and committed (on SQLite's). Commits stay in
/// page order, so the watermark only moves forward; a page's diff sees the previous page's
/// changes through an overlay, whether or not that commit had landed when its outbox state was
/// read.
#[allow(clippy::too_many_arguments)]
async fn pull_all(
    store: &Store,
    connector: &dyn Connector,
    mapping: &Mapping,
    spec: PullSpec,
    mode: Mode,
    dry_run: bool,
    run: Option<i64>,
    adopter: Option<&dyn Adopter>,
    report: &mut CycleReport,
    progress: &dyn Progress,
) -> Result<(), CycleError> {
    let connector_error = |source| CycleError::Connector {
        mapping: mapping.name.clone(),
        source,
    };
    let shared = Arc::new(mapping.clone());
    let for_diff = shared.clone();
    let seed = DigestSeed::new(mapping);
    let mut pull = connector.pull(spec).await.map_err(connector_error)?;
    let (tx, rx) = tokio::sync::mpsc::channel(PAGES_AHEAD);
    let budget = Arc::new(tokio::sync::Semaphore::new(RECORDS_AHEAD));
    let produce = async move {
        let mut next = pull.next_page().await;
        loop {
            let page = match next {
                Ok(Some(page)) => page,
                Ok(None) => break,
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    break;
                }
            };
            // The page's records count against the budget until its diff is done.
            let want = page.records.len().clamp(1, RECORDS_AHEAD) as u32;
            let Ok(permit) = budget.clone().acquire_many_owned(want).await else {
                break;
            };
            let (mut mapped, fetched) =
                tokio::join!(map_page(&shared, &seed, page), pull.next_page());
            mapped.budget = Some(permit);
            if tx.send(Ok(mapped)).await.is_err() {
                break; // the other side stopped on an error
            }
            next = fetched;
        }
    };
    let mut seen = Seen::default();
    let (_, consumed) = tokio::join!(
        produce,
        consume(
            store, mapping, for_diff, rx, mode, dry_run, run, &mut seen, report, progress
        )
    );
    consumed?;
    if mode.full() && mapping.on_delete == OnDelete::Clear {
        clear_orphans(store, mapping, &seen, dry_run, run, report).await?;
    }
    // The pull is complete: the guard decides over the mapping's staged changes (guarantee 9).
    if dry_run {
        let mut by_field = report.counts_by_field(mapping);
        let context = store
            .guard_context(&mapping.name, mapping.kind, &mapping.guard)
            .await?;
        crate::guard::apply_context(&mut by_field, &context);
        if let Some(adopter) = adopter {
            adopt_in_memory(store, mapping, adopter, report, &mut by_field).await?;
        }
        report.would_hold =
            crate::guard::evaluate(&mapping.guard, mapping.kind, &by_field).map(|t| t.summary());
    } else {
        if let Some(adopter) = adopter {
            adopt_first_pushes(store, mapping, adopter, report).await?;
        }
        let guard_started = Instant::now();
        let outcome = store
            .finish_staged(&mapping.name, mapping.kind, &mapping.guard)
            .await?;
        report.guard_seconds = guard_started.elapsed().as_secs_f64();
        // What a full pull did not see is forgotten (claims, set-aside entries) only if the guard
        // let the pull through: a held pull (a filter typo) may be wrong about what is gone.
        if mode.full() && !matches!(outcome, GuardOutcome::Held { .. }) {
            forget_unseen(store, mapping, &seen).await?;
        }
        if let GuardOutcome::Held {
            hold_id,
            new,
            reason,
            values,
        } = &outcome
        {
            if *new {
                tracing::error!(mapping = %mapping.name, hold = hold_id, values, %reason, "The guard HELD this cycle's changes: nothing of it goes to Pendo until a person approves (`pendo-sync holds show {hold_id}`).");
            } else {
                tracing::warn!(mapping = %mapping.name, hold = hold_id, values, "This cycle's changes joined the mapping's open hold.");
            }
        }
        report.guard = Some(outcome);
    }
    Ok(())
}

/// The fields this cycle fills for the first time in the mapping: first fills among its
/// changes, no value of the field in the shadow (a field with values was pushed before, on a
/// state from before adoption too), and not adopted before (its ids may all be unknown to Pendo,
/// leaving the shadow empty).
async fn first_pushes<'m>(
    store: &Store,
    mapping: &'m Mapping,
    report: &CycleReport,
) -> Result<Vec<&'m crate::mapping::FieldMap>, CycleError> {
    let filling = |i: usize| report.field_counts.get(i).is_some_and(|c| c.sets > 0);
    if !(0..mapping.fields.len()).any(filling) {
        return Ok(Vec::new());
    }
    let context = store
        .guard_context(&mapping.name, mapping.kind, &mapping.guard)
        .await?;
    let mut fields = Vec::new();
    for (i, f) in mapping.fields.iter().enumerate() {
        if filling(i)
            && context.get(&f.pendo_field).is_none_or(|c| c.total == 0)
            && store
                .kv_get(&crate::store::adopted_key(&mapping.name, &f.pendo_field))
                .await?
                .is_none()
        {
            fields.push(f);
        }
    }
    Ok(fields)
}

/// Before the guard: what Pendo holds for the fields of this cycle's first pushes is adopted.
async fn adopt_first_pushes(
    store: &Store,
    mapping: &Mapping,
    adopter: &dyn Adopter,
    report: &mut CycleReport,
) -> Result<(), CycleError> {
    let fields = first_pushes(store, mapping, report).await?;
    if fields.is_empty() {
        return Ok(());
    }
    let adopted = adopter
        .adopt(store, mapping, &fields)
        .await
        .map_err(|message| CycleError::Adopt {
            mapping: mapping.name.clone(),
            message,
        })?;
    report.adopted += adopted.equal;
    for f in &fields {
        store
            .kv_set(
                &crate::store::adopted_key(&mapping.name, &f.pendo_field),
                &now_ms().into(),
            )
            .await?;
    }
    if adopted.seeded > 0 {
        tracing::info!(mapping = %mapping.name, pendo_values = adopted.seeded, equal = adopted.equal, "Pendo already held values of fields pendo-sync had not written yet: adopted (equal ones are not sent; different ones count as overwrites).");
    }
    Ok(())
}

/// A dry run's adoption, in memory: the first fills of first-pushed fields are judged against
/// what Pendo holds (equal ones leave the changes; different ones count as overwrites of the
/// values Pendo holds), and `by_field` says so.
async fn adopt_in_memory(
    store: &Store,
    mapping: &Mapping,
    adopter: &dyn Adopter,
    report: &mut CycleReport,
    by_field: &mut BTreeMap<String, FieldCounts>,
) -> Result<(), CycleError> {
    let fields = first_pushes(store, mapping, report).await?;
    if fields.is_empty() {
        return Ok(());
    }
    let held = adopter
        .read_held(mapping, &fields)
        .await
        .map_err(|message| CycleError::Adopt {
            mapping: mapping.name.clone(),
            message,
        })?;
    let first: HashSet<&str> = fields.iter().map(|f| f.pendo_field.as_str()).collect();
    let mut adopted = 0;
    report.dry_run_changes.retain(|c| {
        if !first.contains(c.field.as_str()) {
            return true;
        }
        let Some(pendo) = held.get(&(c.pendo_id.clone(), c.field.clone())) else {
            return true;
        };
        let counts = by_field.entry(c.field.clone()).or_default();
        counts.sets = counts.sets.saturating_sub(1);
        counts.total += 1;
        if *pendo == c.value {
            adopted += 1;
            false
        } else {
            counts.overwrites += 1;
            true
        }
    });
    report.adopted += adopted;
    report.changes = report.changes.saturating_sub(adopted);
    Ok(())
}

/// The checking, diffing and committing side of [`pull_all`]. Owns the channel's receiving end,
/// so returning early (on an error) stops the fetching side too.
#[allow(clippy::too_many_arguments)]
async fn consume(
    store: &Store,
    mapping: &Mapping,
    shared: Arc<Mapping>,
    mut pages: tokio::sync::mpsc::Receiver<Result<MappedPage, ConnectorError>>,
    mode: Mode,
    dry_run: bool,
    run: Option<i64>,
    seen: &mut Seen,
    report: &mut CycleReport,
    progress: &dyn Progress,
) -> Result<(), CycleError> {
    let force = mode == Mode::Resync;
    // Clearing earlier set-aside entries costs a lookup per record; skip it when there are none.
    let mut any_invalid = !dry_run && store.has_invalid_records(&mapping.name).await?;
    // A reconcile re-reads everything, and most of it has not changed: records matching the
    // digest of their last empty diff skip the shadow load and the diff. (Incremental pulls
    // bring changed records; a resync sends everything whatever the shadow says.)
    let stored = match mode {
        Mode::Reconcile => {
            let started = Instant::now();
            let digests = store.load_digests(mapping.kind, &mapping.name).await?;
            tracing::debug!(mapping = %mapping.name, digests = digests.len(), seconds = started.elapsed().as_secs_f64(), "Loaded value digests.");
            Some(digests)
        }
        _ => None,
    };
    let mut ready: Option<Prepared> = None;
    let mut last_write: Option<PageWrite> = None;
    let mut fetch_error = None;
    let mut open = true;
    while open || ready.is_some() {
        let to_diff = ready.take();
        let previous = last_write.take();
        let clear_valid = !any_invalid;
        let (prepared, written) = tokio::join!(
            async {
                if !open {
                    return Ok(None);
                }
                match pages.recv().await {
                    Some(Ok(page)) => {
                        report.pages += 1;
                        report.pulled += page.pulled;
                        metrics::counter!(RECORDS_PULLED, "mapping" => mapping.name.clone())
                            .increment(page.pulled);
                        prepare(
                            store,
                            mapping,
                            page,
                            mode.full(),
                            stored.as_ref(),
                            seen,
                            report,
                        )
                        .await
                        .map(Some)
                    }
                    Some(Err(e)) => {
                        fetch_error = Some(e);
                        Ok(None)
                    }
                    None => Ok(None),
                }
            },
            async {
                let Some(mut p) = to_diff else {
                    return Ok(None);
                };
                if let Some(w) = &previous {
                    overlay(&mut p.outbox, w);
                }
                let m = shared.clone();
                let mut write = tokio::task::spawn_blocking(move || diff_page(&m, p, force))
                    .await
                    .expect("the diff does not panic");
                if clear_valid {
                    write.valid_crm_ids.clear();
                }
                if !dry_run {
                    commit(store, mapping, &write, run).await?;
                }
                Ok::<_, CycleError>(Some(write))
            },
        );
        match prepared? {
            Some(p) => ready = Some(p),
            None => open = false,
        }
        if let Some(write) = written? {
            report.add_counts(&write.counts);
            any_invalid |= !write.invalid.is_empty();
            report.changes += write.changes.len() as u64;
            report.invalid += write.invalid.len() as u64;
            metrics::counter!(CHANGES_DETECTED, "mapping" => mapping.name.clone(), "kind" => mapping.kind.as_str())
                .increment(write.changes.len() as u64);
            if dry_run {
                report.dry_run_changes.extend(write.changes.iter().cloned());
            }
            progress.page(report);
            last_write = Some(write);
        }
    }
    match fetch_error {
        Some(source) => Err(CycleError::Connector {
            mapping: mapping.name.clone(),
            source,
        }),
        None => Ok(()),
    }
}

/// Sets bad and ambiguous records aside, drops the records whose stored digest shows them
/// unchanged, and loads the state the diff needs for the rest.
async fn prepare(
    store: &Store,
    mapping: &Mapping,
    page: MappedPage,
    full: bool,
    stored: Option<&IdMap<u64>>,
    seen: &mut Seen,
    report: &mut CycleReport,
) -> Result<Prepared, CycleError> {
    let mut invalid = Vec::new();
    let mut valid_crm_ids = Vec::with_capacity(page.ok.len());
    let mut live: Vec<(MappedRecord, u64)> = Vec::new();
    let mut gone: Vec<MappedRecord> = Vec::new();
    let mut claims: Vec<crate::store::Claim> = Vec::new();
    let mut forget: Vec<String> = Vec::new();
    // Values of the records skipped by their digest: covered, for the guard (they equal the
    // shadow's).
    let mut skipped_cover = vec![FieldCounts::default(); mapping.fields.len()];
    for (deleted, e) in page.errors {
        if matches!(e, RecordError::MissingId { .. }) {
            report.skipped_empty_ids += 1;
        }
        if deleted {
            // A deleted record with no usable id has nothing to clear; what we kept of it goes.
            forget.push(e.crm_id().to_owned());
            continue;
        }
        seen.set_aside.insert(id_hash(e.crm_id()));
        // A record set aside is still in the CRM: its Pendo id must not look like an orphan to
        // the reconcile, which would clear what Pendo holds for it.
        if let Some(pendo_id) = e.pendo_id() {
            seen.ids
                .entry(id_hash(pendo_id))
                .or_insert((id_hash(e.crm_id()), 0));
        }
        metrics::counter!(INVALID_RECORDS, "mapping" => mapping.name.clone(), "reason" => e.reason())
            .increment(1);
        tracing::warn!(mapping = %mapping.name, error = %e, "Set a record aside.");
        invalid.push(InvalidRecord {
            mapping: mapping.name.clone(),
            crm_id: e.crm_id().to_owned(),
            pendo_id: e.pendo_id().map(str::to_owned),
            reason: e.reason().to_owned(),
            detail: e.to_string(),
            seen_at: now_ms(),
        });
    }

    // An incremental pull sees only what changed: the other claimants of its Pendo ids come
    // from the claims the state keeps. (A full pull sees every live claimant itself.)
    let kept = if full || page.ok.is_empty() {
        HashMap::new()
    } else {
        let ids: Vec<&str> = page.ok.iter().map(|m| m.rec.pendo_id.as_str()).collect();
        store.load_claims(&mapping.name, &ids).await?
    };
    // The stored claims of records this pull has seen (deleted, or on this page, or claiming
    // something already) are out of date: only the others count.
    let in_page: HashSet<u64, BuildHasherDefault<AlreadyHashed>> =
        page.ok.iter().map(|m| m.crm_hash).collect();
    for m in page.ok.iter().filter(|m| m.rec.deleted) {
        seen.deleted.insert(m.crm_hash);
    }
    // Another record of this mapping, outside what this pull has seen, claims `pendo_id` (with
    // other values, when `digest` is given).
    let claimed_elsewhere = |pendo_id: &str, crm_id: &str, digest: Option<u64>, seen: &Seen| {
        kept.get(pendo_id).is_some_and(|list| {
            list.iter().any(|(other, d)| {
                let h = id_hash(other);
                other != crm_id
                    && !in_page.contains(&h)
                    && !seen.deleted.contains(&h)
                    && !seen.claimants.contains(&h)
                    && digest.is_none_or(|mine| *d != mine)
            })
        })
    };
    let mut gone_claimed: Vec<bool> = Vec::new();

    // Two CRM records mapping to one Pendo id with different values: hold both back.
    let mut held_back: Vec<String> = Vec::new();
    for Mapped {
        mut rec,
        pendo_hash: id,
        crm_hash,
        digest,
    } in page.ok
    {
        if rec.deleted {
            gone_claimed.push(claimed_elsewhere(&rec.pendo_id, &rec.crm_id, None, seen));
            forget.push(rec.crm_id.clone());
            gone.push(rec);
            continue;
        }
        let conflict = match seen.ids.get(&id) {
            Some(prev) => prev.0 != crm_hash && prev.1 != digest,
            None => {
                seen.ids.insert(id, (crm_hash, digest));
                false
            }
        };
        let elsewhere = claimed_elsewhere(&rec.pendo_id, &rec.crm_id, Some(digest), seen);
        seen.claimants.insert(crm_hash);
        if conflict || elsewhere || seen.ambiguous.contains(&id) {
            if seen.ambiguous.insert(id) {
                held_back.push(rec.pendo_id.clone());
            }
            report.ambiguous += 1;
            claims.push((rec.crm_id.clone(), rec.pendo_id.clone(), digest));
            invalid.push(InvalidRecord {
                mapping: mapping.name.clone(),
                detail: format!(
                    "record {}: Pendo id {} is also the id of another CRM record with different values{}; neither is sent until only one remains",
                    rec.crm_id,
                    rec.pendo_id,
                    if elsewhere && !conflict { "" } else { " in this pull" }
                ),
                crm_id: rec.crm_id,
                pendo_id: Some(rec.pendo_id),
                reason: "ambiguous_id".into(),
                seen_at: now_ms(),
            });
            metrics::counter!(INVALID_RECORDS, "mapping" => mapping.name.clone(), "reason" => "ambiguous_id")
                .increment(1);
            continue;
        }
        let keep = stored_digest(digest, crm_hash);
        if stored.is_some_and(|s| s.get(&id) == Some(&keep)) {
            // Unchanged, and the same claimant as when its digest and claim were written: its
            // values are the ones the shadow holds, so they count as covered.
            valid_crm_ids.push(std::mem::take(&mut rec.crm_id));
            report.unchanged_by_digest += 1;
            for (c, v) in skipped_cover.iter_mut().zip(&rec.values) {
                if v.as_ref().is_some_and(|v| !v.is_null()) {
                    c.covered += 1;
                }
            }
            continue;
        }
        claims.push((rec.crm_id.clone(), rec.pendo_id.clone(), digest));
        // The diff keeps the CRM id for the history's detections.
        valid_crm_ids.push(rec.crm_id.clone());
        live.push((rec, keep));
    }

    // A deleted record clears Pendo only if no live record holds its Pendo id: in this pull,
    // or (claims) outside it. A full pull decides that once it has seen every record: its
    // orphan pass clears the ids no live record claimed (a deleted duplicate may come before
    // the live record that keeps the id).
    if mapping.on_delete == OnDelete::Clear && !full {
        let mut claimed = gone_claimed.into_iter();
        gone.retain(|rec| {
            let elsewhere = claimed.next().unwrap_or(false);
            !elsewhere && !seen.ids.contains_key(&id_hash(&rec.pendo_id))
        });
        report.deleted += gone.len() as u64;
    } else {
        gone.clear();
    }
    let ids: Vec<&str> = live
        .iter()
        .map(|(r, _)| r.pendo_id.as_str())
        .chain(gone.iter().map(|r| r.pendo_id.as_str()))
        .chain(held_back.iter().map(String::as_str))
        .collect();
    let DiffState {
        shadow,
        outbox,
        shadow_seq,
    } = if ids.is_empty() {
        DiffState::default()
    } else {
        store.load_diff_state(mapping.kind, &ids).await?
    };
    Ok(Prepared {
        skipped_cover,
        _budget: page.budget,
        watermark: page.watermark,
        live,
        gone,
        held_back,
        invalid,
        valid_crm_ids,
        claims,
        forget,
        shadow,
        outbox,
        shadow_seq,
    })
}

/// Makes the previous page's writes visible to this page's diff (latest wins across pages).
fn overlay(outbox: &mut HashMap<String, HashMap<String, String>>, previous: &PageWrite) {
    for c in &previous.unqueue {
        if let Some(fields) = outbox.get_mut(&c.pendo_id) {
            fields.remove(&c.field);
        }
    }
    for c in &previous.changes {
        outbox
            .entry(c.pendo_id.clone())
            .or_default()
            .insert(c.field.clone(), c.value.clone());
    }
}

fn diff_page(mapping: &Mapping, p: Prepared, force: bool) -> PageWrite {
    let mut changes: Vec<Change> = Vec::new();
    let mut digests: Vec<(String, u64)> = Vec::new();
    let mut counts = p.skipped_cover.clone();
    for (rec, digest) in &p.live {
        cover_shadow(mapping, p.shadow.get(&rec.pendo_id), &mut counts);
        let queued = p.outbox.get(&rec.pendo_id);
        let before = changes.len();
        changes.extend(diff_record(
            mapping,
            rec,
            p.shadow.get(&rec.pendo_id),
            queued,
            force,
        ));
        // In sync with nothing on its way: the next pull can skip it while nothing changes.
        if !force && changes.len() == before && queued.is_none_or(HashMap::is_empty) {
            digests.push((rec.pendo_id.clone(), *digest));
        }
    }
    // A clear goes only where this mapping's value is held or queued, even in a resync: a
    // forced null for a field Pendo never held would only create work (or, with
    // create_missing, an entity).
    for rec in &p.gone {
        cover_shadow(mapping, p.shadow.get(&rec.pendo_id), &mut counts);
        changes.extend(clear_record(
            mapping,
            &rec.pendo_id,
            p.shadow.get(&rec.pendo_id),
            p.outbox.get(&rec.pendo_id),
            false,
            Source {
                crm_id: Some(rec.crm_id.clone()),
                modified_at: rec.modified_at,
                cleared: Some("deleted in the CRM"),
            },
        ));
    }
    // Held-back ids lose any value this pull already queued for them: it was a coin toss.
    let unqueue: Vec<Change> = p
        .held_back
        .iter()
        .flat_map(|id| {
            let queued = p.outbox.get(id);
            mapping
                .fields
                .iter()
                .filter(move |f| queued.is_some_and(|q| q.contains_key(&f.pendo_field)))
                .map(move |f| Change {
                    kind: mapping.kind,
                    pendo_id: id.clone(),
                    field: f.pendo_field.clone(),
                    value: String::new(),
                    mapping: mapping.name.clone(),
                    force: false,
                    source: None,
                })
        })
        .collect();
    changes.retain(|c| !p.held_back.contains(&c.pendo_id));
    classify(mapping, &changes, |id| p.shadow.get(id), &mut counts);
    digests.retain(|(id, _)| !p.held_back.contains(id));
    PageWrite {
        counts,
        digests,
        shadow_seq: p.shadow_seq,
        claims: p.claims,
        forget: p.forget,
        changes,
        unqueue,
        invalid: p.invalid,
        valid_crm_ids: p.valid_crm_ids,
        watermark: p.watermark,
    }
}

async fn commit(
    store: &Store,
    mapping: &Mapping,
    w: &PageWrite,
    run: Option<i64>,
) -> Result<(), CycleError> {
    store
        .commit_page(&PageCommit {
            mapping: &mapping.name,
            changes: &w.changes,
            watermark: w.watermark.as_ref(),
            invalid: &w.invalid,
            valid_crm_ids: &w.valid_crm_ids,
            unqueue: &w.unqueue,
            digests: Some((mapping.kind, &w.digests, w.shadow_seq)),
            claims: &w.claims,
            forget: &w.forget,
            kind: Some(mapping.kind),
            stage: true,
            cover: &cover_of(mapping, &w.counts),
            run,
        })
        .await?;
    Ok(())
}

/// After a full pull: the claims and set-aside entries of CRM records the pull did not see
/// (deleted without a trace, or out of the filter) go. The claims are only walked when there are
/// more than the pull's claimants (steady state: none to walk).
async fn forget_unseen(store: &Store, mapping: &Mapping, seen: &Seen) -> Result<(), CycleError> {
    let mut stale: Vec<String> = store
        .invalid_records(Some(&mapping.name))
        .await?
        .into_iter()
        .map(|r| r.crm_id)
        .filter(|crm| {
            let h = id_hash(crm);
            !seen.claimants.contains(&h) && !seen.set_aside.contains(&h)
        })
        .collect();
    if store.claims_count(&mapping.name).await? > seen.claimants.len() as i64 {
        let mut after = String::new();
        loop {
            let page = store.claim_crm_ids(&mapping.name, &after, 10_000).await?;
            let Some(last) = page.last() else { break };
            after = last.clone();
            stale.extend(
                page.into_iter()
                    .filter(|crm| !seen.claimants.contains(&id_hash(crm))),
            );
        }
    }
    if !stale.is_empty() {
        tracing::debug!(mapping = %mapping.name, records = stale.len(), "Forgetting records the full pull no longer sees.");
        store
            .forget_records(mapping.kind, &mapping.name, &stale)
            .await?;
    }
    Ok(())
}

/// Why an orphan's clear was queued (the history's detail).
const ORPHAN: &str = "not in the full pull: deleted in the CRM or out of the mapping's filter";

/// After a full pull: every shadow (or queued) record of this mapping's kind holding one of its
/// fields that the pull did not see has left the CRM or the filter, and is cleared.
async fn clear_orphans(
    store: &Store,
    mapping: &Mapping,
    seen: &Seen,
    dry_run: bool,
    run: Option<i64>,
    report: &mut CycleReport,
) -> Result<(), CycleError> {
    let mut after: Option<String> = None;
    loop {
        let page = store
            .shadow_page(mapping.kind, after.as_deref(), 2_000)
            .await?;
        let Some((last, _)) = page.last() else { break };
        after = Some(last.clone());
        let orphans: Vec<&(String, crate::store::ShadowRecord)> = page
            .iter()
            .filter(|(id, _)| !seen.ids.contains_key(&id_hash(id)))
            .collect();
        if orphans.is_empty() {
            continue;
        }
        let ids: Vec<&str> = orphans.iter().map(|(id, _)| id.as_str()).collect();
        let outbox = store.load_outbox_values(mapping.kind, &ids).await?;
        let mut counts = vec![FieldCounts::default(); mapping.fields.len()];
        for (_, shadow) in &orphans {
            cover_shadow(mapping, Some(shadow), &mut counts);
        }
        let changes: Vec<Change> = orphans
            .iter()
            // Never forced: only (id, field) pairs holding a value this mapping confirmed (each
            // Pendo field of a kind belongs to one mapping) or queued get a clear, so entities
            // only another mapping writes and fields already cleared are left alone.
            .flat_map(|(id, shadow)| {
                let source = Source {
                    cleared: Some(ORPHAN),
                    ..Source::default()
                };
                clear_record(mapping, id, Some(shadow), outbox.get(id), false, source)
            })
            .collect();
        let held: HashMap<&str, &crate::store::ShadowRecord> = orphans
            .iter()
            .map(|(id, shadow)| (id.as_str(), shadow))
            .collect();
        classify(mapping, &changes, |id| held.get(id).copied(), &mut counts);
        report.add_counts(&counts);
        if changes.is_empty() {
            continue;
        }
        report.cleared_orphans += changes
            .iter()
            .map(|c| &c.pendo_id)
            .collect::<HashSet<_>>()
            .len() as u64;
        report.changes += changes.len() as u64;
        if dry_run {
            report.dry_run_changes.extend(changes);
        } else {
            store
                .commit_page(&PageCommit {
                    mapping: &mapping.name,
                    changes: &changes,
                    stage: true,
                    cover: &cover_of(mapping, &counts),
                    run,
                    ..PageCommit::default()
                })
                .await?;
        }
    }
    Ok(())
}

/// How long `sync` waits for retries that fall due after the first pass over the outbox.
pub const SYNC_RETRY_WAIT: Duration = Duration::from_secs(120);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_first_incremental_pull_is_named_a_full_pull() {
        assert_eq!(Mode::Incremental.pull_label(false), FIRST_PULL);
        assert!(FIRST_PULL.contains("full") && FIRST_PULL.contains("no watermark"));
        assert_eq!(Mode::Incremental.pull_label(true), "incremental");
        for mode in [Mode::Reconcile, Mode::Resync] {
            assert_eq!(mode.pull_label(false), mode.as_str());
            assert_eq!(mode.pull_label(true), mode.as_str());
        }
    }
}
