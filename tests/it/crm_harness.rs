//! A harness with the real connectors: the Salesforce, HubSpot and Pendo simulators on loopback,
//! a config pointing at all three (one Salesforce account mapping, one HubSpot contact mapping),
//! and an `App` per "process" built the way the binary builds it (`connectors::build`).
//!
//! Unlike `helpers::TestApp` (fixture CRM), every CRM request here crosses HTTP, its rate limiter
//! and its retry logic, so fault and rate tests see what production would.

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::extract::{Request, State};
use axum::middleware::{self, Next};
use axum::response::Response;
use pendo_sync::app::{App, SyncReport};
use pendo_sync::config::Settings;
use pendo_sync::domain::Kind;
use pendo_sync::engine::Mode;
use pendo_sync::sim::SimServer;
use pendo_sync::sim::config::{
    Auth, HubspotSection, MappingSection, PendoSection, SalesforceSection, SimConfig,
};
use pendo_sync::sim::hubspot::{HubspotSim, HubspotSimConfig};
use pendo_sync::sim::pendo::{PendoSim, PendoSimConfig, SimRateLimit};
use pendo_sync::sim::salesforce::{SalesforceSim, SalesforceSimConfig};
use pendo_sync::store::{OutboxEntry, QueueFilter, Store};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

pub const PENDO_KEY: &str = "crm-harness-pendo-key";

/// HubSpot owners the seeded contacts point at: (id, email, first, last).
pub const OWNERS: [(&str, &str, &str, &str); 3] = [
    ("201", "ada@owners.test", "Ada", "Lovelace"),
    ("202", "alan@owners.test", "Alan", "Turing"),
    ("203", "grace@owners.test", "Grace", "Hopper"),
];

pub struct CrmOptions {
    /// Client-side limits written into the config.
    pub pendo_rps: f64,
    pub sf_rps: f64,
    pub hs_per_10s: u32,
    pub hs_search_rps: f64,
    /// The Pendo simulator's own rate limit (429s when the client is faster).
    pub pendo_sim_limit: Option<SimRateLimit>,
    pub errors_as_strings: bool,
    pub pendo_key: String,
    pub sf_sim: SalesforceSimConfig,
    pub hs_sim: HubspotSimConfig,
    pub batch_size: usize,
    pub max_attempts: u32,
    pub retry_initial: &'static str,
    pub retry_max: &'static str,
    /// The credential keys of `[salesforce]` (auth, client_id, secrets).
    pub sf_auth: Auth,
    /// The credential keys of `[hubspot]` (auth, token or OAuth app).
    pub hs_auth: Auth,
    /// Extra lines for `[pendo]`.
    pub extra_pendo: String,
    /// `[admin] token`, if any (the section is written only then).
    pub admin_token: Option<String>,
    /// `[admin] viewer_token`, if any.
    pub admin_viewer_token: Option<String>,
}

impl Default for CrmOptions {
    fn default() -> Self {
        let sf_sim = SalesforceSimConfig {
            client_secret: "crm-harness-sf-secret".into(),
            page_size: 10,
            ..SalesforceSimConfig::default()
        };
        let hs_sim = HubspotSimConfig {
            access_token: "crm-harness-hs-token".into(),
            // Unlimited on the server: the tests measure the client's own limiter from the log;
            // a 1 s "ten-secondly" interval keeps injected 429 waits short.
            requests_per_10s: 0,
            window_ms: 1000,
            search_per_second: 0,
            ..HubspotSimConfig::default()
        };
        CrmOptions {
            pendo_rps: 50.0,
            sf_rps: 50.0,
            hs_per_10s: 500,
            hs_search_rps: 50.0,
            pendo_sim_limit: None,
            errors_as_strings: false,
            pendo_key: PENDO_KEY.into(),
            sf_auth: Auth::client_credentials(&sf_sim.client_id, &sf_sim.client_secret),
            hs_auth: Auth::access_token(&hs_sim.access_token),
            sf_sim,
            hs_sim,
            batch_size: 10,
            max_attempts: 200,
            retry_initial: "20ms",
            retry_max: "200ms",
            extra_pendo: String::new(),
            admin_token: None,
            admin_viewer_token: None,
        }
    }
}

