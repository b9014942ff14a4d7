//! The core promise: exact values in, only changes pushed, nothing when nothing changed.

use pendo_sync::domain::Kind;
use pendo_sync::engine::Mode;
use serde_json::json;

use crate::helpers::{TestApp, account_id};

crate::on_both_backends! {
    async fn first_sync_puts_exactly_the_crm_values_into_pendo(backend: Backend) {
        let Some(t) = TestApp::on(backend).await else {
            return;
        };
        t.seed(120);
        let report = t.sync().await;
        assert_eq!(report.cycles[0].pulled, 120);
        t.assert_converged();
        // 120 records at batch size 50: three requests, no more.
        assert_eq!(t.writes().len(), 3);
        // The wire format: numbers as numbers, dates as epoch ms, booleans as booleans.
        let id = account_id(3);
        assert_eq!(
            t.pendo.value(Kind::Account, &id, "arr"),
            Some(json!(3000.5))
        );
        assert_eq!(
            t.pendo.value(Kind::Account, &id, "isstrategic"),
            Some(json!(false))
        );
        assert_eq!(
            t.pendo.value(Kind::Account, &id, "renewaldate"),
            Some(json!(1_806_796_800_000i64))
        );
    }
}

crate::on_both_backends! {
    async fn a_cycle_with_no_change_sends_nothing_and_one_field_sends_one_field(backend: Backend) {
        let Some(t) = TestApp::on(backend).await else {
            return;
        };
        t.seed(80);
        t.sync().await;
        t.pendo.reset_requests();

        // Nothing changed: zero Pendo requests, even on a full reconcile that re-reads everything.
        t.sync().await;
        t.sync_mode(Mode::Reconcile).await;
        assert!(t.pendo.requests().is_empty(), "{:?}", t.pendo.requests());

        // The same value in another representation is not a change either.
        t.crm
            .set_field("Account", &account_id(5), "ARR__c", json!("5000.50"));
        t.sync().await;
        assert!(t.pendo.requests().is_empty(), "{:?}", t.pendo.requests());

        // One field of one record: one request carrying only that field.
        t.crm
            .set_field("Account", &account_id(7), "Plan_Tier__c", json!("Platinum"));
        t.sync().await;
        let writes = t.writes();
        assert_eq!(writes.len(), 1);
        assert_eq!(
            writes[0].body,
            Some(json!([{"accountId": account_id(7), "values": {"plantier": "Platinum"}}]))
        );
        t.assert_converged();
    }
}

#[tokio::test]
async fn an_emptied_field_clears_pendo_and_a_deleted_record_is_cleared() {
    let t = TestApp::new().await;
    t.seed(10);
    t.sync().await;
    t.crm
        .set_field("Account", &account_id(1), "Plan_Tier__c", json!(null));
    t.crm.delete("Account", &account_id(2));
    t.sync().await;
    assert_eq!(
        t.pendo.value(Kind::Account, &account_id(1), "plantier"),
        None
    );
    assert!(t.pendo.values(Kind::Account)[&account_id(2)].is_empty());
    t.assert_converged();
}

#[tokio::test]
async fn a_record_that_leaves_the_crm_is_cleared_by_the_reconcile() {
    let t = TestApp::new().await;
    t.seed(10);
    t.sync().await;
    // Gone without a trace (hard delete, or it left the filter): only a full pull notices.
    let other = pendo_sync::connectors::fixture::FixtureConnector::new(40);
    for i in 0..10 {
        if i != 4 {
            other.upsert("Account", &account_id(i), crate::helpers::account(i));
        }
    }
    let mut t = t;
    t.crm = other;
    t.sync_mode(Mode::Reconcile).await;
    assert!(t.pendo.values(Kind::Account)[&account_id(4)].is_empty());
    t.assert_converged();
}

