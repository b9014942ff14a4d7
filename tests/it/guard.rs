//! The guard (guarantee 9): a cycle that would clear or overwrite too much of a field is held,
//! whole, until a person approves or rejects it; Pendo sees none of it meanwhile.

use std::time::Duration;

use pendo_sync::domain::Kind;
use pendo_sync::engine::Mode;
use pendo_sync::store::{GuardOutcome, QueueFilter, QueueState};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::crm_harness::{Crm, CrmOptions, hs_contact};
use crate::helpers::{TestApp, account_id};

fn held_id(outcome: &Option<GuardOutcome>) -> i64 {
    match outcome {
        Some(GuardOutcome::Held { hold_id, .. }) => *hold_id,
        other => panic!("expected a hold, got {other:?}"),
    }
}

/// The (id, field) pairs of every write Pendo received.
fn written_fields(requests: &[pendo_sync::sim::pendo::RecordedRequest]) -> Vec<(String, String)> {
    requests
        .iter()
        .flat_map(|r| r.written_values())
        .map(|(id, field, _)| (id, field))
        .collect()
}

/// HubSpot omits a property the token can no longer read (renamed, hidden): every contact's
/// value reads as empty. The reconcile would clear it everywhere; the guard holds it.
#[tokio::test]
async fn a_hidden_hubspot_property_is_held_then_rejected_held_again_and_approved() {
    let crm = Crm::start(CrmOptions::default()).await;
    crm.seed_contacts(150);
    crm.sync().await;
    crm.assert_converged();
    let email = |i: usize| hs_contact(i)["email"].as_str().unwrap().to_lowercase();
    let before = crm.pendo.value(Kind::Visitor, &email(0), "lifecyclestage");
    assert!(before.is_some());

    crm.hs.hide_property("contacts", "lifecyclestage");
    crm.pendo.reset_requests();
    let app = crm.app().await;
    let cancel = CancellationToken::new();
    let report = app
        .sync(Some("hs-contacts"), Mode::Reconcile, false, &cancel, &())
        .await
        .unwrap();
    let hold = held_id(&report.cycles[0].guard);
    let sent = written_fields(&crm.pendo.requests());
    assert!(
        sent.is_empty(),
        "nothing of a held cycle goes out: {sent:?}"
    );
    let shown = app.store.hold(hold).await.unwrap().unwrap();
    assert!(
        shown
            .reason
            .contains("would clear `lifecyclestage` on 150 of 150 visitors (100% > 10%)"),
        "{}",
        shown.reason
    );
    assert_eq!(shown.counts["lifecyclestage"].clears, 150);
    assert_eq!(shown.sample.len(), 20);

    // Rejected: nothing goes out; the next reconcile finds the same difference and holds again.
    app.store
        .decide_hold(hold, false, "tester", Some("property renamed in HubSpot"))
        .await
        .unwrap();
    app.drain(&cancel, Duration::ZERO).await.unwrap();
    assert!(written_fields(&crm.pendo.requests()).is_empty());
    let again = app
        .sync(Some("hs-contacts"), Mode::Reconcile, false, &cancel, &())
        .await
        .unwrap();
    let second = held_id(&again.cycles[0].guard);
    assert_ne!(second, hold);
    let rejected = app.store.hold(hold).await.unwrap().unwrap();
    assert_eq!(rejected.state, "rejected");
    assert_eq!(rejected.decided_by.as_deref(), Some("tester"));
    assert_eq!(
        rejected.decision_reason.as_deref(),
        Some("property renamed in HubSpot")
    );

    // Approved: the clears go out.
    app.store
        .decide_hold(second, true, "tester", None)
        .await
        .unwrap();
    app.drain(&cancel, Duration::from_secs(5)).await.unwrap();
    let sent = written_fields(&crm.pendo.requests());
    assert_eq!(
        sent.iter().filter(|(_, f)| f == "lifecyclestage").count(),
        150
    );
    assert_eq!(
        crm.pendo.value(Kind::Visitor, &email(0), "lifecyclestage"),
        None
    );
    app.store.close().await;
}

