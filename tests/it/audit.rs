//! `pendo-sync audit`: every class found where it should be, nothing written anywhere (the state
//! file stays byte-identical, Pendo gets reads only), the four formats, and exit code 3.

use std::path::Path;
use std::sync::Arc;

use pendo_sync::app::Connectors;
use pendo_sync::audit::{
    self, Against, AuditArgs, AuditOptions, AuditReport, AuditRow, Class, Format,
};
use pendo_sync::config::Source;
use pendo_sync::domain::Kind;
use pendo_sync::engine::Mode;
use serde_json::json;

use crate::helpers::{TestApp, account, account_id};

fn connectors(t: &TestApp) -> Connectors {
    let mut c = Connectors::new();
    c.insert(Source::Salesforce, Arc::new(t.crm.clone()));
    c
}

async fn run_audit(t: &TestApp, against: Against, page_size: usize) -> AuditReport {
    let options = AuditOptions {
        mapping: None,
        against,
        page_size,
    };
    audit::audit(&t.settings, &connectors(t), &options)
        .await
        .expect("audit runs")
}

fn rows(report: &AuditReport, class: Class) -> Vec<&AuditRow> {
    report.rows.iter().filter(|r| r.class == class).collect()
}

/// The state file and its WAL, as bytes. An absent WAL reads as empty: SQLite creates an empty
/// `-wal` (and a `-shm` index) when a read-only connection opens a WAL-mode file, which holds no
/// data; any write would show as WAL frames or a changed main file.
fn state_bytes(dir: &Path) -> (Vec<u8>, Vec<u8>) {
    let read = |name: &str| std::fs::read(dir.join(name)).unwrap_or_default();
    (read("state.db"), read("state.db-wal"))
}

/// 40 accounts synced, then three fields edited in Pendo behind the sync's back, plus two edits
/// that only change the representation (and so are not drift).
async fn drifted() -> TestApp {
    let t = TestApp::new().await;
    t.seed(40);
    t.sync().await;
    t.pendo
        .set_value(Kind::Account, &account_id(1), "plantier", json!("Hacked"));
    t.pendo
        .set_value(Kind::Account, &account_id(2), "arr", json!(1));
    t.pendo
        .set_value(Kind::Account, &account_id(3), "renewaldate", json!(null));
    // Same meaning, other form: a date as an ISO string, a number as text.
    let renewal = pendo_sync::mapping::parse_date("2027-05-05").unwrap();
    assert_eq!(
        t.pendo.value(Kind::Account, &account_id(4), "renewaldate"),
        Some(json!(renewal))
    );
    t.pendo.set_value(
        Kind::Account,
        &account_id(4),
        "renewaldate",
        json!("2027-05-05T00:00:00.000Z"),
    );
    t.pendo
        .set_value(Kind::Account, &account_id(5), "arr", json!("5000.50"));
    t
}

#[tokio::test]
async fn against_pendo_reports_exactly_the_fields_edited_in_pendo_and_writes_nothing() {
    let t = drifted().await;
    let before = state_bytes(t.dir.path());
    t.pendo.reset_requests();

    // Pages of 7 over 40 accounts: the skip/limit paging is exercised (7,7,7,7,7,5).
    let report = run_audit(&t, Against::Pendo, 7).await;

    let drift: Vec<(String, String)> = rows(&report, Class::Drift)
        .iter()
        .map(|r| (r.id.clone(), r.field.clone()))
        .collect();
    assert_eq!(
        drift,
        vec![
            (account_id(1), "plantier".to_owned()),
            (account_id(2), "arr".to_owned()),
            (account_id(3), "renewaldate".to_owned()),
        ]
    );
    assert_eq!(report.rows.len(), 3, "{:#?}", report.rows);
    assert_eq!(report.count(Class::InSync), 40 * 5 - 3);
    assert!(report.has_drift());
    let hacked = rows(&report, Class::Drift)[0];
    assert_eq!(hacked.crm.as_deref(), Some("Growth"));
    assert_eq!(hacked.shadow.as_deref(), Some("Growth"));
    assert_eq!(hacked.pendo, Some(Some("Hacked".to_owned())));
    assert_eq!(rows(&report, Class::Drift)[2].pendo, Some(None));
    // Each difference carries its (id, field)'s last event: confirmed, then changed in Pendo.
    let last = hacked.last_event.as_ref().expect("a last event");
    assert_eq!(last.event, pendo_sync::store::Event::Confirmed);
    assert!(
        last.summary.starts_with("Pendo confirmed \"Growth\""),
        "{last:?}"
    );
    assert_eq!(report.mappings[0].records, 40);
    assert_eq!(report.mappings[0].pendo_rows, Some(40));

    // Pendo was only read: six aggregation pages, no write.
    let requests = t.pendo.requests();
    assert!(t.writes().is_empty());
    assert!(
        requests
            .iter()
            .all(|r| r.method == "POST" && r.path == "/api/v1/aggregation"),
        "{requests:?}"
    );
    assert_eq!(requests.len(), 6);
    assert!(
        state_bytes(t.dir.path()) == before,
        "the audit changed the state file"
    );
    // Pendo still holds the edits: the audit repaired nothing.
    assert_eq!(
        t.pendo.value(Kind::Account, &account_id(1), "plantier"),
        Some(json!("Hacked"))
    );
}

