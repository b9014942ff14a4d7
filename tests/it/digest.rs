//! The reconcile's shortcut: records whose values match the digest of their last empty diff skip
//! the shadow load and the diff. These tests show the shortcut is taken, and that it never hides
//! a change: whatever touches an entity's shadow or outbox makes its digest stale.

use pendo_sync::digest::id_hash;
use pendo_sync::domain::Kind;
use pendo_sync::engine::Mode;
use pendo_sync::store::{Change, PageCommit, QueueFilter, Settlement, Store};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::helpers::{TestApp, account_id};

#[tokio::test]
async fn unchanged_records_skip_the_diff_and_a_b_a_still_sends_a() {
    let t = TestApp::new().await;
    t.seed(30);
    t.sync().await;

    // The first reconcile after the initial push diffs everything and records 30 digests.
    let first = t.sync_mode(Mode::Reconcile).await;
    assert_eq!(first.cycles[0].unchanged_by_digest, 0);
    let app = t.app().await;
    assert_eq!(app.store.digest_count("accounts").await.unwrap(), 30);
    app.store.close().await;

    // The next one takes the shortcut for all of them and sends nothing.
    t.pendo.reset_requests();
    let second = t.sync_mode(Mode::Reconcile).await;
    assert_eq!(second.cycles[0].unchanged_by_digest, 30);
    assert_eq!(second.cycles[0].changes, 0);
    assert!(t.pendo.requests().is_empty(), "{:?}", t.pendo.requests());

    // A → B, no drain: B is queued, which hides the record's digest (of A).
    let id = account_id(4);
    let original = t.crm.records("Account")[&id]["Plan_Tier__c"].clone();
    t.crm
        .set_field("Account", &id, "Plan_Tier__c", json!("Platinum"));
    let app = t.app().await;
    let cancel = CancellationToken::new();
    let b = app
        .cycle(&t.settings.mappings[0], Mode::Reconcile, false, &())
        .await
        .unwrap();
    assert_eq!((b.changes, b.unchanged_by_digest), (1, 29));
    let usable = app.store.load_digests(Kind::Account, "accounts").await;
    assert_eq!(usable.unwrap().len(), 29);

    // B → A before B went out: A matches the digest A once had, but that digest is hidden, so
    // the record is diffed against the queued B and A replaces it.
    t.crm.set_field("Account", &id, "Plan_Tier__c", original);
    let a = app
        .cycle(&t.settings.mappings[0], Mode::Reconcile, false, &())
        .await
        .unwrap();
    assert_eq!((a.changes, a.unchanged_by_digest), (1, 29));
    app.drain(&cancel, std::time::Duration::from_secs(1))
        .await
        .unwrap();
    t.assert_converged();
    app.store.close().await;

    // B never went out and Pendo already held A: the writer settled the queued A without
    // sending it and the shadow row never changed, so the digest of A stands again.
    assert!(t.writes().is_empty(), "{:?}", t.writes());
    let after = t.sync_mode(Mode::Reconcile).await;
    assert_eq!(after.cycles[0].unchanged_by_digest, 30);

    // A → B sent and confirmed (the shadow row changes, which deletes the digest of A), then
    // B → A: A must go out again, though its values hash to the digest it once had.
    let original = t.crm.records("Account")[&id]["Plan_Tier__c"].clone();
    t.crm
        .set_field("Account", &id, "Plan_Tier__c", json!("Platinum"));
    let sent_b = t.sync_mode(Mode::Reconcile).await;
    assert_eq!(sent_b.cycles[0].changes, 1);
    assert_eq!(
        t.pendo.value(Kind::Account, &id, "plantier"),
        Some(json!("Platinum"))
    );
    t.crm.set_field("Account", &id, "Plan_Tier__c", original);
    let sent_a = t.sync_mode(Mode::Reconcile).await;
    assert_eq!(
        (
            sent_a.cycles[0].changes,
            sent_a.cycles[0].unchanged_by_digest
        ),
        (1, 29)
    );
    t.assert_converged();
    let app = t.app().await;
    assert_eq!(app.store.digest_count("accounts").await.unwrap(), 29);
    app.store.close().await;
}

#[tokio::test]
async fn resync_ignores_digests_and_repairs_pendo() {
    let t = TestApp::new().await;
    t.seed(10);
    t.sync().await;
    t.sync_mode(Mode::Reconcile).await; // digests for all 10
    // Someone edits Pendo by hand: the shadow (and the digest) still say "in sync".
    t.pendo.set_value(
        Kind::Account,
        &account_id(2),
        "plantier",
        json!("hand-edited"),
    );
    let reconcile = t.sync_mode(Mode::Reconcile).await;
    assert_eq!(reconcile.cycles[0].unchanged_by_digest, 10);
    let resync = t.sync_mode(Mode::Resync).await;
    assert_eq!(resync.cycles[0].unchanged_by_digest, 0);
    t.assert_converged();
}

