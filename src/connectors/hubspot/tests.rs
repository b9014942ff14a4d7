//! The HubSpot connector against the HubSpot simulator over real HTTP: paging, the search cap,
//! ties, rate limits, owners, archived records, dated paths, OAuth and `check`.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use serde_json::{Value, json};

use super::{HubspotConnector, OWNER_CACHE_MAX_AGE};
use crate::config::{HubspotSettings, Settings, Transform};
use crate::connectors::{Connector, ConnectorError, FieldRequest, PullSpec, RawRecord, Watermark};
use crate::sim::SimServer;
use crate::sim::hubspot::{HubspotSim, HubspotSimConfig, SimFaults, SimOauth};
use crate::store::Store;

const TOKEN: &str = "pat-na1-test-secret-token";

fn settings(url: &str, extra: &str) -> HubspotSettings {
    let auth = if extra.contains("auth = \"oauth\"") {
        String::new()
    } else {
        format!("access_token = \"{TOKEN}\"")
    };
    let text = format!(
        r#"
[state]
path = "/tmp/unused-hubspot-test.db"
[pendo]
integration_key = "pendo-key"
[hubspot]
base_url = "{url}"
{auth}
{extra}
[[mappings]]
name = "hs-contacts"
source = "hubspot"
object = "contacts"
kind = "visitor"
id = "email"
  [mappings.fields]
  lifecyclestage = {{ from = "lifecyclestage", type = "string" }}
"#
    );
    let s = Settings::from_toml_with_env(&text, HashMap::new()).expect("test config loads");
    s.hubspot.expect("hubspot section")
}

fn sim_config() -> HubspotSimConfig {
    HubspotSimConfig {
        access_token: TOKEN.into(),
        requests_per_10s: 0,
        search_per_second: 0,
        ..HubspotSimConfig::default()
    }
}

/// A sim and a connector with generous limits (`extra` lines go into `[hubspot]`).
async fn setup(
    cfg: HubspotSimConfig,
    extra: &str,
    store: Option<Store>,
) -> (HubspotSim, SimServer, HubspotConnector) {
    let sim = HubspotSim::new(cfg);
    let server = sim
        .start("127.0.0.1:0".parse().unwrap())
        .await
        .expect("sim starts");
    let extra = if extra.contains("requests_per_10s") {
        extra.to_owned()
    } else {
        format!("requests_per_10s = 1000\nsearch_requests_per_second = 100\n{extra}")
    };
    let conn = HubspotConnector::new(
        &settings(&server.url(), &extra),
        store.map(|s| std::sync::Arc::new(s) as crate::connectors::SharedKv),
    )
    .expect("connector builds");
    (sim, server, conn)
}

fn spec(object: &str, fields: &[(&str, Option<Transform>)], since: Option<Watermark>) -> PullSpec {
    PullSpec {
        mapping: "hs-test".into(),
        object: object.into(),
        fields: fields
            .iter()
            .map(|(p, t)| FieldRequest {
                path: (*p).into(),
                transform: *t,
            })
            .collect(),
        filter: None,
        since,
        overlap: Duration::ZERO,
    }
}

fn mark(ms: i64) -> Watermark {
    Watermark(json!({"ms": ms, "id": "0"}).to_string())
}

fn mark_ms(w: &Watermark) -> (i64, u64) {
    let v: Value = serde_json::from_str(&w.0).expect("watermark is JSON");
    (
        v["ms"].as_i64().unwrap(),
        v["id"].as_str().unwrap().parse().unwrap(),
    )
}

/// Drains a pull: every record, and every watermark in order.
async fn drain(
    conn: &HubspotConnector,
    spec: PullSpec,
) -> Result<(Vec<RawRecord>, Vec<Watermark>), ConnectorError> {
    let mut pull = conn.pull(spec).await?;
    let (mut records, mut marks) = (Vec::new(), Vec::new());
    while let Some(page) = pull.next_page().await? {
        records.extend(page.records);
        marks.extend(page.watermark);
    }
    Ok((records, marks))
}

fn ids(records: &[RawRecord]) -> BTreeSet<u64> {
    records.iter().map(|r| r.crm_id.parse().unwrap()).collect()
}

fn assert_marks_ordered(marks: &[Watermark], start: (i64, u64)) {
    let mut prev = start;
    for m in marks {
        let m = mark_ms(m);
        assert!(m >= prev, "watermark moved backward: {prev:?} -> {m:?}");
        prev = m;
    }
}

const T0: i64 = 1_760_000_000_000;