/// Every record leaving a Salesforce mapping with `on_delete = "clear"` (a filter typo) would
/// clear every value: held, zero clears sent.
#[tokio::test]
async fn a_filter_typo_that_empties_a_clearing_mapping_is_held() {
    let t = TestApp::new().await;
    t.seed(150);
    t.sync().await;
    t.assert_converged();
    // What a filter that matches nothing looks like to the reconcile: no record is seen.
    for i in 0..150 {
        t.crm.purge("Account", &account_id(i));
    }
    t.pendo.reset_requests();
    let report = t.sync_mode(Mode::Reconcile).await;
    held_id(&report.cycles[0].guard);
    assert_eq!(report.cycles[0].cleared_orphans, 150);
    assert!(t.writes().is_empty(), "{:?}", t.writes());
    assert!(
        t.pendo
            .value(Kind::Account, &account_id(5), "plantier")
            .is_some()
    );
}

/// A change that overwrites more than half of a field is held; a first fill and a normal 1 %
/// change go out at once; while a hold is open, later changes of the mapping join it (latest
/// wins inside it) and nothing of the mapping overtakes it.
#[tokio::test]
async fn overwrites_past_the_limit_are_held_and_later_changes_join_the_hold() {
    let t = TestApp::new().await;
    t.seed(200);
    // The first fill: 200 × 5 values where Pendo held none. Never counted.
    let first = t.sync().await;
    assert!(
        matches!(
            first.cycles[0].guard,
            Some(GuardOutcome::Passed { values: 1000 })
        ),
        "{:?}",
        first.cycles[0].guard
    );
    t.assert_converged();
    // A normal change: 2 of 200.
    for i in [3, 4] {
        t.crm
            .set_field("Account", &account_id(i), "Plan_Tier__c", json!("Normal"));
    }
    let normal = t.sync().await;
    assert!(matches!(
        normal.cycles[0].guard,
        Some(GuardOutcome::Passed { values: 2 })
    ));
    t.assert_converged();

    // 120 of 200 plan tiers change at once (60 % > 50 %).
    for i in 0..120 {
        t.crm
            .set_field("Account", &account_id(i), "Plan_Tier__c", json!("Bulk"));
    }
    t.pendo.reset_requests();
    let bulk = t.sync().await;
    let hold = held_id(&bulk.cycles[0].guard);
    assert!(t.writes().is_empty());

    // `queue retry` (every row) does not slip held rows past the hold.
    let app = t.app().await;
    let retried = app
        .store
        .outbox_retry(&QueueFilter::default(), "test")
        .await
        .unwrap();
    assert_eq!(retried, 0, "held rows are not retried");
    app.drain(&CancellationToken::new(), Duration::ZERO)
        .await
        .unwrap();
    app.store.close().await;
    assert!(t.writes().is_empty(), "{:?}", t.writes());

    // A later change of a held value, and of another record: both join the hold.
    t.crm
        .set_field("Account", &account_id(7), "Plan_Tier__c", json!("Latest"));
    t.crm
        .set_field("Account", &account_id(150), "ARR__c", json!(1.5));
    let later = t.sync().await;
    assert!(
        matches!(later.cycles[0].guard, Some(GuardOutcome::Held { hold_id, new: false, .. }) if hold_id == hold),
        "{:?}",
        later.cycles[0].guard
    );
    assert!(
        t.writes().is_empty(),
        "nothing of the mapping overtakes the hold"
    );
    let app = t.app().await;
    let h = app.store.hold(hold).await.unwrap().unwrap();
    assert_eq!(h.cycles, 2);
    assert_eq!(h.held_values, 121);
    let held = app
        .store
        .outbox_list(
            &QueueFilter {
                state: Some(QueueState::Held),
                pendo_id: Some(account_id(7)),
                ..Default::default()
            },
            10,
        )
        .await
        .unwrap();
    assert_eq!(held.len(), 1);
    assert_eq!(
        held[0].value,
        json!("Latest").to_string(),
        "latest wins inside the hold"
    );
    app.store
        .decide_hold(hold, true, "tester", None)
        .await
        .unwrap();
    app.store.close().await;
    t.sync().await;
    t.assert_converged();
}