#[tokio::test]
async fn bad_records_are_set_aside_and_the_rest_of_the_page_goes_on() {
    let t = TestApp::new().await;
    t.seed(20);
    t.crm
        .set_field("Account", &account_id(3), "ARR__c", json!("twelve"));
    t.crm.set_field("Account", &account_id(4), "Id", json!(""));
    // Two CRM records claiming one Pendo id with different values: ambiguous, neither is sent.
    let mut twin = crate::helpers::account(6);
    twin["Plan_Tier__c"] = json!("Other");
    t.crm.upsert("Account", "001TWIN", twin);
    let report = t.sync().await;
    let c = &report.cycles[0];
    assert_eq!(c.skipped_empty_ids, 1);
    assert_eq!(c.ambiguous, 1);
    let app = t.app().await;
    let invalid = app.store.invalid_records(None).await.unwrap();
    let reasons: Vec<(&str, &str)> = invalid
        .iter()
        .map(|r| (r.crm_id.as_str(), r.reason.as_str()))
        .collect();
    assert!(
        reasons.contains(&(account_id(3).as_str(), "bad_value")),
        "{reasons:?}"
    );
    assert!(
        reasons.contains(&(account_id(4).as_str(), "missing_id")),
        "{reasons:?}"
    );
    assert!(
        reasons.contains(&("001TWIN", "ambiguous_id")),
        "{reasons:?}"
    );
    let bad = invalid.iter().find(|r| r.reason == "bad_value").unwrap();
    assert!(
        bad.detail.contains("arr")
            && bad.detail.contains("ARR__c")
            && bad.detail.contains("twelve"),
        "{}",
        bad.detail
    );
    // The ambiguous id got nothing; the others all went through.
    assert!(t.pendo.values(Kind::Account)[&account_id(6)].is_empty());
    assert_eq!(
        t.pendo.value(Kind::Account, &account_id(5), "plantier"),
        Some(json!("Enterprise"))
    );
    assert_eq!(
        t.pendo
            .values(Kind::Account)
            .values()
            .filter(|v| !v.is_empty())
            .count(),
        17
    );
}

crate::on_both_backends! {
    async fn latest_value_wins_while_a_change_waits_in_the_outbox(backend: Backend) {
        let Some(t) = TestApp::on(backend).await else {
            return;
        };
        t.seed(3);
        t.sync().await;
        let app = t.app().await;
        let cancel = tokio_util::sync::CancellationToken::new();
        // Two cycles without a drain: A → B → A must leave A (the outbox holds one row per field).
        t.crm
            .set_field("Account", &account_id(0), "Plan_Tier__c", json!("B"));
        app.sync(None, Mode::Incremental, false, &cancel, &())
            .await
            .unwrap();
        t.pendo.reset_requests();
        t.crm
            .set_field("Account", &account_id(0), "Plan_Tier__c", json!("C"));
        t.crm
            .set_field("Account", &account_id(0), "Plan_Tier__c", json!("Starter"));
        app.cycle(&t.settings.mappings[0], Mode::Incremental, false, &())
            .await
            .unwrap();
        let rows = app
            .store
            .outbox_list(&Default::default(), 10)
            .await
            .unwrap();
        assert_eq!(rows.len(), 1, "{rows:?}");
        app.drain(&cancel, std::time::Duration::from_secs(1))
            .await
            .unwrap();
        t.assert_converged();
    }
}

/// The whole state as bytes: the SQLite file, or every PostgreSQL table hashed.
async fn state_now(t: &TestApp) -> Vec<u8> {
    match t.settings.state.url() {
        Some(url) => {
            use secrecy::ExposeSecret;
            crate::pg::fingerprint(url.expose_secret())
                .await
                .into_bytes()
        }
        None => std::fs::read(t.dir.path().join("state.db")).unwrap(),
    }
}

crate::on_both_backends! {
    async fn dry_run_writes_nothing_anywhere(backend: Backend) {
        let Some(t) = TestApp::on(backend).await else {
            return;
        };
        t.seed(5);
        let app = t.app().await;
        app.store.close().await; // checkpoint: the state is now what a fresh state holds
        let before = state_now(&t).await;
        let app = t.app().await;
        let report = app
            .sync(
                None,
                Mode::Incremental,
                true,
                &tokio_util::sync::CancellationToken::new(),
                &(),
            )
            .await
            .unwrap();
        assert_eq!(report.cycles[0].dry_run_changes.len(), 25);
        // Nothing sent; Pendo is only read (what it holds for the fields' first push).
        assert!(t.writes().is_empty());
        assert!(
            t.pendo.requests().iter().all(|r| r.path == "/api/v1/aggregation"),
            "{:?}",
            t.pendo.requests()
        );
        assert!(app.store.watermark("accounts").await.unwrap().is_none());
        assert!(
            app.store
                .outbox_list(&Default::default(), 10)
                .await
                .unwrap()
                .is_empty()
        );
        app.store.close().await;
        assert!(before == state_now(&t).await, "the state changed");
    }
}

