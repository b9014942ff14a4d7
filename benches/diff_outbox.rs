//! Benchmark: diff + outbox write of N records × 5 fields against a populated shadow, 1% changed.
//!
//! Target (issue): N = 1,000,000 in ≤ 5 s and ≤ 300 MB peak RSS on a 2-core machine; time grows
//! linearly with N and memory stays flat.
//!
//! Run: `cargo bench --bench diff_outbox` (sizes 10k, 100k, 1M). Environment:
//! - `BENCH_SIZES=10000,100000`: the sizes to run; `BENCH_QUICK=1`: 10k only.
//! - `BENCH_PAGE=2000`: records per connector page (Salesforce's REST query batch).
//! - `BENCH_RT=multi|current`: the tokio runtime (multi_thread, as the binary builds it, is the
//!   default).
//! - `BENCH_SETUP=settle|sql`: how the shadow is populated (see below; by default `settle` up to
//!   100k and `sql` above).
//! - `BENCH_REPEAT=3`: timed runs per size (each on a fresh copy of the state file); the table
//!   shows the median and the best, and the largest peak RSS.
//! - `BENCH_BREAKDOWN=1`: also time the phases of the long path (pull, map, shadow load, outbox
//!   load, diff, commit: what the first reconcile does for every record, and later ones for
//!   records whose digest is stale) on a third copy of the state file.
//!
//! Every size runs in child processes (this binary re-executed with `BENCH_CHILD=<phase>`), so
//! each figure's peak RSS (`VmHWM`) belongs to that phase alone:
//!
//! 1. `setup` (not timed): a full cycle enqueues all N records, then every outbox row is
//!    confirmed exactly as the writer does on a 200 (`claim_due` → `settle(Confirmed)`). With
//!    `BENCH_SETUP=sql` the shadow rows are written directly, in the text `settle` produces, with
//!    the same `json_patch` statement (faster for 1M; the assertions below catch any mismatch).
//!    Then one reconcile of the unchanged CRM, as a running service did last time: it finds no
//!    change and keeps a value digest per record. Its time is reported as "first reconcile".
//!    The state file is then closed and copied: one copy per measured phase.
//! 2. `reconcile` (timed): `run_cycle(Mode::Reconcile)`: a full pull of N records, each mapped
//!    and hashed; the 99% whose digest matches skip the diff, the rest are diffed against shadow +
//!    outbox; the 1% changes go to the outbox with each page's watermark.
//! 3. `incremental` (timed): `run_cycle(Mode::Incremental)` from the stored watermark: only the
//!    changed records.
//!
//! Both timed phases assert that exactly N/100 changes were detected and N/100 rows are pending.
//!
//! The CRM is a synthetic connector that generates each record when its page is read (like a
//! connector parsing a response page), so peak RSS measures pendo-sync, not an in-memory copy of
//! a million-record CRM (`FixtureConnector` holds every record and clones them all at pull start).

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use pendo_sync::config::{MappingSettings, Settings};
use pendo_sync::connectors::{
    BoxFuture, CheckFinding, Connector, ConnectorError, Page, Pull, PullSpec, RawRecord, Watermark,
};
use pendo_sync::diff::diff_record;
use pendo_sync::domain::Kind;
use pendo_sync::engine::{Mode, run_cycle};
use pendo_sync::mapping::Mapping;
use pendo_sync::sim::config::{Auth, MappingSection, PendoSection, SalesforceSection, SimConfig};
use pendo_sync::store::{Change, PageCommit, Settlement, Store};
use serde_json::json;

/// The binary's allocator (src/main.rs), so the figures are the binary's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const TARGET_N: u64 = 1_000_000;
const TARGET_SECONDS: f64 = 5.0;
const TARGET_RSS_MB: f64 = 300.0;

