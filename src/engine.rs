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
//! Unchanged records take a shortcut: each record's mapped values are hashed, and a record whose
//! digest equals the one the store kept from the last empty diff (see
//! [`Store::stale_digests`]) skips the shadow load and the diff. Resyncs never take it.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::time::{Duration, Instant};

use crate::config::OnDelete;
use crate::connectors::{Connector, ConnectorError, PullSpec};
use crate::diff::{clear_record, diff_record};
use crate::domain::now_ms;
use crate::mapping::{MappedRecord, Mapping, RecordError};
use crate::metrics::{
    CHANGES_DETECTED, CYCLE_DURATION, INVALID_RECORDS, LAST_SUCCESS, RECORDS_PULLED,
};
use crate::store::{Change, InvalidRecord, PageCommit, Store, StoreError};

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
}

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
}

#[derive(Debug, thiserror::Error)]
pub enum CycleError {
    #[error("mapping {mapping}: {source}")]
    Connector {
        mapping: String,
        #[source]
        source: ConnectorError,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Observes progress (pages read, changes found), for progress bars and logs.
pub trait Progress: Send + Sync {
    fn page(&self, _report: &CycleReport) {}
}

impl Progress for () {}

/// Runs one cycle of `mapping` through `connector`.
pub async fn run_cycle(
    store: &Store,
    connector: &dyn Connector,
    mapping: &Mapping,
    spec_for: impl FnOnce(Option<crate::connectors::Watermark>) -> PullSpec,
    mode: Mode,
    dry_run: bool,
    progress: &dyn Progress,
) -> Result<CycleReport, CycleError> {
    let started = Instant::now();
    let since = match mode {
        Mode::Incremental => store.watermark(&mapping.name).await?,
        _ => None,
    };
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
                mode = mode.as_str(),
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
    ids: HashMap<u64, (u64, u64), BuildHasherDefault<AlreadyHashed>>,
    ambiguous: HashSet<u64, BuildHasherDefault<AlreadyHashed>>,
}

/// The hasher for maps keyed by a 64-bit hash: the key is used as it is. Rehashing it would cost
/// a second SipHash per record and spread the keys no better.
#[derive(Default)]
struct AlreadyHashed(u64);

impl Hasher for AlreadyHashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only u64 keys are used; this keeps any other key correct, if slower.
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

fn hash_of<T: Hash + ?Sized>(t: &T) -> u64 {
    let mut h = DefaultHasher::new();
    t.hash(&mut h);
    h.finish()
}

/// The starting state of every value digest of `mapping`: what it writes (kind, Pendo fields and
/// their types) goes in first, so renaming a field or changing its type makes every stored digest
/// stale. `DefaultHasher::new()` is the same in every process of one build; a Rust release that
/// changes it makes the digests stale once, which costs one long reconcile and misses nothing.
fn digest_seed(mapping: &Mapping) -> DefaultHasher {
    let mut h = DefaultHasher::new();
    mapping.kind.as_str().hash(&mut h);
    for f in &mapping.fields {
        (f.pendo_field.as_str(), f.field_type.as_str()).hash(&mut h);
    }
    h
}

/// The digest of a record's mapped values (equal meanings, equal digests).
fn values_digest(seed: &DefaultHasher, r: &MappedRecord) -> u64 {
    let mut h = seed.clone();
    for v in &r.values {
        match v {
            Some(v) => v.hash_into(&mut h),
            None => 255u8.hash(&mut h),
        }
    }
    h.finish()
}

/// One page, mapped and checked, with the shadow and outbox state of the ids it must diff.
struct Prepared {
    watermark: Option<crate::connectors::Watermark>,
    /// Records to diff, with their value digests.
    live: Vec<(MappedRecord, u64)>,
    gone: Vec<MappedRecord>,
    held_back: Vec<String>,
    invalid: Vec<InvalidRecord>,
    valid_crm_ids: Vec<String>,
    shadow: HashMap<String, crate::store::ShadowRecord>,
    outbox: HashMap<String, HashMap<String, String>>,
}

/// What one page writes.
#[derive(Default)]
struct PageWrite {
    changes: Vec<Change>,
    unqueue: Vec<Change>,
    invalid: Vec<InvalidRecord>,
    valid_crm_ids: Vec<String>,
    watermark: Option<crate::connectors::Watermark>,
    /// Records found in sync, for the store's digests.
    digests: Vec<(String, u64)>,
}

/// Pages flow through a pipeline so both cores work: while page N is diffed and committed
/// (the diff on a blocking thread, the commit on SQLite's), page N+1 is mapped and its shadow and
/// outbox state loaded, and page N+2 is fetched from the CRM. Commits stay in page order, so the
/// watermark only moves forward; page N+1's diff sees page N's changes through an overlay,
/// whether or not N's commit had landed when N+1's outbox state was read.
#[allow(clippy::too_many_arguments)]
async fn pull_all(
    store: &Store,
    connector: &dyn Connector,
    mapping: &Mapping,
    spec: PullSpec,
    mode: Mode,
    dry_run: bool,
    report: &mut CycleReport,
    progress: &dyn Progress,
) -> Result<(), CycleError> {
    let force = mode == Mode::Resync;
    let connector_error = |source| CycleError::Connector {
        mapping: mapping.name.clone(),
        source,
    };
    let shared = std::sync::Arc::new(mapping.clone());
    let seed = digest_seed(mapping);
    let mut pull = connector.pull(spec).await.map_err(connector_error)?;
    let mut seen = Seen::default();
    // Clearing earlier set-aside entries costs a lookup per record; skip it when there are none.
    let mut any_invalid = !dry_run && store.has_invalid_records(&mapping.name).await?;

    let mut page = pull.next_page().await.map_err(connector_error)?;
    let mut ready: Option<Prepared> = None;
    let mut last_write: Option<PageWrite> = None;
    let mut fetch_error = None;
    while page.is_some() || ready.is_some() {
        let current = page.take();
        if let Some(p) = &current {
            report.pages += 1;
            report.pulled += p.records.len() as u64;
            metrics::counter!(RECORDS_PULLED, "mapping" => mapping.name.clone())
                .increment(p.records.len() as u64);
        }
        let fetch_next = current.is_some() && fetch_error.is_none();
        let to_diff = ready.take();
        let previous = last_write.take();
        let clear_valid = !any_invalid;
        let (prepared, written, fetched) = tokio::join!(
            async {
                match current {
                    Some(p) => prepare(store, &shared, p, &seed, !force, &mut seen, report)
                        .await
                        .map(Some),
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
                    commit(store, mapping, &write).await?;
                }
                Ok::<_, CycleError>(Some(write))
            },
            async {
                if fetch_next {
                    Some(pull.next_page().await)
                } else {
                    None
                }
            },
        );
        ready = prepared?;
        if let Some(write) = written? {
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
        match fetched {
            Some(Ok(next)) => page = next,
            Some(Err(e)) => fetch_error = Some(e),
            None => {}
        }
    }
    if let Some(e) = fetch_error {
        return Err(connector_error(e));
    }

    if mode.full() && mapping.on_delete == OnDelete::Clear {
        clear_orphans(store, mapping, &seen, force, dry_run, report).await?;
    }
    Ok(())
}

/// Maps a page, sets bad and ambiguous records aside, drops the records whose digest shows them
/// unchanged (with `use_digests`), and loads the state the diff needs for the rest.
async fn prepare(
    store: &Store,
    mapping: &std::sync::Arc<Mapping>,
    page: crate::connectors::Page,
    seed: &DefaultHasher,
    use_digests: bool,
    seen: &mut Seen,
    report: &mut CycleReport,
) -> Result<Prepared, CycleError> {
    let watermark = page.watermark;
    let m = mapping.clone();
    let records = page.records;
    // Mapping is pure CPU work on owned data: a blocking thread lets it overlap the rest.
    let mapped: Vec<(bool, Result<MappedRecord, RecordError>)> =
        tokio::task::spawn_blocking(move || {
            records
                .iter()
                .map(|raw| (raw.deleted, m.map(raw)))
                .collect()
        })
        .await
        .expect("mapping does not panic");
    let mut invalid = Vec::new();
    let mut valid_crm_ids = Vec::new();
    let mut live: Vec<MappedRecord> = Vec::new();
    let mut gone: Vec<MappedRecord> = Vec::new();
    for (deleted, result) in mapped {
        match result {
            Ok(rec) if rec.deleted => gone.push(rec),
            Ok(rec) => live.push(rec),
            Err(e) => {
                if matches!(e, RecordError::MissingId { .. }) {
                    report.skipped_empty_ids += 1;
                }
                if deleted {
                    continue; // a deleted record with no usable id has nothing to clear
                }
                // A record set aside is still in the CRM: its Pendo id must not look like an
                // orphan to the reconcile, which would clear what Pendo holds for it.
                if let Some(pendo_id) = e.pendo_id() {
                    seen.ids
                        .entry(hash_of(pendo_id))
                        .or_insert((hash_of(e.crm_id()), 0));
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
        }
    }

    // Two CRM records mapping to one Pendo id with different values: hold both back.
    let mut held_back: Vec<String> = Vec::new();
    let mut live: Vec<(MappedRecord, u64)> = live
        .into_iter()
        .map(|rec| {
            let digest = values_digest(seed, &rec);
            (rec, digest)
        })
        .collect();
    live.retain(|(rec, digest)| {
        let id = hash_of(rec.pendo_id.as_str());
        let entry = (hash_of(rec.crm_id.as_str()), *digest);
        let conflict = match seen.ids.get(&id) {
            Some(prev) => prev.0 != entry.0 && prev.1 != entry.1,
            None => {
                seen.ids.insert(id, entry);
                false
            }
        };
        if conflict || seen.ambiguous.contains(&id) {
            if seen.ambiguous.insert(id) {
                held_back.push(rec.pendo_id.clone());
            }
            report.ambiguous += 1;
            invalid.push(InvalidRecord {
                mapping: mapping.name.clone(),
                crm_id: rec.crm_id.clone(),
                pendo_id: Some(rec.pendo_id.clone()),
                reason: "ambiguous_id".into(),
                detail: format!(
                    "record {}: Pendo id {} is also the id of another CRM record with different values in this pull; neither is sent until only one remains",
                    rec.crm_id, rec.pendo_id
                ),
                seen_at: now_ms(),
            });
            metrics::counter!(INVALID_RECORDS, "mapping" => mapping.name.clone(), "reason" => "ambiguous_id")
                .increment(1);
            return false;
        }
        valid_crm_ids.push(rec.crm_id.clone());
        true
    });

    // A deleted record clears Pendo only if no live record holds its Pendo id in this pull.
    if mapping.on_delete == OnDelete::Clear {
        gone.retain(|rec| !seen.ids.contains_key(&hash_of(rec.pendo_id.as_str())));
        report.deleted += gone.len() as u64;
    } else {
        gone.clear();
    }
    if use_digests && !live.is_empty() {
        let keys: Vec<crate::store::Digest<'_>> = live
            .iter()
            .map(|(r, d)| (r.pendo_id.as_str(), *d))
            .collect();
        let stale = store
            .stale_digests(mapping.kind, &mapping.name, &keys)
            .await?;
        drop(keys);
        if stale.len() < live.len() {
            report.unchanged_by_digest += (live.len() - stale.len()) as u64;
            let mut keep = vec![false; live.len()];
            for i in stale {
                keep[i] = true;
            }
            let mut keep = keep.into_iter();
            live.retain(|_| keep.next().unwrap_or(true));
        }
    }
    let ids: Vec<&str> = live
        .iter()
        .map(|(r, _)| r.pendo_id.as_str())
        .chain(gone.iter().map(|r| r.pendo_id.as_str()))
        .chain(held_back.iter().map(String::as_str))
        .collect();
    let (shadow, outbox) = tokio::try_join!(
        store.load_shadow(mapping.kind, &ids),
        store.load_outbox_values(mapping.kind, &ids)
    )?;
    Ok(Prepared {
        watermark,
        live,
        gone,
        held_back,
        invalid,
        valid_crm_ids,
        shadow,
        outbox,
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
    for (rec, digest) in &p.live {
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
    for rec in &p.gone {
        changes.extend(clear_record(
            mapping,
            &rec.pendo_id,
            p.shadow.get(&rec.pendo_id),
            p.outbox.get(&rec.pendo_id),
            force,
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
                })
        })
        .collect();
    changes.retain(|c| !p.held_back.contains(&c.pendo_id));
    digests.retain(|(id, _)| !p.held_back.contains(id));
    PageWrite {
        digests,
        changes,
        unqueue,
        invalid: p.invalid,
        valid_crm_ids: p.valid_crm_ids,
        watermark: p.watermark,
    }
}

async fn commit(store: &Store, mapping: &Mapping, w: &PageWrite) -> Result<(), CycleError> {
    store
        .commit_page(&PageCommit {
            mapping: &mapping.name,
            changes: &w.changes,
            watermark: w.watermark.as_ref(),
            invalid: &w.invalid,
            valid_crm_ids: &w.valid_crm_ids,
            unqueue: &w.unqueue,
            digests: Some((mapping.kind, &w.digests)),
        })
        .await?;
    Ok(())
}

/// After a full pull: every shadow (or queued) record of this mapping's kind holding one of its
/// fields that the pull did not see has left the CRM or the filter, and is cleared.
async fn clear_orphans(
    store: &Store,
    mapping: &Mapping,
    seen: &Seen,
    force: bool,
    dry_run: bool,
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
            .filter(|(id, _)| !seen.ids.contains_key(&hash_of(id.as_str())))
            .collect();
        if orphans.is_empty() {
            continue;
        }
        let ids: Vec<&str> = orphans.iter().map(|(id, _)| id.as_str()).collect();
        let outbox = store.load_outbox_values(mapping.kind, &ids).await?;
        let changes: Vec<Change> = orphans
            .iter()
            .flat_map(|(id, shadow)| clear_record(mapping, id, Some(shadow), outbox.get(id), force))
            .collect();
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
    use crate::config::{IdCase, OnDelete, OnNull};
    use crate::domain::{FieldType, Kind, Value};
    use crate::mapping::FieldMap;

    fn mapping(fields: &[(&str, FieldType)]) -> Mapping {
        Mapping {
            name: "m".into(),
            kind: Kind::Account,
            id_path: "Id".into(),
            id_case: IdCase::Keep,
            on_delete: OnDelete::Keep,
            fields: fields
                .iter()
                .map(|(name, t)| FieldMap {
                    pendo_field: (*name).into(),
                    raw_key: "x".into(),
                    from: "x".into(),
                    field_type: *t,
                    on_null: OnNull::Clear,
                })
                .collect(),
        }
    }

    fn record(values: Vec<Option<Value>>) -> MappedRecord {
        MappedRecord {
            crm_id: "c".into(),
            pendo_id: "p".into(),
            values,
            deleted: false,
        }
    }

    #[test]
    fn a_digest_changes_with_the_values_and_with_what_the_mapping_writes() {
        let m = mapping(&[("tier", FieldType::String), ("arr", FieldType::Number)]);
        let r = record(vec![
            Some(Value::String("gold".into())),
            Some(Value::Number(1.0)),
        ]);
        let d = values_digest(&digest_seed(&m), &r);
        // Stable: the same mapping and values give the same digest (in another "process" too:
        // the seed is rebuilt from scratch).
        assert_eq!(d, values_digest(&digest_seed(&m.clone()), &r));
        // Any value, a kept null, a renamed field, a new type or another kind: a different one.
        let other = |m: &Mapping, r: &MappedRecord| values_digest(&digest_seed(m), r);
        let mut r2 = r.clone();
        r2.values[1] = Some(Value::Number(2.0));
        assert_ne!(d, other(&m, &r2));
        r2.values[1] = None;
        assert_ne!(d, other(&m, &r2));
        r2.values[1] = Some(Value::Null);
        assert_ne!(d, other(&m, &r2));
        let renamed = mapping(&[("plan", FieldType::String), ("arr", FieldType::Number)]);
        assert_ne!(d, other(&renamed, &r));
        let retyped = mapping(&[("tier", FieldType::String), ("arr", FieldType::Date)]);
        assert_ne!(d, other(&retyped, &r));
        let mut visitor = m.clone();
        visitor.kind = Kind::Visitor;
        assert_ne!(d, other(&visitor, &r));
    }

    #[test]
    fn already_hashed_keys_pass_through() {
        let mut h = AlreadyHashed::default();
        h.write_u64(0xfeed);
        assert_eq!(h.finish(), 0xfeed);
    }
}