#[tokio::test]
async fn more_than_10k_changes_since_the_watermark_all_arrive() {
    let (sim, _server, conn) = setup(sim_config(), "", None).await;
    // An old record before the watermark, then 10,150 changes at distinct times.
    sim.upsert_at(
        "contacts",
        1,
        json!({"email": "old@x.io"}),
        (T0 - 60_000) as u64,
    );
    for i in 0..10_150u64 {
        sim.upsert_at(
            "contacts",
            100 + i,
            json!({"email": format!("c{i}@x.io")}),
            T0 as u64 + i,
        );
    }
    let (records, marks) = drain(&conn, spec("contacts", &[("email", None)], Some(mark(T0))))
        .await
        .unwrap();
    let got = ids(&records);
    assert_eq!(got, (100..10_250).collect::<BTreeSet<u64>>());
    assert_marks_ordered(&marks, (T0, 0));
    assert_eq!(mark_ms(marks.last().unwrap()), (T0 + 10_149, 10_249));
    // The search offset never reached the cap (it would have answered 400).
    assert!(sim.requests().iter().all(|r| r.status == 200));
}

#[tokio::test]
async fn more_than_10k_records_sharing_one_timestamp_all_arrive() {
    let (sim, _server, conn) = setup(sim_config(), "", None).await;
    for i in 0..10_250u64 {
        sim.upsert_at(
            "contacts",
            1_000 + i,
            json!({"email": format!("t{i}@x.io")}),
            T0 as u64,
        );
    }
    for i in 0..30u64 {
        sim.upsert_at(
            "contacts",
            50 + i,
            json!({"email": format!("late{i}@x.io")}),
            T0 as u64 + 5 + i,
        );
    }
    let (records, marks) = drain(
        &conn,
        spec("contacts", &[("email", None)], Some(mark(T0 - 1))),
    )
    .await
    .unwrap();
    let want: BTreeSet<u64> = (1_000..11_250).chain(50..80).collect();
    assert_eq!(ids(&records), want);
    assert_marks_ordered(&marks, (T0 - 1, 0));
    assert_eq!(mark_ms(marks.last().unwrap()).0, T0 + 34);
}

#[tokio::test]
async fn ties_across_pages_arrive_with_a_small_search_cap() {
    let cfg = HubspotSimConfig {
        search_cap: 600,
        ..sim_config()
    };
    let (sim, _server, conn) = setup(cfg, "", None).await;
    // Groups of 150 records sharing a timestamp straddle the 200-record pages; 2,400 records
    // are four times the (shrunk) cap.
    for i in 0..2_400u64 {
        sim.upsert_at(
            "companies",
            10_000 + i,
            json!({"name": format!("co{i}")}),
            T0 as u64 + i / 150,
        );
    }
    let (records, marks) = drain(&conn, spec("companies", &[("name", None)], Some(mark(T0))))
        .await
        .unwrap();
    assert_eq!(ids(&records), (10_000..12_400).collect::<BTreeSet<u64>>());
    assert_marks_ordered(&marks, (T0, 0));
    // The search used the companies cursor property.
    assert!(
        sim.requests()
            .iter()
            .any(|r| r.path == "/crm/v3/objects/companies/search")
    );
    assert!(sim.requests().iter().all(|r| r.status == 200));
    // Names pass through as strings.
    assert!(records.iter().all(|r| r.fields["name"].is_string()));
}

/// The most requests in any window of `window_ms` among `times`.
fn max_in_window(times: &[u64], window_ms: u64) -> usize {
    times
        .iter()
        .map(|t| {
            times
                .iter()
                .filter(|u| **u >= *t && **u < t + window_ms)
                .count()
        })
        .max()
        .unwrap_or(0)
}

#[tokio::test]
async fn a_429_storm_loses_nothing_and_the_rate_stays_within_limits() {
    let cfg = HubspotSimConfig {
        requests_per_10s: 10,
        window_ms: 1_000,
        retry_after: None,
        search_per_second: 3,
        ..sim_config()
    };
    // The connector: 100 per 10 s (10/s) for everything, 2/s for searches.
    let (sim, _server, conn) = setup(
        cfg,
        "requests_per_10s = 100\nsearch_requests_per_second = 2",
        None,
    )
    .await;
    for i in 0..900u64 {
        sim.upsert_at(
            "contacts",
            1 + i,
            json!({"email": format!("s{i}@x.io")}),
            T0 as u64 + i,
        );
    }
    sim.set_fault(SimFaults {
        ten_secondly_429s: 2,
        secondly_429s: 2,
        ..SimFaults::default()
    });
    let (full, _) = drain(&conn, spec("contacts", &[("email", None)], None))
        .await
        .unwrap();
    assert_eq!(ids(&full), (1..901).collect::<BTreeSet<u64>>());
    let (incr, _) = drain(&conn, spec("contacts", &[("email", None)], Some(mark(T0))))
        .await
        .unwrap();
    assert_eq!(ids(&incr), (1..901).collect::<BTreeSet<u64>>());

    let log = sim.requests();
    assert!(
        log.iter().filter(|r| r.status == 429).count() >= 4,
        "the storm happened"
    );
    let search: Vec<u64> = log
        .iter()
        .filter(|r| r.path.ends_with("/search"))
        .map(|r| r.at_ms)
        .collect();
    let general: Vec<u64> = log
        .iter()
        .filter(|r| !r.path.ends_with("/search"))
        .map(|r| r.at_ms)
        .collect();
    assert!(general.len() >= 12 && search.len() >= 6);
    // Burst 1: in any window w at most 1 + w × rate requests; small slack for clock rounding.
    assert!(
        max_in_window(&general, 1_000) <= 11,
        "general rate exceeded: {}",
        max_in_window(&general, 1_000)
    );
    assert!(
        max_in_window(&search, 1_000) <= 3,
        "search rate exceeded: {}",
        max_in_window(&search, 1_000)
    );
}