/// Staged rows are never sent before the guard passed the whole pull: a cycle that dies after
/// committing some pages leaves them staged (a drain sends nothing); the next cycle counts them
/// with its own and lets them go.
#[tokio::test]
async fn a_cycle_interrupted_between_pages_sends_nothing_until_the_next_one_passes_it() {
    let t = TestApp::new().await;
    t.seed(200); // 40 records per page: 5 pages
    t.crm.fail_after_pages(Some(2));
    let app = t.app().await;
    let cancel = CancellationToken::new();
    let report = app
        .sync(None, Mode::Incremental, false, &cancel, &())
        .await
        .unwrap();
    assert_eq!(report.failed.len(), 1, "{report:?}");
    let staged = app
        .store
        .outbox_list(
            &QueueFilter {
                state: Some(QueueState::Staged),
                ..Default::default()
            },
            10_000,
        )
        .await
        .unwrap();
    assert!(!staged.is_empty(), "the committed pages are staged");
    app.drain(&cancel, Duration::ZERO).await.unwrap();
    assert!(
        t.writes().is_empty(),
        "staged rows were sent: {:?}",
        t.writes()
    );
    app.store.close().await;
    // The restart's cycle completes; the guard passes the leftovers with its own changes.
    let next = t.sync().await;
    assert!(
        matches!(next.cycles[0].guard, Some(GuardOutcome::Passed { .. })),
        "{:?}",
        next.cycles[0].guard
    );
    t.assert_converged();
}

/// `sync --dry-run` says what the guard would do.
#[tokio::test]
async fn a_dry_run_says_what_the_guard_would_hold() {
    let t = TestApp::new().await;
    t.seed(150);
    t.sync().await;
    crate::helpers::null_field_on(&t, 150, "Plan_Tier__c");
    let app = t.app().await;
    let report = app
        .sync(
            None,
            Mode::Incremental,
            true,
            &CancellationToken::new(),
            &(),
        )
        .await
        .unwrap();
    let would = report.cycles[0].would_hold.as_deref().unwrap_or_default();
    assert_eq!(
        would, "would clear `plantier` on 150 of 150 accounts (100% > 10%)",
        "{report:?}"
    );
    app.store.close().await;
}

/// A loopback webhook: records what it receives; answers 200, 500, or never.
#[derive(Clone)]
struct Hook {
    url: String,
    bodies: std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
}

#[derive(Clone, Copy)]
enum HookAnswer {
    Ok,
    Fail,
    Hang,
}

