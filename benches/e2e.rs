//! End-to-end benchmarks against the Pendo simulator (issue 6, part 5):
//!
//! 1. **Push**: N changed records to a Pendo limited at R requests in any second, with batch size
//!    B. Wall time against the floor ceil(N / B) / R, the share of the allowed rate we used, and
//!    how many 429s we caused (target: ≥ 92% of the rate; any 429 fails the bench).
//! 2. **Idle cycle**: an incremental cycle and a full reconcile over N unchanged records: Pendo
//!    requests (target 0) and time per cycle.
//! 3. **1% changed** vs a **naive loop** that sends every record every cycle: requests and time.
//!
//! Run: `cargo bench --bench e2e`. Environment: `BENCH_E2E_N` (100000), `BENCH_E2E_R` (20),
//! `BENCH_E2E_B` (500), `BENCH_E2E_IN_FLIGHT` (`pendo.max_in_flight`, 2); `BENCH_E2E_EDGE=bucket` limits Pendo by a token bucket of one token
//! instead of a one-second window; `BENCH_E2E_GAPS=1` lists every pause between Pendo requests longer than
//! 1.5 periods (on stderr); `BENCH_STATE=postgres` keeps the state in a throwaway PostgreSQL. The
//! CRM is the in-memory fixture connector, so the figures are pendo-sync's and the Pendo
//! simulator's, not a CRM's.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use pendo_sync::app::{App, Connectors};
use pendo_sync::config::{Settings, Source};
use pendo_sync::connectors::fixture::FixtureConnector;
use pendo_sync::domain::Kind;
use pendo_sync::engine::Mode;
use pendo_sync::sim::config::{Auth, MappingSection, PendoSection, SalesforceSection, SimConfig};
use pendo_sync::sim::pendo::{PendoSim, PendoSimConfig, SimRateLimit};
use serde_json::json;

/// The binary's allocator (src/main.rs), so the figures are the binary's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use tokio_util::sync::CancellationToken;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn account(i: usize, tier: &str) -> serde_json::Value {
    json!({
        "Id": format!("001E2E{i:09}"),
        "Plan_Tier__c": tier,
        "ARR__c": (i % 1000) as f64 * 100.0,
        "Owner": {"Email": format!("owner{}@acme.test", i % 13)},
        "Renewal_Date__c": "2027-03-31",
        "Strategic__c": i % 2 == 1,
    })
}

fn main() {
    // `cargo test --all-targets` runs bench binaries without `--bench`: do nothing there.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    // The simulator on a runtime of its own, as Pendo is another machine: its handlers (a
    // bulk write parses and applies 2,500 values) must not delay pendo-sync's sends, nor its
    // clock of arrivals wait for pendo-sync's work.
    let sim_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("pendo-sim")
        .enable_all()
        .build()
        .expect("simulator runtime");
    rt.block_on(run(sim_rt.handle().clone()));
}

