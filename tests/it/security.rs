//! Guarantee 8 end to end: a canary in every secret setting, the real binary against the three
//! simulators, every command users run (with `-vv`, `RUST_LOG=trace` and JSON logs), the happy
//! path and the error paths (a refused Pendo key, refused CRM credentials). No canary may appear
//! in stdout, stderr, status JSON or the state file. Also: the state file is owner-only, and
//! TLS verification has no off switch.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use pendo_sync::config::Settings;
use pendo_sync::sim::config::Auth;
use pendo_sync::sim::hubspot::{HubspotSimConfig, SimOauth};
use pendo_sync::sim::salesforce::SalesforceSimConfig;
use serde_json::json;

use crate::crm_harness::{Crm, CrmOptions};

const PENDO_KEY: &str = "canary-pendo-key-a81f3c";
const SF_CLIENT_SECRET: &str = "canary-sf-client-secret-5be2";
const SF_REFRESH_TOKEN: &str = "canary-sf-refresh-token-77d0";
const HS_ACCESS_TOKEN: &str = "canary-hs-access-token-c4e9";
const HS_CLIENT_SECRET: &str = "canary-hs-client-secret-91aa";
const HS_REFRESH_TOKEN: &str = "canary-hs-refresh-token-0f6b";
const ADMIN_TOKEN: &str = "canary-admin-token-3d5c";
const VIEWER_TOKEN: &str = "canary-viewer-token-8e21";
/// Wrong values an operator might type; they are secrets too.
const WRONG_PENDO_KEY: &str = "canary-wrong-pendo-key-e07b";
const WRONG_SF_SECRET: &str = "canary-wrong-sf-secret-62ad";
const WRONG_HS_TOKEN: &str = "canary-wrong-hs-token-b913";

const PRIVATE_KEY: &str = include_str!("../fixtures/salesforce/test_private_key.pem");
const PUBLIC_KEY: &str = include_str!("../fixtures/salesforce/test_public_key.pem");

/// The first 40 characters of the PEM body: searchable wherever the key might be echoed.
fn pem_canary() -> &'static str {
    let body = PRIVATE_KEY.lines().nth(1).expect("PEM body");
    &body[..40]
}

/// Every secret (and the settings it came from), plus the session tokens the simulators issue:
/// those are secrets too, though nobody configured them.
fn canaries() -> Vec<(&'static str, &'static str)> {
    vec![
        ("pendo.integration_key", PENDO_KEY),
        ("salesforce.client_secret", SF_CLIENT_SECRET),
        ("salesforce.private_key", pem_canary()),
        ("salesforce.refresh_token", SF_REFRESH_TOKEN),
        ("hubspot.access_token", HS_ACCESS_TOKEN),
        ("hubspot.client_secret", HS_CLIENT_SECRET),
        ("hubspot.refresh_token", HS_REFRESH_TOKEN),
        ("admin.token", ADMIN_TOKEN),
        ("admin.viewer_token", VIEWER_TOKEN),
        ("a wrong pendo.integration_key", WRONG_PENDO_KEY),
        ("a wrong salesforce.client_secret", WRONG_SF_SECRET),
        ("a wrong hubspot.access_token", WRONG_HS_TOKEN),
        ("a Salesforce session token", "00DSIM000000001!"),
        ("a HubSpot OAuth access token", "sim-oauth-access-"),
    ]
}

fn assert_no_canary(label: &str, text: &str) {
    for (setting, canary) in canaries() {
        if let Some(at) = text.find(canary) {
            let from = text[..at]
                .char_indices()
                .rev()
                .nth(150)
                .map_or(0, |(i, _)| i);
            let to = (at + canary.len() + 100).min(text.len());
            let to = (to..=text.len())
                .find(|i| text.is_char_boundary(*i))
                .unwrap();
            panic!("{setting} leaked into {label}: …{}…", &text[from..to]);
        }
    }
}

/// The simulators accept the canaries; the config carries every secret setting at once (those
/// the chosen auth modes do not use as well).
async fn start() -> Crm {
    let sf_sim = SalesforceSimConfig {
        client_secret: SF_CLIENT_SECRET.into(),
        refresh_token: SF_REFRESH_TOKEN.into(),
        jwt_public_key_pem: Some(PUBLIC_KEY.into()),
        page_size: 10,
        ..SalesforceSimConfig::default()
    };
    let hs_sim = HubspotSimConfig {
        access_token: HS_ACCESS_TOKEN.into(),
        oauth: Some(SimOauth {
            client_id: "hs-app-id".into(),
            client_secret: HS_CLIENT_SECRET.into(),
            refresh_token: HS_REFRESH_TOKEN.into(),
            rotate: false,
            expires_in: 1800,
        }),
        requests_per_10s: 0,
        search_per_second: 0,
        ..HubspotSimConfig::default()
    };
    let sf_auth = Auth::new("jwt")
        .key("client_id", &sf_sim.client_id)
        .key("username", &sf_sim.username)
        .key("private_key", PRIVATE_KEY)
        .key("client_secret", SF_CLIENT_SECRET)
        .key("refresh_token", SF_REFRESH_TOKEN);
    let hs_auth = Auth::new("token")
        .key("access_token", HS_ACCESS_TOKEN)
        .key("client_id", "hs-app-id")
        .key("client_secret", HS_CLIENT_SECRET)
        .key("refresh_token", HS_REFRESH_TOKEN);
    let crm = Crm::start(CrmOptions {
        pendo_key: PENDO_KEY.into(),
        sf_sim,
        hs_sim,
        sf_auth,
        hs_auth,
        admin_token: Some(ADMIN_TOKEN.into()),
        admin_viewer_token: Some(VIEWER_TOKEN.into()),
        max_attempts: 3,
        ..CrmOptions::default()
    })
    .await;
    crm.seed_accounts(8);
    crm.seed_contacts(6);
    crm
}

