//! Connector tests against the Salesforce simulator on loopback, over real HTTP.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use chrono::{TimeZone, Utc};
use serde_json::{Value, json};

use super::{QUOTA_KEY, SalesforceConnector, parse_limit_info};
use crate::config::{SalesforceSettings, Settings};
use crate::connectors::{Connector, ConnectorError, FieldRequest, PullSpec, RawRecord, Watermark};
use crate::sim::SimServer;
use crate::sim::salesforce::{SalesforceFault, SalesforceSim, SalesforceSimConfig, account_id};
use crate::store::Store;

const PRIVATE_KEY: &str = include_str!("../../../tests/fixtures/salesforce/test_private_key.pem");
const PUBLIC_KEY: &str = include_str!("../../../tests/fixtures/salesforce/test_public_key.pem");

const JWT: &str = "auth = \"jwt\"\nusername = \"integration@example.com\"";
const CLIENT: &str = "auth = \"client_credentials\"\nclient_secret = \"sim-client-secret\"";
const REFRESH: &str = "auth = \"refresh_token\"\nclient_secret = \"sim-client-secret\"\nrefresh_token = \"sim-refresh-token\"";

fn settings(url: &str, auth: &str, extra: &str) -> SalesforceSettings {
    Settings::from_toml_with_env(&settings_text(url, auth, extra), HashMap::new())
        .expect("test config loads")
        .salesforce
        .expect("salesforce section")
}

fn settings_text(url: &str, auth: &str, extra: &str) -> String {
    let key = if auth.contains("jwt") {
        format!("private_key = '''\n{PRIVATE_KEY}'''")
    } else {
        String::new()
    };
    format!(
        r#"
[state]
path = "/tmp/pendo-sync-unused.db"
[pendo]
integration_key = "pendo-test-key"
[salesforce]
login_url = "{url}"
client_id = "sim-client-id"
requests_per_second = 1000
{auth}
{key}
{extra}
[[mappings]]
name = "sf-accounts"
source = "salesforce"
object = "Account"
kind = "account"
id = "Id"
  [mappings.fields]
  arr = {{ from = "ARR__c", type = "number" }}
"#
    )
}

fn sim_config() -> SalesforceSimConfig {
    SalesforceSimConfig {
        jwt_public_key_pem: Some(PUBLIC_KEY.into()),
        ..SalesforceSimConfig::default()
    }
}

async fn start(cfg: SalesforceSimConfig) -> (SalesforceSim, SimServer) {
    let sim = SalesforceSim::new(cfg);
    let server = sim
        .start("127.0.0.1:0".parse().unwrap())
        .await
        .expect("sim starts");
    (sim, server)
}

fn connector(
    server: &SimServer,
    auth: &str,
    extra: &str,
    store: Option<Store>,
) -> SalesforceConnector {
    SalesforceConnector::new(
        &settings(&server.url(), auth, extra),
        store.map(|s| std::sync::Arc::new(s) as crate::connectors::SharedKv),
    )
    .expect("connector builds")
    .with_backoff(Duration::from_millis(5))
}

fn spec(paths: &[&str], filter: Option<&str>, since: Option<Watermark>) -> PullSpec {
    PullSpec {
        mapping: "sf-accounts".into(),
        object: "Account".into(),
        fields: paths
            .iter()
            .map(|p| FieldRequest {
                path: (*p).into(),
                transform: None,
            })
            .collect(),
        filter: filter.map(str::to_owned),
        since,
        overlap: Duration::ZERO,
    }
}

/// Every page of a pull: records, last watermark, page count.
async fn drain(
    conn: &SalesforceConnector,
    spec: PullSpec,
) -> Result<(Vec<RawRecord>, Option<Watermark>, usize), ConnectorError> {
    let mut pull = conn.pull(spec).await?;
    let (mut records, mut wm, mut pages) = (Vec::new(), None, 0);
    while let Some(page) = pull.next_page().await? {
        pages += 1;
        records.extend(page.records);
        if page.watermark.is_some() {
            wm = page.watermark;
        }
    }
    Ok((records, wm, pages))
}

fn by_id(records: &[RawRecord]) -> BTreeMap<String, RawRecord> {
    records
        .iter()
        .map(|r| (r.crm_id.clone(), r.clone()))
        .collect()
}

fn count(sim: &SalesforceSim, method: &str, path_part: &str) -> usize {
    sim.requests()
        .iter()
        .filter(|(m, p, _)| m == method && p.contains(path_part))
        .count()
}