pub struct Crm {
    pub dir: tempfile::TempDir,
    pub pendo: PendoSim,
    pub sf: SalesforceSim,
    pub hs: HubspotSim,
    /// Receipt times (epoch ms) of every Salesforce request: the simulator's own log has none.
    sf_times: Arc<Mutex<Vec<i64>>>,
    /// Start time (epoch ms) of each "process" (`App`), to attribute requests to limiters.
    process_starts: Mutex<Vec<i64>>,
    #[allow(dead_code)]
    pub servers: Vec<SimServer>,
    pub toml: String,
    pub settings: Arc<Settings>,
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

async fn stamp(State(times): State<Arc<Mutex<Vec<i64>>>>, req: Request, next: Next) -> Response {
    if !req.uri().path().starts_with("/_sim/") {
        times.lock().unwrap().push(now_ms());
    }
    next.run(req).await
}

impl Crm {
    pub async fn start(opts: CrmOptions) -> Crm {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut schema = Vec::new();
        for (f, t) in crate::helpers::ACCOUNT_FIELDS {
            schema.push((Kind::Account, f.to_owned(), t.to_owned()));
        }
        for f in ["lifecyclestage", "owneremail", "csmname"] {
            schema.push((Kind::Visitor, f.to_owned(), "string".to_owned()));
        }
        let pendo = PendoSim::new(PendoSimConfig {
            integration_key: opts.pendo_key.clone(),
            write_access: true,
            schema,
            rate_limit: opts.pendo_sim_limit.clone(),
            errors_as_strings: opts.errors_as_strings,
        });
        let sf = SalesforceSim::new(opts.sf_sim.clone());
        // Every field the mapping reads exists even before a record carries a value for it.
        sf.declare_fields(
            "Account",
            &[
                ("Plan_Tier__c", "picklist"),
                ("ARR__c", "currency"),
                ("Renewal_Date__c", "date"),
                ("Strategic__c", "boolean"),
                ("OwnerId", "reference"),
            ],
        );
        sf.declare_fields("User", &[("Email", "email")]);
        let hs = HubspotSim::new(opts.hs_sim.clone());
        for (id, email, first, last) in OWNERS {
            hs.add_owner(id, email, first, last);
        }
        let loopback: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let sf_times = Arc::new(Mutex::new(Vec::new()));
        let sf_router = sf
            .router()
            .layer(middleware::from_fn_with_state(sf_times.clone(), stamp));
        let servers = vec![
            pendo.start(loopback).await.expect("pendo sim"),
            SimServer::start(sf_router, loopback)
                .await
                .expect("salesforce sim"),
            hs.start(loopback).await.expect("hubspot sim"),
        ];
        let pendo_section = PendoSection::new(&opts.pendo_key)
            .base_url(servers[0].url())
            .batch_size(opts.batch_size)
            .requests_per_second(opts.pendo_rps)
            .timeout("5s")
            .max_attempts(opts.max_attempts)
            .create_missing(true)
            .retry_initial(opts.retry_initial)
            .retry_max(opts.retry_max)
            .extra(&opts.extra_pendo);
        let mut sim_config = SimConfig::new(dir.path().join("state.db"), pendo_section)
            .salesforce(
                SalesforceSection::new(servers[1].url(), opts.sf_auth.clone())
                    .requests_per_second(opts.sf_rps)
                    .timeout("5s"),
            )
            .hubspot(
                HubspotSection::new(servers[2].url(), opts.hs_auth.clone())
                    .requests_per_10s(opts.hs_per_10s)
                    .search_requests_per_second(opts.hs_search_rps)
                    .timeout("5s"),
            )
            .overlap("1s")
            .mapping(MappingSection::sf_accounts("sf-accounts"))
            .mapping(MappingSection::hs_contacts());
        if let Some(token) = &opts.admin_token {
            sim_config = sim_config.admin_token(token);
        }
        if let Some(token) = &opts.admin_viewer_token {
            sim_config = sim_config.admin_viewer_token(token);
        }
        let toml = sim_config.to_toml();
        let settings = Arc::new(
            Settings::from_toml_with_env(&toml, HashMap::new()).expect("harness config is valid"),
        );
        Crm {
            dir,
            pendo,
            sf,
            hs,
            sf_times,
            process_starts: Mutex::new(Vec::new()),
            servers,
            toml,
            settings,
        }
    }

    pub fn state_path(&self) -> std::path::PathBuf {
        self.settings.state.path.clone()
    }

    /// `n` Salesforce accounts; every fifth has no owner (a null relationship).
    pub fn seed_accounts(&self, n: usize) {
        for i in 0..n {
            self.sf.upsert("Account", &sf_account_id(i), sf_account(i));
        }
    }