async fn webhook(answer: HookAnswer) -> Hook {
    use axum::routing::post;
    let bodies: std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>> = Default::default();
    let seen = bodies.clone();
    let app = axum::Router::new().route(
        "/hooks/{secret}",
        post(move |body: axum::body::Bytes| {
            let seen = seen.clone();
            async move {
                seen.lock()
                    .unwrap()
                    .push(serde_json::from_slice(&body).unwrap_or_default());
                match answer {
                    HookAnswer::Ok => axum::http::StatusCode::OK,
                    HookAnswer::Fail => axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                    HookAnswer::Hang => {
                        std::future::pending::<()>().await;
                        unreachable!()
                    }
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    Hook {
        url: format!("http://{addr}/hooks/canary-webhook-9d2f"),
        bodies,
    }
}

/// A TestApp whose `[notify]` posts to `hook`, and a state of 200 accounts in Pendo.
async fn app_with_webhook(hook: &Hook) -> TestApp {
    let t = TestApp::with(crate::helpers::Options {
        extra_mappings: format!("[notify]\nwebhook_url = \"{}\"\n", hook.url),
        ..Default::default()
    })
    .await;
    t.seed(200);
    t.sync().await;
    t
}

async fn bulk_change(t: &TestApp) -> pendo_sync::app::SyncReport {
    for i in 0..150 {
        t.crm
            .set_field("Account", &account_id(i), "Plan_Tier__c", json!("Bulk"));
    }
    t.sync().await
}

async fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(
            std::time::Instant::now() < deadline,
            "waited 10 s for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_new_hold_is_posted_to_the_webhook() {
    let hook = webhook(HookAnswer::Ok).await;
    let t = app_with_webhook(&hook).await;
    let report = bulk_change(&t).await;
    let hold = held_id(&report.cycles[0].guard);
    wait_for("the hold notification", || {
        !hook.bodies.lock().unwrap().is_empty()
    })
    .await;
    let body = hook.bodies.lock().unwrap()[0].clone();
    assert_eq!(body["event"], json!("hold"));
    assert_eq!(body["mapping"], json!("accounts"));
    assert_eq!(body["details"]["hold_id"], json!(hold));
    let text = body["text"].as_str().unwrap();
    assert!(
        text.contains("would overwrite `plantier` on 150 of 200 accounts (75% > 50%)"),
        "{text}"
    );
    assert!(
        text.contains(&format!("pendo-sync holds show {hold}")),
        "{text}"
    );
}

/// A webhook that fails or hangs neither slows nor fails the cycle; a failing one is retried;
/// its URL (a secret) never reaches the logs, settings' Debug or status.
#[tokio::test]
async fn a_failing_or_hanging_webhook_does_not_block_and_its_url_never_leaks() {
    let captured = crate::helpers::Captured::default();
    let sink = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || sink.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let failing = webhook(HookAnswer::Fail).await;
    let t = app_with_webhook(&failing).await;
    let report = bulk_change(&t).await;
    held_id(&report.cycles[0].guard);
    // Retried: three attempts reach the webhook, all after the cycle returned.
    wait_for("three attempts", || {
        failing.bodies.lock().unwrap().len() >= 3
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;

    let hanging = webhook(HookAnswer::Hang).await;
    let t2 = app_with_webhook(&hanging).await;
    let started = std::time::Instant::now();
    let report = bulk_change(&t2).await;
    held_id(&report.cycles[0].guard);
    wait_for("the hanging request", || {
        !hanging.bodies.lock().unwrap().is_empty()
    })
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the cycle waited for the webhook: {:?}",
        started.elapsed()
    );

    let app = t.app().await;
    let status = pendo_sync::status::status_report(&t.settings, &app.store)
        .await
        .unwrap();
    app.store.close().await;
    let texts = [
        captured.text(),
        format!("{:?}", t.settings),
        format!("{:?}", app.notifier),
        serde_json::to_string(&status).unwrap(),
    ];
    assert!(
        texts[0].contains("could not be delivered"),
        "the failure is logged"
    );
    for text in &texts {
        assert!(
            !text.contains("canary-webhook-9d2f"),
            "the webhook URL leaked: {text}"
        );
    }
}

/// `audit` says what the guard would do with the changes a reconcile would make now.
#[tokio::test]
async fn the_audit_says_what_the_guard_would_hold() {
    let t = TestApp::new().await;
    t.seed(150);
    t.sync().await;
    crate::helpers::null_field_on(&t, 150, "Plan_Tier__c");
    let mut connectors = pendo_sync::app::Connectors::new();
    connectors.insert(
        pendo_sync::config::Source::Salesforce,
        std::sync::Arc::new(t.crm.clone()),
    );
    let report = pendo_sync::audit::audit(&t.settings, &connectors, &Default::default())
        .await
        .unwrap();
    assert_eq!(
        report.mappings[0].guard.as_deref(),
        Some("would hold: would clear `plantier` on 150 of 150 accounts (100% > 10%)"),
        "{:?}",
        report.mappings[0]
    );
}

/// The operator adds a filter with a typo to a Salesforce mapping with `on_delete = "clear"`:
/// the Salesforce simulator (real SOQL) returns no record, so every account "left the filter".
/// The reconcile would clear every value: held, zero clears sent.
#[tokio::test]
async fn a_salesforce_filter_typo_is_held_with_zero_clears_sent() {
    use crate::crm_harness::sf_account_id;
    let crm = Crm::start(CrmOptions::default()).await;
    crm.seed_accounts(120);
    crm.sync().await;
    crm.assert_converged();
    let mut edited = (*crm.settings).clone();
    let m = edited
        .mappings
        .iter_mut()
        .find(|m| m.name == "sf-accounts")
        .unwrap();
    m.filter = Some("Plan_Tier__c = 'Enterprice'".into());
    let edited = std::sync::Arc::new(edited);
    let store = pendo_sync::store::Store::open(&edited.state.path)
        .await
        .unwrap();
    let connectors =
        pendo_sync::connectors::build(&edited, Some(std::sync::Arc::new(store.clone()))).unwrap();
    let app = pendo_sync::app::App::open(edited.clone(), connectors)
        .await
        .unwrap();
    crm.pendo.reset_requests();
    let report = app
        .sync(
            Some("sf-accounts"),
            Mode::Reconcile,
            false,
            &CancellationToken::new(),
            &(),
        )
        .await
        .unwrap();
    assert_eq!(report.cycles[0].pulled, 0, "the typo matches nothing");
    let hold = held_id(&report.cycles[0].guard);
    assert!(written_fields(&crm.pendo.requests()).is_empty());
    let h = app.store.hold(hold).await.unwrap().unwrap();
    assert!(
        h.reason
            .contains("would clear `plantier` on 120 of 120 accounts"),
        "{}",
        h.reason
    );
    // A resync is guarded too: once the hold is rejected, the resync's clears are held anew.
    app.store
        .decide_hold(hold, false, "tester", Some("filter typo"))
        .await
        .unwrap();
    let resync = app
        .sync(
            Some("sf-accounts"),
            Mode::Resync,
            false,
            &CancellationToken::new(),
            &(),
        )
        .await
        .unwrap();
    assert!(
        matches!(resync.cycles[0].guard, Some(GuardOutcome::Held { hold_id, new: true, .. }) if hold_id != hold),
        "{:?}",
        resync.cycles[0].guard
    );
    assert!(written_fields(&crm.pendo.requests()).is_empty());
    assert!(
        crm.pendo
            .value(Kind::Account, &sf_account_id(0), "plantier")
            .is_some()
    );
    app.store.close().await;
    store.close().await;
}

/// Values that go dead and a writer Pendo pauses are posted too.
#[tokio::test]
async fn dead_values_and_a_paused_writer_are_posted() {
    let hook = webhook(HookAnswer::Ok).await;
    let t = TestApp::with(crate::helpers::Options {
        extra_mappings: format!("[notify]\nwebhook_url = \"{}\"\n", hook.url),
        ..Default::default()
    })
    .await;
    t.seed(1);
    // Pendo rejects the lone record (400): dead at once.
    t.pendo.set_faults(pendo_sync::sim::pendo::PendoFaults {
        status_script: vec![400],
        ..Default::default()
    });
    t.sync().await;
    wait_for("the dead notification", || {
        hook.bodies
            .lock()
            .unwrap()
            .iter()
            .any(|b| b["event"] == json!("dead"))
    })
    .await;
    // Pendo refuses the key: the writer pauses.
    t.crm
        .set_field("Account", &account_id(0), "Plan_Tier__c", json!("Paused"));
    t.pendo.set_faults(pendo_sync::sim::pendo::PendoFaults {
        status_script: vec![401],
        ..Default::default()
    });
    t.sync().await;
    wait_for("the writer_paused notification", || {
        hook.bodies
            .lock()
            .unwrap()
            .iter()
            .any(|b| b["event"] == json!("writer_paused"))
    })
    .await;
    let bodies = hook.bodies.lock().unwrap().clone();
    let dead = bodies.iter().find(|b| b["event"] == json!("dead")).unwrap();
    assert!(
        dead["text"].as_str().unwrap().contains("went dead"),
        "{dead}"
    );
}

/// Review finding: a pull that staged mass clears and then failed left them for a next cycle
/// that pulled nothing, which judged them against no coverage (under min_values: passed). The
/// coverage now stays with the staged rows.
#[tokio::test]
async fn staged_rows_left_by_a_failed_pull_are_judged_against_their_own_coverage() {
    let t = TestApp::new().await;
    t.seed(150);
    t.sync().await;
    crate::helpers::null_field_on(&t, 150, "Plan_Tier__c");
    // Every page commits (4 pages of 40), then the pull fails before it completes.
    t.crm.fail_after_pages(Some(4));
    let failed = t.sync().await;
    assert_eq!(failed.failed.len(), 1, "{failed:?}");
    t.pendo.reset_requests();
    // The next cycle pulls nothing new; the leftovers are judged with their coverage.
    let next = t.sync().await;
    assert_eq!(next.cycles[0].pulled, 0);
    held_id(&next.cycles[0].guard);
    assert!(t.writes().is_empty(), "{:?}", t.writes());
}

/// Review finding: a newer value of a held row stayed held without the guard counting it, so
/// an approval could send a value nobody saw. It is staged again and rejoins the hold, which
/// shows it.
#[tokio::test]
async fn a_newer_value_of_a_held_row_rejoins_the_hold_and_shows_in_it() {
    let t = TestApp::new().await;
    t.seed(200);
    t.sync().await;
    for i in 0..120 {
        t.crm
            .set_field("Account", &account_id(i), "Plan_Tier__c", json!("Bulk"));
    }
    let hold = held_id(&t.sync().await.cycles[0].guard);
    // Only a held value changes again.
    t.crm
        .set_field("Account", &account_id(0), "Plan_Tier__c", json!("Newest"));
    let again = t.sync().await;
    assert!(
        matches!(again.cycles[0].guard, Some(GuardOutcome::Held { hold_id, new: false, .. }) if hold_id == hold),
        "{:?}",
        again.cycles[0].guard
    );
    let app = t.app().await;
    let h = app.store.hold(hold).await.unwrap().unwrap();
    assert_eq!(h.cycles, 2);
    assert!(
        h.sample.iter().any(|c| c.to == "\"Newest\""),
        "{:?}",
        h.sample
    );
    app.store.close().await;
}

/// Review finding: a held full pull (every record gone: a filter typo) forgot every claim
/// before the guard decided; it now forgets nothing unless the guard lets the pull through.
#[tokio::test]
async fn a_held_full_pull_forgets_no_claims() {
    let t = TestApp::new().await;
    t.seed(150);
    t.sync().await;
    t.sync_mode(Mode::Reconcile).await;
    let app = t.app().await;
    let before = app.store.claims_count("accounts").await.unwrap();
    app.store.close().await;
    assert_eq!(before, 150);
    for i in 0..150 {
        t.crm.purge("Account", &account_id(i));
    }
    let report = t.sync_mode(Mode::Reconcile).await;
    held_id(&report.cycles[0].guard);
    let app = t.app().await;
    assert_eq!(app.store.claims_count("accounts").await.unwrap(), before);
    app.store.close().await;
}

/// `queue drop --state held` takes a hold's values away: a hold left with nothing to send is
/// closed (as rejected, by whoever dropped them), so `sync` stops exiting 4 for it; a hold that
/// still holds values stays open and counts what is left.
#[tokio::test]
async fn dropping_a_hold_s_values_closes_the_hold_or_recounts_it() {
    let t = TestApp::with(crate::helpers::Options {
        extra_mappings: "[guard]\nmin_values = 1\n".into(),
        ..Default::default()
    })
    .await;
    t.seed(3);
    t.sync().await;
    for i in 0..3 {
        t.crm
            .set_field("Account", &account_id(i), "Plan_Tier__c", json!("Bulk"));
    }
    let hold = held_id(&t.sync().await.cycles[0].guard);
    let app = t.app().await;
    let dropped = app
        .store
        .outbox_drop(
            &QueueFilter {
                state: Some(QueueState::Held),
                pendo_id: Some(account_id(0)),
                ..Default::default()
            },
            "queue drop by tester",
        )
        .await
        .unwrap();
    assert_eq!(dropped, 1);
    let h = app.store.hold(hold).await.unwrap().unwrap();
    assert_eq!((h.state.as_str(), h.held_values), ("open", 2));
    app.store
        .outbox_drop(
            &QueueFilter {
                state: Some(QueueState::Held),
                ..Default::default()
            },
            "queue drop by tester",
        )
        .await
        .unwrap();
    let h = app.store.hold(hold).await.unwrap().unwrap();
    assert_eq!(h.state, "rejected");
    assert_eq!(h.held_values, 0);
    assert_eq!(h.decided_by.as_deref(), Some("queue drop by tester"));
    assert!(app.store.holds(true).await.unwrap().is_empty());
    app.store.close().await;
}

/// Found by the kill -9 test on PostgreSQL: a value Pendo confirms between a cycle's diff and
/// its guard (an older queued value of a record the diff saw with no shadow, in flight when
/// the cycle restaged it) turns the cycle's first fill into an overwrite of a value the pages
/// never counted as covered. The guard then saw more overwrites than covered values ("204 of
/// 176") and held a cycle nothing was wrong with. A value the guard counts as overwritten or
/// cleared was held, so it is covered.
#[tokio::test]
async fn a_value_confirmed_between_the_diff_and_the_guard_counts_as_covered() {
    use pendo_sync::config::GuardSettings;
    use pendo_sync::store::{Change, PageCommit, Settlement, Store};
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("state.db")).await.unwrap();
    let change = |id: &str, value: &str| Change {
        kind: Kind::Account,
        pendo_id: id.into(),
        field: "arr".into(),
        value: value.into(),
        mapping: "accounts".into(),
        force: false,
        source: None,
    };
    // Ten records Pendo confirmed (covered by the cycle below, unchanged), eleven in flight.
    let confirmed: Vec<Change> = (0..10).map(|i| change(&format!("c{i}"), "1")).collect();
    let in_flight: Vec<Change> = (0..11).map(|i| change(&format!("r{i:02}"), "1")).collect();
    for changes in [&confirmed, &in_flight] {
        store
            .commit_page(&PageCommit {
                mapping: "accounts",
                changes,
                ..PageCommit::default()
            })
            .await
            .unwrap();
    }
    let claimed = store.claim_due(Kind::Account, i64::MAX, 100).await.unwrap();
    assert_eq!(claimed.len(), 21);
    let (done, sent): (Vec<_>, Vec<_>) = claimed
        .into_iter()
        .partition(|e| e.pendo_id.starts_with('c'));
    let confirm = |rows: Vec<pendo_sync::store::OutboxEntry>| {
        rows.into_iter()
            .map(|e| (e, Settlement::Confirmed))
            .collect::<Vec<_>>()
    };
    store.settle(&confirm(done)).await.unwrap();
    // The cycle: its diff saw the eleven with no shadow (first fills of "2"); it covered the
    // ten confirmed values.
    let restaged: Vec<Change> = (0..11).map(|i| change(&format!("r{i:02}"), "2")).collect();
    store
        .commit_page(&PageCommit {
            mapping: "accounts",
            changes: &restaged,
            kind: Some(Kind::Account),
            stage: true,
            cover: &[("arr".to_owned(), 10)],
            ..PageCommit::default()
        })
        .await
        .unwrap();
    // Pendo confirms the eleven older values before the guard runs.
    store.settle(&confirm(sent)).await.unwrap();
    let limits = GuardSettings {
        max_overwrite_percent: 100.0,
        min_values: 1,
        ..GuardSettings::default()
    };
    let outcome = store
        .finish_staged("accounts", Kind::Account, &limits)
        .await
        .unwrap();
    assert_eq!(outcome, GuardOutcome::Passed { values: 11 });
}