/// The bench's config: no simulator is contacted, only the mapping matters.
fn config() -> String {
    let sf_auth = Auth::new("jwt")
        .key("client_id", "bench")
        .key("username", "bench@example.com")
        .key("private_key", "bench");
    let pendo = PendoSection::new("bench").max_in_flight(None);
    let salesforce = SalesforceSection::new("https://login.salesforce.com", sf_auth);
    SimConfig::new("/tmp/unused.db", pendo)
        .salesforce(salesforce)
        .admin_token("bench")
        .mapping(MappingSection::sf_accounts("accounts").on_delete(Some("keep")))
        .to_toml()
}

// ---- the synthetic CRM ----------------------------------------------------------------------

/// Record `i` is one of the 1% changed ones (spread evenly across the id range).
fn is_changed(i: u64) -> bool {
    i % 100 == 37
}

/// Record `i` as Salesforce would send it; `changed` alters one of its five fields (in turn).
fn record(i: u64, changed: bool) -> RawRecord {
    let tiers = ["free", "starter", "growth", "enterprise"];
    let mut fields = json!({
        "Id": format!("001A{i:012}"),
        "Plan_Tier__c": tiers[(i % 4) as usize],
        "ARR__c": (i * 37 % 1_000_000) as f64 + 0.5,
        "Strategic__c": i.is_multiple_of(3),
        "Renewal_Date__c": format!("2026-{:02}-{:02}", i % 12 + 1, i % 28 + 1),
        "Owner": { "Email": format!("owner{}@example.com", i % 5_000) },
    });
    if changed {
        match (i / 100) % 5 {
            0 => fields["Plan_Tier__c"] = json!(format!("custom-{i}")),
            1 => fields["ARR__c"] = json!((i * 37 % 1_000_000) as f64 + 1.75),
            2 => fields["Strategic__c"] = json!(!i.is_multiple_of(3)),
            3 => fields["Renewal_Date__c"] = json!("2027-06-30"),
            _ => fields["Owner"] = json!({ "Email": format!("new-owner{i}@example.com") }),
        }
    }
    RawRecord {
        crm_id: format!("001A{i:012}"),
        fields,
        deleted: false,
        modified_at: Some(1_790_000_000_000 + i as i64),
    }
}

/// N accounts. Before `mutated`, record `i` has modification seq `i + 1`; after, the changed
/// ones were edited last: the k-th changed record has seq `N + k + 1`. Pages come in seq order
/// and carry the last seq as watermark, as the fixture connector's do.
#[derive(Clone)]
struct SyntheticCrm {
    n: u64,
    mutated: bool,
    page_size: usize,
    /// Every record's plan tier changed at once (a currency switch, a bad import): the cycle the
    /// guard must hold. Its seqs follow the setup's.
    mass: bool,
}

struct SyntheticPull {
    rows: Box<dyn Iterator<Item = (u64, u64, bool)> + Send>,
    page_size: usize,
    /// Every record's plan tier changed too (the held phase).
    mass: bool,
}

impl SyntheticCrm {
    fn changed_count(&self) -> u64 {
        (0..self.n).filter(|&i| is_changed(i)).count() as u64
    }
}

impl Connector for SyntheticCrm {
    fn source(&self) -> &'static str {
        "fixture"
    }

    fn pull<'a>(
        &'a self,
        spec: PullSpec,
    ) -> BoxFuture<'a, Result<Box<dyn Pull + 'a>, ConnectorError>> {
        Box::pin(async move {
            let since: u64 = spec
                .since
                .map_or(0, |w| w.0.parse().expect("numeric watermark"));
            let (n, mutated, mass) = (self.n, self.mutated, self.mass);
            if mass {
                let rows = (0..n).map(move |i| (n + i + 1, i, false));
                return Ok(Box::new(SyntheticPull {
                    rows: Box::new(rows),
                    page_size: self.page_size,
                    mass: true,
                }) as Box<dyn Pull + 'a>);
            }
            // (seq, index, changed)
            let unchanged = (0..n)
                .filter(move |&i| !(mutated && is_changed(i)))
                .map(|i| (i + 1, i, false));
            let edited = (0..n)
                .filter(move |&i| mutated && is_changed(i))
                .enumerate()
                .map(move |(k, i)| (n + k as u64 + 1, i, true));
            let rows = unchanged.chain(edited).filter(move |r| r.0 > since);
            Ok(Box::new(SyntheticPull {
                rows: Box::new(rows),
                page_size: self.page_size,
                mass: false,
            }) as Box<dyn Pull + 'a>)
        })
    }

    fn check<'a>(
        &'a self,
        _spec: &'a PullSpec,
    ) -> BoxFuture<'a, Result<Vec<CheckFinding>, ConnectorError>> {
        Box::pin(async { Ok(Vec::new()) })
    }

    /// The bench never asks for a single record (`why --live` is not measured here).
    fn fetch<'a>(
        &'a self,
        _spec: &'a PullSpec,
        _crm_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<RawRecord>, ConnectorError>> {
        Box::pin(async { Ok(None) })
    }
}