crate::on_both_backends! {
/// Latest wins while a value is in flight: Pendo confirming the old value removes only the row
/// version that was sent; the newer value stays queued, unleased, and goes out next. Every other
/// row the batch held is released too, whatever its answer: a retried value (version still the
/// one sent) waits unleased for its retry time, and a superseded one that failed is due at once.
async fn a_value_replaced_in_flight_survives_the_old_one_s_confirmation(backend: Backend) {
    use pendo_sync::domain::now_ms;
    use pendo_sync::store::{Change, PageCommit, Settlement};
    let dir = tempfile::tempdir().unwrap();
    let Some(store) = backend.open_store(dir.path()).await else {
        return;
    };
    let change = |id: &str, field: &str, value: &str| Change {
        kind: Kind::Account,
        pendo_id: id.into(),
        field: field.into(),
        value: format!("{value:?}"),
        mapping: "accounts".into(),
        force: false,
        source: None,
    };
    let enqueue = |changes: Vec<Change>| {
        let store = store.clone();
        async move {
            store
                .commit_page(&PageCommit {
                    mapping: "accounts",
                    changes: &changes,
                    ..PageCommit::default()
                })
                .await
                .unwrap()
        }
    };
    enqueue(vec![
        change("a", "plantier", "Gold"),
        change("a", "owneremail", "x@example.com"),
        change("b", "plantier", "Silver"),
        change("c", "plantier", "Bronze"),
        change("d", "plantier", "Iron"),
    ])
    .await;
    let claimed = store.claim_due(Kind::Account, i64::MAX, 10).await.unwrap();
    assert_eq!(claimed.len(), 5);
    // While the batch is in flight, a's and d's tiers change again.
    enqueue(vec![
        change("a", "plantier", "Platinum"),
        change("d", "plantier", "Steel"),
    ])
    .await;
    let later = now_ms() + 3_600_000;
    let outcomes: Vec<_> = claimed
        .into_iter()
        .map(|e| {
            let settlement = match e.pendo_id.as_str() {
                // c failed and d (superseded) failed: retried later, or sent anew at once.
                "c" | "d" => Settlement::Retry {
                    retry_at: later,
                    error: "503".into(),
                    max_attempts: 10,
                    attempts: 1,
                },
                _ => Settlement::Confirmed,
            };
            (e, settlement)
        })
        .collect();
    store.settle(&outcomes).await.unwrap();

    // Oldest enqueued first: c, then the two replacements.
    let rows = store.outbox_list(&Default::default(), 10).await.unwrap();
    let left: Vec<_> = rows
        .iter()
        .map(|r| (r.pendo_id.as_str(), r.field.as_str(), r.value.as_str()))
        .collect();
    assert_eq!(
        left,
        [
            ("c", "plantier", "\"Bronze\""),
            ("a", "plantier", "\"Platinum\""),
            ("d", "plantier", "\"Steel\""),
        ],
        "{rows:?}"
    );
    // Due now: the two newer values. c waits for its retry time, unleased.
    let next: Vec<_> = store
        .claim_due(Kind::Account, now_ms(), 10)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.pendo_id)
        .collect();
    assert_eq!(next, ["a", "d"], "the newer values are unleased and due");
    let retried = store.claim_due(Kind::Account, later, 10).await.unwrap();
    assert_eq!(retried.len(), 1, "the retried value is unleased: {retried:?}");
    assert_eq!(retried[0].attempts, 1);
    let shadow = store.load_shadow(Kind::Account, &["a", "b"]).await.unwrap();
    assert_eq!(shadow["a"]["plantier"], json!("Gold"));
    assert_eq!(shadow["a"]["owneremail"], json!("x@example.com"));
    assert_eq!(shadow["b"]["plantier"], json!("Silver"));
    store.close().await;
}
}