#[tokio::test]
async fn the_daily_limit_is_rate_limited_until_midnight() {
    let cfg = HubspotSimConfig {
        daily_limit: 1,
        ..sim_config()
    };
    let (sim, _server, conn) = setup(cfg, "", None).await;
    for i in 0..150u64 {
        sim.upsert("contacts", 1 + i, json!({"email": format!("d{i}@x.io")}));
    }
    let mut pull = conn
        .pull(spec("contacts", &[("email", None)], None))
        .await
        .unwrap();
    assert_eq!(pull.next_page().await.unwrap().unwrap().records.len(), 100);
    match pull.next_page().await {
        Err(ConnectorError::RateLimited { wait, message, .. }) => {
            assert!(wait > Duration::ZERO && wait <= Duration::from_secs(86_400));
            assert!(message.contains("daily"), "{message}");
        }
        other => panic!("expected RateLimited, got {other:?}"),
    }
}

#[tokio::test]
async fn full_pull_passes_strings_resolves_owners_and_reports_archived() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("state.db")).await.unwrap();
    let (sim, _server, conn) = setup(sim_config(), "", Some(store.clone())).await;
    sim.add_owner("101", "ada@example.com", "Ada", "Lovelace");
    sim.declare_property("contacts", "annualrevenue", "number");
    sim.declare_property("contacts", "is_strategic", "bool");
    sim.upsert(
        "contacts",
        1,
        json!({"email": "a@x.io", "annualrevenue": "1200000", "is_strategic": "true", "lifecyclestage": "", "hubspot_owner_id": "101"}),
    );
    sim.upsert(
        "contacts",
        2,
        json!({"email": "b@x.io", "hubspot_owner_id": "999"}),
    );
    sim.upsert(
        "contacts",
        3,
        json!({"email": "gone@x.io", "hubspot_owner_id": "101"}),
    );
    sim.archive("contacts", 3);
    let fields = [
        ("email", None),
        ("annualrevenue", None),
        ("is_strategic", None),
        ("lifecyclestage", None),
        ("hubspot_owner_id", Some(Transform::OwnerEmail)),
        ("hubspot_owner_id", Some(Transform::OwnerName)),
    ];
    let (records, marks) = drain(&conn, spec("contacts", &fields, None)).await.unwrap();
    let by_id: HashMap<&str, &RawRecord> = records.iter().map(|r| (r.crm_id.as_str(), r)).collect();
    assert_eq!(records.len(), 3);
    let a = &by_id["1"].fields;
    assert_eq!(a["annualrevenue"], json!("1200000"));
    assert_eq!(a["is_strategic"], json!("true"));
    assert_eq!(a["lifecyclestage"], json!(""));
    assert_eq!(a["hubspot_owner_id#owner_email"], json!("ada@example.com"));
    assert_eq!(a["hubspot_owner_id#owner_name"], json!("Ada Lovelace"));
    let b = &by_id["2"].fields;
    assert_eq!(
        b["hubspot_owner_id#owner_email"],
        Value::Null,
        "unknown owner -> null"
    );
    assert_eq!(b["annualrevenue"], Value::Null);
    assert!(!by_id["1"].deleted && !by_id["2"].deleted);
    assert!(
        by_id["3"].deleted,
        "archived records come with deleted = true"
    );
    assert_eq!(by_id["3"].fields["email"], json!("gone@x.io"));
    assert_eq!(
        marks.len(),
        1,
        "a full pull's watermark comes with its last page"
    );
    let owner_calls = || {
        sim.requests()
            .iter()
            .filter(|r| r.path == "/crm/v3/owners")
            .count()
    };
    assert_eq!(
        owner_calls(),
        2,
        "one read of the owner list per pull: active, then archived owners"
    );
    // A new owner appears: an incremental pull's miss refreshes the cache once.
    sim.add_owner("999", "new@example.com", "New", "");
    let (records, _) = drain(&conn, spec("contacts", &fields, Some(mark(0))))
        .await
        .unwrap();
    let b = records.iter().find(|r| r.crm_id == "2").unwrap();
    assert_eq!(
        b.fields["hubspot_owner_id#owner_email"],
        json!("new@example.com")
    );
    assert_eq!(b.fields["hubspot_owner_id#owner_name"], json!("New"));
    assert_eq!(owner_calls(), 4);
    drain(&conn, spec("contacts", &fields, Some(mark(0))))
        .await
        .unwrap();
    assert_eq!(owner_calls(), 4, "no miss, fresh cache: no refresh");
    drain(&conn, spec("contacts", &fields, None)).await.unwrap();
    assert_eq!(owner_calls(), 6, "a full pull always reads the list again");
    let quota = store
        .kv_get("quota.hubspot")
        .await
        .unwrap()
        .expect("quota recorded");
    assert_eq!(quota["daily_limit"], json!(1_000_000));
    assert!(quota["daily_remaining"].as_u64().unwrap() < 1_000_000);
}

