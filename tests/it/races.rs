//! Races made deterministic: a pause hook in the store stops a cycle between two statements while
//! a second writer settles, which is exactly the interleaving two pool connections allowed.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use pendo_sync::app::App;
use pendo_sync::domain::Kind;
use pendo_sync::engine::Mode;
use pendo_sync::store::{PauseHook, PausePoint};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::helpers::{TestApp, account_id};

/// A hook that, the first time the store reaches `at`, drains the outbox through `other` (a
/// second writer on the same state file) before letting the store go on.
fn drain_once_at(at: PausePoint, other: Arc<App>) -> PauseHook {
    let fired = Arc::new(AtomicBool::new(false));
    Arc::new(move |point| {
        let other = other.clone();
        let first = point == at && !fired.swap(true, Ordering::SeqCst);
        Box::pin(async move {
            if first {
                other
                    .drain(&CancellationToken::new(), Duration::ZERO)
                    .await
                    .expect("the second writer drains");
            }
        })
    })
}

/// Pendo holds A, B is queued, the CRM goes back to A: a cycle must not take "shadow A, nothing
/// queued" from two moments between which the writer confirmed B.
#[tokio::test]
async fn a_diff_reads_shadow_and_outbox_from_one_snapshot() {
    let t = TestApp::new().await;
    t.seed(5);
    t.sync().await;
    let id = account_id(0);
    let original = t.crm.records("Account")[&id]["Plan_Tier__c"].clone();
    t.crm.set_field("Account", &id, "Plan_Tier__c", json!("B"));
    let app = t.app().await;
    let m = &t.settings.mappings[0];
    app.cycle(m, Mode::Incremental, false, &()).await.unwrap();
    t.crm.set_field("Account", &id, "Plan_Tier__c", original);

    let other = Arc::new(t.app().await);
    app.store
        .set_pause_hook(Some(drain_once_at(PausePoint::BetweenDiffReads, other)));
    let report = app.cycle(m, Mode::Incremental, false, &()).await.unwrap();
    app.store.set_pause_hook(None);
    assert_eq!(report.changes, 1, "A replaces the queued B");
    app.drain(&CancellationToken::new(), Duration::from_secs(1))
        .await
        .unwrap();
    t.assert_converged();
}

/// The same race on the reconcile's digest load: a digest read before the writer confirmed B,
/// with the outbox read after, would let A skip the diff while Pendo holds B.
#[tokio::test]
async fn a_reconcile_reads_digests_and_outbox_ids_from_one_snapshot() {
    let t = TestApp::new().await;
    t.seed(5);
    t.sync().await;
    t.sync_mode(Mode::Reconcile).await;
    let id = account_id(1);
    let original = t.crm.records("Account")[&id]["Plan_Tier__c"].clone();
    t.crm.set_field("Account", &id, "Plan_Tier__c", json!("B"));
    let app = t.app().await;
    let m = &t.settings.mappings[0];
    app.cycle(m, Mode::Reconcile, false, &()).await.unwrap();
    t.crm.set_field("Account", &id, "Plan_Tier__c", original);

    let other = Arc::new(t.app().await);
    app.store
        .set_pause_hook(Some(drain_once_at(PausePoint::BetweenDigestReads, other)));
    let report = app.cycle(m, Mode::Reconcile, false, &()).await.unwrap();
    app.store.set_pause_hook(None);
    assert_eq!(report.changes, 1, "A goes out again: Pendo holds B");
    app.drain(&CancellationToken::new(), Duration::from_secs(1))
        .await
        .unwrap();
    t.assert_converged();
}