#[tokio::test]
async fn jwt_login_and_paged_pull_with_filter_and_relationships() {
    let (sim, server) = start(sim_config()).await;
    sim.seed_demo(2500, 0);
    let conn = connector(&server, JWT, "", None);
    let fields = [
        "Id",
        "ARR__c",
        "Owner.Email",
        "Plan_Tier__c",
        "Strategic__c",
        "Renewal_Date__c",
    ];
    let (records, wm, pages) = drain(&conn, spec(&fields, Some("Type = 'Customer'"), None))
        .await
        .unwrap();
    assert_eq!(records.len(), 2250, "every Customer, none of the Prospects");
    assert_eq!(pages, 2, "2,000 per page");
    assert!(wm.is_some(), "a full pull still yields a watermark");
    let first = by_id(&records)[&account_id(0)].clone();
    assert_eq!(
        first.fields,
        json!({"Id": account_id(0), "ARR__c": 1200.0, "Owner.Email": "owner0@example.com",
               "Plan_Tier__c": "Starter", "Strategic__c": true, "Renewal_Date__c": "2027-03-31"})
    );
    assert!(!first.deleted);
    assert_eq!(
        count(&sim, "POST", "/services/oauth2/token"),
        1,
        "one login for the whole pull"
    );
    assert_eq!(
        count(&sim, "GET", "/query/"),
        1,
        "followed nextRecordsUrl once"
    );
}

#[tokio::test]
async fn relationship_that_is_empty_arrives_as_null() {
    let (sim, server) = start(sim_config()).await;
    sim.seed_demo(1, 0);
    sim.upsert(
        "Account",
        "001X",
        json!({"Name": "Orphan", "Owner": null, "ARR__c": null}),
    );
    let conn = connector(&server, JWT, "", None);
    let (records, _, _) = drain(&conn, spec(&["Id", "Owner.Email", "ARR__c"], None, None))
        .await
        .unwrap();
    assert_eq!(
        by_id(&records)["001X"].fields,
        json!({"Id": "001X", "Owner.Email": null, "ARR__c": null})
    );
}

#[tokio::test]
async fn auth_failures_name_the_setting_and_hide_secrets() {
    let (_sim, server) = start(SalesforceSimConfig {
        username: "someone-else@example.com".into(),
        ..sim_config()
    })
    .await;
    let conn = connector(&server, JWT, "", None);
    let e = drain(&conn, spec(&["Id"], None, None)).await.unwrap_err();
    assert!(matches!(e, ConnectorError::Auth { .. }), "{e}");
    assert!(e.to_string().contains("salesforce.username"), "{e}");

    let bad_secret = CLIENT.replace("sim-client-secret", "wrong-secret-value");
    let conn = connector(&server, &bad_secret, "", None);
    let e = drain(&conn, spec(&["Id"], None, None)).await.unwrap_err();
    let text = e.to_string();
    assert!(matches!(e, ConnectorError::Auth { .. }), "{text}");
    assert!(text.contains("salesforce.client_secret"), "{text}");
    assert!(!text.contains("wrong-secret-value"), "{text}");
    // check() reports a failed login as a finding, not an error.
    let s = spec(&["Id"], None, None);
    let findings = conn.check(&s).await.unwrap();
    assert_eq!(findings.len(), 1);
    assert!(!findings[0].ok && findings[0].subject == "salesforce login");
}

#[tokio::test]
async fn client_credentials_login_pulls() {
    let (sim, server) = start(sim_config()).await;
    sim.seed_demo(10, 0);
    let conn = connector(&server, CLIENT, "", None);
    let (records, _, _) = drain(&conn, spec(&["Id", "Plan_Tier__c"], None, None))
        .await
        .unwrap();
    assert_eq!(records.len(), 10);
}

#[tokio::test]
async fn rotated_refresh_token_is_kept_in_the_store_and_used_next_time() {
    let (sim, server) = start(SalesforceSimConfig {
        rotate_refresh_token: true,
        ..sim_config()
    })
    .await;
    sim.seed_demo(3, 0);
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("state.db")).await.unwrap();

    let conn = connector(&server, REFRESH, "", Some(store.clone()));
    assert_eq!(
        drain(&conn, spec(&["Id"], None, None))
            .await
            .unwrap()
            .0
            .len(),
        3
    );
    let rotated = sim.current_refresh_token();
    assert_ne!(rotated, "sim-refresh-token", "the sim rotated the token");
    assert_eq!(
        store.kv_get("salesforce.refresh_token").await.unwrap(),
        Some(Value::String(rotated.clone()))
    );
    assert!(
        !format!("{conn:?}").contains(&rotated),
        "Debug must not show the refresh token"
    );

    // A restart: a new connector with the (now invalid) configured token logs in with the kept one.
    let restarted = connector(&server, REFRESH, "", Some(store.clone()));
    assert_eq!(
        drain(&restarted, spec(&["Id"], None, None))
            .await
            .unwrap()
            .0
            .len(),
        3
    );
    // Without the store, the configured token has been rotated out.
    let forgetful = connector(&server, REFRESH, "", None);
    let e = drain(&forgetful, spec(&["Id"], None, None))
        .await
        .unwrap_err();
    assert!(matches!(e, ConnectorError::Auth { .. }), "{e}");
    assert!(e.to_string().contains("salesforce.refresh_token"), "{e}");
}