    /// `n` HubSpot contacts with mixed-case emails (the mapping lower-cases them) and owners.
    pub fn seed_contacts(&self, n: usize) {
        for i in 0..n {
            self.hs.upsert("contacts", hs_contact_id(i), hs_contact(i));
        }
    }

    /// A fresh `App` on the same state file, connectors built as the binary builds them.
    pub async fn app(&self) -> App {
        self.process_starts.lock().unwrap().push(now_ms());
        let store = Store::open(&self.settings.state.path)
            .await
            .expect("state opens");
        let connectors =
            pendo_sync::connectors::build(&self.settings, Some(std::sync::Arc::new(store.clone())))
                .expect("connectors build");
        App::open(self.settings.clone(), connectors)
            .await
            .expect("app opens")
    }

    /// One `pendo-sync sync` as its own process: every mapping, then the outbox drained.
    pub async fn sync(&self) -> SyncReport {
        let app = self.app().await;
        let report = app
            .sync(
                None,
                Mode::Incremental,
                false,
                &CancellationToken::new(),
                &(),
            )
            .await
            .expect("sync runs");
        app.store.close().await;
        report
    }

    /// Syncs (a new process each time) until a run has no failed cycle and an empty outbox, as
    /// cron would. Every failure on the way must be transient (the CRM was unavailable).
    /// Returns the reports of every run.
    pub async fn sync_until_clean(&self, max_runs: usize) -> Vec<SyncReport> {
        let mut reports = Vec::new();
        for _ in 0..max_runs {
            let report = self.sync().await;
            for (mapping, error) in &report.failed {
                assert!(
                    error.contains("unavailable") || error.contains("rate limit"),
                    "mapping {mapping} failed with a non-transient error: {error}"
                );
            }
            let clean = report.failed.is_empty() && self.outbox().await.is_empty();
            reports.push(report);
            if clean {
                return reports;
            }
        }
        panic!(
            "not clean after {max_runs} runs: failures {:?}, outbox {:?}",
            reports.iter().map(|r| r.failed.clone()).collect::<Vec<_>>(),
            self.outbox().await
        );
    }

    pub async fn outbox(&self) -> Vec<OutboxEntry> {
        let store = Store::open(&self.settings.state.path).await.unwrap();
        let rows = store
            .outbox_list(&QueueFilter::default(), 10_000)
            .await
            .unwrap();
        store.close().await;
        rows
    }

    /// What Pendo should hold for accounts: the Salesforce records mapped by hand, per the config.
    pub fn expected_accounts(&self) -> BTreeMap<String, BTreeMap<String, Value>> {
        let mut out = BTreeMap::new();
        for r in self.sf.records("Account") {
            if r["IsDeleted"] == json!(true) {
                continue;
            }
            let mut m = BTreeMap::new();
            let mut put = |k: &str, v: &Value| {
                if !v.is_null() {
                    m.insert(k.to_owned(), v.clone());
                }
            };
            put("plantier", &r["Plan_Tier__c"]);
            put("arr", &r["ARR__c"]);
            put("owneremail", &r["Owner"]["Email"]);
            put("isstrategic", &r["Strategic__c"]);
            if let Some(d) = r["Renewal_Date__c"].as_str() {
                let ms = chrono::NaiveDate::parse_from_str(d, "%Y-%m-%d")
                    .unwrap()
                    .and_hms_opt(0, 0, 0)
                    .unwrap()
                    .and_utc()
                    .timestamp_millis();
                m.insert("renewaldate".into(), json!(ms));
            }
            out.insert(r["Id"].as_str().unwrap().to_owned(), m);
        }
        out
    }

    /// What Pendo should hold for visitors: HubSpot contacts, email lower-cased, owners resolved.
    pub fn expected_visitors(&self) -> BTreeMap<String, BTreeMap<String, Value>> {
        let mut out = BTreeMap::new();
        for r in self.hs.records("contacts") {
            if r["archived"] == json!(true) {
                continue;
            }
            let p = &r["properties"];
            let Some(email) = p["email"].as_str() else {
                continue;
            };
            let mut m = BTreeMap::new();
            if let Some(s) = p["lifecyclestage"].as_str() {
                m.insert("lifecyclestage".to_owned(), json!(s));
            }
            if let Some(o) = OWNERS
                .iter()
                .find(|o| p["hubspot_owner_id"].as_str() == Some(o.0))
            {
                m.insert("owneremail".to_owned(), json!(o.1));
                m.insert("csmname".to_owned(), json!(format!("{} {}", o.2, o.3)));
            }
            out.insert(email.to_lowercase(), m);
        }
        out
    }