crate::on_both_backends! {
/// Claims go round the queue: each takes due rows no other claim holds, a claim that reaches
/// the end goes on from the start (PostgreSQL claims from where the last one stopped), and no
/// due row is left behind or taken twice.
async fn claims_take_every_due_row_once_whatever_order_they_arrive_in(backend: Backend) {
    use pendo_sync::store::{Change, PageCommit, Settlement};
    let dir = tempfile::tempdir().unwrap();
    let Some(store) = backend.open_store(dir.path()).await else {
        return;
    };
    let enqueue = |ids: &[&str]| {
        let store = store.clone();
        let changes: Vec<Change> = ids
            .iter()
            .map(|id| Change {
                kind: Kind::Account,
                pendo_id: (*id).into(),
                field: "plantier".into(),
                value: "\"Gold\"".into(),
                mapping: "accounts".into(),
                force: false,
                source: None,
            })
            .collect();
        async move {
            store
                .commit_page(&PageCommit {
                    mapping: "accounts",
                    changes: &changes,
                    ..PageCommit::default()
                })
                .await
                .unwrap()
        }
    };
    let claim = |n: usize| {
        let store = store.clone();
        async move { store.claim_due(Kind::Account, i64::MAX, n).await.unwrap() }
    };
    let ids = |claimed: &[pendo_sync::store::OutboxEntry]| {
        let mut ids: Vec<String> = claimed.iter().map(|e| e.pendo_id.clone()).collect();
        ids.sort();
        ids
    };
    enqueue(&["b", "c", "d", "e"]).await;
    let first = claim(2).await;
    assert_eq!(ids(&first), ["b", "c"]);
    // A row before the first claim's ids arrives while they are in flight.
    enqueue(&["a"]).await;
    let second = claim(3).await;
    assert_eq!(ids(&second), ["a", "d", "e"], "every due row not in flight");
    assert!(claim(3).await.is_empty(), "everything is in flight");
    let release: Vec<_> = first
        .into_iter()
        .chain(second)
        .map(|e| (e, Settlement::Release))
        .collect();
    store.settle(&release).await.unwrap();
    assert_eq!(ids(&claim(10).await), ["a", "b", "c", "d", "e"]);
    store.close().await;
}
}

/// A mapping's first cycle on an empty state is scheduled as an incremental, but with no
/// watermark yet it reads every record: its log line says so. The next one is an incremental.
#[tokio::test]
async fn the_first_pull_of_a_mapping_is_logged_as_a_full_pull_not_an_incremental() {
    let captured = crate::helpers::Captured::default();
    let sink = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::INFO)
        .with_ansi(false)
        .with_writer(move || sink.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let t = TestApp::new().await;
    t.seed(3);
    t.cycle(Mode::Incremental).await;
    let finished = |text: String| -> Vec<String> {
        text.lines()
            .filter(|l| l.contains("Cycle finished."))
            .map(str::to_owned)
            .collect()
    };
    let first = finished(captured.text());
    assert_eq!(first.len(), 1, "{first:?}");
    assert!(
        first[0].contains(pendo_sync::engine::FIRST_PULL) && !first[0].contains("\"incremental\""),
        "{first:?}"
    );

    captured.0.lock().unwrap().clear();
    t.cycle(Mode::Incremental).await;
    let second = finished(captured.text());
    assert_eq!(second.len(), 1, "{second:?}");
    assert!(
        second[0].contains("mode=\"incremental\"") && !second[0].contains("first pull"),
        "{second:?}"
    );
}

/// A cycle's writes reach the state file itself within a moment, copied from the WAL in the
/// background while the store stays open: no commit of a cycle waits for that copy (it was 40
/// of the 110 ms of each page of a 1M incremental), and the WAL does not grow unchecked
/// between a service's cycles. (Before: only a commit that grew the WAL past 1,000 pages
/// copied it, so a small cycle's writes stayed in the WAL.)
#[tokio::test]
async fn a_cycle_s_writes_are_checkpointed_in_the_background() {
    let t = TestApp::new().await;
    t.seed(30);
    let app = t.app().await;
    let main_file = t.dir.path().join("state.db");
    let before = std::fs::read(&main_file).expect("state file");
    app.sync(
        None,
        Mode::Incremental,
        false,
        &tokio_util::sync::CancellationToken::new(),
        &(),
    )
    .await
    .expect("sync runs");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while std::fs::read(&main_file).expect("state file") == before {
        assert!(
            std::time::Instant::now() < deadline,
            "the state file still holds none of the cycle's writes 5 s later"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    app.store.close().await;
}
