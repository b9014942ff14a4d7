//! `pendo-sync run` as users run it: the real binary in a child process, against the Salesforce and
//! Pendo simulators served from this test process, with its admin port on a free loopback port.
//! Changes reach Pendo within a poll interval; SIGTERM and kill -9 lose nothing; the admin port's
//! numbers match what the simulators saw; `resync` and `healthcheck` talk to the running service;
//! one service per state file.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use pendo_sync::domain::Kind;
use pendo_sync::sim::SimServer;
use pendo_sync::sim::config::{Auth, MappingSection, PendoSection, SalesforceSection, SimConfig};
use pendo_sync::sim::pendo::{PendoFaults, PendoSim, PendoSimConfig};
use pendo_sync::sim::salesforce::{SalesforceSim, SalesforceSimConfig, account_id};
use serde_json::{Value, json};

const PENDO_KEY: &str = "service-test-pendo-key";
const SF_SECRET: &str = "service-test-sf-secret";
pub(crate) const ADMIN_TOKEN: &str = "service-test-admin-token";
pub(crate) const VIEWER_TOKEN: &str = "service-test-viewer-token";
const POLL: Duration = Duration::from_secs(1);

pub(crate) struct Options {
    pub(crate) accounts: usize,
    pub(crate) batch_size: usize,
    pub(crate) create_missing: bool,
    pub(crate) admin_token: bool,
    pub(crate) sf_page_size: usize,
    /// The integration key comes from this file (`<dir>/pendo_key`) instead of the config.
    pub(crate) pendo_key_file: Option<&'static str>,
    pub(crate) reconcile_interval: &'static str,
    /// The guard's default limits (most tests here edit every account at once on purpose and
    /// lift the overwrite limit).
    pub(crate) default_guard: bool,
    /// `[notify] webhook_url`.
    pub(crate) notify_url: Option<String>,
    /// `schedule.poll_interval` (the console's tests want the state still after the first cycle).
    pub(crate) poll: &'static str,
    /// `[state] url`: the state in this PostgreSQL database (lease_ttl 3s).
    pub(crate) state_url: Option<String>,
    /// `admin.viewer_token` (`VIEWER_TOKEN`).
    pub(crate) viewer_token: bool,
    /// Raw lines in `[admin]` (`allowed_hosts`, `read_auth`, the trusted proxy).
    pub(crate) admin_extra: &'static str,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            accounts: 50,
            batch_size: 50,
            create_missing: true,
            admin_token: true,
            sf_page_size: 2_000,
            pendo_key_file: None,
            reconcile_interval: "1h",
            default_guard: false,
            notify_url: None,
            poll: "1s",
            state_url: None,
            viewer_token: false,
            admin_extra: "",
        }
    }
}

/// The simulators, a state directory and a config pointing at them.
pub(crate) struct Env {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) config: PathBuf,
    pub(crate) admin: String,
    pub(crate) pendo: PendoSim,
    pub(crate) sf: SalesforceSim,
    #[allow(dead_code)]
    pub(crate) servers: Vec<SimServer>,
    pub(crate) runs: usize,
    /// The PostgreSQL state, if not the SQLite file `<dir>/state.db`.
    pub(crate) state_url: Option<String>,
}

/// A `pendo-sync run` child, killed when dropped so a failing test leaves nothing behind.
pub(crate) struct Service {
    child: Child,
    log: PathBuf,
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Service {
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub(crate) fn sigterm(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success());
    }

