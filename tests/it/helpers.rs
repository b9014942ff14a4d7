//! Shared test harness: a temp state file, the Pendo simulator on a loopback port, a fixture CRM,
//! and settings pointing at them. `TestApp::app()` builds a fresh `App` on the same state file,
//! which is what a restart is.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use pendo_sync::app::{App, Connectors, SyncReport};
use pendo_sync::config::{Settings, Source};
use pendo_sync::connectors::fixture::FixtureConnector;
use pendo_sync::domain::Kind;
use pendo_sync::engine::Mode;
use pendo_sync::sim::SimServer;
use pendo_sync::sim::config::{Auth, MappingSection, PendoSection, SalesforceSection, SimConfig};
use pendo_sync::sim::pendo::{PendoSim, PendoSimConfig};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// The integration key used everywhere in tests: a canary that must never be printed.
pub const CANARY_KEY: &str = "canary-pendo-key-7f3a9c";

pub const ACCOUNT_FIELDS: [(&str, &str); 5] = [
    ("plantier", "string"),
    ("arr", "number"),
    ("owneremail", "string"),
    ("renewaldate", "date"),
    ("isstrategic", "boolean"),
];

pub struct TestApp {
    pub dir: tempfile::TempDir,
    pub pendo: PendoSim,
    /// Keeps the simulator serving for the test's lifetime.
    #[allow(dead_code)]
    pub server: SimServer,
    pub crm: FixtureConnector,
    pub settings: Arc<Settings>,
}

pub struct Options {
    pub batch_size: usize,
    pub max_attempts: u32,
    pub create_missing: bool,
    pub extra_pendo: String,
    /// Pendo's declared account fields (key, Type).
    pub schema: Vec<(&'static str, &'static str)>,
    pub errors_as_strings: bool,
    /// TOML appended after the `accounts` mapping (more mappings).
    pub extra_mappings: String,
    /// The state in this PostgreSQL database instead of a SQLite file.
    pub state_url: Option<String>,
    /// `pendo.unmatched_retry`: the full check of unknown ids.
    pub unmatched_retry: &'static str,
    /// `pendo.discovery_interval`, when set.
    pub discovery_interval: Option<&'static str>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            batch_size: 50,
            max_attempts: 6,
            create_missing: false,
            extra_pendo: String::new(),
            schema: ACCOUNT_FIELDS.to_vec(),
            errors_as_strings: false,
            extra_mappings: String::new(),
            state_url: None,
            unmatched_retry: "1h",
            discovery_interval: None,
        }
    }
}

impl TestApp {
    pub async fn new() -> TestApp {
        Self::with(Options::default()).await
    }

    /// A test app on `backend`'s state; `None` where PostgreSQL is not available (skipped).
    pub async fn on(backend: crate::pg::Backend) -> Option<TestApp> {
        let state_url = backend.state_url().await.ok()?;
        Some(
            Self::with(Options {
                state_url,
                ..Options::default()
            })
            .await,
        )
    }

    pub async fn with(opts: Options) -> TestApp {
        let dir = tempfile::tempdir().expect("temp dir");
        let pendo = PendoSim::new(PendoSimConfig {
            integration_key: CANARY_KEY.into(),
            write_access: true,
            schema: opts
                .schema
                .iter()
                .map(|(f, t)| (Kind::Account, f.to_string(), t.to_string()))
                .collect(),
            rate_limit: None,
            errors_as_strings: opts.errors_as_strings,
        });
        let server = pendo
            .start("127.0.0.1:0".parse::<SocketAddr>().unwrap())
            .await
            .expect("pendo sim starts");
        let mut pendo_section = PendoSection::new(CANARY_KEY)
            .base_url(server.url())
            .batch_size(opts.batch_size)
            .requests_per_second(2000.0)
            .timeout("5s")
            .max_attempts(opts.max_attempts)
            .create_missing(opts.create_missing)
            .unmatched_retry(opts.unmatched_retry)
            .retry_initial("5ms")
            .retry_max("40ms")
            .extra(opts.extra_pendo);
        pendo_section.discovery_interval = opts.discovery_interval.map(Into::into);
        let mut config = SimConfig::new(dir.path().join("state.db"), pendo_section);
        // Discovery runs once per poll interval at most: as often as the test asks.
        config.poll_interval = opts.discovery_interval.map(Into::into);
        let toml = config
            .state_url(opts.state_url)
            .salesforce(SalesforceSection::new(
                "http://127.0.0.1:9",
                Auth::client_credentials("test", "canary-sf-secret-55"),
            ))
            .mapping(MappingSection::sf_accounts("accounts"))
            .tail(opts.extra_mappings)
            .to_toml();
        let settings = Arc::new(
            Settings::from_toml_with_env(&toml, HashMap::new()).expect("test config is valid"),
        );
        TestApp {
            dir,
            pendo,
            server,
            crm: FixtureConnector::new(40),
            settings,
        }
    }

    /// The fixture CRM as the only connector (in the Salesforce seat).
    pub fn connectors(&self) -> Connectors {
        let mut connectors = Connectors::new();
        connectors.insert(Source::Salesforce, Arc::new(self.crm.clone()));
        connectors
    }

    /// A Pendo client on the simulator, built as the app builds its own.
    pub fn pendo_client(&self) -> pendo_sync::pendo::PendoClient {
        let key = self
            .settings
            .pendo
            .integration_key_source
            .resolve("pendo.integration_key")
            .expect("the test key resolves");
        pendo_sync::pendo::PendoClient::new(&self.settings.pendo, key)
    }