/// Issue 22 item 7: two processes share the state file (the leader, and a standby whose "Check
/// live" logs in, or `check`, or `why --live`). The standby's login rotates the refresh token,
/// so the one the leader last saw is dead; the leader's next login must use the token the
/// standby stored, not fail with `invalid_grant` on every cycle until a restart.
#[tokio::test]
async fn relogin_uses_the_refresh_token_another_process_rotated() {
    let (sim, server) = start(SalesforceSimConfig {
        rotate_refresh_token: true,
        ..sim_config()
    })
    .await;
    sim.seed_demo(3, 0);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    // Like two processes: each opens the state file and builds its connector from the same
    // settings.
    let leader_store = Store::open(&path).await.unwrap();
    let leader = connector(&server, REFRESH, "", Some(leader_store.clone()));
    let standby = connector(
        &server,
        REFRESH,
        "",
        Some(Store::open(&path).await.unwrap()),
    );

    assert_eq!(
        drain(&leader, spec(&["Id"], None, None))
            .await
            .unwrap()
            .0
            .len(),
        3
    );
    let seen_by_leader = sim.current_refresh_token();
    assert_ne!(
        seen_by_leader, "sim-refresh-token",
        "the sim rotated the token"
    );

    // The standby's "Check live" logs in, rotating the token the leader last saw out.
    let s = spec(&["Id"], None, None);
    let findings = standby.check(&s).await.unwrap();
    assert!(
        findings[0].ok && findings[0].subject == "salesforce login",
        "{}: {}",
        findings[0].subject,
        findings[0].detail
    );
    let rotated = sim.current_refresh_token();
    assert_ne!(
        rotated, seen_by_leader,
        "the standby's login rotated the token"
    );
    assert_eq!(
        leader_store
            .kv_get("salesforce.refresh_token")
            .await
            .unwrap(),
        Some(Value::String(rotated.clone())),
        "the standby stored the rotated token"
    );

    // The leader's session expires; its next pull logs in again with the standby's token.
    sim.expire_tokens();
    let (records, _, _) = drain(&leader, spec(&["Id"], None, None))
        .await
        .expect("the leader logs in again with the token the standby stored");
    assert_eq!(records.len(), 3);
    assert_eq!(
        count(&sim, "POST", "/services/oauth2/token"),
        3,
        "leader, standby, leader again: no refused attempt with the stale token first"
    );
    let newest = sim.current_refresh_token();
    assert_ne!(
        newest, rotated,
        "the leader's login rotated the token again"
    );
    assert_eq!(
        leader_store
            .kv_get("salesforce.refresh_token")
            .await
            .unwrap(),
        Some(Value::String(newest)),
        "the leader stored the token its login got"
    );
}

/// The state as read just before another process rotated the token: the first read of the
/// refresh token answers `stale`, later reads (and every write) go to the state file.
struct RotatedAfterFirstRead {
    inner: crate::connectors::SharedKv,
    stale: std::sync::Mutex<Option<Value>>,
}

impl crate::connectors::StateKv for RotatedAfterFirstRead {
    fn get<'a>(
        &'a self,
        key: &'a str,
    ) -> crate::connectors::BoxFuture<'a, Result<Option<Value>, String>> {
        let stale = if key == "salesforce.refresh_token" {
            self.stale.lock().unwrap().take()
        } else {
            None
        };
        Box::pin(async move {
            match stale {
                Some(v) => Ok(Some(v)),
                None => self.inner.get(key).await,
            }
        })
    }

    fn set<'a>(
        &'a self,
        key: &'a str,
        value: &'a Value,
    ) -> crate::connectors::BoxFuture<'a, Result<(), String>> {
        self.inner.set(key, value)
    }
}