    /// kill -9.
    pub(crate) fn crash(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub(crate) async fn exit_within(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the service did not exit within {limit:?}; log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub(crate) fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_pendo-sync"))
}

impl Env {
    pub(crate) async fn new(opts: Options) -> Env {
        let dir = tempfile::tempdir().expect("temp dir");
        let pendo = PendoSim::new(PendoSimConfig {
            integration_key: PENDO_KEY.into(),
            write_access: true,
            schema: [
                ("plantier", "string"),
                ("arr", "number"),
                ("isstrategic", "boolean"),
            ]
            .iter()
            .map(|(f, t)| (Kind::Account, f.to_string(), t.to_string()))
            .collect(),
            rate_limit: None,
            errors_as_strings: false,
        });
        let sf = SalesforceSim::new(SalesforceSimConfig {
            client_secret: SF_SECRET.into(),
            page_size: opts.sf_page_size,
            ..SalesforceSimConfig::default()
        });
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let servers = vec![
            pendo.start(any).await.expect("pendo sim"),
            sf.start(any).await.expect("salesforce sim"),
        ];
        sf.seed_demo(opts.accounts, 0);
        let admin = format!("127.0.0.1:{}", free_port());
        let config = dir.path().join("config.toml");
        let mut pendo_section = PendoSection::new(PENDO_KEY)
            .base_url(servers[0].url())
            .batch_size(opts.batch_size)
            .requests_per_second(1000.0)
            .timeout("10s")
            .create_missing(opts.create_missing)
            .retry_initial("50ms")
            .retry_max("500ms");
        if let Some(key) = opts.pendo_key_file {
            let path = dir.path().join("pendo_key");
            std::fs::write(&path, format!("{key}\n")).unwrap();
            pendo_section = pendo_section.integration_key_file(&path);
        }
        let sf_auth = Auth::client_credentials(SalesforceSimConfig::default().client_id, SF_SECRET);
        let fields = ["plantier", "arr", "isstrategic"];
        let mut sim_config = SimConfig::new(dir.path().join("state.db"), pendo_section)
            .state_url(opts.state_url.clone())
            .salesforce(
                SalesforceSection::new(servers[1].url(), sf_auth).requests_per_second(1000.0),
            )
            .poll_interval(opts.poll)
            .reconcile_interval(opts.reconcile_interval)
            .overlap("0s")
            .admin_listen(&admin)
            .mapping(MappingSection::sf_accounts("sf-accounts").only(&fields))
            // These tests edit every account at once on purpose (crash and lock tests); the
            // guard's own tests are in guard.rs.
            .tail(format!(
                "{}{}",
                if opts.default_guard {
                    ""
                } else {
                    "[guard]\nmax_overwrite_percent = 100\n"
                },
                opts.notify_url
                    .as_ref()
                    .map(|u| format!("[notify]\nwebhook_url = \"{u}\"\n"))
                    .unwrap_or_default()
            ));
        if opts.admin_token {
            sim_config = sim_config.admin_token(ADMIN_TOKEN);
        }
        if opts.viewer_token {
            sim_config = sim_config.admin_viewer_token(VIEWER_TOKEN);
        }
        sim_config = sim_config.admin_extra(opts.admin_extra);
        let text = sim_config.to_toml();
        std::fs::write(&config, text).unwrap();
        Env {
            dir,
            config,
            admin,
            pendo,
            sf,
            servers,
            runs: 0,
            state_url: opts.state_url,
        }
    }

    /// The state, read-only (the SQLite file or the PostgreSQL database).
    pub(crate) async fn open_state(&self) -> pendo_sync::store::Store {
        let state = match &self.state_url {
            Some(url) => pendo_sync::config::StateSettings::postgres(url),
            None => pendo_sync::config::StateSettings::sqlite(self.dir.path().join("state.db")),
        };
        pendo_sync::store::Store::open_settings_read_only(&state)
            .await
            .expect("the state opens")
    }

    pub(crate) fn command(&self, args: &[&str]) -> Command {
        let mut c = bin();
        c.arg("--config").arg(&self.config).args(args);
        c
    }

    pub(crate) fn start(&mut self) -> Service {
        let admin = self.admin.clone();
        self.start_on(&admin)
    }

    /// `run` with its admin port on `admin` (replicas on one state need one each).
    pub(crate) fn start_on(&mut self, admin: &str) -> Service {
        self.start_with(admin, &[])
    }

    /// `run` with its admin port on `admin` and more `PENDO_SYNC__*` overrides.
    pub(crate) fn start_with(&mut self, admin: &str, env: &[(&str, &str)]) -> Service {
        self.runs += 1;
        let log = self.dir.path().join(format!("run-{}.log", self.runs));
        let child = self
            .command(&["run"])
            .envs(env.iter().copied())
            .env("PENDO_SYNC__ADMIN__LISTEN", admin)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("pendo-sync run starts");
        Service { child, log }
    }

    /// Runs a CLI command to completion without blocking the simulators' threads; one that hangs
    /// (a `run` that should have refused to start) is killed and fails the test.
    pub(crate) async fn cli(&self, args: &[&str]) -> std::process::Output {
        let mut c = tokio::process::Command::from(self.command(args));
        c.kill_on_drop(true)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = c.spawn().expect("the CLI runs");
        tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
            .await
            .unwrap_or_else(|_| panic!("pendo-sync {args:?} did not finish within 60 s"))
            .expect("the CLI's output")
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    pub(crate) async fn get(&self, path: &str) -> (u16, String) {
        get_at(&self.admin, path).await
    }
}

/// GET `path` on the admin port at `admin`: status and body (status 0: no answer).
pub(crate) async fn get_at(admin: &str, path: &str) -> (u16, String) {
    match reqwest::get(format!("http://{admin}{path}")).await {
        Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
        Err(e) => (0, e.to_string()),
    }
}

impl Env {
    pub(crate) async fn wait_ready(&self, svc: &Service, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let (status, body) = self.get("/readyz").await;
            if status == 200 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "not ready after {limit:?}: {status} {body}; log:\n{}",
                svc.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// What Pendo should hold: every Salesforce account's mapped fields (numbers as f64).
    pub(crate) fn expected(&self) -> BTreeMap<String, BTreeMap<String, Value>> {
        self.sf
            .records("Account")
            .into_iter()
            .filter(|r| r["IsDeleted"] != json!(true))
            .map(|r| {
                let mut m = BTreeMap::new();
                for (field, from) in [
                    ("plantier", "Plan_Tier__c"),
                    ("arr", "ARR__c"),
                    ("isstrategic", "Strategic__c"),
                ] {
                    if !r[from].is_null() {
                        m.insert(field.to_owned(), norm(&r[from]));
                    }
                }
                (r["Id"].as_str().unwrap().to_owned(), m)
            })
            .collect()
    }

    pub(crate) fn held(&self) -> BTreeMap<String, BTreeMap<String, Value>> {
        self.pendo
            .values(Kind::Account)
            .into_iter()
            .map(|(id, f)| (id, f.iter().map(|(k, v)| (k.clone(), norm(v))).collect()))
            .collect()
    }

    /// The first few differences between the CRM and Pendo (empty when equal).
    pub(crate) fn differences(&self) -> Vec<String> {
        let (want, have) = (self.expected(), self.held());
        let mut out = Vec::new();
        for (id, fields) in &want {
            if have.get(id) != Some(fields) {
                out.push(format!(
                    "{id}: want {fields:?}, Pendo has {:?}",
                    have.get(id)
                ));
            }
        }
        out.truncate(5);
        out
    }

    pub(crate) async fn wait_converged(&self, svc: &Service, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let diff = self.differences();
            if diff.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "Pendo differs from the CRM after {limit:?}: {diff:#?}; log:\n{}",
                svc.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Writes the Pendo simulator answered with 200.
    pub(crate) fn pendo_200s(&self) -> usize {
        self.pendo
            .requests()
            .iter()
            .filter(|r| r.status == 200)
            .count()
    }

    /// The modes of the finished cycles in the state file's run history, oldest first.
    pub(crate) async fn run_modes(&self) -> Vec<String> {
        let Ok(store) =
            pendo_sync::store::Store::open_read_only(&self.dir.path().join("state.db")).await
        else {
            return vec![];
        };
        let modes = sqlx::query_scalar("SELECT mode FROM runs WHERE ok = 1 ORDER BY id")
            .fetch_all(store.pool())
            .await
            .unwrap_or_default();
        store.close().await;
        modes
    }

    pub(crate) fn pendo_writes(&self) -> usize {
        self.pendo
            .requests()
            .iter()
            // The aggregation API is read with POST: not a write.
            .filter(|r| r.method == "POST" && r.status == 200 && r.path != "/api/v1/aggregation")
            .count()
    }
}

fn norm(v: &Value) -> Value {
    match v.as_f64() {
        Some(f) if v.is_number() => json!(f),
        _ => v.clone(),
    }
}

/// One sample of a Prometheus text exposition, by its exact name and label set.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crm_change_reaches_pendo_within_one_poll_interval() {
    let mut env = Env::new(Options::default()).await;
    let mut svc = env.start();
    env.wait_ready(&svc, Duration::from_secs(15)).await;
    env.wait_converged(&svc, Duration::from_secs(5)).await;

    let id = account_id(7);
    env.sf
        .set_field("Account", &id, "Plan_Tier__c", json!("Platinum"));
    let changed = Instant::now();
    let deadline = changed + 3 * POLL;
    while env.pendo.value(Kind::Account, &id, "plantier") != Some(json!("Platinum")) {
        assert!(
            Instant::now() < deadline,
            "the change did not reach Pendo within 3 poll intervals; log:\n{}",
            svc.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = changed.elapsed();
    // One value changed: one request carrying one field.
    let last = env
        .pendo
        .requests()
        .into_iter()
        .rev()
        .find(|r| r.method == "POST");
    assert_eq!(
        last.and_then(|r| r.body),
        Some(json!([{"accountId": id, "values": {"plantier": "Platinum"}}]))
    );
    svc.sigterm();
    assert!(svc.exit_within(Duration::from_secs(10)).await.success());
    assert!(took <= 2 * POLL, "took {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_service_per_state_file_and_healthcheck_follows_readiness() {
    let mut env = Env::new(Options {
        admin_token: false,
        ..Options::default()
    })
    .await;
    let mut svc = env.start();
    env.wait_ready(&svc, Duration::from_secs(15)).await;
    let out = env.cli(&["healthcheck"]).await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");

    let second = env.cli(&["run"]).await;
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert_ne!(second.status.code(), Some(0), "{stderr}");
    let lock = format!("{}.lock", env.dir.path().join("state.db").display());
    assert!(
        stderr.contains(&format!("pendo-sync run (pid {}) holds {lock}", svc.pid())),
        "{stderr}"
    );

    // A cron `sync` beside the service would fight over the outbox: it waits, then gives up.
    let sync = env.cli(&["sync", "--wait-lock", "200ms"]).await;
    assert_eq!(sync.status.code(), Some(1), "{sync:?}");
    assert!(String::from_utf8_lossy(&sync.stderr).contains("already syncs"));

    // Without admin.token the POST endpoints are off.
    let resp = reqwest::Client::new()
        .post(env.url("/v1/resync"))
        .bearer_auth("anything")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 403);
    assert!(resp.text().await.unwrap().contains("set admin.token"));

    svc.sigterm();
    assert!(svc.exit_within(Duration::from_secs(10)).await.success());
    let out = env.cli(&["healthcheck"]).await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_push_exits_0_and_a_restart_finishes_the_work() {
    let mut env = Env::new(Options {
        accounts: 400,
        batch_size: 20,
        ..Options::default()
    })
    .await;
    env.pendo.set_faults(PendoFaults {
        latency: Duration::from_millis(300),
        ..PendoFaults::default()
    });
    let mut svc = env.start();
    let deadline = Instant::now() + Duration::from_secs(15);
    while env.pendo_writes() < 2 {
        assert!(
            Instant::now() < deadline,
            "no push started; log:\n{}",
            svc.log()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Two batches are in flight now (max_in_flight = 2, 300 ms each).
    svc.sigterm();
    let stopped = Instant::now();
    let status = svc.exit_within(Duration::from_secs(10)).await;
    assert!(status.success(), "{status:?}; log:\n{}", svc.log());
    assert!(stopped.elapsed() < Duration::from_secs(5));

    // Everything Pendo applied was confirmed and committed; the rest waits in the outbox.
    let store = pendo_sync::store::Store::open_read_only(&env.dir.path().join("state.db"))
        .await
        .unwrap();
    let applied = env.held().values().filter(|f| !f.is_empty()).count() as i64;
    assert_eq!(store.shadow_count(Kind::Account).await.unwrap(), applied);
    let pending = store.outbox_counts().await.unwrap()["pending"];
    assert!(pending > 0, "the push was cut short, so work must remain");
    store.close().await;

    env.pendo.set_faults(PendoFaults::default());
    let mut svc = env.start();
    env.wait_converged(&svc, Duration::from_secs(15)).await;
    svc.sigterm();
    assert!(svc.exit_within(Duration::from_secs(10)).await.success());
}

/// kill -9 at `rounds` random moments of a large sync, with CRM edits between restarts; then one
/// clean run must leave Pendo equal to the CRM.
async fn killed_at_random_moments(
    accounts: usize,
    rounds: usize,
    changes_per_round: usize,
    max_kill_ms: u64,
    seed: u64,
    state_url: Option<String>,
) {
    let mut env = Env::new(Options {
        accounts,
        batch_size: 25,
        sf_page_size: 100,
        state_url,
        ..Options::default()
    })
    .await;
    env.pendo.set_faults(PendoFaults {
        latency: Duration::from_millis(20),
        ..PendoFaults::default()
    });
    let mut rng = fastrand::Rng::with_seed(seed);
    // Rounds killed while pushes were under way (writes before and after the kill).
    let mut mid_push = 0;
    for round in 0..rounds {
        // Many accounts change between restarts: every round has a real push to cut.
        for _ in 0..changes_per_round {
            let i = rng.usize(0..accounts);
            env.sf.set_field(
                "Account",
                &account_id(i),
                "ARR__c",
                json!((round * 1000 + i) as f64),
            );
        }
        let writes = env.pendo_writes();
        let mut svc = env.start();
        if round % 2 == 0 {
            // Any moment: start-up, reading pages, committing them, pushing.
            tokio::time::sleep(Duration::from_millis(rng.u64(50..max_kill_ms))).await;
        } else {
            // Shortly after a push began, however fast this machine is.
            let deadline = Instant::now() + Duration::from_secs(15);
            while env.pendo_writes() == writes && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            tokio::time::sleep(Duration::from_millis(rng.u64(0..60))).await;
        }
        svc.crash();
        if env.pendo_writes() > writes && !env.differences().is_empty() {
            mid_push += 1;
        }
    }
    assert!(
        mid_push >= rounds / 5,
        "only {mid_push} of {rounds} kills landed while pushes were under way"
    );
    env.pendo.set_faults(PendoFaults::default());
    let mut svc = env.start();
    env.wait_converged(&svc, Duration::from_secs(30)).await;
    svc.sigterm();
    assert!(svc.exit_within(Duration::from_secs(10)).await.success());
    history_matches_state(&env).await;
}

/// Guarantee 11 under kill -9: no event without its state change, no change without its event.
/// Every value the shadow holds is the value of its field's last confirmation, and of its last
/// detection (the outbox is empty once converged); a field whose last confirmation is a clear is
/// absent from the shadow. A settle or a page commit that wrote its change and not its event
/// (or the reverse) before a kill leaves a field whose history ends on another value.
async fn history_matches_state(env: &Env) {
    let store = env.open_state().await;
    use pendo_sync::store::Event;
    let parse = |v: &Option<String>| -> Value {
        v.as_deref()
            .map_or(Value::Null, |s| serde_json::from_str(s).unwrap())
    };
    let mut after: Option<String> = None;
    let mut checked = 0;
    loop {
        let page = store
            .shadow_page(Kind::Account, after.as_deref(), 500)
            .await
            .unwrap();
        let Some((last, _)) = page.last() else { break };
        after = Some(last.clone());
        for (id, shadow) in &page {
            let confirmed = store
                .last_events(
                    Kind::Account,
                    id,
                    &[Event::Confirmed, Event::AlreadyConfirmed],
                )
                .await
                .unwrap();
            let detected = store
                .last_events(Kind::Account, id, &[Event::Detected])
                .await
                .unwrap();
            for field in ["plantier", "arr", "isstrategic"] {
                let held = shadow.get(field).cloned().unwrap_or(Value::Null);
                let last_confirmed = confirmed
                    .iter()
                    .filter(|e| e.field == field)
                    .max_by_key(|e| e.id)
                    .map(|e| parse(&e.value))
                    .unwrap_or(Value::Null);
                assert_eq!(
                    norm(&last_confirmed),
                    norm(&held),
                    "{id}.{field}: the shadow holds {held}, its last confirmation says {last_confirmed}"
                );
                if let Some(d) = detected
                    .iter()
                    .filter(|e| e.field == field)
                    .max_by_key(|e| e.id)
                {
                    assert_eq!(
                        norm(&parse(&d.value)),
                        norm(&held),
                        "{id}.{field}: the last detection is not what Pendo confirmed"
                    );
                }
                checked += 1;
            }
        }
    }
    assert!(checked > 0);
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_20_random_moments_then_a_restart_converges() {
    killed_at_random_moments(1_500, 20, 300, 1_500, 11, None).await;
}

/// The same 20 kills with the state in PostgreSQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_20_random_moments_on_postgres_then_a_restart_converges() {
    let Some(url) = crate::pg::database().await else {
        eprintln!("SKIPPED: PostgreSQL is not installed");
        return;
    };
    killed_at_random_moments(1_500, 20, 300, 1_500, 11, Some(url)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long: 100 kills over 5,000 accounts"]
async fn kill_9_at_100_random_moments_then_a_restart_converges() {
    killed_at_random_moments(5_000, 100, 200, 4_000, 23, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_status_match_the_simulators_and_resync_needs_the_token() {
    let accounts = 60;
    let unknown = 4;
    let mut env = Env::new(Options {
        accounts,
        create_missing: false,
        ..Options::default()
    })
    .await;
    // Pendo knows all but `unknown` accounts: those end `unmatched` in the outbox.
    for i in unknown..accounts {
        env.pendo.add_entity(Kind::Account, &account_id(i));
    }
    let svc = env.start();
    env.wait_ready(&svc, Duration::from_secs(15)).await;
    let known = accounts - unknown;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, body) = env.get("/v1/status").await;
        let status: Value = serde_json::from_str(&body).unwrap_or_default();
        if status["outbox"]["pending"] == json!(0)
            && status["outbox"]["unmatched"] == json!(unknown * 3)
        {
            break;
        }
        assert!(Instant::now() < deadline, "{body}; log:\n{}", svc.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(env.held().values().filter(|f| !f.is_empty()).count(), known);
    // The history's size, as the state file counts it (a detection and an answer per value).
    let state = pendo_sync::store::Store::open_read_only(&env.dir.path().join("state.db"))
        .await
        .unwrap();
    let events = state.history_count().await.unwrap();
    state.close().await;
    assert!(events >= 2 * (known + unknown) as i64, "{events}");

    // The state gauges follow the writer's last pass within a second (a scrape reads them as
    // of their last read, not the state).
    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        let (code, text) = env.get("/metrics").await;
        assert_eq!(code, 200);
        if sample(&text, r#"pendo_sync_outbox_values{state="pending"}"#) == Some(0.0)
            && sample(&text, "pendo_sync_history_events") == Some(events as f64)
        {
            break text;
        }
        assert!(Instant::now() < deadline, "{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let m = |series: &str| sample(&text, series).unwrap_or_else(|| panic!("{series} in\n{text}"));
    assert_eq!(
        m(r#"pendo_sync_requests_total{api="pendo",status="200"}"#),
        env.pendo_200s() as f64
    );
    assert_eq!(
        m(r#"pendo_sync_values_pushed_total{kind="account",outcome="updated"}"#),
        known as f64
    );
    assert_eq!(
        m(r#"pendo_sync_values_pushed_total{kind="account",outcome="missing"}"#),
        unknown as f64
    );
    assert_eq!(m(r#"pendo_sync_outbox_values{state="pending"}"#), 0.0);
    assert_eq!(
        m(r#"pendo_sync_outbox_values{state="unmatched"}"#),
        (unknown * 3) as f64
    );
    assert_eq!(m("pendo_sync_writer_paused"), 0.0);
    assert_eq!(
        m(r#"pendo_sync_reconcile_failures{mapping="sf-accounts"}"#),
        0.0
    );
    assert!(m(r#"pendo_sync_records_pulled_total{mapping="sf-accounts"}"#) >= accounts as f64);

    // /v1/status is the document `status --format json` prints.
    let (_, body) = env.get("/v1/status").await;
    let api: Value = serde_json::from_str(&body).unwrap();
    let out = env.cli(&["status", "--format", "json"]).await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let cli: Value = serde_json::from_slice(&out.stdout).unwrap();
    for key in [
        "state_file",
        "writer_paused",
        "outbox",
        "oldest_pending_seconds",
        "invalid_records",
        "history",
    ] {
        assert_eq!(api[key], cli[key], "{key}");
    }
    // The history's size as the metric says it, kept for the default 90 days.
    assert_eq!(cli["history"]["events"], json!(events));
    assert_eq!(cli["history"]["retention"], "90d");
    assert_eq!(api["mappings"][0]["name"], cli["mappings"][0]["name"]);
    assert_eq!(
        api.as_object().unwrap().keys().collect::<Vec<_>>(),
        cli.as_object().unwrap().keys().collect::<Vec<_>>()
    );

    // POST /v1/resync: the token is required and checked.
    let http = reqwest::Client::new();
    let post = |token: Option<&str>| {
        let mut req = http
            .post(env.url("/v1/resync"))
            .json(&json!({"mapping": "sf-accounts"}));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        req.send()
    };
    assert_eq!(post(None).await.unwrap().status().as_u16(), 401);
    assert_eq!(
        post(Some("not-the-token")).await.unwrap().status().as_u16(),
        401
    );
    let writes_before = env.pendo_writes();
    let resp = post(Some(ADMIN_TOKEN)).await.unwrap();
    assert_eq!(resp.status().as_u16(), 202);
    let job: Value = resp.json().await.unwrap();
    let id = job["id"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(15);
    let job = loop {
        let (code, body) = env.get(&format!("/v1/resync/{id}")).await;
        assert_eq!(code, 200, "{body}");
        let job: Value = serde_json::from_str(&body).unwrap();
        if job["state"] == "done" || job["state"] == "failed" {
            break job;
        }
        assert!(Instant::now() < deadline, "{body}; log:\n{}", svc.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(job["state"], "done", "{job}");
    assert_eq!(job["records_read"], json!(accounts));
    assert_eq!(job["changes"], json!(accounts * 3));
    assert_eq!(job["pushed"], json!(known));
    // A resync sends every value again, whatever the shadow says.
    assert!(env.pendo_writes() > writes_before);
    assert!(
        env.differences()
            .iter()
            .all(|d| { (0..unknown).any(|i| d.starts_with(&account_id(i))) })
    );
    assert_eq!(env.get("/v1/resync/nope").await.0, 404);
}

/// Resync jobs are rows in the state: one requested over the admin port and cut by kill -9 runs
/// again at the next start, and its id still answers (it used to live in the process's memory:
/// a 404 after any restart).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resync_cut_by_kill_9_runs_again_after_the_restart_under_the_same_id() {
    let mut env = Env::new(Options {
        accounts: 1_500,
        batch_size: 25,
        sf_page_size: 100,
        ..Options::default()
    })
    .await;
    let mut svc = env.start();
    env.wait_ready(&svc, Duration::from_secs(30)).await;
    env.wait_converged(&svc, Duration::from_secs(30)).await;
    // Slow answers: the resync's push is still going when it is killed.
    env.pendo.set_faults(PendoFaults {
        latency: Duration::from_millis(20),
        ..PendoFaults::default()
    });
    let answer = reqwest::Client::new()
        .post(env.url("/v1/resync"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 202);
    let id = answer.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let writes = env.pendo_writes();
    let deadline = Instant::now() + Duration::from_secs(30);
    while env.pendo_writes() < writes + 3 {
        assert!(Instant::now() < deadline, "log:\n{}", svc.log());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    svc.crash();
    let svc = env.start();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (code, body) = env.get(&format!("/v1/resync/{id}")).await;
        let job: Value = serde_json::from_str(&body).unwrap_or_default();
        if job["state"] == json!("done") {
            assert_eq!(job["records_read"], json!(1_500), "{body}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{code} {body}; log:\n{}",
            svc.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        svc.log().contains("queued again"),
        "the restart did not pick the job up:\n{}",
        svc.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resync_cli_hands_off_to_the_service_and_restores_wiped_values() {
    let mut env = Env::new(Options {
        accounts: 80,
        ..Options::default()
    })
    .await;
    let mut svc = env.start();
    env.wait_ready(&svc, Duration::from_secs(15)).await;
    env.wait_converged(&svc, Duration::from_secs(5)).await;

    // Someone wipes Pendo behind the service's back: the shadow still says all is confirmed.
    env.pendo.clear_all_values(Kind::Account);
    tokio::time::sleep(2 * POLL).await;
    assert!(
        !env.differences().is_empty(),
        "incremental cycles cannot see it"
    );

    let out = env.cli(&["resync", "--kind", "account"]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{out:?}");
    assert!(stdout.contains("handed to the running service"), "{stdout}");
    assert!(stdout.contains(": done, 80 records read"), "{stdout}");
    // Done means sent and confirmed: Pendo holds everything again.
    assert_eq!(env.differences(), Vec::<String>::new());

    // --no-wait returns once the service accepted it.
    let out = env.cli(&["resync", "--no-wait"]).await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("/v1/resync/"));

    svc.sigterm();
    assert!(svc.exit_within(Duration::from_secs(10)).await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_key_pauses_the_writer_fails_readyz_and_a_fixed_key_resumes_it() {
    let mut env = Env::new(Options {
        pendo_key_file: Some("a-revoked-key"),
        ..Options::default()
    })
    .await;
    let mut svc = env.start();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (code, body) = env.get("/readyz").await;
        if code == 503 && body.contains("writer paused") {
            assert!(body.contains("check the integration key"), "{body}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{code} {body}; log:\n{}",
            svc.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The service stays up, sends nothing more, and says why.
    assert_eq!(env.get("/healthz").await.0, 200);
    let (_, status) = env.get("/v1/status").await;
    assert!(
        status.contains("writer_paused\":\"Pendo refused"),
        "{status}"
    );
    assert!(env.held().values().all(|f| f.is_empty()));
    let out = env.cli(&["healthcheck"]).await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");

    // The operator fixes the key file (a rotated credential): the worker tries again within a
    // poll interval or two, without a restart.
    std::fs::write(env.dir.path().join("pendo_key"), PENDO_KEY).unwrap();
    env.wait_ready(&svc, 4 * POLL).await;
    env.wait_converged(&svc, Duration::from_secs(5)).await;
    svc.sigterm();
    assert!(svc.exit_within(Duration::from_secs(10)).await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconciles_come_every_reconcile_interval_and_a_restart_does_not_bring_one_early() {
    let mut env = Env::new(Options {
        reconcile_interval: "3s",
        ..Options::default()
    })
    .await;
    let mut svc = env.start();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !env.run_modes().await.iter().any(|m| m == "reconcile") {
        assert!(
            Instant::now() < deadline,
            "no reconcile; log:\n{}",
            svc.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let modes = env.run_modes().await;
    // The clock starts with the first run: incremental cycles first, a reconcile ~3 s later.
    assert_eq!(modes[0], "incremental", "{modes:?}");
    assert!(
        modes.iter().filter(|m| *m == "incremental").count() >= 2,
        "{modes:?}"
    );
    svc.sigterm();
    assert!(svc.exit_within(Duration::from_secs(10)).await.success());

    // A restart right after a reconcile goes on with incremental cycles.
    let before = env.run_modes().await.len();
    let mut svc = env.start();
    let deadline = Instant::now() + Duration::from_secs(10);
    let modes = loop {
        let modes = env.run_modes().await;
        if modes.len() > before {
            break modes;
        }
        assert!(Instant::now() < deadline, "no cycle; log:\n{}", svc.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(modes[before], "incremental", "{modes:?}");
    svc.sigterm();
    assert!(svc.exit_within(Duration::from_secs(10)).await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_port_in_use_fails_start_up_naming_admin_listen() {
    let env = Env::new(Options::default()).await;
    let _taken = std::net::TcpListener::bind(&env.admin).unwrap();
    let out = env.cli(&["run"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot listen on admin.listen = {}", env.admin)),
        "{stderr}"
    );
}

crate::on_both_backends! {
    multi_thread:
    /// Two cron `sync`s started together: the second waits for the first (one writer per
    /// outbox: the file lock, or the lease), so Pendo converges and no value is sent twice.
    async fn two_syncs_started_together_send_each_value_once(backend: Backend) {
        let Ok(state_url) = backend.state_url().await else {
            return;
        };
        let env = Env::new(Options {
            accounts: 120,
            batch_size: 20,
            state_url,
            ..Options::default()
        })
        .await;
        // Slow answers keep the first sync's batches in flight while the second starts.
        env.pendo.set_faults(PendoFaults {
            latency: Duration::from_millis(150),
            ..PendoFaults::default()
        });
        let (a, b) = tokio::join!(
            env.cli(&["sync", "--wait-lock", "60s"]),
            env.cli(&["sync", "--wait-lock", "60s"])
        );
        for out in [&a, &b] {
            assert_eq!(out.status.code(), Some(0), "{out:?}");
        }
        assert_eq!(env.differences(), Vec::<String>::new());
        let mut sent: BTreeMap<(String, String), usize> = BTreeMap::new();
        for r in env.pendo.requests().iter().filter(|r| r.status == 200) {
            for (id, field, _) in r.written_values() {
                *sent.entry((id, field)).or_default() += 1;
            }
        }
        let twice: Vec<_> = sent.iter().filter(|(_, n)| **n > 1).collect();
        assert!(twice.is_empty(), "sent more than once: {twice:?}");

        // A short wait beside a slow holder exits 1 naming it.
        env.pendo.set_faults(PendoFaults {
            latency: Duration::from_millis(300),
            ..PendoFaults::default()
        });
        for i in 0..120 {
            env.sf
                .set_field("Account", &account_id(i), "Plan_Tier__c", json!("Changed"));
        }
        let (a, b) = tokio::join!(env.cli(&["sync", "--wait-lock", "60s"]), async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            env.cli(&["sync", "--wait-lock", "100ms"]).await
        });
        assert_eq!(a.status.code(), Some(0), "{a:?}");
        assert_eq!(b.status.code(), Some(1), "{b:?}");
        let stderr = String::from_utf8_lossy(&b.stderr);
        assert!(stderr.contains("pendo-sync sync (pid"), "{stderr}");
    }
}

/// Guarantee 6 for the command users run: `sync --dry-run` on a fresh machine creates no state
/// file, and beside an existing one it changes nothing in it (no migrations, no quota readings,
/// no rotated tokens, no run history).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_dry_run_creates_and_changes_nothing() {
    let env = Env::new(Options {
        accounts: 30,
        ..Options::default()
    })
    .await;
    let state = env.dir.path().join("state.db");
    let out = env.cli(&["sync", "--dry-run"]).await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("would set account"),
        "{out:?}"
    );
    assert!(!state.exists(), "a dry run created the state file");
    assert!(env.pendo_writes() == 0);

    let out = env.cli(&["sync"]).await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let dump = || async {
        let store = pendo_sync::store::Store::open_read_only(&state)
            .await
            .unwrap();
        let mut text = String::new();
        for key in ["quota.salesforce", "reconcile.sf-accounts"] {
            text.push_str(&format!("{key}={:?}\n", store.kv_get(key).await.unwrap()));
        }
        text.push_str(&format!("{:?}\n", store.watermarks().await.unwrap()));
        text.push_str(&format!(
            "{:?}\n",
            store.recent_runs("sf-accounts", 1_000).await.unwrap()
        ));
        store.close().await;
        text
    };
    let before = dump().await;
    let file_before = std::fs::read(&state).unwrap();
    env.sf.set_api_usage(4_321);
    env.sf
        .set_field("Account", &account_id(1), "Plan_Tier__c", json!("Dry"));
    let out = env.cli(&["sync", "--dry-run"]).await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("plantier = Dry"),
        "{out:?}"
    );
    assert_eq!(dump().await, before, "the dry run wrote to the state file");
    assert!(
        std::fs::read(&state).unwrap() == file_before,
        "the state file changed"
    );
}

/// `queue list` says when it cut the list, and `status` counts accounts and visitors as well as
/// field values (an operator thinks in ids).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_list_says_when_it_cut_and_status_counts_ids() {
    let env = Env::new(Options {
        accounts: 40,
        create_missing: false,
        ..Options::default()
    })
    .await;
    let out = env.cli(&["sync"]).await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let out = env
        .cli(&["queue", "list", "--state", "unmatched", "--limit", "100"])
        .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        stdout.contains("100 of 120 outbox rows shown; raise --limit"),
        "{stdout}"
    );
    let out = env.cli(&["status"]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("unmatched 120 values (40 ids)"), "{stdout}");
    let out = env.cli(&["status", "--format", "json"]).await;
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["outbox_ids"]["unmatched"], json!(40));
    assert_eq!(json["outbox"]["unmatched"], json!(120));
}

/// The guard as an operator meets it: `sync` exits 4 naming the hold, `holds list|show`,
/// `status` shows it, the admin port lists it and approves it with the token (not without),
/// the service then sends it, and a decided hold cannot be decided again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_sync_exits_4_and_the_hold_is_approved_over_the_admin_port() {
    let mut env = Env::new(Options {
        accounts: 150,
        default_guard: true,
        ..Options::default()
    })
    .await;
    let out = env.cli(&["sync"]).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "a first fill is never held: {out:?}"
    );
    for i in 0..150 {
        env.sf
            .set_field("Account", &account_id(i), "Plan_Tier__c", json!("Bulk"));
    }
    let writes_before = env.pendo_writes();
    let out = env.cli(&["sync"]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    assert!(
        stdout.contains("HELD by the guard (new hold 1)"),
        "{stdout}"
    );
    assert_eq!(env.pendo_writes(), writes_before, "nothing of it was sent");
    // The next cron run stages nothing new, but the hold is still open: exit 4 again.
    let out = env.cli(&["sync"]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    assert!(stdout.contains("hold 1 is still open"), "{stdout}");

    let out = env.cli(&["holds"]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("open") && stdout.contains("sf-accounts"),
        "{stdout}"
    );
    let out = env.cli(&["holds", "show", "1"]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("would overwrite `plantier` on 150 of 150 accounts (100% > 50%)"),
        "{stdout}"
    );
    assert!(stdout.contains("-> Bulk"), "{stdout}");
    let out = env.cli(&["status", "--format", "json"]).await;
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["open_holds"][0]["id"], json!(1), "{json}");
    assert_eq!(json["outbox"]["held"], json!(150));

    let mut svc = env.start();
    env.wait_ready(&svc, Duration::from_secs(15)).await;
    // A resync handed to the service while the hold is open joins it: exit 4 as well.
    let out = env.cli(&["resync"]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    assert!(stdout.contains("HELD by the guard: hold 1"), "{stdout}");
    assert_eq!(env.pendo_writes(), writes_before, "nothing of it was sent");
    let (_, text) = env.get("/metrics").await;
    assert_eq!(sample(&text, "pendo_sync_holds_open"), Some(1.0), "{text}");
    assert_eq!(
        sample(&text, r#"pendo_sync_held_values{mapping="sf-accounts"}"#),
        Some(450.0),
        "{text}"
    );
    let (code, body) = env.get("/v1/holds").await;
    assert_eq!(code, 200);
    assert!(body.contains("\"state\":\"open\""), "{body}");
    let client = reqwest::Client::new();
    let refused = client
        .post(env.url("/v1/holds/1/approve"))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status().as_u16(), 401);
    let approved = client
        .post(env.url("/v1/holds/1/approve"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"reason": "the price change is real"}))
        .send()
        .await
        .unwrap();
    assert_eq!(approved.status().as_u16(), 200);
    let hold: Value = approved.json().await.unwrap();
    assert_eq!(hold["state"], json!("approved"));
    assert_eq!(hold["decided_by"], json!("admin-api"));
    assert_eq!(hold["decision_reason"], json!("the price change is real"));
    env.wait_converged(&svc, Duration::from_secs(10)).await;
    let (_, text) = env.get("/metrics").await;
    assert_eq!(sample(&text, "pendo_sync_holds_open"), Some(0.0), "{text}");
    svc.sigterm();
    assert!(svc.exit_within(Duration::from_secs(10)).await.success());

    let out = env.cli(&["holds", "reject", "1"]).await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("hold 1 is already approved"),
        "{out:?}"
    );
}

/// Review finding: a cron `sync` ended its runtime before its notifications went out. The hold
/// is posted before the process exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_cron_sync_posts_its_hold_before_it_exits() {
    use axum::routing::post;
    let bodies: std::sync::Arc<std::sync::Mutex<Vec<Value>>> = Default::default();
    let seen = bodies.clone();
    let hook = axum::Router::new().route(
        "/hook",
        post(move |body: axum::body::Bytes| {
            let seen = seen.clone();
            async move {
                // A webhook that takes its time, as real ones do.
                tokio::time::sleep(Duration::from_millis(300)).await;
                seen.lock()
                    .unwrap()
                    .push(serde_json::from_slice(&body).unwrap_or_default());
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, hook).await });
    let env = Env::new(Options {
        accounts: 150,
        default_guard: true,
        notify_url: Some(url),
        ..Options::default()
    })
    .await;
    assert_eq!(env.cli(&["sync"]).await.status.code(), Some(0));
    for i in 0..150 {
        env.sf
            .set_field("Account", &account_id(i), "Plan_Tier__c", json!("Bulk"));
    }
    let out = env.cli(&["sync"]).await;
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    let got = bodies.lock().unwrap().clone();
    assert_eq!(got.len(), 1, "the hold was not posted before exit: {got:?}");
    assert_eq!(got[0]["event"], json!("hold"));
}

/// `why --live` against the simulators: the three agree after a sync; an edit made in Pendo
/// behind pendo-sync's back is named with the value it replaced. The admin port answers the same
/// JSON, and its live reads need the token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn why_live_agrees_after_a_sync_and_names_an_edit_made_in_pendo() {
    let mut env = Env::new(Options {
        accounts: 20,
        ..Options::default()
    })
    .await;
    let mut svc = env.start();
    env.wait_converged(&svc, Duration::from_secs(15)).await;
    let id = account_id(3);
    let why = |live: bool| {
        let mut args = vec!["why", "account", id.as_str(), "--format", "json"];
        if live {
            args.push("--live");
        }
        let env = &env;
        async move {
            let out = env.cli(&args).await;
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            serde_json::from_slice::<Value>(&out.stdout).unwrap()
        }
    };
    let report = why(true).await;
    assert_eq!(
        report["verdict"], "CRM, pendo-sync and Pendo agree",
        "{report:#}"
    );
    let plan = report["fields"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["field"] == "plantier")
        .unwrap()
        .clone();
    assert_eq!(plan["source"]["crm_ids"], json!([id]));
    assert_eq!(plan["source"]["object"], "Account");
    assert_eq!(plan["live"]["agree"], true);
    let confirmed = plan["confirmed"]["value"].as_str().unwrap().to_owned();
    let events: Vec<&str> = report["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["field"] == "plantier")
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(events, ["confirmed", "detected"], "newest first");

    // Someone edits Pendo by hand.
    env.pendo
        .set_value(Kind::Account, &id, "plantier", json!("Edited by hand"));
    let report = why(true).await;
    let verdict = report["verdict"].as_str().unwrap();
    assert!(
        verdict.contains(&format!(
            "Pendo was edited after pendo-sync confirmed \"{confirmed}\" on "
        )) && verdict.contains("\"Edited by hand\""),
        "{verdict}"
    );
    // Without --live nothing is read: no verdict.
    assert!(why(false).await.get("verdict").is_none());

    // The admin port: the same JSON; live reads need the token.
    let (status, body) = env.get(&format!("/v1/why/account/{id}")).await;
    assert_eq!(status, 200, "{body}");
    let doc: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(doc["id"], json!(id));
    let (status, _) = env.get(&format!("/v1/why/account/{id}?live=true")).await;
    assert_eq!(status, 401);
    let answer = reqwest::Client::new()
        .get(env.url(&format!("/v1/why/account/{id}?live=true&field=plantier")))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status().as_u16(), 200);
    let doc: Value = answer.json().await.unwrap();
    assert!(
        doc["verdict"]
            .as_str()
            .unwrap()
            .contains("Pendo was edited"),
        "{doc:#}"
    );
    assert_eq!(doc["fields"].as_array().unwrap().len(), 1);
    let (status, body) = env.get("/v1/why/account/no-such-account").await;
    assert_eq!(status, 404, "{body}");

    // An id the state has never seen: exit 1, said plainly. The table form escapes values.
    let out = env.cli(&["why", "account", "no-such-account"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no record of account no-such-account"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    env.pendo
        .set_value(Kind::Account, &id, "plantier", json!("\u{1b}[2Jgotcha"));
    let out = env.cli(&["why", "account", &id, "--live"]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("verdict: "), "{text}");
    assert!(
        !text.contains('\u{1b}'),
        "a control character reached the terminal: {text}"
    );
    assert!(text.contains("\\u{1b}[2Jgotcha"), "{text}");
    svc.sigterm();
    assert!(svc.exit_within(Duration::from_secs(10)).await.success());
}