impl Pull for SyntheticPull {
    fn next_page(&mut self) -> BoxFuture<'_, Result<Option<Page>, ConnectorError>> {
        Box::pin(async move {
            let mut last = None;
            let records: Vec<RawRecord> = self
                .rows
                .by_ref()
                .take(self.page_size)
                .map(|(seq, i, changed)| {
                    last = Some(seq);
                    let mut r = record(i, changed);
                    if self.mass {
                        r.fields["Plan_Tier__c"] = json!(format!("mass-{}", i % 4));
                    }
                    r
                })
                .collect();
            Ok(last.map(|seq| Page {
                records,
                watermark: Some(Watermark(seq.to_string())),
            }))
        })
    }
}

/// A reconcile in which every record's plan tier changed: the guard holds all of it. Reports the
/// whole cycle and the guard's own decision (counting N staged values against the shadow).
async fn held(n: u64, db: &str) -> serde_json::Value {
    let (_, ms) = settings();
    let mapping = Mapping::new(&ms);
    let crm = SyntheticCrm {
        n,
        mutated: false,
        page_size: page_size(),
        mass: true,
    };
    let store = open(db).await;
    let hwm_before = proc_status_mb("VmHWM");
    let cpu_before = cpu_seconds();
    let started = Instant::now();
    let report = cycle(&store, &crm, &mapping, &ms, Mode::Reconcile).await;
    let seconds = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu_before;
    let hwm = proc_status_mb("VmHWM");
    let held = match &report.guard {
        Some(pendo_sync::store::GuardOutcome::Held { values, .. }) => *values,
        other => panic!("the mass change was not held: {other:?}"),
    };
    assert_eq!(held, n, "every plan tier is held");
    assert_eq!(pending(&store).await, 0, "nothing of it is pending");
    store.close().await;
    json!({
        "seconds": seconds,
        "guard_seconds": report.guard_seconds,
        "cpu_seconds": cpu,
        "held": held,
        "hwm_before_mb": hwm_before,
        "peak_rss_mb": hwm,
    })
}

// ---- measurement helpers --------------------------------------------------------------------

fn env_flag(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| !v.is_empty() && v != "0")
}

/// A `/proc/self/status` figure in MB (`VmRSS`, `VmHWM`).
fn proc_status_mb(key: &str) -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// CPU seconds (user + system, all threads) this process has used so far.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<f64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse().ok())
        .collect();
    f.iter().sum::<f64>() / 100.0 // USER_HZ
}

fn settings() -> (Settings, MappingSettings) {
    let settings = Settings::from_toml_with_env(&config(), HashMap::new()).expect("bench config");
    let m = settings.mappings[0].clone();
    (settings, m)
}

fn runtime() -> tokio::runtime::Runtime {
    match std::env::var("BENCH_RT").as_deref() {
        Ok("current") => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        // What src/main.rs builds: one worker per core.
        _ => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build(),
    }
    .expect("tokio runtime")
}

