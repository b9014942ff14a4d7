//! Benchmark: the history (DESIGN guarantee 11, issue "Provenance").
//!
//! Run: `cargo bench --bench history`. Three measurements, each on a fresh state file in a temp
//! dir (`BENCH_EVENTS=10000000` sets the size of the second; `BENCH_VALUES=500000` the first):
//!
//! 1. **Bytes per confirmed value.** `BENCH_VALUES` values (records × 5 fields, the shapes of a
//!    real account: a plan tier, an ARR, an owner e-mail, a date, a flag; 18-character CRM ids)
//!    go the real way: `commit_page` (a detection each, with its CRM record and cycle), then
//!    `claim_due` → `settle_sent` with one request of 100 records (a confirmation each, and one
//!    batch row). The state file is vacuumed, its size taken, the history dropped, vacuumed
//!    again: the difference over the values is what the history costs per confirmed value.
//! 2. **`why` with `BENCH_EVENTS` events.** The history is filled with that many events over
//!    1,000,000 accounts (10 per account, interleaved in time as a running service writes them,
//!    detections pointing at cycles and confirmations at batches), with the accounts' shadow
//!    rows and claims. Then `why::explain` (no live reads: those are network) for 200 random
//!    accounts: median, 99th percentile and worst, against the target of 100 ms.
//! 3. **Pruning 1,000,000 expired events beside a writer.** The events of (2) older than a
//!    cut-off (1,000,000 of them) are pruned the way a running service does
//!    (`Store::prune_history` in batches of `app::PRUNE_BATCH`, `app::PRUNE_PAUSE` between them)
//!    while a writer loop enqueues and settles 500 values at a time; the loop's settle latency
//!    is reported with and without the pruning next to it.
//! 4. **What ids Pendo does not know cost** (`BENCH_UNKNOWN=1000000`, `BENCH_KNOWN=50000`; run
//!    alone with `BENCH_PART=unknown`). `BENCH_UNKNOWN` accounts × 3 fields are detected and sent
//!    the real way, and the Pendo simulator (on loopback, knowing `BENCH_KNOWN` other ids) has
//!    none of them: every value ends `unmatched`, with its two events. The state is vacuumed and
//!    measured; then one discovery pass and one full check run as the writer runs them
//!    (`pendo::discovery::pass`, the default limiter of 5 requests/s), each measured in Pendo
//!    requests, seconds, history events and state bytes written. A day at the defaults is 1,440
//!    discoveries and one full check.
//! 5. **The guard's adoption read** (`BENCH_ADOPT=1000000`; run alone with `BENCH_PART=adopt`).
//!    `BENCH_ADOPT` accounts × 3 fields are staged (a first sync's pages, `commit_page` with
//!    `stage`), and the Pendo simulator (on loopback) already holds all of them, written by
//!    "another integration": 60 % of the plan tiers stale, everything else equal. Then
//!    `pendo::adopt::adopt` reads Pendo's values of the 3 fields and adopts them as a first sync
//!    does before its guard, at the default limiter (5 requests/s) and unlimited: Pendo requests,
//!    seconds, values adopted and dropped, and the guard's decision that follows.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use pendo_sync::app::{PRUNE_BATCH, PRUNE_PAUSE};
use pendo_sync::config::Settings;
use pendo_sync::domain::{Kind, now_ms};
use pendo_sync::pendo::PendoClient;
use pendo_sync::pendo::discovery::{self, DiscoveryConfig};
use pendo_sync::sim::config::{Auth, MappingSection, PendoSection, SalesforceSection, SimConfig};
use pendo_sync::sim::pendo::{PendoSim, PendoSimConfig};
use pendo_sync::store::{Change, OutboxEntry, PageCommit, SentBatch, Settlement, Source, Store};
use pendo_sync::why::{WhyOptions, explain};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const WHY_TARGET_MS: f64 = 100.0;
const ACCOUNTS: u64 = 1_000_000;