    /// What the Pendo simulator holds for `kind`, entities without values left out.
    pub fn held(&self, kind: Kind) -> BTreeMap<String, BTreeMap<String, Value>> {
        self.pendo
            .values(kind)
            .into_iter()
            .map(|(id, f)| (id, f.into_iter().collect::<BTreeMap<_, _>>()))
            .filter(|(_, f)| !f.is_empty())
            .collect()
    }

    /// Pendo equals both CRMs, field by field (numbers by value).
    pub fn assert_converged(&self) {
        for (kind, expected) in [
            (Kind::Account, self.expected_accounts()),
            (Kind::Visitor, self.expected_visitors()),
        ] {
            let expected: BTreeMap<_, _> = expected
                .into_iter()
                .filter(|(_, f)| !f.is_empty())
                .collect();
            let held = self.held(kind);
            let ids_e: Vec<_> = expected.keys().collect();
            let ids_h: Vec<_> = held.keys().collect();
            assert_eq!(ids_h, ids_e, "{kind} ids in Pendo vs the CRM");
            for (id, fields) in &expected {
                let got = &held[id];
                assert_eq!(
                    got.keys().collect::<Vec<_>>(),
                    fields.keys().collect::<Vec<_>>(),
                    "{kind} {id}: fields"
                );
                for (k, v) in fields {
                    let g = &got[k];
                    let same = match (v.as_f64(), g.as_f64()) {
                        (Some(a), Some(b)) => a == b,
                        _ => v == g,
                    };
                    assert!(same, "{kind} {id} field {k}: CRM {v}, Pendo {g}");
                }
            }
        }
    }

    pub fn pendo_times(&self) -> Vec<i64> {
        self.pendo.requests().iter().map(|r| r.at_ms).collect()
    }

    pub fn sf_times(&self) -> Vec<i64> {
        self.sf_times.lock().unwrap().clone()
    }

    /// HubSpot request times; `search_only` keeps the search calls (their own limit).
    pub fn hs_times(&self, search_only: bool) -> Vec<i64> {
        self.hs
            .requests()
            .iter()
            .filter(|r| !search_only || r.path.ends_with("/search"))
            .map(|r| r.at_ms as i64)
            .collect()
    }

    /// Asserts that in every window of `window_ms` at most `allowed` requests arrived, plus one
    /// for each further process whose requests fall in the window (each process has its own
    /// limiter, whose burst of 1 is available when it starts). Returns the busiest window count.
    pub fn assert_rate(&self, api: &str, times: &[i64], window_ms: i64, allowed: usize) -> usize {
        let mut times = times.to_vec();
        times.sort_unstable();
        let starts = self.process_starts.lock().unwrap().clone();
        let process_of = |t: i64| starts.iter().filter(|s| **s <= t).count();
        let mut busiest = 0;
        let mut j = 0;
        for i in 0..times.len() {
            while j + 1 < times.len() && times[j + 1] - times[i] <= window_ms {
                j += 1;
            }
            let count = j + 1 - i;
            let mut procs: Vec<usize> = times[i..=j].iter().map(|t| process_of(*t)).collect();
            procs.dedup();
            let limit = allowed + procs.len() - 1;
            assert!(
                count <= limit,
                "{api}: {count} requests within {window_ms} ms from t={} (allowed {limit}); times {:?}",
                times[i],
                &times[i..=j]
            );
            busiest = busiest.max(count);
        }
        busiest
    }
}

pub fn sf_account_id(i: usize) -> String {
    format!("001H{i:014}")
}

pub fn sf_account(i: usize) -> Value {
    let owner = if i % 5 == 4 {
        Value::Null
    } else {
        json!({"attributes": {"type": "User"}, "Email": format!("rep{}@acme.test", i % 3)})
    };
    json!({
        "Plan_Tier__c": (["Starter", "Growth", "Enterprise"][i % 3]),
        "ARR__c": (i as f64) * 1500.0 + 0.25,
        "Owner": owner,
        "Renewal_Date__c": format!("2027-{:02}-{:02}", i % 12 + 1, i % 28 + 1),
        "Strategic__c": i.is_multiple_of(3),
    })
}

pub fn hs_contact_id(i: usize) -> u64 {
    7001 + i as u64
}

pub fn hs_contact(i: usize) -> Value {
    json!({
        "email": format!("Person{i}@Customer.Example"),
        "lifecyclestage": (["lead", "opportunity", "customer"][i % 3]),
        "hubspot_owner_id": OWNERS[i % 3].0,
    })
}