/// A digest says "the shadow holds these values". If the shadow changes after the diff read it
/// and before the page commits, the digest must not be written: the next reconcile would skip a
/// record that differs from Pendo.
#[tokio::test]
async fn a_digest_is_not_written_over_a_shadow_that_changed_after_the_diff_read_it() {
    let t = TestApp::new().await;
    t.seed(5);
    t.sync().await;
    let id = account_id(2);
    // Another writer path changes what Pendo confirmed for the record while the reconcile's diff
    // has its snapshot: it queues and sends C (as an operator's resync of an older CRM state
    // would), so the shadow holds C with nothing queued when the reconcile commits.
    let other = Arc::new(t.app().await);
    let fired = Arc::new(AtomicBool::new(false));
    let hook_id = id.clone();
    let hook: PauseHook = Arc::new(move |point| {
        let other = other.clone();
        let id = hook_id.clone();
        let first = point == PausePoint::BetweenDiffReads && !fired.swap(true, Ordering::SeqCst);
        Box::pin(async move {
            if first {
                let change = pendo_sync::store::Change {
                    kind: Kind::Account,
                    pendo_id: id,
                    field: "plantier".into(),
                    value: json!("C").to_string(),
                    mapping: "accounts".into(),
                    force: false,
                    source: None,
                };
                other
                    .store
                    .commit_page(&pendo_sync::store::PageCommit {
                        mapping: "accounts",
                        changes: &[change],
                        ..Default::default()
                    })
                    .await
                    .unwrap();
                other
                    .drain(&CancellationToken::new(), Duration::ZERO)
                    .await
                    .unwrap();
            }
        })
    });
    let app = t.app().await;
    app.store.set_pause_hook(Some(hook));
    let m = &t.settings.mappings[0];
    app.cycle(m, Mode::Reconcile, false, &()).await.unwrap();
    app.store.set_pause_hook(None);
    assert_eq!(
        t.pendo.value(Kind::Account, &id, "plantier"),
        Some(json!("C"))
    );
    // The CRM still says what it said: the next reconcile must find Pendo's C and repair it.
    let report = app.cycle(m, Mode::Reconcile, false, &()).await.unwrap();
    assert_eq!(report.changes, 1, "{report:?}");
    app.drain(&CancellationToken::new(), Duration::from_secs(1))
        .await
        .unwrap();
    t.assert_converged();
}

/// Guarantee 10: a second writer never releases the leases of batches another process has in
/// flight (which sent them twice, and could land an older value last); it waits for the lock a
/// bounded time, then gives up naming the holder.
#[tokio::test]
async fn a_second_writer_waits_for_the_lock_and_never_releases_anothers_leases() {
    let t = TestApp::new().await;
    t.seed(6);
    let first = t.app().await;
    let m = &t.settings.mappings[0];
    first.cycle(m, Mode::Incremental, false, &()).await.unwrap();
    first.hold_lock(
        pendo_sync::lock::InstanceLock::acquire(&t.settings.state.path, "sync").unwrap(),
    );
    // The first writer has a batch in flight.
    let in_flight = first
        .store
        .claim_due(Kind::Account, i64::MAX, 100)
        .await
        .unwrap();
    assert_eq!(in_flight.len(), 6 * 5);

    let mut second = t.app().await;
    second.lock_wait = Duration::from_millis(300);
    let err = second
        .sync(
            None,
            Mode::Incremental,
            false,
            &CancellationToken::new(),
            &(),
        )
        .await
        .expect_err("the second writer gives up");
    let text = err.to_string();
    assert!(
        text.contains(&format!("pendo-sync sync (pid {})", std::process::id())),
        "{text}"
    );
    assert!(t.writes().is_empty(), "nothing was sent twice");
    let still = first
        .store
        .claim_due(Kind::Account, i64::MAX, 100)
        .await
        .unwrap();
    assert!(
        still.is_empty(),
        "the first writer's leases stand: {still:?}"
    );
    assert_eq!(err.exit_code(), 1);
}