struct Run {
    label: String,
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs the binary with `args` and `env`, and checks its output for every canary.
async fn run(config: &Path, args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_pendo-sync"));
    cmd.arg("--config").arg(config).args(args);
    cmd.env_remove("RUST_LOG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().await.expect("the binary runs");
    let run = Run {
        label: format!(
            "`{}`{} with {}",
            args.join(" "),
            env.iter()
                .map(|(k, v)| format!(" {k}={v}"))
                .collect::<String>(),
            config.file_name().unwrap().to_string_lossy()
        ),
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    assert_no_canary(&format!("stdout of {}", run.label), &run.stdout);
    assert_no_canary(&format!("stderr of {}", run.label), &run.stderr);
    run
}

/// Flags and environment for one logging set-up.
type Loudness = (
    &'static [&'static str],
    &'static [(&'static str, &'static str)],
);

/// The three logging set-ups every command is run with.
const LOUD: [Loudness; 3] = [
    (&["-vv"], &[]),
    (&["--log-format", "json", "-vv"], &[]),
    (&[], &[("RUST_LOG", "trace")]),
];

async fn run_loud(config: &Path, args: &[&str]) -> Vec<Run> {
    let mut runs = Vec::new();
    for (flags, env) in LOUD {
        let all: Vec<&str> = flags.iter().chain(args).copied().collect();
        runs.push(run(config, &all, env).await);
    }
    runs
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn assert_state_files_clean(state: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let path = PathBuf::from(format!("{}{suffix}", state.display()));
        if let Ok(bytes) = std::fs::read(&path) {
            assert_no_canary(
                &format!("the state file {}", path.display()),
                &String::from_utf8_lossy(&bytes),
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_output_status_or_the_state_file() {
    let crm = start().await;
    // The canaries really are in the config (else finding none of them proves nothing).
    for (setting, canary) in canaries().into_iter().take(9) {
        assert!(crm.toml.contains(canary), "{setting} is not configured");
    }
    let dir = crm.dir.path();
    // A: Salesforce JWT (the private key in use), HubSpot private-app token.
    let config_a = write(dir, "a-jwt-token.toml", &crm.toml);
    // B: Salesforce refresh token (client secret + refresh token), HubSpot OAuth.
    let config_b = write(
        dir,
        "b-refresh-oauth.toml",
        &crm.toml
            .replacen("auth = \"jwt\"", "auth = \"refresh_token\"", 1)
            .replacen("auth = \"token\"", "auth = \"oauth\"", 1),
    );

    let mut runs = Vec::new();
    for (round, config) in [&config_a, &config_b].into_iter().enumerate() {
        for (i, (flags, env)) in LOUD.iter().enumerate() {
            // A change per run, so every run pulls, pushes and logs a real cycle.
            crm.sf.set_field(
                "Account",
                &crate::crm_harness::sf_account_id(i),
                "Plan_Tier__c",
                json!(format!("Tier {round}-{i}")),
            );
            crm.hs.upsert(
                "contacts",
                crate::crm_harness::hs_contact_id(i),
                json!({"lifecyclestage": format!("stage {round}-{i}")}),
            );
            let all: Vec<&str> = flags.iter().copied().chain(["sync"]).collect();
            let sync = run(config, &all, env).await;
            assert_eq!(
                sync.code,
                Some(0),
                "{}: {}{}",
                sync.label,
                sync.stdout,
                sync.stderr
            );
            runs.push(sync);
        }
        runs.extend(run_loud(config, &["status", "--format", "json"]).await);
        runs.extend(run_loud(config, &["check"]).await);
        runs.extend(run_loud(config, &["queue", "list"]).await);
        runs.extend(run_loud(config, &["resync", "--dry-run"]).await);
    }
    crm.assert_converged();
    // The runs were real: both auth paths logged in, trace logging was on, status is JSON.
    let sf_paths: Vec<_> = crm.sf.requests().into_iter().map(|r| r.1).collect();
    assert!(sf_paths.iter().any(|p| p == "/services/oauth2/token"));
    assert!(crm.hs.requests().iter().any(|r| r.path.contains("/oauth/")));
    let trace = runs
        .iter()
        .find(|r| r.label.contains("RUST_LOG=trace") && r.label.contains("`sync`"))
        .unwrap();
    assert!(trace.stderr.contains("TRACE"), "{}", trace.stderr);
    let status = runs
        .iter()
        .find(|r| r.label.contains("status --format json"))
        .unwrap();
    let doc: serde_json::Value = serde_json::from_str(&status.stdout).expect("status is JSON");
    assert!(doc["mappings"].is_array());
    for r in runs.iter().filter(|r| r.label.contains("check")) {
        assert_eq!(r.code, Some(0), "{}: {}", r.label, r.stdout);
    }
    assert_state_files_clean(&crm.state_path());

    // The settings' Debug form, as a panic or a debug log would show it.
    let settings =
        Settings::from_toml_with_env(&std::fs::read_to_string(&config_b).unwrap(), HashMap::new())
            .unwrap();
    assert_no_canary("Debug of Settings", &format!("{settings:?}"));
}

/// The error paths: a key Pendo refuses (403), Salesforce and HubSpot refusing the credentials.
/// The messages say what to check, and still carry no secret (the wrong ones included).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_credentials_are_reported_without_the_secret() {
    let crm = start().await;
    let dir = crm.dir.path();
    let refresh = crm
        .toml
        .replacen("auth = \"jwt\"", "auth = \"refresh_token\"", 1);
    let cases = [
        (
            "wrong-pendo-key.toml",
            crm.toml.replace(PENDO_KEY, WRONG_PENDO_KEY),
            "Pendo refused the integration key (403); check the integration key, its region",
        ),
        (
            "wrong-sf-secret.toml",
            refresh.replace(SF_CLIENT_SECRET, WRONG_SF_SECRET),
            "salesforce refused our credentials",
        ),
        (
            "wrong-hs-token.toml",
            crm.toml.replace(HS_ACCESS_TOKEN, WRONG_HS_TOKEN),
            "hubspot refused our credentials: 401",
        ),
    ];
    for (name, text, says) in cases {
        let config = write(dir, name, &text);
        for args in [&["sync"][..], &["check"][..]] {
            // Pending changes, so the writer meets the refused key.
            crm.sf.set_field(
                "Account",
                &crate::crm_harness::sf_account_id(1),
                "ARR__c",
                json!(fastrand::u32(1..1_000_000)),
            );
            for r in run_loud(&config, args).await {
                assert_eq!(r.code, Some(1), "{}: {}{}", r.label, r.stdout, r.stderr);
                assert!(
                    r.stdout.contains(says) || r.stderr.contains(says),
                    "{}: expected {says:?} in {}{}",
                    r.label,
                    r.stdout,
                    r.stderr
                );
            }
        }
        let status = run(&config, &["status", "--format", "json"], &[]).await;
        assert_eq!(status.code, Some(0));
    }
    assert_state_files_clean(&crm.state_path());
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_creates_the_state_file_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let crm = start().await;
    let config = write(crm.dir.path(), "config.toml", &crm.toml);
    let state = crm.state_path();
    assert!(!state.exists());
    let r = run(&config, &["sync"], &[]).await;
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    for suffix in ["", "-wal", "-shm"] {
        let path = PathBuf::from(format!("{}{suffix}", state.display()));
        if let Ok(meta) = std::fs::metadata(&path) {
            let mode = meta.permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{} is {mode:o}", path.display());
        }
    }
}

/// Certificate checks cannot be switched off by a config key or an environment variable: each
/// spelling is an unknown key, named.
#[test]
fn tls_verification_has_no_off_switch() {
    let base = r#"
[state]
path = "/tmp/x.db"
[pendo]
integration_key = "k"
[salesforce]
auth = "client_credentials"
client_id = "c"
client_secret = "s"
[hubspot]
access_token = "t"
[[mappings]]
name = "m"
source = "hubspot"
object = "contacts"
kind = "visitor"
id = "email"
  [mappings.fields]
  stage = { from = "lifecyclestage", type = "string" }
"#;
    Settings::from_toml_with_env(base, HashMap::new()).expect("the base is valid");
    for section in ["pendo", "salesforce", "hubspot"] {
        for line in [
            "danger_accept_invalid_certs = true",
            "tls_verify = false",
            "insecure = true",
            "verify_ssl = false",
        ] {
            let text = base.replace(&format!("[{section}]\n"), &format!("[{section}]\n{line}\n"));
            let key = line.split(' ').next().unwrap();
            let e = Settings::from_toml_with_env(&text, HashMap::new())
                .expect_err(&format!("[{section}] {line} was accepted"));
            assert_eq!(e.key, format!("{section}.{key}"), "{e}");
            assert!(
                e.message.starts_with(&format!("unknown key `{key}`")),
                "{e}"
            );
            let env = HashMap::from([(
                format!(
                    "PENDO_SYNC__{}__{}",
                    section.to_uppercase(),
                    key.to_uppercase()
                ),
                "true".to_owned(),
            )]);
            let e = Settings::from_toml_with_env(base, env)
                .expect_err(&format!("the environment switched off TLS for {section}"));
            assert_eq!(e.key, format!("{section}.{key}"), "{e}");
        }
    }
}