#[tokio::test]
async fn fetch_reads_one_record_live_or_archived_as_a_pull_does() {
    let (sim, _server, conn) = setup(sim_config(), "", None).await;
    sim.add_owner("101", "ada@example.com", "Ada", "Lovelace");
    sim.upsert(
        "contacts",
        1,
        json!({"email": "a@x.io", "hubspot_owner_id": "101"}),
    );
    sim.upsert("contacts", 2, json!({"email": "gone@x.io"}));
    sim.archive("contacts", 2);
    let fields = [
        ("email", None),
        ("lifecyclestage", None),
        ("hubspot_owner_id", Some(Transform::OwnerEmail)),
    ];
    // The mapping's filter would exclude both records: fetch ignores it.
    let mut s = spec("contacts", &fields, None);
    let (pulled, _) = drain(&conn, s.clone()).await.unwrap();
    s.filter = Some("lifecyclestage=customer".into());
    let pulled_one = |id: &str| pulled.iter().find(|r| r.crm_id == id).cloned();
    let live = conn.fetch(&s, "1").await.unwrap();
    assert_eq!(live, pulled_one("1"), "the same record as the pull's");
    let live = live.unwrap();
    assert_eq!(
        live.fields["hubspot_owner_id#owner_email"],
        json!("ada@example.com")
    );
    assert!(live.modified_at.is_some() && !live.deleted);
    let gone = conn.fetch(&s, "2").await.unwrap();
    assert_eq!(gone, pulled_one("2"));
    assert!(gone.is_some_and(|g| g.deleted && g.fields["email"] == json!("gone@x.io")));
    assert_eq!(conn.fetch(&s, "3").await.unwrap(), None);
    let reads = |id: &str| -> Vec<u16> {
        let path = format!("/crm/v3/objects/contacts/{id}");
        sim.requests()
            .into_iter()
            .filter(|r| r.path == path)
            .map(|r| r.status)
            .collect()
    };
    assert_eq!(reads("1"), [200]);
    assert_eq!(
        reads("2"),
        [404, 200],
        "an archived record: found by the archived retry"
    );
    assert_eq!(reads("3"), [404, 404]);
    let sent = sim.requests().len();
    for bad in ["abc", "1 OR 2", "1/../2", ""] {
        assert_eq!(conn.fetch(&s, bad).await.unwrap(), None, "{bad:?}");
    }
    assert_eq!(
        sim.requests().len(),
        sent,
        "no request for a non-numeric id"
    );
}

#[tokio::test]
async fn filters_apply_to_list_and_search_pulls() {
    let (sim, server, conn) = setup(sim_config(), "", None).await;
    for i in 0..30u64 {
        let stage = if i % 3 == 0 { "customer" } else { "lead" };
        sim.upsert_at(
            "contacts",
            1 + i,
            json!({"email": format!("f{i}@x.io"), "lifecyclestage": stage}),
            T0 as u64 + i,
        );
    }
    let mut s = spec("contacts", &[("email", None)], None);
    s.filter = Some("lifecyclestage=customer".into());
    let (full, _) = drain(&conn, s.clone()).await.unwrap();
    s.since = Some(mark(T0));
    let (incr, _) = drain(&conn, s).await.unwrap();
    let want: BTreeSet<u64> = (0..30).filter(|i| i % 3 == 0).map(|i| i + 1).collect();
    assert_eq!(ids(&full), want);
    assert_eq!(ids(&incr), want);
    // The sim's state reads back over HTTP without auth, and the read is not logged.
    let before = sim.requests().len();
    let url = format!("{}/_sim/hubspot/records/contacts", server.url());
    let back: Value = reqwest::get(url).await.unwrap().json().await.unwrap();
    assert_eq!(back["results"].as_array().unwrap().len(), 30);
    assert_eq!(
        back["results"][0]["properties"]["lifecyclestage"],
        json!("customer")
    );
    assert_eq!(sim.requests().len(), before);
}