/// Another process rotates the token between this process reading it and Salesforce receiving
/// it: the `invalid_grant` makes the login read the state again and retry once with the newer
/// token. A token that is simply refused (the state holds nothing newer) is not retried.
#[tokio::test]
async fn refused_refresh_token_is_read_again_and_retried_once_if_another_process_rotated_it() {
    let (sim, server) = start(SalesforceSimConfig {
        rotate_refresh_token: true,
        ..sim_config()
    })
    .await;
    sim.seed_demo(3, 0);
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("state.db")).await.unwrap();

    let first = connector(&server, REFRESH, "", Some(store.clone()));
    drain(&first, spec(&["Id"], None, None)).await.unwrap();
    let read_by_us = sim.current_refresh_token();
    // Another process logs in with the stored token and rotates it...
    let other = connector(&server, REFRESH, "", Some(store.clone()));
    drain(&other, spec(&["Id"], None, None)).await.unwrap();
    let rotated = sim.current_refresh_token();
    assert_ne!(rotated, read_by_us, "the other login rotated the token");
    // ...after this process read it.
    let kv = RotatedAfterFirstRead {
        inner: std::sync::Arc::new(store.clone()),
        stale: std::sync::Mutex::new(Some(Value::String(read_by_us))),
    };
    let racing = SalesforceConnector::new(
        &settings(&server.url(), REFRESH, ""),
        Some(std::sync::Arc::new(kv) as crate::connectors::SharedKv),
    )
    .expect("connector builds")
    .with_backoff(Duration::from_millis(5));
    let before = count(&sim, "POST", "/services/oauth2/token");
    let (records, _, _) = drain(&racing, spec(&["Id"], None, None))
        .await
        .expect("the refused login is retried with the newer stored token");
    assert_eq!(records.len(), 3);
    assert_eq!(
        count(&sim, "POST", "/services/oauth2/token"),
        before + 2,
        "one refused attempt, one retry"
    );
    let newest = sim.current_refresh_token();
    assert_ne!(newest, rotated);
    assert_eq!(
        store.kv_get("salesforce.refresh_token").await.unwrap(),
        Some(Value::String(newest))
    );

    // A revoked token with nothing newer in the state: refused once, no retry.
    store
        .kv_set(
            "salesforce.refresh_token",
            &Value::String("revoked-token".into()),
        )
        .await
        .unwrap();
    let revoked = connector(&server, REFRESH, "", Some(store.clone()));
    let before = count(&sim, "POST", "/services/oauth2/token");
    let e = drain(&revoked, spec(&["Id"], None, None))
        .await
        .unwrap_err();
    assert!(matches!(e, ConnectorError::Auth { .. }), "{e}");
    assert!(e.to_string().contains("invalid_grant"), "{e}");
    assert_eq!(
        count(&sim, "POST", "/services/oauth2/token"),
        before + 1,
        "the same token is not retried"
    );
}

#[tokio::test]
async fn token_expiry_mid_pull_logs_in_again_once_and_loses_nothing() {
    let (sim, server) = start(SalesforceSimConfig {
        page_size: 100,
        ..sim_config()
    })
    .await;
    sim.seed_demo(350, 0);
    let conn = connector(&server, JWT, "", None);
    let mut pull = conn.pull(spec(&["Id"], None, None)).await.unwrap();
    let mut ids: Vec<String> = pull
        .next_page()
        .await
        .unwrap()
        .unwrap()
        .records
        .into_iter()
        .map(|r| r.crm_id)
        .collect();
    sim.expire_tokens();
    while let Some(page) = pull.next_page().await.unwrap() {
        ids.extend(page.records.into_iter().map(|r| r.crm_id));
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 350);
    assert_eq!(
        count(&sim, "POST", "/services/oauth2/token"),
        2,
        "exactly one re-login"
    );
    assert_eq!(sim.requests().iter().filter(|r| r.2 == 401).count(), 1);
}

#[tokio::test]
async fn three_thousand_records_sharing_a_modstamp_all_arrive_even_after_a_crash() {
    let (sim, server) = start(sim_config()).await;
    let ts = Utc.with_ymd_and_hms(2026, 11, 1, 10, 0, 0).unwrap();
    for i in 0..3000 {
        sim.upsert_at(
            "Account",
            &account_id(i),
            json!({"Name": format!("A{i}")}),
            ts,
        );
    }
    let conn = connector(&server, JWT, "", None);
    let (records, _, pages) = drain(&conn, spec(&["Id"], None, None)).await.unwrap();
    assert_eq!((by_id(&records).len(), pages), (3000, 2));

    // Crash after the first page: its watermark is all the engine kept. The next pull must
    // still deliver the 1,000 records of the tie group that page one did not carry.
    let mut pull = conn.pull(spec(&["Id"], None, None)).await.unwrap();
    let first = pull.next_page().await.unwrap().unwrap();
    drop(pull);
    let delivered: std::collections::BTreeSet<String> =
        first.records.iter().map(|r| r.crm_id.clone()).collect();
    let (again, wm, _) = drain(&conn, spec(&["Id"], None, first.watermark.clone()))
        .await
        .unwrap();
    let missing = (0..3000)
        .map(account_id)
        .filter(|id| !delivered.contains(id));
    let again = by_id(&again);
    assert!(
        missing.clone().count() == 1000 && missing.into_iter().all(|id| again.contains_key(&id))
    );
    let cursor =
        |w: &Option<Watermark>| super::soql::Cursor::from_watermark(w.as_ref().unwrap()).unwrap();
    assert!(
        cursor(&wm) >= cursor(&first.watermark),
        "watermarks never move backward"
    );
}