#[tokio::test]
async fn against_the_shadow_pendo_is_not_read() {
    let t = drifted().await;
    t.pendo.reset_requests();
    let report = run_audit(&t, Against::Shadow, 5_000).await;
    assert!(report.rows.is_empty(), "{:#?}", report.rows);
    assert_eq!(report.count(Class::InSync), 200);
    assert!(t.pendo.requests().is_empty());
    assert!(!report.has_drift());
}

#[tokio::test]
async fn a_crm_change_not_yet_synced_is_pending_and_says_whether_it_is_queued() {
    let t = TestApp::new().await;
    t.seed(10);
    t.sync().await;
    // One change detected and queued (a cycle without a drain), one not seen by any cycle yet.
    t.crm
        .set_field("Account", &account_id(1), "Plan_Tier__c", json!("Queued"));
    let app = t.app().await;
    app.cycle(&t.settings.mappings[0], Mode::Incremental, false, &())
        .await
        .unwrap();
    app.store.close().await;
    t.crm
        .set_field("Account", &account_id(2), "ARR__c", json!(7.25));

    let report = run_audit(&t, Against::Pendo, 5_000).await;
    let pending = rows(&report, Class::Pending);
    assert_eq!(pending.len(), 2, "{:#?}", report.rows);
    assert_eq!(
        (pending[0].id.as_str(), pending[0].field.as_str()),
        (account_id(1).as_str(), "plantier")
    );
    assert!(pending[0].note.contains("queued in the outbox"));
    assert_eq!(pending[0].crm.as_deref(), Some("Queued"));
    assert_eq!(pending[0].shadow.as_deref(), Some("Growth"));
    assert_eq!(pending[1].field, "arr");
    assert!(
        pending[1].note.contains("not queued"),
        "{}",
        pending[1].note
    );
    assert_eq!(pending[1].crm.as_deref(), Some("7.25"));
    assert_eq!(report.rows.len(), 2);
}

#[tokio::test]
async fn a_record_gone_from_the_crm_is_an_orphan() {
    let mut t = TestApp::new().await;
    t.seed(10);
    t.sync().await;
    // Gone without a trace (hard delete, or it left the filter).
    let other = pendo_sync::connectors::fixture::FixtureConnector::new(40);
    for i in (0..10).filter(|i| *i != 4) {
        other.upsert("Account", &account_id(i), account(i));
    }
    t.crm = other;
    let report = run_audit(&t, Against::Pendo, 5_000).await;
    let orphans = rows(&report, Class::Orphan);
    assert_eq!(orphans.len(), 5, "{:#?}", report.rows);
    assert!(orphans.iter().all(|r| r.id == account_id(4)
        && r.crm.is_none()
        && r.crm_id.is_none()
        && r.shadow.is_some()
        && r.pendo.as_ref().is_some_and(Option::is_some)));
    assert!(orphans[0].note.contains("clears it"), "{}", orphans[0].note);
    assert_eq!(report.rows.len(), 5);
    assert_eq!(report.count(Class::InSync), 45);
}

#[tokio::test]
async fn an_id_pendo_does_not_know_is_unmatched() {
    let t = TestApp::new().await;
    t.seed(5);
    // In the CRM, never made known to Pendo: the sync's write comes back `missing`.
    t.crm.upsert("Account", "001NEW", {
        let mut a = account(7);
        a["Id"] = json!("001NEW");
        a
    });
    t.sync().await;
    let report = run_audit(&t, Against::Pendo, 5_000).await;
    let unmatched = rows(&report, Class::Unmatched);
    assert_eq!(unmatched.len(), 5, "{:#?}", report.rows);
    assert!(
        unmatched
            .iter()
            .all(|r| r.id == "001NEW" && r.pendo == Some(None))
    );
    assert!(
        unmatched[0].note.contains("queued"),
        "{}",
        unmatched[0].note
    );
    assert_eq!(report.rows.len(), 5);
    // Against the shadow alone, the same fields are simply pending (Pendo never confirmed them).
    let report = run_audit(&t, Against::Shadow, 5_000).await;
    assert_eq!(rows(&report, Class::Pending).len(), 5);
}