#[tokio::test]
async fn dated_api_version_uses_dated_paths() {
    let (sim, _server, conn) = setup(sim_config(), "api_version = \"2026-03\"", None).await;
    sim.add_owner("7", "o@x.io", "O", "Wner");
    sim.upsert_at(
        "companies",
        5,
        json!({"name": "Dated", "hubspot_owner_id": "7"}),
        T0 as u64,
    );
    let fields = [
        ("name", None),
        ("hubspot_owner_id", Some(Transform::OwnerEmail)),
    ];
    let (full, _) = drain(&conn, spec("companies", &fields, None))
        .await
        .unwrap();
    let (incr, _) = drain(&conn, spec("companies", &fields, Some(mark(T0))))
        .await
        .unwrap();
    assert_eq!(
        full[0].fields["hubspot_owner_id#owner_email"],
        json!("o@x.io")
    );
    assert_eq!(incr.len(), 1);
    let findings = conn.check(&spec("companies", &fields, None)).await.unwrap();
    assert!(findings.iter().all(|f| f.ok), "{findings:?}");
    let one = conn
        .fetch(&spec("companies", &fields, None), "5")
        .await
        .unwrap();
    assert_eq!(
        one.as_ref(),
        full.first(),
        "a dated read is the pull's record"
    );
    let paths: BTreeSet<String> = sim.requests().into_iter().map(|r| r.path).collect();
    let want: BTreeSet<String> = [
        "/crm/objects/2026-03/companies",
        "/crm/objects/2026-03/companies/5",
        "/crm/objects/2026-03/companies/search",
        "/crm/owners/2026-03",
        "/crm/properties/2026-03/companies",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(paths, want);
}

#[tokio::test]
async fn oauth_refreshes_and_keeps_the_rotated_refresh_token() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("state.db")).await.unwrap();
    let cfg = HubspotSimConfig {
        oauth: Some(SimOauth {
            client_id: "app-id".into(),
            client_secret: "app-secret".into(),
            refresh_token: "refresh-original".into(),
            rotate: true,
            expires_in: 1800,
        }),
        ..sim_config()
    };
    let extra = "auth = \"oauth\"\nclient_id = \"app-id\"\nclient_secret = \"app-secret\"\nrefresh_token = \"refresh-original\"";
    let (sim, server, conn) = setup(cfg, extra, Some(store.clone())).await;
    sim.upsert("contacts", 1, json!({"email": "o@x.io"}));
    let (records, _) = drain(&conn, spec("contacts", &[("email", None)], None))
        .await
        .unwrap();
    assert_eq!(records.len(), 1);
    let rotated = sim.current_refresh_token().unwrap();
    assert_ne!(rotated, "refresh-original");
    assert_eq!(
        store.kv_get("hubspot.refresh_token").await.unwrap(),
        Some(json!(rotated))
    );

    // The access token dies early: one 401, one refresh, and the pull goes on.
    sim.expire_tokens();
    drain(&conn, spec("contacts", &[("email", None)], None))
        .await
        .unwrap();
    let rotated2 = sim.current_refresh_token().unwrap();
    assert_ne!(rotated2, rotated);
    assert_eq!(
        store.kv_get("hubspot.refresh_token").await.unwrap(),
        Some(json!(rotated2))
    );

    // A new process with the original (now revoked) token in its config uses the stored one.
    let s = settings(&server.url(), &format!("requests_per_10s = 1000\n{extra}"));
    let conn2 = HubspotConnector::new(&s, Some(std::sync::Arc::new(store.clone()))).unwrap();
    drain(&conn2, spec("contacts", &[("email", None)], None))
        .await
        .unwrap();
    let token_calls: Vec<_> = sim
        .requests()
        .into_iter()
        .filter(|r| r.path == "/oauth/v3/token")
        .collect();
    assert_eq!(token_calls.len(), 3);
    assert!(token_calls.iter().all(|r| r.status == 200));
    // Without a store nothing else holds the rotated token: the refresh is refused clearly.
    let conn3 = HubspotConnector::new(&s, None).unwrap();
    match drain(&conn3, spec("contacts", &[("email", None)], None)).await {
        Err(e @ ConnectorError::Auth { .. }) => {
            let text = e.to_string();
            assert!(text.contains("refresh"), "{text}");
            assert!(
                !text.contains("app-secret") && !text.contains("refresh-original"),
                "{text}"
            );
        }
        other => panic!("expected Auth, got {other:?}"),
    }
}

#[tokio::test]
async fn check_names_each_missing_property() {
    let (_sim, _server, conn) = setup(sim_config(), "", None).await;
    let s = spec(
        "contacts",
        &[
            ("email", None),
            ("plan_tierr", None),
            ("arr_custom", None),
            ("hubspot_owner_id", Some(Transform::OwnerName)),
        ],
        None,
    );
    let findings = conn.check(&s).await.unwrap();
    let bad: Vec<&str> = findings
        .iter()
        .filter(|f| !f.ok)
        .map(|f| f.detail.as_str())
        .collect();
    assert_eq!(
        bad,
        [
            "contacts has no property plan_tierr",
            "contacts has no property arr_custom"
        ]
    );
    assert!(
        findings
            .iter()
            .any(|f| f.ok && f.subject == "contacts.email")
    );
    assert!(
        findings
            .iter()
            .any(|f| f.ok && f.subject == "hubspot owners")
    );
    let unknown = conn
        .check(&spec("widgets", &[("x", None)], None))
        .await
        .unwrap();
    assert!(!unknown.iter().all(|f| f.ok));
}