#[tokio::test]
async fn a_record_changed_during_a_pull_arrives_next_cycle() {
    let (sim, server) = start(SalesforceSimConfig {
        page_size: 100,
        ..sim_config()
    })
    .await;
    let base = Utc::now() - chrono::Duration::hours(2);
    for i in 0..300 {
        let at = base + chrono::Duration::seconds(i as i64);
        sim.upsert_at(
            "Account",
            &account_id(i),
            json!({"Plan_Tier__c": "Starter"}),
            at,
        );
    }
    let conn = connector(&server, JWT, "", None);
    let mut pull = conn
        .pull(spec(&["Id", "Plan_Tier__c"], None, None))
        .await
        .unwrap();
    let mut wm = pull.next_page().await.unwrap().unwrap().watermark;
    // Change a record already delivered, and one still to come in this pull's snapshot.
    sim.set_field(
        "Account",
        &account_id(5),
        "Plan_Tier__c",
        json!("Enterprise"),
    );
    sim.set_field("Account", &account_id(250), "Plan_Tier__c", json!("Growth"));
    while let Some(page) = pull.next_page().await.unwrap() {
        wm = page.watermark.or(wm);
    }
    drop(pull);
    let (next, _, _) = drain(&conn, spec(&["Id", "Plan_Tier__c"], None, wm))
        .await
        .unwrap();
    let next = by_id(&next);
    assert_eq!(next[&account_id(5)].fields["Plan_Tier__c"], "Enterprise");
    assert_eq!(next[&account_id(250)].fields["Plan_Tier__c"], "Growth");
    assert!(
        next.len() <= 3,
        "the incremental pull reads only what changed, got {}",
        next.len()
    );
}

#[tokio::test]
async fn deleted_records_arrive_flagged() {
    let (sim, server) = start(sim_config()).await;
    sim.seed_demo(5, 0);
    let conn = connector(&server, JWT, "", None);
    let (_, wm, _) = drain(&conn, spec(&["Id"], None, None)).await.unwrap();
    sim.delete("Account", &account_id(2));
    let (records, _, _) = drain(&conn, spec(&["Id"], None, wm)).await.unwrap();
    let rec = &by_id(&records)[&account_id(2)];
    assert!(rec.deleted);
    assert_eq!(rec.fields["Id"], account_id(2));
}

#[tokio::test]
async fn fetch_reads_one_record_as_a_pull_does() {
    let (sim, server) = start(sim_config()).await;
    sim.seed_demo(3, 0);
    sim.delete("Account", &account_id(2));
    let conn = connector(&server, JWT, "", None);
    let fields = ["Id", "ARR__c", "Owner.Email"];
    let (pulled, _, _) = drain(&conn, spec(&fields, None, None)).await.unwrap();
    // The mapping's filter would exclude every seeded account: fetch ignores it.
    let s = spec(&fields, Some("Type = 'Prospect'"), None);
    let live = conn
        .fetch(&s, &account_id(1))
        .await
        .unwrap()
        .expect("found");
    assert_eq!(
        live,
        by_id(&pulled)[&account_id(1)],
        "same record as the pull's"
    );
    assert_eq!(live.fields["Owner.Email"], json!("owner1@example.com"));
    assert!(live.modified_at.is_some() && !live.deleted);
    let gone = conn
        .fetch(&s, &account_id(2))
        .await
        .unwrap()
        .expect("in the recycle bin");
    assert!(gone.deleted);
    assert_eq!(conn.fetch(&s, "001SIM999999999999").await.unwrap(), None);
    let sent = count(&sim, "GET", "/queryAll");
    for bad in ["001SIM0000000000'1", "001SIM00000000 001", "001X", ""] {
        assert_eq!(conn.fetch(&s, bad).await.unwrap(), None, "{bad:?}");
    }
    assert_eq!(
        count(&sim, "GET", "/queryAll"),
        sent,
        "no request for a non-id"
    );
}

#[tokio::test]
async fn daily_budget_pauses_the_pull_and_resumes_when_usage_drops() {
    let (sim, server) = start(SalesforceSimConfig {
        page_size: 100,
        daily_limit: 1000,
        ..sim_config()
    })
    .await;
    sim.seed_demo(300, 0);
    sim.set_api_usage(600);
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("state.db")).await.unwrap();
    let conn = connector(
        &server,
        JWT,
        "max_daily_api_percent = 50",
        Some(store.clone()),
    );

    let mut pull = conn.pull(spec(&["Id"], None, None)).await.unwrap();
    // Pages are served while no reading says otherwise; the first answer reports 60%.
    let mut got = 0;
    let err = loop {
        match pull.next_page().await {
            Ok(Some(p)) => got += p.records.len(),
            Ok(None) => panic!("the pull should have paused"),
            Err(e) => break e,
        }
    };
    drop(pull);
    assert!(got < 300);
    match &err {
        ConnectorError::RateLimited { message, wait, .. } => {
            assert!(
                message.contains("salesforce.max_daily_api_percent"),
                "{message}"
            );
            assert!(*wait >= Duration::from_secs(60));
        }
        other => panic!("expected RateLimited, got {other}"),
    }
    let (used, limit) = conn.quota().unwrap();
    assert_eq!(limit, 1000);
    assert!(used >= 600);
    let kept = store.kv_get(QUOTA_KEY).await.unwrap().expect("quota kept");
    assert_eq!(kept["limit"], 1000);
    let sent_while_paused = sim.api_usage().0;

    // Still over: a new pull sends no counted request.
    assert!(drain(&conn, spec(&["Id"], None, None)).await.is_err());
    assert_eq!(sim.api_usage().0, sent_while_paused);

    // The rolling window frees up: the next cycle resumes.
    sim.set_api_usage(100);
    let (records, _, _) = drain(&conn, spec(&["Id"], None, None)).await.unwrap();
    assert_eq!(records.len(), 300);
}