fn page_size() -> usize {
    std::env::var("BENCH_PAGE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000)
}

/// `BENCH_SETUP=settle|sql`; by default the writer's path up to 100k and direct SQL above (the
/// writer's path costs minutes at 1M: see BENCHMARKS.md).
fn setup_is_sql(n: u64) -> bool {
    match std::env::var("BENCH_SETUP").as_deref() {
        Ok("sql") => true,
        Ok("settle") => false,
        _ => n > 100_000,
    }
}

fn repeats() -> usize {
    std::env::var("BENCH_REPEAT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
        .max(1)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// `BENCH_STATE=postgres`: the state in PostgreSQL (a throwaway server of this run's, see
/// `pendo_sync::sim::postgres`); each phase gets a copy of the set-up database, as it gets a copy
/// of the SQLite file otherwise.
fn on_postgres() -> bool {
    std::env::var("BENCH_STATE").is_ok_and(|v| v == "postgres")
}

/// A phase's state: a SQLite file's path, or a PostgreSQL URL.
async fn open(db: &str) -> Store {
    if db.starts_with("postgres://") {
        Store::open_settings(&pendo_sync::config::StateSettings::postgres(db))
            .await
            .expect("open state")
    } else {
        Store::open(Path::new(db)).await.expect("open state")
    }
}

/// A copy of the set-up state for one phase: `name` beside the file, or a database cloned
/// from it.
fn copy_state(base: &str, dir: &Path, name: &str) -> String {
    if on_postgres() {
        runtime()
            .block_on(pendo_sync::sim::postgres::copy_of(base))
            .expect("PostgreSQL is installed")
    } else {
        let to = dir.join(name);
        std::fs::copy(base, &to).expect("copy state file");
        to.display().to_string()
    }
}

fn discard_state(db: &str) {
    if on_postgres() {
        runtime().block_on(pendo_sync::sim::postgres::drop_database(db));
    } else {
        let db = Path::new(db);
        std::fs::remove_file(db).expect("remove copy");
        let _ = std::fs::remove_file(db.with_extension("db-wal"));
        let _ = std::fs::remove_file(db.with_extension("db-shm"));
    }
}

async fn pending(store: &Store) -> i64 {
    store.outbox_counts().await.expect("outbox counts")["pending"]
}

/// One `run_cycle` of the bench mapping over `crm`.
async fn cycle(
    store: &Store,
    crm: &dyn Connector,
    mapping: &Mapping,
    ms: &MappingSettings,
    mode: Mode,
) -> pendo_sync::engine::CycleReport {
    run_cycle(
        store,
        crm,
        mapping,
        |since| PullSpec::for_mapping(ms, since, Duration::ZERO),
        mode,
        false,
        None,
        &(),
    )
    .await
    .unwrap_or_else(|e| panic!("{mode:?} cycle: {e}"))
}

// ---- child phases ---------------------------------------------------------------------------

async fn setup(n: u64, db: &str) -> serde_json::Value {
    let started = Instant::now();
    let (_, ms) = settings();
    let mapping = Mapping::new(&ms);
    let crm = SyntheticCrm {
        n,
        mutated: false,
        page_size: page_size(),
        mass: false,
    };
    let store = open(db).await;
    let sql = setup_is_sql(n);
    if sql && on_postgres() {
        // The same shadow rows, written set-wise (10,000 a statement) on PostgreSQL.
        let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(db)
            .await
            .expect("connect");
        let mut rows = Vec::with_capacity(10_000);
        for i in 0..n {
            let rec = mapping.map(&record(i, false)).expect("maps");
            let mut vals = serde_json::Map::new();
            for (f, v) in mapping.fields.iter().zip(&rec.values) {
                let stored = v.as_ref().expect("value").to_stored();
                let value: serde_json::Value = serde_json::from_str(&stored).expect("json");
                vals.insert(f.pendo_field.clone(), value);
            }
            rows.push(json!([rec.pendo_id, vals]));
            if rows.len() == 10_000 || i + 1 == n {
                sqlx::query(
                    "INSERT INTO shadow (kind, pendo_id, vals, confirmed_at)
                     SELECT $1, e.value ->> 0, e.value -> 1, 0
                     FROM jsonb_array_elements($2::jsonb) AS e(value)",
                )
                .bind(Kind::Account.as_str())
                .bind(serde_json::Value::Array(std::mem::take(&mut rows)).to_string())
                .execute(&mut conn)
                .await
                .expect("insert shadow");
            }
        }
        sqlx::query("INSERT INTO watermarks (mapping, value, updated_at) VALUES ($1, $2, 0)")
            .bind(&mapping.name)
            .bind(n.to_string())
            .execute(&mut conn)
            .await
            .expect("watermark");
    } else if sql {
        // The shadow `settle(Confirmed)` would write, written directly: one object per record of
        // field → JSON of the canonical stored text, through the same json_patch.
        let mut tx = store.pool().begin().await.expect("begin");
        for i in 0..n {
            let rec = mapping.map(&record(i, false)).expect("maps");
            let mut vals = serde_json::Map::new();
            for (f, v) in mapping.fields.iter().zip(&rec.values) {
                let stored = v.as_ref().expect("value").to_stored();
                let value: serde_json::Value = serde_json::from_str(&stored).expect("json");
                vals.insert(f.pendo_field.clone(), value);
            }
            sqlx::query(
                "INSERT INTO shadow (kind, pendo_id, vals, confirmed_at) VALUES (?1, ?2, json_patch('{}', ?3), ?4)",
            )
            .bind(Kind::Account.as_str())
            .bind(&rec.pendo_id)
            .bind(serde_json::Value::Object(vals).to_string())
            .bind(0_i64)
            .execute(&mut *tx)
            .await
            .expect("insert shadow");
        }
        sqlx::query(
            "INSERT INTO watermarks (mapping, value, updated_at) VALUES (?1, ?2, 0)
             ON CONFLICT (mapping) DO UPDATE SET value = excluded.value",
        )
        .bind(&mapping.name)
        .bind(n.to_string())
        .execute(&mut *tx)
        .await
        .expect("watermark");
        tx.commit().await.expect("commit");
    } else {
        let report = cycle(&store, &crm, &mapping, &ms, Mode::Incremental).await;
        assert_eq!(report.changes, n * 5, "first cycle enqueues every field");
        loop {
            let rows = store
                .claim_due(Kind::Account, i64::MAX, 5_000)
                .await
                .expect("claim");
            if rows.is_empty() {
                break;
            }
            let outcomes: Vec<_> = rows
                .into_iter()
                .map(|e| (e, Settlement::Confirmed))
                .collect();
            store.settle(&outcomes).await.expect("settle");
        }
    }
    // The guard's per-field totals, as a settle would have kept them (the SQL seeding above
    // writes the shadow directly).
    store.recount_field_totals().await.expect("field totals");
    assert_eq!(pending(&store).await, 0, "outbox drained");
    assert_eq!(
        store.shadow_count(Kind::Account).await.expect("count") as u64,
        n,
        "shadow populated"
    );
    assert_eq!(
        store.watermark(&mapping.name).await.expect("wm"),
        Some(Watermark(n.to_string()))
    );
    // The reconcile a running service did last time: it finds nothing to change and records a
    // digest per record (see `Store::stale_digests`). Timed on its own: this is the cost of the
    // first reconcile after a bulk load, before any digest exists.
    let cold = Instant::now();
    let cpu_before = cpu_seconds();
    let report = cycle(&store, &crm, &mapping, &ms, Mode::Reconcile).await;
    let cold_s = cold.elapsed().as_secs_f64();
    let cold_cpu = cpu_seconds() - cpu_before;
    assert_eq!(report.changes, 0, "nothing changed yet");
    assert_eq!(
        report.unchanged_by_digest, 0,
        "no digest before the first reconcile"
    );
    assert_eq!(
        store.digest_count(&mapping.name).await.expect("digests") as u64,
        n
    );
    if !on_postgres() {
        sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
            .execute(store.pool())
            .await
            .expect("checkpoint");
    }
    store.close().await;
    json!({ "setup_s": started.elapsed().as_secs_f64(), "cold_reconcile_s": cold_s, "cold_reconcile_cpu_s": cold_cpu, "db_mb": std::fs::metadata(db).map_or(0.0, |m| m.len() as f64 / 1048576.0) })
}

async fn measure(n: u64, db: &str, mode: Mode) -> serde_json::Value {
    let (_, ms) = settings();
    let mapping = Mapping::new(&ms);
    let crm = SyntheticCrm {
        n,
        mutated: true,
        page_size: page_size(),
        mass: false,
    };
    let expected = crm.changed_count();
    let store = open(db).await;
    let rss_before = proc_status_mb("VmRSS");
    let hwm_before = proc_status_mb("VmHWM");
    let cpu_before = cpu_seconds();
    let started = Instant::now();
    let report = cycle(&store, &crm, &mapping, &ms, mode).await;
    let seconds = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu_before;
    let hwm = proc_status_mb("VmHWM");
    let pending = pending(&store).await;
    assert_eq!(report.changes, expected, "{mode:?}: changes detected");
    if mode == Mode::Reconcile {
        assert_eq!(
            report.unchanged_by_digest,
            n - expected,
            "every unchanged record matched its digest"
        );
    }
    assert_eq!(pending as u64, expected, "{mode:?}: outbox pending rows");
    assert_eq!(report.invalid, 0);
    store.close().await;
    json!({
        "seconds": seconds,
        "cpu_seconds": cpu,
        "pulled": report.pulled,
        "changes": report.changes,
        "pending": pending,
        "rss_before_mb": rss_before,
        "hwm_before_mb": hwm_before,
        "peak_rss_mb": hwm,
    })
}

/// The long path (every record diffed, no digests), re-done serially with public pieces and a
/// stopwatch on each phase (the engine's ambiguity bookkeeping and metrics are left out).
async fn breakdown(n: u64, db: &str) -> serde_json::Value {
    let (_, ms) = settings();
    let mapping = Mapping::new(&ms);
    let crm = SyntheticCrm {
        n,
        mutated: true,
        page_size: page_size(),
        mass: false,
    };
    let store = open(db).await;
    let mut t: HashMap<&str, Duration> = HashMap::new();
    let mut add = |k, since: Instant| *t.entry(k).or_default() += since.elapsed();
    let started = Instant::now();
    let mut pull = crm
        .pull(PullSpec::for_mapping(&ms, None, Duration::ZERO))
        .await
        .expect("pull");
    let mut changes_total = 0;
    let mut extra = Duration::ZERO;
    loop {
        let at = Instant::now();
        let Some(page) = pull.next_page().await.expect("page") else {
            break;
        };
        add("1 pull (generate records)", at);
        let at = Instant::now();
        let live: Vec<_> = page
            .records
            .iter()
            .map(|r| mapping.map(r).expect("maps"))
            .collect();
        add("2 map", at);
        let ids: Vec<&str> = live.iter().map(|r| r.pendo_id.as_str()).collect();
        let at = Instant::now();
        let shadow = store.load_shadow(mapping.kind, &ids).await.expect("shadow");
        add("3 load shadow", at);
        // The same query alone, rows fetched but not parsed (not counted in the total; SQLite
        // only).
        if !on_postgres() {
            let at = Instant::now();
            let list = serde_json::to_string(&ids).expect("ids");
            let raw = sqlx::query(
                "SELECT pendo_id, vals FROM shadow
                 WHERE kind = ?1 AND pendo_id IN (SELECT value FROM json_each(?2))",
            )
            .bind(mapping.kind.as_str())
            .bind(list)
            .fetch_all(store.pool())
            .await
            .expect("raw shadow");
            assert_eq!(raw.len(), ids.len());
            extra += at.elapsed();
        }
        let at = Instant::now();
        let outbox = store
            .load_outbox_values(mapping.kind, &ids)
            .await
            .expect("outbox");
        add("4 load outbox", at);
        let at = Instant::now();
        let changes: Vec<Change> = live
            .iter()
            .flat_map(|rec| {
                diff_record(
                    &mapping,
                    rec,
                    shadow.get(&rec.pendo_id),
                    outbox.get(&rec.pendo_id),
                    false,
                )
            })
            .collect();
        add("5 diff", at);
        changes_total += changes.len();
        let valid: Vec<String> = live.iter().map(|r| r.crm_id.clone()).collect();
        let at = Instant::now();
        store
            .commit_page(&PageCommit {
                mapping: &mapping.name,
                changes: &changes,
                watermark: page.watermark.as_ref(),
                valid_crm_ids: &valid,
                ..PageCommit::default()
            })
            .await
            .expect("commit");
        add("6 commit page", at);
    }
    let total = (started.elapsed() - extra).as_secs_f64();
    assert_eq!(changes_total as u64, crm.changed_count());
    store.close().await;
    let mut phases = serde_json::Map::new();
    for (k, v) in t {
        phases.insert(k.to_owned(), json!(v.as_secs_f64()));
    }
    phases.insert(
        "3b (extra, not in total) shadow query alone, unparsed".into(),
        json!(extra.as_secs_f64()),
    );
    json!({ "seconds": total, "phases": phases })
}

fn child(phase: &str) {
    let n: u64 = std::env::var("BENCH_N")
        .expect("BENCH_N")
        .parse()
        .expect("BENCH_N");
    let db = std::env::var("BENCH_DB").expect("BENCH_DB");
    let rt = runtime();
    let out = rt.block_on(async {
        match phase {
            "setup" => setup(n, &db).await,
            "reconcile" => measure(n, &db, Mode::Reconcile).await,
            "incremental" => measure(n, &db, Mode::Incremental).await,
            "held" => held(n, &db).await,
            "breakdown" => breakdown(n, &db).await,
            other => panic!("unknown phase {other}"),
        }
    });
    println!("BENCH_RESULT {out}");
}

// ---- parent ---------------------------------------------------------------------------------

fn run_child(phase: &str, n: u64, db: &str) -> serde_json::Value {
    let out = Command::new(std::env::current_exe().expect("current exe"))
        .env("BENCH_CHILD", phase)
        .env("BENCH_N", n.to_string())
        .env("BENCH_DB", db)
        .output()
        .expect("spawn child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        panic!(
            "{phase} for N={n} failed ({}):\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("BENCH_RESULT "))
        .expect("child printed a result");
    serde_json::from_str(line).expect("child result is JSON")
}

fn sizes() -> Vec<u64> {
    if env_flag("BENCH_QUICK") {
        return vec![10_000];
    }
    match std::env::var("BENCH_SIZES") {
        Ok(list) => list
            .split(',')
            .map(|s| s.trim().replace('_', "").parse().expect("BENCH_SIZES"))
            .collect(),
        Err(_) => vec![10_000, 100_000, 1_000_000],
    }
}

fn main() {
    if let Ok(phase) = std::env::var("BENCH_CHILD") {
        child(&phase);
        return;
    }
    // `cargo bench` passes `--bench`; `cargo test --benches` runs benches without it: stay quick.
    if !std::env::args().any(|a| a == "--bench") && !env_flag("BENCH_SIZES_FORCE") {
        println!("diff_outbox: not run outside `cargo bench` (set BENCH_SIZES_FORCE=1 to force)");
        return;
    }
    let rt_name = match std::env::var("BENCH_RT").as_deref() {
        Ok("current") => "current_thread",
        _ => "multi_thread (one worker per core, as the binary)",
    };
    let setup_kind = std::env::var("BENCH_SETUP").unwrap_or_else(|_| "auto".into());
    eprintln!(
        "diff_outbox: runtime {rt_name}, page {} records, setup {setup_kind}, {} repeats, load average {}",
        page_size(),
        repeats(),
        load_average()
    );
    let mut rows = Vec::new();
    for n in sizes() {
        let dir = tempfile::tempdir().expect("temp dir");
        let base = if on_postgres() {
            runtime()
                .block_on({
                    pendo_sync::sim::postgres::durable();
                    pendo_sync::sim::postgres::database()
                })
                .expect("BENCH_STATE=postgres needs PostgreSQL installed")
        } else {
            dir.path().join("state.db").display().to_string()
        };
        let s = run_child("setup", n, &base);
        eprintln!(
            "  N={n}: setup ({}) {s}",
            if setup_is_sql(n) { "sql" } else { "settle" }
        );
        let (mut rec, mut inc) = (Vec::new(), Vec::new());
        for _ in 0..repeats() {
            for (phase, out) in [("reconcile", &mut rec), ("incremental", &mut inc)] {
                let db = copy_state(&base, dir.path(), &format!("{phase}.db"));
                let r = run_child(phase, n, &db);
                eprintln!("  N={n}: {phase} {r} (load {})", load_average());
                out.push(r);
                discard_state(&db);
            }
        }
        // Once per size: the reconcile the guard holds (every plan tier changed).
        {
            let db = copy_state(&base, dir.path(), "held.db");
            let h = run_child("held", n, &db);
            eprintln!("  N={n}: held {h} (load {})", load_average());
            discard_state(&db);
        }
        if env_flag("BENCH_BREAKDOWN") {
            let b_db = copy_state(&base, dir.path(), "breakdown.db");
            let b = run_child("breakdown", n, &b_db);
            eprintln!("  N={n}: breakdown {b}");
        }
        let f = |v: &[serde_json::Value], k: &str| -> Vec<f64> {
            v.iter()
                .map(|r| r[k].as_f64().unwrap_or(f64::NAN))
                .collect()
        };
        let max = |v: Vec<f64>| v.into_iter().fold(f64::NAN, f64::max);
        let min = |v: Vec<f64>| v.into_iter().fold(f64::NAN, f64::min);
        rows.push(Row {
            n,
            setup_s: s["setup_s"].as_f64().unwrap_or(f64::NAN),
            cold_s: s["cold_reconcile_s"].as_f64().unwrap_or(f64::NAN),
            setup_sql: setup_is_sql(n),
            rec_median: median(f(&rec, "seconds")),
            rec_min: min(f(&rec, "seconds")),
            rec_cpu: median(f(&rec, "cpu_seconds")),
            inc_median: median(f(&inc, "seconds")),
            rss_before: max(f(&rec, "rss_before_mb")),
            rec_peak: max(f(&rec, "peak_rss_mb")),
            inc_peak: max(f(&inc, "peak_rss_mb")),
        });
    }
    println!();
    println!(
        "| N | setup s (untimed) | first reconcile s (no digests yet) | reconcile s (median) | reconcile s (best) | reconcile CPU s (median) | records/s (median) | incremental s (median) | RSS before MB | peak RSS MB reconcile | peak RSS MB incremental | target met? |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---|");
    for r in &rows {
        let met = if r.n == TARGET_N {
            let time_ok = r.rec_median <= TARGET_SECONDS;
            let mem_ok = r.rec_peak <= TARGET_RSS_MB;
            match (time_ok, mem_ok) {
                (true, true) => "yes".to_owned(),
                _ => format!(
                    "no (time {}, memory {})",
                    if time_ok { "ok" } else { "over" },
                    if mem_ok { "ok" } else { "over" }
                ),
            }
        } else {
            "n/a (target is for 1M)".to_owned()
        };
        println!(
            "| {} | {:.1} ({}) | {:.2} | {:.2} | {:.2} | {:.2} | {:.0} | {:.3} | {:.1} | {:.1} | {:.1} | {met} |",
            r.n,
            r.setup_s,
            if r.setup_sql { "sql" } else { "settle" },
            r.cold_s,
            r.rec_median,
            r.rec_min,
            r.rec_cpu,
            r.n as f64 / r.rec_median,
            r.inc_median,
            r.rss_before,
            r.rec_peak,
            r.inc_peak,
        );
    }
}

struct Row {
    n: u64,
    setup_s: f64,
    cold_s: f64,
    setup_sql: bool,
    rec_median: f64,
    rec_min: f64,
    rec_cpu: f64,
    inc_median: f64,
    rss_before: f64,
    rec_peak: f64,
    inc_peak: f64,
}