#[tokio::test]
async fn the_token_never_leaks_and_a_bad_token_is_an_auth_error() {
    let cfg = HubspotSimConfig {
        access_token: "some-other-token".into(),
        ..sim_config()
    };
    let (_sim, _server, conn) = setup(cfg, "", None).await;
    assert!(!format!("{conn:?}").contains(TOKEN));
    let err = drain(&conn, spec("contacts", &[("email", None)], None))
        .await
        .unwrap_err();
    assert!(matches!(err, ConnectorError::Auth { .. }), "{err:?}");
    let text = format!("{err} {err:?}");
    assert!(!text.contains(TOKEN), "{text}");
    assert!(
        text.contains("crm.objects"),
        "the hint names the scopes: {text}"
    );
    let findings = conn
        .check(&spec("contacts", &[("email", None)], None))
        .await
        .unwrap();
    assert!(!findings[0].ok && !findings[0].detail.contains(TOKEN));
}

#[tokio::test]
async fn server_errors_retry_html_is_protocol_and_bad_properties_are_mapping_errors() {
    let (sim, _server, conn) = setup(sim_config(), "", None).await;
    sim.upsert_at("contacts", 1, json!({"email": "r@x.io"}), T0 as u64);
    sim.set_fault(SimFaults {
        server_errors: 2,
        ..SimFaults::default()
    });
    let (records, _) = drain(&conn, spec("contacts", &[("email", None)], Some(mark(T0))))
        .await
        .unwrap();
    assert_eq!(records.len(), 1, "two 503s are retried");
    sim.set_fault(SimFaults {
        server_errors: 10,
        ..SimFaults::default()
    });
    let err = drain(&conn, spec("contacts", &[("email", None)], None))
        .await
        .unwrap_err();
    assert!(matches!(err, ConnectorError::Transient { .. }), "{err:?}");
    sim.set_fault(SimFaults {
        html_pages: 1,
        ..SimFaults::default()
    });
    let err = drain(&conn, spec("contacts", &[("email", None)], None))
        .await
        .unwrap_err();
    assert!(matches!(err, ConnectorError::Protocol { .. }), "{err:?}");
    sim.set_fault(SimFaults::default());
    let mut s = spec("contacts", &[("email", None)], Some(mark(T0)));
    s.filter = Some("no_such_prop=1".into());
    let err = drain(&conn, s).await.unwrap_err();
    match err {
        ConnectorError::Mapping { message, .. } => {
            assert!(message.contains("no_such_prop"), "{message}")
        }
        other => panic!("expected Mapping, got {other:?}"),
    }
}

/// The owner e-mail each record of `records` arrived with, by record id.
fn owner_emails(records: &[RawRecord]) -> HashMap<String, Value> {
    records
        .iter()
        .map(|r| {
            (
                r.crm_id.clone(),
                r.fields["hubspot_owner_id#owner_email"].clone(),
            )
        })
        .collect()
}

#[tokio::test]
async fn a_changed_owner_email_reaches_the_next_full_pull_of_the_same_connector() {
    let (sim, _server, conn) = setup(sim_config(), "", None).await;
    sim.add_owner("101", "ada@example.com", "Ada", "Lovelace");
    sim.upsert(
        "contacts",
        1,
        json!({"email": "a@x.io", "hubspot_owner_id": "101"}),
    );
    let fields = [
        ("email", None),
        ("hubspot_owner_id", Some(Transform::OwnerEmail)),
    ];
    let (records, _) = drain(&conn, spec("contacts", &fields, None)).await.unwrap();
    assert_eq!(owner_emails(&records)["1"], json!("ada@example.com"));

    // The owner's e-mail changes; the contact does not (its hubspot_owner_id stays "101").
    sim.set_owner_email("101", "ada.lovelace@example.com");
    let (records, _) = drain(&conn, spec("contacts", &fields, None)).await.unwrap();
    assert_eq!(
        owner_emails(&records)["1"],
        json!("ada.lovelace@example.com"),
        "a full pull (reconcile, resync) reads the owner list afresh"
    );
}