/// The store-level contract, statement by statement: a digest is written only for entities with
/// no outbox rows, is not loaded while the entity has outbox rows, and any change to the entity's
/// shadow row deletes it.
#[tokio::test]
async fn any_outbox_or_shadow_change_makes_the_digest_stale() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("state.db")).await.unwrap();
    let ids = ["a", "b", "c", "d"];
    let digests: Vec<(String, u64)> = ids.iter().map(|id| (id.to_string(), 7)).collect();
    let write = |d: Vec<(String, u64)>| {
        let store = store.clone();
        async move {
            store
                .commit_page(&PageCommit {
                    mapping: "accounts",
                    digests: Some((Kind::Account, &d, i64::MAX)),
                    ..PageCommit::default()
                })
                .await
                .unwrap();
        }
    };
    let change = |id: &str, value: &str| Change {
        kind: Kind::Account,
        pendo_id: id.into(),
        field: "plantier".into(),
        value: format!("{value:?}"),
        mapping: "accounts".into(),
        force: false,
        source: None,
    };
    let enqueue = |c: Vec<Change>| {
        let store = store.clone();
        async move {
            store
                .commit_page(&PageCommit {
                    mapping: "accounts",
                    changes: &c,
                    ..PageCommit::default()
                })
                .await
                .unwrap();
        }
    };
    let stale = |id: &'static str| {
        let store = store.clone();
        async move {
            let kept = store.load_digests(Kind::Account, "accounts").await.unwrap();
            kept.get(&id_hash(id)) != Some(&7)
        }
    };

    write(digests.clone()).await;
    assert_eq!(store.digest_count("accounts").await.unwrap(), 4);
    assert!(!stale("a").await);
    // Digests belong to their mapping and kind.
    assert!(
        store
            .load_digests(Kind::Account, "other")
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        store
            .load_digests(Kind::Visitor, "accounts")
            .await
            .unwrap()
            .is_empty()
    );

    // Queued values for "a" and "b" hide their digests.
    enqueue(vec![change("a", "x"), change("b", "x")]).await;
    assert!(stale("a").await && stale("b").await);
    write(vec![("b".into(), 7)]).await; // "b" has an outbox row: not recorded
    assert!(stale("b").await);
    // The writer confirms "a": outbox delete + shadow insert. Then a fresh digest can be kept.
    let claimed = store.claim_due(Kind::Account, i64::MAX, 10).await.unwrap();
    let a_row = claimed.iter().find(|e| e.pendo_id == "a").unwrap().clone();
    let b_row = claimed.iter().find(|e| e.pendo_id == "b").unwrap().clone();
    store
        .settle(&[(a_row, Settlement::Confirmed), (b_row, Settlement::Release)])
        .await
        .unwrap();
    write(vec![("a".into(), 7)]).await;
    assert!(!stale("a").await);
    // A shadow update (confirming another field of "a") makes it stale again.
    enqueue(vec![Change {
        field: "arr".into(),
        ..change("a", "1")
    }])
    .await;
    write(vec![("a".into(), 7)]).await; // refused: "a" has an outbox row again
    let claimed = store.claim_due(Kind::Account, i64::MAX, 10).await.unwrap();
    let outcomes: Vec<_> = claimed
        .into_iter()
        .map(|e| (e, Settlement::Confirmed))
        .collect();
    store.settle(&outcomes).await.unwrap();
    assert!(stale("a").await);

    // A queued value hides the digest (the diff must compare against it); dropping the value
    // brings it back, as the shadow row the digest describes never changed.
    write(vec![("c".into(), 7)]).await;
    assert!(!stale("c").await);
    enqueue(vec![change("c", "y")]).await;
    assert!(stale("c").await);
    store
        .outbox_drop(
            &QueueFilter {
                pendo_id: Some("c".into()),
                ..QueueFilter::default()
            },
            "test",
        )
        .await
        .unwrap();
    assert!(!stale("c").await);

    // "d" was never touched: its digest stands.
    assert!(!stale("d").await);
    store.close().await;
}

/// `load_digests` pages through the table (50,000 per statement): every digest comes back once.
#[tokio::test]
async fn digests_load_across_pages() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("state.db")).await.unwrap();
    let n = 120_001u64;
    let digests: Vec<(String, u64)> = (0..n)
        .map(|i| {
            (
                format!("acct-{i:07}"),
                i.wrapping_mul(0x9E37_79B9_7F4A_7C15),
            )
        })
        .collect();
    store
        .commit_page(&PageCommit {
            mapping: "accounts",
            digests: Some((Kind::Account, &digests, i64::MAX)),
            ..PageCommit::default()
        })
        .await
        .unwrap();
    let kept = store.load_digests(Kind::Account, "accounts").await.unwrap();
    assert_eq!(kept.len() as u64, n);
    for (id, d) in digests.iter().step_by(997) {
        assert_eq!(kept.get(&id_hash(id)), Some(d), "{id}");
    }
    store.close().await;
}