#[tokio::test]
async fn a_record_with_a_bad_value_is_invalid_with_its_reason() {
    let t = TestApp::new().await;
    t.seed(5);
    t.sync().await;
    t.crm
        .set_field("Account", &account_id(3), "ARR__c", json!("twelve"));
    let report = run_audit(&t, Against::Shadow, 5_000).await;
    let invalid = rows(&report, Class::Invalid);
    assert_eq!(invalid.len(), 1, "{:#?}", report.rows);
    let row = invalid[0];
    assert_eq!(
        (row.id.as_str(), row.field.as_str()),
        (account_id(3).as_str(), "arr")
    );
    assert!(
        row.note.contains("bad_value") && row.note.contains("twelve"),
        "{}",
        row.note
    );
    assert!(row.note.contains("new"), "{}", row.note);
    // A record set aside is still in the CRM: not an orphan.
    assert!(rows(&report, Class::Orphan).is_empty());
    assert_eq!(report.rows.len(), 1);
    assert!(!report.has_drift(), "invalid records do not fail the audit");

    t.sync().await;
    let report = run_audit(&t, Against::Shadow, 5_000).await;
    assert!(
        rows(&report, Class::Invalid)[0]
            .note
            .contains("set aside in the state file")
    );
}

#[tokio::test]
async fn without_a_state_file_the_audit_runs_against_an_empty_shadow_and_creates_nothing() {
    let t = TestApp::new().await;
    t.seed(5);
    let report = run_audit(&t, Against::Shadow, 5_000).await;
    assert!(!report.state_file_exists);
    assert_eq!(rows(&report, Class::Pending).len(), 25);
    assert!(!t.dir.path().join("state.db").exists());
    assert!(std::fs::read_dir(t.dir.path()).unwrap().next().is_none());
}

#[tokio::test]
async fn the_formats_carry_the_counts_and_the_rows() {
    let t = drifted().await;
    let report = run_audit(&t, Against::Pendo, 5_000).await;

    let doc: serde_json::Value =
        serde_json::from_str(&audit::render(&report, Format::Json)).expect("json parses");
    assert_eq!(doc["against"], json!("pendo"));
    assert_eq!(doc["totals"]["drift"], json!(3));
    assert_eq!(doc["totals"]["in_sync"], json!(197));
    assert_eq!(doc["mappings"][0]["counts"]["drift"], json!(3));
    assert_eq!(doc["rows"].as_array().unwrap().len(), 3);
    assert_eq!(doc["rows"][0]["class"], json!("drift"));

    let csv = audit::render(&report, Format::Csv);
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(
        lines[0],
        "mapping,kind,id,crm_id,field,crm,shadow,pendo,class,note"
    );
    assert_eq!(lines.len(), 1 + 3);
    assert!(lines[1].starts_with(&format!(
        "accounts,account,{0},{0},plantier,Growth,Growth,Hacked,drift,",
        account_id(1)
    )));

    let md = audit::render(&report, Format::Markdown);
    assert!(
        md.contains("| mapping | kind | records | in_sync |"),
        "{md}"
    );
    assert!(md.contains("|---|"), "{md}");
    assert!(md.contains(&format!(
        "| accounts | account | {} | plantier |",
        account_id(1)
    )));

    let table = audit::render(&report, Format::Table);
    assert!(
        table.contains("drift") && table.contains("Hacked"),
        "{table}"
    );

    // No secret in any format.
    for f in [Format::Table, Format::Json, Format::Csv, Format::Markdown] {
        let text = audit::render(&report, f);
        assert!(!text.contains(crate::helpers::CANARY_KEY));
        assert!(!text.contains("canary-sf-secret-55"));
    }
}

#[tokio::test]
async fn output_writes_the_file_and_fail_on_drift_picks_the_exit_code() {
    let t = drifted().await;
    let out = t.dir.path().join("report.json");
    let args = |output: Option<std::path::PathBuf>, fail_on_drift| AuditArgs {
        mapping: Some("accounts".into()),
        against: Against::Pendo,
        format: Format::Json,
        output,
        fail_on_drift,
    };
    let code = audit::run_with(&t.settings, &connectors(&t), &args(Some(out.clone()), true))
        .await
        .unwrap();
    assert_eq!(code, 3);
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    assert_eq!(doc["totals"]["drift"], json!(3));
    // Without the flag, drift is reported but the exit code stays 0.
    let code = audit::run_with(
        &t.settings,
        &connectors(&t),
        &args(Some(out.clone()), false),
    )
    .await
    .unwrap();
    assert_eq!(code, 0);
    // The one file the audit must never write is the state file.
    let state = t.dir.path().join("state.db");
    let err = audit::run_with(&t.settings, &connectors(&t), &args(Some(state), true))
        .await
        .unwrap_err();
    assert_eq!(err.exit_code(), 2, "{err}");
}