#[tokio::test]
async fn an_incremental_pull_rereads_an_owner_list_older_than_the_max_age() {
    let (sim, _server, conn) = setup(sim_config(), "", None).await;
    sim.add_owner("101", "ada@example.com", "Ada", "Lovelace");
    sim.upsert_at(
        "contacts",
        1,
        json!({"email": "a@x.io", "hubspot_owner_id": "101"}),
        T0 as u64,
    );
    let fields = [
        ("email", None),
        ("hubspot_owner_id", Some(Transform::OwnerEmail)),
    ];
    let incremental = || spec("contacts", &fields, Some(mark(T0 - 1)));
    let (records, _) = drain(&conn, incremental()).await.unwrap();
    assert_eq!(owner_emails(&records)["1"], json!("ada@example.com"));

    sim.set_owner_email("101", "ada.lovelace@example.com");
    let (records, _) = drain(&conn, incremental()).await.unwrap();
    assert_eq!(
        owner_emails(&records)["1"],
        json!("ada@example.com"),
        "a fresh cache with no unknown id serves incremental pulls"
    );

    // More than the max age later on Tokio's clock (the cache's clock; the sim keeps real time).
    // Paused only while moving it, so no request runs on a frozen clock.
    tokio::time::pause();
    tokio::time::advance(OWNER_CACHE_MAX_AGE + Duration::from_secs(1)).await;
    tokio::time::resume();
    let (records, _) = drain(&conn, incremental()).await.unwrap();
    assert_eq!(
        owner_emails(&records)["1"],
        json!("ada.lovelace@example.com"),
        "an owner list older than the max age is read again"
    );
}

#[tokio::test]
async fn contacts_of_an_archived_owner_keep_the_owner_email_and_name() {
    let (sim, server, conn) = setup(sim_config(), "", None).await;
    sim.add_owner("101", "ada@example.com", "Ada", "Lovelace");
    sim.add_owner("102", "grace@example.com", "Grace", "Hopper");
    sim.archive_owner("102");
    sim.upsert_at(
        "contacts",
        1,
        json!({"email": "a@x.io", "hubspot_owner_id": "102"}),
        T0 as u64,
    );
    sim.upsert_at(
        "contacts",
        2,
        json!({"email": "b@x.io", "hubspot_owner_id": "101"}),
        T0 as u64 + 1,
    );
    let fields = [
        ("email", None),
        ("hubspot_owner_id", Some(Transform::OwnerEmail)),
        ("hubspot_owner_id", Some(Transform::OwnerName)),
    ];
    for since in [None, Some(mark(T0 - 1))] {
        let fresh = HubspotConnector::new(
            &settings(
                &server.url(),
                "requests_per_10s = 1000\nsearch_requests_per_second = 100",
            ),
            None,
        )
        .unwrap();
        for c in [&conn, &fresh] {
            let (records, _) = drain(c, spec("contacts", &fields, since.clone()))
                .await
                .unwrap();
            let by_id: HashMap<&str, &RawRecord> =
                records.iter().map(|r| (r.crm_id.as_str(), r)).collect();
            let a = &by_id["1"].fields;
            assert_eq!(
                a["hubspot_owner_id#owner_email"],
                json!("grace@example.com"),
                "a deactivated owner still resolves (since {since:?})"
            );
            assert_eq!(a["hubspot_owner_id#owner_name"], json!("Grace Hopper"));
            assert_eq!(
                by_id["2"].fields["hubspot_owner_id#owner_email"],
                json!("ada@example.com")
            );
        }
    }
    // The sim lists owners as HubSpot does: active ones by default, archived ones only with
    // archived=true.
    let http = reqwest::Client::new();
    let list = |archived: Option<&'static str>| {
        let mut req = http
            .get(format!("{}/crm/v3/owners", server.url()))
            .bearer_auth(TOKEN);
        if let Some(a) = archived {
            req = req.query(&[("archived", a)]);
        }
        async move {
            let v: Value = req.send().await.unwrap().json().await.unwrap();
            v["results"]
                .as_array()
                .unwrap()
                .iter()
                .map(|o| (o["id"].as_str().unwrap().to_owned(), o["archived"].clone()))
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(list(None).await, [("101".to_owned(), json!(false))]);
    assert_eq!(
        list(Some("false")).await,
        [("101".to_owned(), json!(false))]
    );
    assert_eq!(list(Some("true")).await, [("102".to_owned(), json!(true))]);
}

#[tokio::test]
async fn a_retry_after_given_as_an_http_date_is_honoured() {
    let cfg = HubspotSimConfig {
        // The advertised window (the fallback when Retry-After is unreadable) is a minute.
        window_ms: 60_000,
        retry_after: Some(2),
        retry_after_as_date: true,
        ..sim_config()
    };
    let (sim, _server, conn) = setup(cfg, "", None).await;
    for i in 0..3u64 {
        sim.upsert("contacts", 1 + i, json!({"email": format!("r{i}@x.io")}));
    }
    sim.set_fault(SimFaults {
        ten_secondly_429s: 1,
        ..SimFaults::default()
    });
    let started = std::time::Instant::now();
    let (records, _) = tokio::time::timeout(
        Duration::from_secs(20),
        drain(&conn, spec("contacts", &[("email", None)], None)),
    )
    .await
    .expect("the ~2 s HTTP-date Retry-After was honoured, not the 60 s window")
    .unwrap();
    let took = started.elapsed();
    assert_eq!(records.len(), 3);
    let log = sim.requests();
    assert_eq!(log.iter().filter(|r| r.status == 429).count(), 1);
    assert!(
        took >= Duration::from_millis(900),
        "waited until the date: {took:?}"
    );
    assert!(took < Duration::from_secs(10), "{took:?}");
}

#[tokio::test]
async fn a_daily_429_fails_fast_and_sends_nothing_more_until_the_reset() {
    let (sim, _server, conn) = setup(sim_config(), "", None).await;
    for i in 0..5u64 {
        sim.upsert_at(
            "contacts",
            1 + i,
            json!({"email": format!("d{i}@x.io")}),
            T0 as u64 + i,
        );
    }
    sim.set_fault(SimFaults {
        daily_429s: 1,
        ..SimFaults::default()
    });
    let started = std::time::Instant::now();
    let err = drain(&conn, spec("contacts", &[("email", None)], None))
        .await
        .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "no in-process retry"
    );
    match &err {
        ConnectorError::RateLimited { wait, message, .. } => {
            assert!(*wait > Duration::from_secs(60), "{wait:?}");
            assert!(*wait <= Duration::from_secs(86_400), "{wait:?}");
            assert!(message.contains("daily"), "{message}");
        }
        other => panic!("expected RateLimited, got {other:?}"),
    }
    assert_eq!(sim.requests().len(), 1, "one request, no retry");

    // The portal stays exhausted until the reset: another pull (a search this time) is refused
    // at once, with the time left, and sends nothing.
    let err = drain(&conn, spec("contacts", &[("email", None)], Some(mark(T0))))
        .await
        .unwrap_err();
    match &err {
        ConnectorError::RateLimited { wait, .. } => {
            assert!(*wait > Duration::from_secs(60), "{wait:?}")
        }
        other => panic!("expected RateLimited, got {other:?}"),
    }
    assert_eq!(sim.requests().len(), 1, "nothing sent until the reset");
}