#[tokio::test]
async fn request_limit_exceeded_waits_then_succeeds_or_gives_up() {
    let (sim, server) = start(sim_config()).await;
    sim.seed_demo(5, 0);
    let limited =
        r#"[{"message":"TotalRequests Limit exceeded.","errorCode":"REQUEST_LIMIT_EXCEEDED"}]"#;
    sim.set_fault(SalesforceFault {
        forced: vec![(403, limited.to_owned()); 2].into(),
        ..SalesforceFault::default()
    });
    let conn = connector(&server, JWT, "", None);
    let (records, _, _) = drain(&conn, spec(&["Id"], None, None)).await.unwrap();
    assert_eq!(records.len(), 5);
    assert_eq!(sim.requests().iter().filter(|r| r.2 == 403).count(), 2);

    sim.set_fault(SalesforceFault {
        forced: vec![(403, limited.to_owned()); 10].into(),
        ..SalesforceFault::default()
    });
    let e = drain(&conn, spec(&["Id"], None, None)).await.unwrap_err();
    assert!(matches!(e, ConnectorError::RateLimited { .. }), "{e}");
}

#[tokio::test]
async fn server_errors_retry_and_html_answers_are_protocol_errors() {
    let (sim, server) = start(sim_config()).await;
    sim.seed_demo(5, 0);
    let conn = connector(&server, JWT, "", None);
    sim.set_fault(SalesforceFault {
        forced: vec![(503, "<html>down</html>".to_owned()); 2].into(),
        ..SalesforceFault::default()
    });
    assert_eq!(
        drain(&conn, spec(&["Id"], None, None))
            .await
            .unwrap()
            .0
            .len(),
        5
    );

    sim.set_fault(SalesforceFault {
        forced: vec![(500, "oops".to_owned()); 10].into(),
        ..SalesforceFault::default()
    });
    let e = drain(&conn, spec(&["Id"], None, None)).await.unwrap_err();
    assert!(matches!(e, ConnectorError::Transient { .. }), "{e}");

    sim.set_fault(SalesforceFault {
        forced: vec![(200, "<html><body>Maintenance</body></html>".to_owned())].into(),
        ..SalesforceFault::default()
    });
    let e = drain(&conn, spec(&["Id"], None, None)).await.unwrap_err();
    assert!(matches!(e, ConnectorError::Protocol { .. }), "{e}");
    assert!(e.to_string().contains("Maintenance"), "{e}");
}

#[tokio::test]
async fn query_timeout_narrows_the_window() {
    let (sim, server) = start(sim_config()).await;
    let base = Utc::now() - chrono::Duration::hours(10);
    for i in 0..20 {
        sim.upsert_at(
            "Account",
            &account_id(i),
            json!({}),
            base + chrono::Duration::minutes(30 * i as i64),
        );
    }
    let conn = connector(&server, JWT, "", None);
    let timeout = r#"[{"message":"Your query request was running for too long.","errorCode":"QUERY_TIMEOUT"}]"#;
    sim.set_fault(SalesforceFault {
        forced: vec![(400, timeout.to_owned()); 2].into(),
        ..SalesforceFault::default()
    });
    let since = super::soql::Cursor {
        ts: base - chrono::Duration::hours(1),
        id: String::new(),
    }
    .to_watermark();
    let (records, _, _) = drain(&conn, spec(&["Id"], None, Some(since)))
        .await
        .unwrap();
    assert_eq!(
        by_id(&records).len(),
        20,
        "the narrowed windows together cover everything"
    );
}

#[tokio::test]
async fn a_missing_field_is_named_by_check_and_fails_the_pull_as_a_mapping_error() {
    let (sim, server) = start(sim_config()).await;
    sim.seed_demo(3, 0);
    let conn = connector(&server, JWT, "", None);
    let s = spec(
        &[
            "Id",
            "ARR__c",
            "Owner.Email",
            "Plan_Tier_X__c",
            "Owner.Nope",
        ],
        None,
        None,
    );
    let findings = conn.check(&s).await.unwrap();
    let by: HashMap<&str, _> = findings.iter().map(|f| (f.subject.as_str(), f)).collect();
    assert!(by["salesforce login"].ok);
    assert!(by["Account.ARR__c"].ok && by["Account.Owner.Email"].ok);
    assert!(!by["Account.Plan_Tier_X__c"].ok);
    assert_eq!(
        by["Account.Plan_Tier_X__c"].detail,
        "Account has no field Plan_Tier_X__c"
    );
    assert_eq!(by["Account.Owner.Nope"].detail, "User has no field Nope");

    let e = drain(&conn, s).await.unwrap_err();
    match e {
        ConnectorError::Mapping {
            mapping, message, ..
        } => {
            assert_eq!(mapping, "sf-accounts");
            assert!(
                message.contains("No such column 'Plan_Tier_X__c'"),
                "{message}"
            );
        }
        other => panic!("expected Mapping, got {other}"),
    }
}