/// The binary against the Salesforce and Pendo simulators: exit 0 in sync, 3 after a Pendo edit.
#[tokio::test]
async fn the_binary_exits_3_on_drift_and_0_in_sync() {
    use pendo_sync::sim::pendo::{PendoSim, PendoSimConfig};
    use pendo_sync::sim::salesforce::{self as sf, SalesforceSim, SalesforceSimConfig};

    let key = "binary-audit-key-91";
    let pendo = PendoSim::new(PendoSimConfig {
        integration_key: key.into(),
        write_access: true,
        schema: crate::helpers::ACCOUNT_FIELDS
            .iter()
            .map(|(f, ty)| (Kind::Account, f.to_string(), ty.to_string()))
            .collect(),
        rate_limit: None,
        errors_as_strings: false,
    });
    let salesforce = SalesforceSim::new(SalesforceSimConfig::default());
    let local = "127.0.0.1:0".parse().unwrap();
    let pendo_server = pendo.start(local).await.unwrap();
    let sf_server = salesforce.start(local).await.unwrap();
    salesforce.seed_demo(30, 0);
    for i in 0..30 {
        pendo.add_entity(Kind::Account, &sf::account_id(i));
    }
    let dir = tempfile::tempdir().unwrap();
    let sf_config = SalesforceSimConfig::default();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            r#"[state]
path = "{state}"

[pendo]
base_url = "{pendo}"
integration_key = "{key}"
requests_per_second = 200

[salesforce]
login_url = "{sf}"
auth = "client_credentials"
client_id = "{client_id}"
client_secret = "{client_secret}"
requests_per_second = 200

[[mappings]]
name = "sf-accounts"
source = "salesforce"
object = "Account"
kind = "account"
id = "Id"
on_delete = "clear"
{sf_account_fields}"#,
            sf_account_fields = pendo_sync::sim::SF_ACCOUNT_FIELDS,
            state = dir.path().join("state.db").display(),
            pendo = pendo_server.url(),
            sf = sf_server.url(),
            client_id = sf_config.client_id,
            client_secret = sf_config.client_secret,
        ),
    )
    .unwrap();
    let run = |args: &'static [&'static str]| {
        let config = config.clone();
        async move {
            tokio::process::Command::new(env!("CARGO_BIN_EXE_pendo-sync"))
                .arg("--config")
                .arg(&config)
                .args(args)
                .output()
                .await
                .unwrap()
        }
    };
    let sync = run(&["sync"]).await;
    assert_eq!(
        sync.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&sync.stderr)
    );

    let audit_args: &[&str] = &["audit", "--against", "pendo", "--fail-on-drift"];
    let clean = run(audit_args).await;
    let stdout = String::from_utf8_lossy(&clean.stdout);
    assert_eq!(
        clean.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&clean.stderr)
    );
    assert!(stdout.contains("no differences"), "{stdout}");

    pendo.set_value(
        Kind::Account,
        &sf::account_id(3),
        "plantier",
        json!("Edited in Pendo"),
    );
    pendo.reset_requests();
    let drifted = run(audit_args).await;
    let stdout = String::from_utf8_lossy(&drifted.stdout);
    assert_eq!(
        drifted.status.code(),
        Some(3),
        "{stdout}{}",
        String::from_utf8_lossy(&drifted.stderr)
    );
    assert!(stdout.contains("Edited in Pendo"), "{stdout}");
    assert!(
        pendo
            .requests()
            .iter()
            .all(|r| r.path == "/api/v1/aggregation")
    );
    let text = format!("{stdout}{}", String::from_utf8_lossy(&drifted.stderr));
    assert!(!text.contains(key) && !text.contains(&sf_config.client_secret));
}

/// A value that was never sent says so in the report: its last event is its detection, and the
/// markdown report shows it in the "last event" column.
#[tokio::test]
async fn a_queued_value_s_row_says_it_was_detected_and_not_yet_sent() {
    let t = TestApp::new().await;
    t.seed(5);
    t.sync().await;
    t.crm
        .set_field("Account", &account_id(0), "Plan_Tier__c", json!("Queued"));
    t.cycle(Mode::Incremental).await;
    let report = run_audit(&t, Against::Shadow, 5_000).await;
    let row = report
        .rows
        .iter()
        .find(|r| r.id == account_id(0) && r.field == "plantier")
        .expect("the queued value differs from the shadow");
    let last = row.last_event.as_ref().unwrap();
    assert_eq!(last.event, pendo_sync::store::Event::Detected);
    let md = audit::render(&report, Format::Markdown);
    assert!(md.contains("| last event |"), "{md}");
    assert!(
        md.contains("detected: detected \"Queued\" in CRM record"),
        "{md}"
    );
    let json = audit::render(&report, Format::Json);
    assert!(json.contains("\"last_event\""), "{json}");
}