#[tokio::test]
async fn a_filter_with_more_pairs_than_a_search_group_holds_still_pulls() {
    let (sim, server, conn) = setup(sim_config(), "", None).await;
    // Ten property=value pairs: with the cursor filters they exceed HubSpot's 10 filters per
    // group, which the sim enforces.
    let filter = (0..10)
        .map(|i| format!("p{i}=x"))
        .collect::<Vec<_>>()
        .join(",");
    // 300 records share T0 (a tie scan, two cursor filters), 30 more follow at distinct times.
    for id in 1..=330u64 {
        let mut props = serde_json::Map::new();
        props.insert("email".into(), json!(format!("f{id}@x.io")));
        for i in 0..10 {
            props.insert(format!("p{i}"), json!("x"));
        }
        if id % 5 == 0 {
            props.insert("p0".into(), json!("y")); // fails a pair search applies
        }
        if id % 3 == 0 {
            props.insert("p9".into(), json!("y")); // fails a pair applied client-side
        }
        let at = if id <= 300 { T0 } else { T0 + id as i64 };
        sim.upsert_at("contacts", id, Value::Object(props), at as u64);
    }
    let want: BTreeSet<u64> = (1..=330u64)
        .filter(|id| id % 5 != 0 && id % 3 != 0)
        .collect();
    let mut s = spec("contacts", &[("email", None)], Some(mark(T0 - 1)));
    s.filter = Some(filter);
    let (incr, marks) = drain(&conn, s.clone()).await.unwrap();
    assert_eq!(ids(&incr), want);
    assert_marks_ordered(&marks, (T0 - 1, 0));
    // The watermark passes records dropped client-side: 329 is the last one search returned.
    assert_eq!(mark_ms(marks.last().unwrap()), (T0 + 329, 329));
    s.since = None;
    let (full, _) = drain(&conn, s).await.unwrap();
    assert_eq!(ids(&full), want);
    let log = sim.requests();
    assert!(log.iter().any(|r| r.path.ends_with("/search")));
    assert!(
        log.iter().all(|r| r.status == 200),
        "no search exceeded the filter limit: {:?}",
        log.iter().filter(|r| r.status != 200).collect::<Vec<_>>()
    );

    // The sim answers a group of 11 filters as HubSpot does: 400 VALIDATION_ERROR.
    let filters: Vec<Value> = (0..11)
        .map(|i| json!({"propertyName": format!("p{}", i % 10), "operator": "EQ", "value": "x"}))
        .collect();
    let resp = reqwest::Client::new()
        .post(format!("{}/crm/v3/objects/contacts/search", server.url()))
        .bearer_auth(TOKEN)
        .json(&json!({"filterGroups": [{"filters": filters}], "limit": 10}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["category"], json!("VALIDATION_ERROR"));
    assert!(
        body["message"].as_str().unwrap().contains("10 filters"),
        "{body}"
    );
}