fn settings() -> Settings {
    let sf_auth = Auth::new("jwt")
        .key("client_id", "bench")
        .key("username", "bench@example.com")
        .key("private_key", "bench");
    let toml = SimConfig::new(
        "/tmp/unused.db",
        PendoSection::new("bench").max_in_flight(None),
    )
    .salesforce(SalesforceSection::new(
        "https://login.salesforce.com",
        sf_auth,
    ))
    .admin_token("bench")
    .mapping(MappingSection::sf_accounts("accounts"))
    .to_toml();
    Settings::from_toml_with_env(&toml, HashMap::new()).expect("bench config")
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// The changes of `records` accounts from `first`, with their CRM records (a detection each).
fn changes(first: u64, records: u64, round: u64) -> Vec<Change> {
    let mut out = Vec::with_capacity(records as usize * 5);
    for i in first..first + records {
        let source = Some(Arc::new(Source {
            crm_id: Some(format!("001A{i:014}")),
            modified_at: Some(1_790_000_000_000 + i as i64),
            cleared: None,
        }));
        let id = format!("acct{i:07}");
        let values = [
            (
                "plantier",
                format!(
                    "\"{}\"",
                    ["Starter", "Growth", "Enterprise"][(i % 3) as usize]
                ),
            ),
            ("arr", format!("{}.5", i * 37 % 1_000_000 + round)),
            ("owneremail", format!("\"owner{}@example.com\"", i % 997)),
            (
                "renewaldate",
                format!("{}", 1_800_000_000_000 + (i % 365) as i64 * 86_400_000),
            ),
            ("isstrategic", (i % 2 == 0).to_string()),
        ];
        for (field, value) in values {
            out.push(Change {
                kind: Kind::Account,
                pendo_id: id.clone(),
                field: field.into(),
                value,
                mapping: "accounts".into(),
                force: false,
                source: source.clone(),
            });
        }
    }
    out
}

/// Detect, send and confirm `records` accounts the way a cycle and a writer do. Returns the
/// settle's seconds.
async fn detect_and_confirm(store: &Store, first: u64, records: u64, round: u64, run: i64) -> f64 {
    let c = changes(first, records, round);
    store
        .commit_page(&PageCommit {
            mapping: "accounts",
            changes: &c,
            run: Some(run),
            ..PageCommit::default()
        })
        .await
        .expect("commit");
    let mut settle_s = 0.0;
    loop {
        let claimed: Vec<OutboxEntry> = store
            .claim_due(Kind::Account, i64::MAX, 100)
            .await
            .expect("claim");
        if claimed.is_empty() {
            return settle_s;
        }
        let at = Instant::now();
        settle_answered(
            store,
            claimed,
            100,
            "2xx for 100 records: 100 updated, 0 missing, 0 with errors",
            || Settlement::Confirmed,
        )
        .await;
        settle_s += at.elapsed().as_secs_f64();
    }
}

/// Settles `claimed` as answered by one request of 40 ms for `records` records whose answer was
/// `answer`, each row with `settlement()`.
async fn settle_answered(
    store: &Store,
    claimed: Vec<OutboxEntry>,
    records: u32,
    answer: &str,
    settlement: impl Fn() -> Settlement,
) {
    let now = now_ms();
    let batch = SentBatch {
        kind: Kind::Account,
        sent_at: now - 40,
        answered_at: now,
        records,
        attempts: 1,
        answer: answer.into(),
    };
    let outcomes: Vec<(OutboxEntry, Settlement)> =
        claimed.into_iter().map(|e| (e, settlement())).collect();
    let batch_of = vec![Some(0); outcomes.len()];
    store
        .settle_sent(&outcomes, &[batch], &batch_of)
        .await
        .expect("settle");
}

async fn file_bytes(store: &Store) -> i64 {
    use sqlx::Row;
    sqlx::query("VACUUM").execute(store.pool()).await.unwrap();
    let row =
        sqlx::query("SELECT page_count * page_size FROM pragma_page_count(), pragma_page_size()")
            .fetch_one(store.pool())
            .await
            .unwrap();
    row.get(0)
}

async fn bytes_per_value(dir: &Path) -> serde_json::Value {
    let values = env_u64("BENCH_VALUES", 500_000);
    let records = values / 5;
    let store = Store::open(&dir.join("bytes.db")).await.unwrap();
    let started = Instant::now();
    let mut first = 0;
    while first < records {
        let n = 10_000.min(records - first);
        detect_and_confirm(&store, first, n, 0, 1).await;
        first += n;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let with = file_bytes(&store).await;
    let events = store.history_count().await.unwrap();
    sqlx::query("DELETE FROM history")
        .execute(store.pool())
        .await
        .unwrap();
    sqlx::query("DELETE FROM history_batches")
        .execute(store.pool())
        .await
        .unwrap();
    let without = file_bytes(&store).await;
    store.close().await;
    let per_value = (with - without) as f64 / values as f64;
    println!(
        "bytes per confirmed value: {per_value:.1} ({values} values, {events} events; state file {:.1} MB with the history, {:.1} MB without; {elapsed:.1} s to detect and confirm them)",
        with as f64 / 1048576.0,
        without as f64 / 1048576.0
    );
    serde_json::json!({ "values": values, "events": events, "bytes_per_value": per_value,
        "with_mb": with as f64 / 1048576.0, "without_mb": without as f64 / 1048576.0 })
}

/// Fills the history with `events` events over [`ACCOUNTS`] accounts, the oldest
/// `expired` of them a year old, plus the accounts' shadow rows and claims.
async fn fill(store: &Store, events: u64, expired: u64) -> f64 {
    let started = Instant::now();
    let now = now_ms();
    let pool = store.pool();
    sqlx::query(
        "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < 9999)
         INSERT INTO history_batches (id, kind, sent_at, answered_at, records, attempts, answer)
         SELECT i + 1, 'account', ?1, ?1, 100, 1, '2xx for 100 records: 100 updated' FROM n",
    )
    .bind(now)
    .execute(pool)
    .await
    .unwrap();
    // In chunks: one transaction of ten million rows would hold the whole WAL.
    let chunk = 1_000_000u64;
    let mut from = 0u64;
    while from < events {
        let to = (from + chunk).min(events);
        sqlx::query(
            "WITH RECURSIVE n(i) AS (SELECT ?1 UNION ALL SELECT i + 1 FROM n WHERE i + 1 < ?2)
             INSERT INTO history (at, kind, pendo_id, field, event, value, mapping, ref, crm_id, crm_at, detail)
             SELECT CASE WHEN i < ?4 THEN ?3 - 31536000000 + i ELSE ?3 - ?5 + i END,
                    'account', printf('acct%07d', i % ?6),
                    CASE (i / ?6) % 5 WHEN 0 THEN 'plantier' WHEN 1 THEN 'arr' WHEN 2 THEN 'owneremail'
                                      WHEN 3 THEN 'renewaldate' ELSE 'isstrategic' END,
                    CASE (i / ?6) % 2 WHEN 0 THEN 1 ELSE 7 END,
                    '\"value ' || (i / ?6) || '\"', 'accounts',
                    CASE (i / ?6) % 2 WHEN 0 THEN i / ?6 + 1 ELSE i % 10000 + 1 END,
                    CASE (i / ?6) % 2 WHEN 0 THEN printf('001A%014d', i % ?6) END,
                    CASE (i / ?6) % 2 WHEN 0 THEN ?3 - 86400000 END, NULL
             FROM n",
        )
        .bind(from as i64)
        .bind(to as i64)
        .bind(now)
        .bind(expired as i64)
        .bind(events as i64)
        .bind(ACCOUNTS as i64)
        .execute(pool)
        .await
        .unwrap();
        from = to;
    }
    sqlx::query(
        "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i + 1 < ?2)
         INSERT INTO shadow (kind, pendo_id, vals, confirmed_at, rev)
         SELECT 'account', printf('acct%07d', i),
                json_object('plantier', 'Growth', 'arr', 1000.5, 'owneremail', 'o@example.com',
                            'renewaldate', 1800000000000, 'isstrategic', json('true')), ?1, 0
         FROM n",
    )
    .bind(now)
    .bind(ACCOUNTS as i64)
    .execute(pool)
    .await
    .unwrap();
    sqlx::query(
        "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i + 1 < ?1)
         INSERT INTO claims (mapping, crm_id, pendo_id, digest)
         SELECT 'accounts', printf('001A%014d', i), printf('acct%07d', i), i FROM n",
    )
    .bind(ACCOUNTS as i64)
    .execute(pool)
    .await
    .unwrap();
    started.elapsed().as_secs_f64()
}

async fn why_latency(store: &Store, settings: &Settings) -> serde_json::Value {
    let mut rng = fastrand::Rng::with_seed(11);
    let options = WhyOptions {
        field: None,
        limit: 10,
        live: false,
    };
    let mut ms = Vec::new();
    for _ in 0..200 {
        let id = format!("acct{:07}", rng.u64(0..ACCOUNTS));
        let at = Instant::now();
        let report = explain(settings, store, Kind::Account, &id, &options, None)
            .await
            .expect("why");
        ms.push(at.elapsed().as_secs_f64() * 1000.0);
        assert_eq!(report.events.len(), 10);
    }
    let (p50, p99, max) = (
        percentile(ms.clone(), 0.5),
        percentile(ms.clone(), 0.99),
        percentile(ms, 1.0),
    );
    println!(
        "why (no live reads), 200 random accounts: median {p50:.2} ms, p99 {p99:.2} ms, max {max:.2} ms (target < {WHY_TARGET_MS} ms)"
    );
    serde_json::json!({ "median_ms": p50, "p99_ms": p99, "max_ms": max })
}

/// A writer loop settling 500 values at a time for `rounds` rounds; each settle's ms.
async fn writer_loop(store: &Store, rounds: u64, base: u64) -> Vec<f64> {
    let mut out = Vec::new();
    for r in 0..rounds {
        let s = detect_and_confirm(store, base + (r % 50) * 100, 100, base + r, 2).await;
        out.push(s * 1000.0);
    }
    out
}

async fn pruning_beside_a_writer(store: &Store, expired: u64) -> serde_json::Value {
    let alone = writer_loop(store, 200, 0).await;
    let before = now_ms() - 86_400_000;
    let prune = async {
        let started = Instant::now();
        let mut total = 0;
        loop {
            let n = store.prune_history(before, PRUNE_BATCH).await.unwrap();
            total += n;
            if n < u64::from(PRUNE_BATCH) {
                break;
            }
            tokio::time::sleep(PRUNE_PAUSE).await;
        }
        (total, started.elapsed().as_secs_f64())
    };
    let writer = async {
        let mut all = Vec::new();
        // Keeps settling while the prune runs (a few rounds past it are harmless).
        for _ in 0..40 {
            all.extend(writer_loop(store, 25, 10_000).await);
        }
        all
    };
    let ((pruned, prune_s), beside) = tokio::join!(prune, writer);
    assert_eq!(pruned, expired, "every expired event, and only those");
    let stats = |v: &Vec<f64>| {
        (
            percentile(v.clone(), 0.5),
            percentile(v.clone(), 0.99),
            percentile(v.clone(), 1.0),
        )
    };
    let (a50, a99, amax) = stats(&alone);
    let (b50, b99, bmax) = stats(&beside);
    println!(
        "pruning {pruned} expired events: {prune_s:.1} s in batches of {PRUNE_BATCH} ({:.0} events/s)",
        pruned as f64 / prune_s
    );
    println!(
        "writer settle of 100 records (500 values) alone: median {a50:.2} ms, p99 {a99:.2} ms, max {amax:.2} ms"
    );
    println!(
        "writer settle of 100 records (500 values) beside the pruning: median {b50:.2} ms, p99 {b99:.2} ms, max {bmax:.2} ms"
    );
    serde_json::json!({ "pruned": pruned, "prune_s": prune_s,
        "settle_alone_ms": [a50, a99, amax], "settle_beside_ms": [b50, b99, bmax] })
}

/// One claim of the writer's (500 records), answered "missing" for every id as Pendo would for
/// ids it does not know; the claim's duration, `None` once nothing was due.
async fn settle_missing(store: &Store) -> Option<f64> {
    let at = Instant::now();
    let claimed = store
        .claim_due(Kind::Account, i64::MAX, 500)
        .await
        .expect("claim");
    let took = at.elapsed().as_secs_f64();
    if claimed.is_empty() {
        return None;
    }
    settle_answered(
        store,
        claimed,
        500,
        "2xx for 500 records: 0 updated, 500 missing, 0 with errors",
        || Settlement::Unmatched {
            message: "Pendo has no such account".into(),
        },
    )
    .await;
    Some(took)
}

/// Measurement 4: see the module's documentation.
async fn unknown_ids(dir: &Path) -> serde_json::Value {
    let unknown = env_u64("BENCH_UNKNOWN", 1_000_000);
    let known = env_u64("BENCH_KNOWN", 50_000);
    let sim = PendoSim::new(PendoSimConfig {
        integration_key: "bench".into(),
        write_access: true,
        schema: Vec::new(),
        rate_limit: None,
        errors_as_strings: false,
    });
    let server = sim.start("127.0.0.1:0".parse().unwrap()).await.unwrap();
    for i in 0..known {
        sim.add_entity_first_visited(Kind::Account, &format!("user{i:07}"), 1_700_000_000_000);
    }
    let toml = SimConfig::new(
        "/tmp/unused.db",
        PendoSection::new("bench").base_url(server.url()),
    )
    .mapping(MappingSection::sf_accounts("accounts"))
    .salesforce(SalesforceSection::new(
        "https://login.salesforce.com",
        Auth::client_credentials("bench", "bench"),
    ))
    .to_toml();
    let settings = Settings::from_toml_with_env(&toml, HashMap::new()).expect("bench config");
    let key = settings
        .pendo
        .integration_key_source
        .resolve("pendo.integration_key")
        .unwrap();
    let client = PendoClient::new(&settings.pendo, key);

    let store = Store::open(&dir.join("unknown.db")).await.unwrap();
    let started = Instant::now();
    let mut first = 0;
    while first < unknown {
        let n = 10_000.min(unknown - first);
        let c: Vec<Change> = changes(first, n, 0)
            .into_iter()
            .filter(|c| ["plantier", "arr", "owneremail"].contains(&c.field.as_str()))
            .collect();
        store
            .commit_page(&PageCommit {
                mapping: "accounts",
                changes: &c,
                run: Some(1),
                ..PageCommit::default()
            })
            .await
            .expect("commit");
        while settle_missing(&store).await.is_some() {}
        first += n;
    }
    let fill_s = started.elapsed().as_secs_f64();
    let events = store.history_count().await.unwrap();
    let bytes = file_bytes(&store).await;
    println!(
        "unknown ids: {unknown} accounts × 3 fields sent and found missing in {fill_s:.1} s: {events} events, state file {:.1} MB",
        bytes as f64 / 1048576.0
    );
    let cfg = DiscoveryConfig {
        every: std::time::Duration::from_secs(60),
        full_every: std::time::Duration::from_secs(86_400),
    };
    let mut out = serde_json::json!({ "unknown": unknown, "known": known, "events": events,
        "state_mb": bytes as f64 / 1048576.0, "fill_s": fill_s });
    // A bulk edit of 10,000 of those leads (one field each, in the middle of the ids), pushed
    // beside the unmatched rows: what the writer's claims cost when most of the outbox waits
    // for ids Pendo does not know.
    let edited = 10_000.min(unknown);
    let c: Vec<Change> = changes((unknown - edited) / 2, edited, 1)
        .into_iter()
        .filter(|c| c.field == "arr")
        .collect();
    store
        .commit_page(&PageCommit {
            mapping: "accounts",
            changes: &c,
            run: Some(2),
            ..PageCommit::default()
        })
        .await
        .expect("commit");
    let at = Instant::now();
    let mut claims = Vec::new();
    while let Some(took) = settle_missing(&store).await {
        claims.push(took * 1000.0);
    }
    let push_s = at.elapsed().as_secs_f64();
    claims.sort_by(f64::total_cmp);
    let median = claims.get(claims.len() / 2).copied().unwrap_or(0.0);
    println!(
        "  a bulk edit of {edited} of them pushed beside the unmatched rows: {} claims, median {median:.1} ms a claim, {push_s:.2} s in all (claims and settles)",
        claims.len()
    );
    out["bulk_edit"] = serde_json::json!({ "claims": claims.len(), "claim_median_ms": median,
        "seconds": push_s });
    let events = store.history_count().await.unwrap();
    // First a discovery (the full check done a minute ago), then a full check (a day ago).
    let day = 86_400_000;
    for (what, checked_ago, discovered_ago) in [
        ("discovery", 61_000, 61_000),
        ("full_check", day + 1, 61_000),
    ] {
        let now = now_ms();
        for (k, ago) in [("checked", checked_ago), ("discovered", discovered_ago)] {
            store
                .kv_set(&format!("unmatched.{k}_at.account"), &(now - ago).into())
                .await
                .unwrap();
        }
        let before = file_bytes(&store).await;
        sim.reset_requests();
        let at = Instant::now();
        let found = discovery::pass(&store, &client, cfg).await.expect("pass");
        let seconds = at.elapsed().as_secs_f64();
        let after = file_bytes(&store).await;
        let requests = sim.requests().len();
        let new_events = store.history_count().await.unwrap() - events;
        println!(
            "  {what}: {requests} Pendo request(s), {seconds:.2} s, {} values found, {new_events} history events, {} state bytes written",
            found.promoted,
            after - before
        );
        out[what] = serde_json::json!({ "requests": requests, "seconds": seconds,
            "history_events": new_events, "state_bytes": after - before });
    }
    store.close().await;
    out
}

async fn adoption(dir: &Path) -> serde_json::Value {
    use pendo_sync::mapping::Mapping;
    use pendo_sync::pendo::adopt;
    use pendo_sync::pendo::values::Retry;
    let n = env_u64("BENCH_ADOPT", 1_000_000);
    let sim = PendoSim::new(PendoSimConfig {
        integration_key: "bench".into(),
        write_access: true,
        schema: Vec::new(),
        rate_limit: None,
        errors_as_strings: false,
    });
    let server = sim.start("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let fields = ["plantier", "arr", "owneremail"];
    let store = Store::open(&dir.join("adopt.db")).await.unwrap();
    let started = Instant::now();
    let mut first = 0;
    while first < n {
        let count = 10_000.min(n - first);
        let c: Vec<Change> = changes(first, count, 0)
            .into_iter()
            .filter(|c| fields.contains(&c.field.as_str()))
            .collect();
        for ch in &c {
            let mut v: serde_json::Value = serde_json::from_str(&ch.value).unwrap();
            let i: u64 = ch.pendo_id[4..].parse().unwrap();
            if ch.field == "plantier" && i % 10 < 6 {
                v = serde_json::json!("Legacy");
            }
            sim.set_value(Kind::Account, &ch.pendo_id, &ch.field, v);
        }
        store
            .commit_page(&PageCommit {
                mapping: "accounts",
                changes: &c,
                run: Some(1),
                stage: true,
                ..PageCommit::default()
            })
            .await
            .expect("commit");
        first += count;
    }
    println!(
        "adoption: {n} accounts × 3 fields staged and held by Pendo in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    // The default limiter (`pendo.requests_per_second`): what a first sync meets.
    let toml = SimConfig::new(
        "/tmp/unused.db",
        PendoSection::new("bench").base_url(server.url()),
    )
    .mapping(MappingSection::sf_accounts("accounts").only(&fields))
    .salesforce(SalesforceSection::new(
        "https://login.salesforce.com",
        Auth::client_credentials("bench", "bench"),
    ))
    .to_toml();
    let settings = Settings::from_toml_with_env(&toml, HashMap::new()).expect("bench config");
    let key = settings
        .pendo
        .integration_key_source
        .resolve("pendo.integration_key")
        .unwrap();
    let client = PendoClient::new(&settings.pendo, key);
    let mapping = Mapping::new(settings.mapping("accounts").unwrap());
    let maps: Vec<_> = mapping.fields.iter().collect();
    let retry = Retry {
        initial: std::time::Duration::from_millis(100),
        max: std::time::Duration::from_secs(5),
        attempts: 6,
    };
    sim.reset_requests();
    let at = Instant::now();
    let done = adopt::adopt(&store, &client, &mapping, &maps, retry)
        .await
        .expect("adopt");
    let seconds = at.elapsed().as_secs_f64();
    let requests = sim.requests().len();
    println!(
        "  adoption at {} requests/s: {requests} Pendo requests, {seconds:.1} s; {} of Pendo's values adopted, {} staged values equal (dropped, never sent)",
        settings.pendo.requests_per_second, done.seeded, done.equal
    );
    let at = Instant::now();
    let outcome = store
        .finish_staged("accounts", Kind::Account, &mapping.guard)
        .await
        .expect("guard");
    let guard_s = at.elapsed().as_secs_f64();
    println!("  then the guard: {outcome:?} in {guard_s:.2} s");
    let out = serde_json::json!({ "accounts": n, "requests": requests, "seconds": seconds,
        "seeded": done.seeded, "equal": done.equal, "guard_s": guard_s });
    store.close().await;
    out
}

fn main() {
    // Outside `cargo bench` (e.g. `cargo test --all-targets`) there is nothing to do.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let settings = settings();
        let part = std::env::var("BENCH_PART").unwrap_or_default();
        if part == "adopt" {
            adoption(dir.path()).await;
            return;
        }
        if part.is_empty() || part == "unknown" {
            unknown_ids(dir.path()).await;
        }
        if part == "unknown" {
            return;
        }
        bytes_per_value(dir.path()).await;
        let events = env_u64("BENCH_EVENTS", 10_000_000);
        let expired = 1_000_000.min(events / 2);
        let store = Store::open(&dir.path().join("history.db")).await.unwrap();
        let fill_s = fill(&store, events, expired).await;
        let size = std::fs::metadata(dir.path().join("history.db")).map_or(0, |m| m.len());
        println!(
            "filled {events} events over {ACCOUNTS} accounts in {fill_s:.1} s; state file {:.0} MB",
            size as f64 / 1048576.0
        );
        why_latency(&store, &settings).await;
        pruning_beside_a_writer(&store, expired).await;
        store.close().await;
    });
}
