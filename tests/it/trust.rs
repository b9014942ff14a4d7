//! Issue "trust in the field": the smaller guarantees a code review found unenforced.

use pendo_sync::connectors::Watermark;
use pendo_sync::store::PageCommit;

use crate::helpers::TestApp;

/// The connector contract says watermarks never move backward; the store enforces it, so a
/// connector bug (or a clock step) cannot make a mapping re-read from an older point and then
/// store that older point over a newer one.
#[tokio::test]
async fn a_stored_watermark_never_moves_backward() {
    let t = TestApp::new().await;
    let app = t.app().await;
    let commit_to = |mapping: &'static str, w: &str| {
        let w = Watermark(w.to_owned());
        let store = app.store.clone();
        async move {
            store
                .commit_page(&PageCommit {
                    mapping,
                    watermark: Some(&w),
                    ..Default::default()
                })
                .await
                .unwrap();
            store.watermark(mapping).await.unwrap().unwrap().0
        }
    };
    let commit = |w: &str| commit_to("accounts", w);
    assert_eq!(commit("100").await, "100");
    assert_eq!(commit("99").await, "100", "a numeric watermark went back");
    assert_eq!(commit("120").await, "120");
    let sf = |ts: &str, id: &str| format!(r#"{{"id":"{id}","ts":"{ts}"}}"#);
    let later = sf("2026-11-20T10:00:00.000Z", "001B");
    assert_eq!(commit(&later).await, later);
    let earlier = sf("2026-11-20T09:59:59.000Z", "001Z");
    assert_eq!(
        commit(&earlier).await,
        later,
        "a Salesforce cursor went back"
    );
    let tie = sf("2026-11-20T10:00:00.000Z", "001A");
    assert_eq!(
        commit(&tie).await,
        later,
        "same time, smaller id is earlier"
    );
    let hs = |ms: i64, id: &str| format!(r#"{{"id":"{id}","ms":{ms}}}"#);
    let h = hs(1_700_000_000_000, "5");
    assert_eq!(commit_to("contacts", &h).await, h);
    let back = hs(1_699_999_999_999, "9");
    assert_eq!(
        commit_to("contacts", &back).await,
        h,
        "a HubSpot mark went back"
    );
    app.store.close().await;
}

/// `sync` is one scheduled step of `run`: when `reconcile_interval` has passed since the last
/// reconcile it reconciles, so cron users get deletes, filter exits and missed changes too.
#[tokio::test]
async fn sync_reconciles_when_the_reconcile_interval_has_passed() {
    let t = TestApp::new().await;
    t.seed(6);
    let app = t.app().await;
    let cancel = tokio_util::sync::CancellationToken::new();
    let first = app.sync_scheduled(None, false, &cancel, &()).await.unwrap();
    assert_eq!(first.cycles[0].pulled, 6, "the first step reads everything");
    t.assert_converged();

    // A record leaves the CRM without a trace (hard delete, filter exit): incremental pulls
    // cannot see it.
    let gone = crate::helpers::account_id(3);
    t.crm.purge("Account", &gone);
    app.sync_scheduled(None, false, &cancel, &()).await.unwrap();
    assert!(
        t.pendo
            .value(pendo_sync::domain::Kind::Account, &gone, "plantier")
            .is_some()
    );

    // A day later (the test's reconcile_interval is the default 24h), the step reconciles.
    let day_ago = pendo_sync::domain::now_ms() - 25 * 3600 * 1000;
    app.store
        .kv_set(
            "reconcile.accounts",
            &serde_json::json!({ "at_ms": day_ago }),
        )
        .await
        .unwrap();
    let step = app.sync_scheduled(None, false, &cancel, &()).await.unwrap();
    assert_eq!(step.cycles[0].cleared_orphans, 1, "{:?}", step.cycles);
    t.assert_converged();
    let record = pendo_sync::schedule::ReconcileRecord::load(&app.store, "accounts")
        .await
        .unwrap()
        .unwrap();
    assert!(
        record.at_ms.unwrap() > day_ago,
        "the reconcile was recorded"
    );
    assert_eq!(record.failures, 0);
    app.store.close().await;
}