    /// A fresh App on the same state file: what a restart is.
    pub async fn app(&self) -> App {
        App::open(self.settings.clone(), self.connectors())
            .await
            .expect("app opens")
    }

    /// One cycle of the `accounts` mapping on a fresh App, without a drain (what it queues
    /// waits in the outbox).
    pub async fn cycle(&self, mode: Mode) -> pendo_sync::engine::CycleReport {
        let app = self.app().await;
        let report = app
            .cycle(self.settings.mapping("accounts").unwrap(), mode, false, &())
            .await
            .expect("the cycle runs");
        app.store.close().await;
        report
    }

    /// One `sync`: an incremental cycle, then the outbox drained.
    pub async fn sync(&self) -> SyncReport {
        self.sync_mode(Mode::Incremental).await
    }

    pub async fn sync_mode(&self, mode: Mode) -> SyncReport {
        sync_on(self.app().await, mode).await
    }

    /// One `sync` under other settings (a changed configuration) on the same state and CRM.
    pub async fn sync_with(&self, settings: Arc<Settings>) -> SyncReport {
        let app = App::open(settings, self.connectors())
            .await
            .expect("app opens");
        sync_on(app, Mode::Incremental).await
    }

    /// Seeds `n` accounts in the CRM (and makes their ids known to Pendo).
    pub fn seed(&self, n: usize) {
        for i in 0..n {
            let id = account_id(i);
            self.crm.upsert("Account", &id, account(i));
            self.pendo.add_entity(Kind::Account, &id);
        }
    }

    /// What Pendo should hold for the fixture CRM's live accounts.
    pub fn expected(&self) -> HashMap<String, HashMap<String, Value>> {
        self.crm
            .records("Account")
            .into_iter()
            .map(|(id, f)| {
                let mut m = HashMap::new();
                let mut put = |k: &str, v: &Value| {
                    if !v.is_null() {
                        m.insert(k.to_owned(), v.clone());
                    }
                };
                put("plantier", &f["Plan_Tier__c"]);
                put("arr", &f["ARR__c"]);
                put("owneremail", &f["Owner"]["Email"]);
                put("isstrategic", &f["Strategic__c"]);
                if let Some(d) = f["Renewal_Date__c"].as_str() {
                    let ms = pendo_sync::mapping::parse_date(d).unwrap();
                    m.insert("renewaldate".into(), json!(ms));
                }
                (id, m)
            })
            .collect()
    }

    /// What the Pendo simulator holds for accounts, numbers compared as numbers.
    pub fn held(&self) -> HashMap<String, HashMap<String, Value>> {
        self.pendo
            .values(Kind::Account)
            .into_iter()
            .map(|(id, f)| (id, f.into_iter().filter(|(_, v)| !v.is_null()).collect()))
            .filter(|(_, f): &(String, HashMap<String, Value>)| !f.is_empty())
            .collect()
    }

    /// Asserts Pendo equals the CRM, field by field, numbers by value.
    pub fn assert_converged(&self) {
        let expected = self.expected();
        let held = self.held();
        for (id, fields) in &expected {
            let got = held.get(id).cloned().unwrap_or_default();
            for (k, v) in fields {
                let g = got.get(k);
                let num = |v: &Value| {
                    v.as_f64()
                        .or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))
                };
                let same = match (num(v), g.and_then(num)) {
                    (Some(a), Some(b)) => a == b,
                    _ => Some(v) == g,
                };
                assert!(same, "account {id} field {k}: CRM {v}, Pendo {g:?}");
            }
            for k in got.keys() {
                assert!(
                    fields.contains_key(k),
                    "account {id} field {k}: Pendo holds {:?}, CRM has nothing",
                    got[k]
                );
            }
        }
        for id in held.keys() {
            assert!(
                expected.contains_key(id),
                "Pendo holds values for {id}, which is not in the CRM"
            );
        }
    }

    pub fn writes(&self) -> Vec<pendo_sync::sim::pendo::RecordedRequest> {
        self.pendo
            .requests()
            .into_iter()
            .filter(|r| r.path.contains("/custom/value"))
            .collect()
    }
}

/// One pass of `app` (cycles, then the drain), then its state closed.
async fn sync_on(app: App, mode: Mode) -> SyncReport {
    let report = app
        .sync(None, mode, false, &CancellationToken::new(), &())
        .await
        .expect("sync runs");
    app.store.close().await;
    report
}

pub fn account_id(i: usize) -> String {
    format!("001A{i:06}")
}

pub fn account(i: usize) -> Value {
    json!({
        "Id": account_id(i),
        "Plan_Tier__c": (["Starter", "Growth", "Enterprise"][i % 3]),
        "ARR__c": (i as f64) * 1000.0 + 0.5,
        "Owner": {"attributes": {"type": "User"}, "Email": format!("owner{}@acme.test", i % 7)},
        "Renewal_Date__c": format!("2027-{:02}-{:02}", i % 12 + 1, i % 28 + 1),
        "Strategic__c": i.is_multiple_of(2),
    })
}

/// A log sink for `tracing_subscriber`'s writer: keeps everything written, for leak checks.
#[derive(Clone, Default)]
pub struct Captured(pub Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// Nulls one CRM field on accounts `0..n` (a property gone empty everywhere).
pub fn null_field_on(t: &TestApp, n: usize, field: &str) {
    for i in 0..n {
        t.crm
            .set_field("Account", &account_id(i), field, Value::Null);
    }
}