async fn run(sim_rt: tokio::runtime::Handle) {
    let n = env_or("BENCH_E2E_N", 100_000) as usize;
    let r = env_or("BENCH_E2E_R", 20) as f64;
    let b = env_or("BENCH_E2E_B", 500) as usize;
    // `BENCH_E2E_EDGE=bucket`: Pendo as a token bucket of one token (two arrivals closer than
    // one period are refused, so this host's scheduling jitter alone draws 429s: BENCHMARKS.md,
    // end-to-end push). Otherwise a window of one second admitting R.
    let bucket = std::env::var("BENCH_E2E_EDGE").is_ok_and(|v| v == "bucket");
    let edge_window = (!bucket).then(|| std::time::Duration::from_secs(1));
    let dir = std::env::temp_dir().join(format!("pendo-sync-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");

    let schema = [
        ("plantier", "string"),
        ("arr", "number"),
        ("owneremail", "string"),
        ("renewaldate", "date"),
        ("isstrategic", "boolean"),
    ]
    .iter()
    .map(|(f, t)| (Kind::Account, f.to_string(), t.to_string()))
    .collect();
    let pendo = PendoSim::new(PendoSimConfig {
        integration_key: "bench-key".into(),
        write_access: true,
        schema,
        // The simulator enforces the same rate we configure: any 429 is one we caused.
        rate_limit: Some(SimRateLimit {
            requests_per_second: r,
            burst: 1,
            retry_after: true,
            window: edge_window,
        }),
        errors_as_strings: false,
    });
    let server = {
        let pendo = pendo.clone();
        sim_rt
            .spawn(async move { pendo.start("127.0.0.1:0".parse().unwrap()).await })
            .await
            .expect("simulator task")
            .expect("sim")
    };
    let crm = FixtureConnector::new(2_000);
    for i in 0..n {
        crm.upsert("Account", &format!("001E2E{i:09}"), account(i, "Growth"));
        pendo.add_entity(Kind::Account, &format!("001E2E{i:09}"));
    }
    let pendo_section = PendoSection::new("bench-key")
        .base_url(server.url())
        .batch_size(b)
        .requests_per_second(r)
        .retry_initial("200ms")
        .retry_max("5s")
        .max_in_flight(Some(env_or("BENCH_E2E_IN_FLIGHT", 2) as u32));
    // `BENCH_STATE=postgres`: the state in a throwaway PostgreSQL of this run's.
    let state_url = if std::env::var("BENCH_STATE").is_ok_and(|v| v == "postgres") {
        Some(
            {
                pendo_sync::sim::postgres::durable();
                pendo_sync::sim::postgres::database()
            }
            .await
            .expect("BENCH_STATE=postgres needs PostgreSQL installed"),
        )
    } else {
        None
    };
    let on = if state_url.is_some() {
        "PostgreSQL"
    } else {
        "SQLite"
    };
    let toml = SimConfig::new(dir.join("state.db"), pendo_section)
        .state_url(state_url)
        .salesforce(SalesforceSection::new(
            "http://127.0.0.1:9",
            Auth::client_credentials("bench", "bench"),
        ))
        .mapping(MappingSection::sf_accounts("accounts").on_delete(None))
        // The 1 % cycle below edits one field of 1,000 records at once: an incremental cycle is
        // judged on the records it pulled, so the guard would hold it (as it should a real bulk
        // edit). This bench measures the push, so it lets such edits through.
        .tail("[guard]\nmax_overwrite_percent = 100\n")
        .to_toml();
    let settings = Arc::new(Settings::from_toml_with_env(&toml, HashMap::new()).expect("config"));
    let mut connectors = Connectors::new();
    connectors.insert(Source::Salesforce, Arc::new(crm.clone()));
    let app = App::open(settings.clone(), connectors).await.expect("app");
    let cancel = CancellationToken::new();
    let writes = |p: &PendoSim| {
        p.requests()
            .into_iter()
            .filter(|q| q.path.contains("/custom/value"))
            .collect::<Vec<_>>()
    };

    println!(
        "e2e: N={n} records × 5 fields, Pendo limited at R={r} requests/s ({}), batch B={b}, state on {on}\n",
        if bucket {
            "a token bucket of one token"
        } else {
            "R in any second"
        }
    );

    // 1. Push every record once (the first sync).
    let m = &settings.mappings[0];
    let t = Instant::now();
    app.cycle(m, Mode::Incremental, false, &())
        .await
        .expect("cycle");
    let cycle_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let drain = app
        .drain(&cancel, std::time::Duration::from_secs(600))
        .await
        .expect("drain");
    let push_s = t.elapsed().as_secs_f64();
    // Every 429 pendo-sync drew in the first sync (its reads of what Pendo holds included):
    // Pendo's limit is the one pendo-sync is configured for, so each is one it caused.
    let mut self_caused: Vec<String> = pendo
        .requests()
        .iter()
        .filter(|q| q.status == 429)
        .map(|q| format!("{} at {} ms", q.path, q.at_ms))
        .collect();
    let sent = writes(&pendo);
    let ok = sent.iter().filter(|q| q.status == 200).count();
    let throttled = sent.iter().filter(|q| q.status == 429).count();
    let floor = (n as f64 / b as f64).ceil() / r;
    assert_eq!(drain.confirmed as usize, n, "every record confirmed");
    println!("| push | value |\n|---|---|");
    println!("| diff + outbox of {n} new records | {cycle_s:.2} s |");
    println!("| push wall time | {push_s:.2} s |");
    println!("| floor ceil(N/B)/R | {floor:.2} s |");
    println!(
        "| share of the allowed rate used | {:.1} % |",
        100.0 * floor / push_s
    );
    println!("| requests (200 / 429) | {ok} / {throttled} |");
    // Where the time went: gaps between requests as Pendo saw them arrive, against the period
    // of the allowed rate.
    let mut arrivals: Vec<i64> = sent.iter().map(|q| q.at_ms).collect();
    arrivals.sort_unstable();
    let mut gaps: Vec<i64> = arrivals.windows(2).map(|w| w[1] - w[0]).collect();
    gaps.sort_unstable();
    let period_ms = 1000.0 / r;
    let slow: i64 = gaps
        .iter()
        .filter(|g| **g as f64 > 1.5 * period_ms)
        .map(|g| g - period_ms as i64)
        .sum();
    if std::env::var("BENCH_E2E_GAPS").is_ok() {
        for w in arrivals.windows(2) {
            if (w[1] - w[0]) as f64 > 1.5 * period_ms {
                eprintln!("gap {} ms at +{} ms", w[1] - w[0], w[0] - arrivals[0]);
            }
        }
    }
    if let (Some(median), Some(max)) = (gaps.get(gaps.len() / 2), gaps.last()) {
        println!(
            "| gaps between requests: median / p90 / max | {median} / {} / {max} ms |",
            gaps[gaps.len() * 9 / 10]
        );
        println!(
            "| time lost in gaps over 1.5 periods | {:.2} s |\n",
            slow as f64 / 1000.0
        );
    }

    // 2. Idle cycles.
    pendo.reset_requests();
    let t = Instant::now();
    app.sync(None, Mode::Incremental, false, &cancel, &())
        .await
        .expect("sync");
    let idle_inc = t.elapsed().as_secs_f64();
    let t = Instant::now();
    app.sync(None, Mode::Reconcile, false, &cancel, &())
        .await
        .expect("sync");
    let idle_full = t.elapsed().as_secs_f64();
    let idle_requests = pendo.requests().len();
    println!("| idle cycle | value |\n|---|---|");
    println!("| incremental sync, nothing changed | {idle_inc:.2} s |");
    println!("| full reconcile of {n} unchanged records | {idle_full:.2} s |");
    println!("| Pendo requests in both | {idle_requests} |\n");

    // 3. 1% changed: pendo-sync vs sending everything every cycle.
    let changed = n / 100;
    for i in 0..changed {
        crm.set_field(
            "Account",
            &format!("001E2E{:09}", i * 100),
            "Plan_Tier__c",
            json!("Enterprise"),
        );
    }
    pendo.reset_requests();
    let t = Instant::now();
    app.sync(None, Mode::Incremental, false, &cancel, &())
        .await
        .expect("sync");
    let ours_s = t.elapsed().as_secs_f64();
    self_caused.extend(
        pendo
            .requests()
            .iter()
            .filter(|q| q.status == 429)
            .map(|q| format!("{} at {} ms (1 % cycle)", q.path, q.at_ms)),
    );
    let ours_requests = writes(&pendo).len();
    let ours_values: usize = writes(&pendo)
        .iter()
        .filter_map(|q| {
            q.body.as_ref()?.as_array().map(|a| {
                a.iter()
                    .map(|e| e["values"].as_object().map_or(0, |v| v.len()))
                    .sum::<usize>()
            })
        })
        .sum();

    // The naive loop: every record, every field, every cycle, through the same client and limiter.
    pendo.reset_requests();
    let t = Instant::now();
    let records = crm.records("Account");
    let ids: Vec<&String> = records.keys().collect();
    for chunk in ids.chunks(b) {
        let body: Vec<serde_json::Value> = chunk
            .iter()
            .map(|id| {
                let f = &records[*id];
                json!({"accountId": id, "values": {
                    "plantier": f["Plan_Tier__c"], "arr": f["ARR__c"], "owneremail": f["Owner"]["Email"],
                    "renewaldate": "2027-03-31T00:00:00Z", "isstrategic": f["Strategic__c"]}})
            })
            .collect();
        let sent: Vec<&str> = chunk.iter().map(|s| s.as_str()).collect();
        let body = serde_json::Value::Array(body);
        // A naive loop still has to survive a 429: wait as told and send again.
        loop {
            match app
                .pendo
                .set_values(Kind::Account, &body, false, &sent)
                .await
            {
                Ok(_) => break,
                Err(e) if e.is_transient() => {
                    tokio::time::sleep(e.retry_after().unwrap_or(std::time::Duration::from_secs(1)))
                        .await
                }
                Err(e) => panic!("naive push: {e}"),
            }
        }
    }
    let naive_s = t.elapsed().as_secs_f64();
    let naive_requests = writes(&pendo).len();
    println!(
        "| one cycle with 1% changed ({changed} records) | pendo-sync | naive loop | ratio |\n|---|---|---|---|"
    );
    println!(
        "| Pendo requests | {ours_requests} | {naive_requests} | {:.0}× |",
        naive_requests as f64 / ours_requests.max(1) as f64
    );
    println!(
        "| field values sent | {ours_values} | {} | {:.0}× |",
        n * 5,
        (n * 5) as f64 / ours_values.max(1) as f64
    );
    println!(
        "| wall time | {ours_s:.2} s | {naive_s:.2} s | {:.1}× |",
        naive_s / ours_s
    );

    app.store.close().await;
    server.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
    // Figures first, then the verdict: a push that drew any 429 failed the bench, however
    // fast it was (the naive loop is not pendo-sync's writer and is not judged).
    assert!(
        self_caused.is_empty(),
        "pendo-sync drew {} × 429 from a limit it is configured for: {self_caused:?}",
        self_caused.len()
    );
}