/// Bounded memory: while the checking side is stuck, the fetching side runs ahead by at most
/// `engine::RECORDS_AHEAD` records (plus the page being fetched), however large the pages are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pull_runs_ahead_by_a_bounded_number_of_records() {
    const PAGE: usize = 20_000;
    let t = TestApp::new().await;
    let crm = pendo_sync::connectors::fixture::FixtureConnector::new(PAGE);
    for i in 0..12 * PAGE {
        let id = account_id(i);
        crm.upsert(
            "Account",
            &id,
            json!({ "Id": id, "Plan_Tier__c": "Starter" }),
        );
    }
    let mut connectors = pendo_sync::app::Connectors::new();
    connectors.insert(
        pendo_sync::config::Source::Salesforce,
        Arc::new(crm.clone()),
    );
    let app = App::open(t.settings.clone(), connectors).await.unwrap();
    let served_when_stuck = Arc::new(std::sync::Mutex::new(None));
    let (fired, served) = (Arc::new(AtomicBool::new(false)), served_when_stuck.clone());
    let watched = crm.clone();
    app.store.set_pause_hook(Some(Arc::new(move |point| {
        let first = point == PausePoint::BetweenDiffReads && !fired.swap(true, Ordering::SeqCst);
        let (crm, served) = (watched.clone(), served.clone());
        Box::pin(async move {
            if !first {
                return;
            }
            // Stuck on the first page: wait until the fetching side stops (or 20 s).
            let mut last = crm.pages_served();
            for _ in 0..100 {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let now = crm.pages_served();
                if now == last {
                    break;
                }
                last = now;
            }
            *served.lock().unwrap() = Some(last);
        })
    })));
    let m = &t.settings.mappings[0];
    let report = app.cycle(m, Mode::Incremental, true, &()).await.unwrap();
    assert_eq!(report.pulled, (12 * PAGE) as u64);
    let served = served_when_stuck.lock().unwrap().expect("the hook ran");
    let bound = pendo_sync::engine::RECORDS_AHEAD.div_ceil(PAGE) + 2;
    assert!(
        served <= bound,
        "{served} pages fetched ahead, bound {bound}"
    );
}

/// Staging closes the ambiguity window: a first claimant's value committed on page 1 is not
/// claimable while a later page of the same pull can still reveal a second claimant, so a writer
/// draining in between (the service's worker runs beside its cycles) sends nothing of it.
#[tokio::test]
async fn nothing_of_a_pull_goes_out_before_the_whole_pull_was_checked_for_two_claimants() {
    let t = TestApp::new().await; // the fixture serves 40 records per page
    t.seed(100);
    let mut dup = crate::helpers::account(0);
    dup["Plan_Tier__c"] = json!("Duplicate");
    t.crm.upsert("Account", "zz-second-claimant", dup); // the newest change: the last page
    let other = Arc::new(t.app().await);
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let app = t.app().await;
    app.store.set_pause_hook(Some(Arc::new(move |point| {
        let other = other.clone();
        let n = if point == PausePoint::BetweenDiffReads {
            calls.fetch_add(1, Ordering::SeqCst) + 1
        } else {
            0
        };
        Box::pin(async move {
            // Checking the last page: a writer drains everything claimable right now.
            if n == 3 {
                other
                    .drain(&CancellationToken::new(), Duration::ZERO)
                    .await
                    .expect("the second writer drains");
            }
        })
    })));
    let report = app
        .cycle(&t.settings.mappings[0], Mode::Incremental, false, &())
        .await
        .unwrap();
    app.store.set_pause_hook(None);
    assert_eq!(report.pages, 3);
    assert!(report.ambiguous >= 1, "{report:?}");
    assert!(
        t.writes().is_empty(),
        "sent before the pull was checked: {:?}",
        t.writes()
    );
    app.drain(&CancellationToken::new(), Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(
        t.pendo.value(Kind::Account, &account_id(0), "plantier"),
        None,
        "neither claimant's value goes out"
    );
    assert!(
        t.pendo
            .value(Kind::Account, &account_id(1), "plantier")
            .is_some()
    );
}