#[tokio::test]
async fn bulk_full_pull_returns_the_same_records_as_rest() {
    let (sim, server) = start(sim_config()).await;
    sim.seed_demo(120, 0);
    sim.upsert(
        "Account",
        "001Q",
        json!({"Name": "Quote \"and\", comma\nnewline", "Type": "Customer"}),
    );
    sim.delete("Account", &account_id(3));
    let fields = ["Id", "Name", "ARR__c", "Owner.Email", "Strategic__c"];
    let rest_conn = connector(&server, JWT, "", None);
    let bulk_conn = connector(&server, JWT, "bulk_threshold = 50", None);
    let (rest, rest_wm, _) = drain(&rest_conn, spec(&fields, Some("Type = 'Customer'"), None))
        .await
        .unwrap();
    assert_eq!(count(&sim, "POST", "/jobs/query"), 0);
    let (bulk, bulk_wm, _) = drain(&bulk_conn, spec(&fields, Some("Type = 'Customer'"), None))
        .await
        .unwrap();
    assert_eq!(
        count(&sim, "POST", "/jobs/query"),
        1,
        "the big full pull went through Bulk 2.0"
    );
    assert_eq!(rest_wm, bulk_wm);
    let (rest, bulk) = (by_id(&rest), by_id(&bulk));
    assert_eq!(
        rest.keys().collect::<Vec<_>>(),
        bulk.keys().collect::<Vec<_>>()
    );
    assert!(bulk[&account_id(3)].deleted);
    // CSV values are strings; they must say the same thing REST's typed values do.
    let as_text = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        Value::Number(n) => n.as_f64().unwrap().to_string(),
        other => other.to_string(),
    };
    for (id, r) in &rest {
        let b = &bulk[id];
        assert_eq!(r.deleted, b.deleted);
        for f in fields {
            let (rv, bv) = (&r.fields[f], &b.fields[f]);
            let bv = bv.as_str().map(|s| {
                s.parse::<f64>()
                    .map(|n| n.to_string())
                    .unwrap_or(s.to_owned())
            });
            assert_eq!(as_text(rv), bv.unwrap_or_default(), "{id} {f}");
        }
    }
}

#[tokio::test]
async fn secrets_never_appear_in_debug_or_errors() {
    let (sim, server) = start(sim_config()).await;
    sim.seed_demo(2, 0);
    let conn = connector(&server, JWT, "", None);
    drain(&conn, spec(&["Id"], None, None)).await.unwrap();
    let key_line = PRIVATE_KEY.lines().nth(1).unwrap();
    let cc = connector(&server, CLIENT, "", None);
    drain(&cc, spec(&["Id"], None, None)).await.unwrap();
    for dbg in [format!("{conn:?}"), format!("{cc:?}")] {
        assert!(!dbg.contains(key_line), "{dbg}");
        assert!(!dbg.contains("sim-client-secret"), "{dbg}");
        assert!(!dbg.contains("00DSIM"), "no access token: {dbg}");
        assert!(dbg.contains("SalesforceConnector"));
    }
    // An error after a failed re-login carries no token either.
    sim.set_fault(SalesforceFault {
        forced: vec![
            (
                401,
                r#"[{"message":"no","errorCode":"INVALID_SESSION_ID"}]"#.into()
            );
            2
        ]
        .into(),
        ..SalesforceFault::default()
    });
    let e = drain(&cc, spec(&["Id"], None, None))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        !e.contains("00DSIM") && !e.contains("sim-client-secret"),
        "{e}"
    );
}

#[test]
fn limit_info_is_parsed_tolerantly() {
    assert_eq!(
        parse_limit_info("api-usage=10018/100000"),
        Some((10018, 100000))
    );
    assert_eq!(
        parse_limit_info("api-usage=18/5000; api-bursts=1/750"),
        Some((18, 5000))
    );
    assert_eq!(
        parse_limit_info("per-app-api-usage=17/250(appName=x); api-usage=25/5000"),
        Some((25, 5000))
    );
    assert_eq!(parse_limit_info("api-bursts=1/750"), None);
}

#[tokio::test]
async fn jwt_audience_is_the_production_login_host_not_the_login_url() {
    // The sim checks `aud` as production Salesforce does; the token is requested from a
    // loopback login_url (as from a My Domain), which must not become the audience.
    let (sim, server) = start(SalesforceSimConfig {
        jwt_audience: "https://login.salesforce.com".into(),
        ..sim_config()
    })
    .await;
    sim.seed_demo(3, 0);
    let conn = connector(&server, JWT, "", None);
    assert_eq!(conn.jwt_audience, "https://login.salesforce.com");
    let (records, _, _) = drain(&conn, spec(&["Id"], None, None)).await.unwrap();
    assert_eq!(records.len(), 3);
    assert_eq!(count(&sim, "POST", "/services/oauth2/token"), 1);
    assert!(sim.requests().iter().all(|r| r.2 == 200));
}

#[tokio::test]
async fn a_configured_jwt_audience_wins_and_a_refused_one_names_the_key() {
    // A sandbox reached through a host that does not say so (here: loopback).
    let (sim, server) = start(SalesforceSimConfig {
        jwt_audience: "https://test.salesforce.com".into(),
        ..sim_config()
    })
    .await;
    sim.seed_demo(2, 0);
    let derived = connector(&server, JWT, "", None);
    let e = drain(&derived, spec(&["Id"], None, None))
        .await
        .unwrap_err();
    let text = e.to_string();
    assert!(matches!(e, ConnectorError::Auth { .. }), "{text}");
    assert!(
        text.contains("invalid_grant: audience is invalid"),
        "{text}"
    );
    assert!(text.contains("salesforce.jwt_audience"), "{text}");

    let set = connector(
        &server,
        JWT,
        "jwt_audience = \"https://test.salesforce.com/\"",
        None,
    );
    assert_eq!(set.jwt_audience, "https://test.salesforce.com");
    let (records, _, _) = drain(&set, spec(&["Id"], None, None)).await.unwrap();
    assert_eq!(records.len(), 2);
}

#[tokio::test]
async fn jwt_audience_follows_the_kind_of_org() {
    use super::auth::{PRODUCTION_AUDIENCE, SANDBOX_AUDIENCE, jwt_audience_for};
    let aud = |u: &str| jwt_audience_for(&url::Url::parse(u).unwrap());
    for prod in [
        "https://login.salesforce.com",
        "https://acme.my.salesforce.com",
        "https://sandboxco.my.salesforce.com",
        "http://127.0.0.1:9101",
        "https://my-co.my.salesforce.com",
        "https://acme-dev-ed.my.salesforce.com",
        "https://na42.salesforce.com",
        "https://acme.develop.my.salesforce.com",
        // Only Salesforce's own hosts: the sandbox patterns are anchored at the end.
        "https://acme--uat.my.salesforce.com.example.test",
        "https://cs42.salesforce.com.example.test",
        "https://usa2.sfdc-abc.salesforce.com",
    ] {
        assert_eq!(aud(prod), PRODUCTION_AUDIENCE, "{prod}");
    }
    for sandbox in [
        "https://test.salesforce.com",
        "https://TEST.Salesforce.com/",
        "https://acme--uat.sandbox.my.salesforce.com",
        "https://acme--dev.sandbox.my.salesforce.com/services/oauth2/token",
        // Sandboxes without enhanced domains (as sfdx-core's isSandboxUrl decides).
        "https://acme--uat.my.salesforce.com",
        "https://ACME--UAT.my.salesforce.com/",
        "https://my-co--dev.my.salesforce.com",
        "https://acme--uat.cs42.my.salesforce.com",
        "https://acme.cs42.my.salesforce.com",
        "https://cs42.salesforce.com",
        "https://cs108.force.com",
        "https://usa2s.sfdc-abc.salesforce.com",
        "https://acme--uat.sandbox.my.salesforce.mil",
    ] {
        assert_eq!(aud(sandbox), SANDBOX_AUDIENCE, "{sandbox}");
    }
    assert_eq!(PRODUCTION_AUDIENCE, "https://login.salesforce.com");
    assert_eq!(SANDBOX_AUDIENCE, "https://test.salesforce.com");

    // The connector uses the derivation, unless salesforce.jwt_audience is set.
    let build = |login: &str, extra: &str| {
        SalesforceConnector::new(&settings(login, JWT, extra), None)
            .unwrap()
            .jwt_audience
    };
    assert_eq!(
        build("https://acme--uat.sandbox.my.salesforce.com", ""),
        SANDBOX_AUDIENCE
    );
    assert_eq!(
        build("https://acme--uat.my.salesforce.com", ""),
        SANDBOX_AUDIENCE
    );
    assert_eq!(
        build("https://acme.my.salesforce.com", ""),
        PRODUCTION_AUDIENCE
    );
    assert_eq!(
        build(
            "https://acme.my.salesforce.com",
            "jwt_audience = \"https://acme.my.site.com/partners\""
        ),
        "https://acme.my.site.com/partners"
    );

    // A bad value is a config error naming the key.
    for bad in ["login.salesforce.com", "ftp://login.salesforce.com", ""] {
        let text = settings_text(
            "https://login.salesforce.com",
            JWT,
            &format!("jwt_audience = \"{bad}\""),
        );
        let e = Settings::from_toml_with_env(&text, HashMap::new()).unwrap_err();
        assert_eq!(e.key, "salesforce.jwt_audience", "{bad:?}: {e}");
    }
}
