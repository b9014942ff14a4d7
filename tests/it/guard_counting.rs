//! What the guard counts, and against what (DESIGN, "The guard"): overwrites against the
//! field's values across the mapping (a routine bulk edit passes), clears also summed over the
//! rolling `guard.window` (a property that vanishes a few records per poll is caught), and the
//! values Pendo held before pendo-sync first wrote a field adopted before the first push (equal
//! ones never sent, different ones counted as overwrites).

use pendo_sync::domain::Kind;
use pendo_sync::engine::Mode;
use pendo_sync::store::{GuardOutcome, Hold, Store};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::helpers::{Options, TestApp, account_id};
use crate::on_both_backends;
use crate::pg::Backend;

async fn app_on(backend: Backend, opts: Options) -> Option<TestApp> {
    let state_url = backend.state_url().await.ok()?;
    Some(TestApp::with(Options { state_url, ..opts }).await)
}

/// Large batches: these tests send tens of thousands of values.
fn big_batches() -> Options {
    Options {
        batch_size: 500,
        ..Options::default()
    }
}

fn held(outcome: &Option<GuardOutcome>) -> i64 {
    match outcome {
        Some(GuardOutcome::Held { hold_id, .. }) => *hold_id,
        other => panic!("expected a hold, got {other:?}"),
    }
}

fn passed(outcome: &Option<GuardOutcome>) -> u64 {
    match outcome {
        Some(GuardOutcome::Passed { values }) => *values,
        other => panic!("expected the guard to pass the cycle, got {other:?}"),
    }
}

async fn hold(t: &TestApp, id: i64) -> Hold {
    let store = Store::open_settings(&t.settings.state).await.unwrap();
    let hold = store.hold(id).await.unwrap().unwrap();
    store.close().await;
    hold
}

async fn decide(t: &TestApp, id: i64, approve: bool) {
    let store = Store::open_settings(&t.settings.state).await.unwrap();
    store
        .decide_hold(id, approve, "tester", None)
        .await
        .unwrap();
    store.close().await;
}

/// What time passing does to the window: its entries dated `ms` earlier.
async fn age_guard_window(t: &TestApp, ms: i64) {
    let sql = format!("UPDATE guard_window SET at = at - {ms}");
    match t.settings.state.is_postgres() {
        true => {
            let url = crate::pg::state_url(t);
            let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&url)
                .await
                .unwrap();
            sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                .execute(&mut conn)
                .await
                .unwrap();
        }
        false => {
            let store = Store::open_settings(&t.settings.state).await.unwrap();
            sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                .execute(store.pool())
                .await
                .unwrap();
            store.close().await;
        }
    }
}

/// The (id, field) pairs Pendo was sent since the last reset.
fn written(t: &TestApp) -> Vec<(String, String)> {
    t.writes()
        .iter()
        .flat_map(|r| r.written_values())
        .map(|(id, field, _)| (id, field))
        .collect()
}

on_both_backends! {
    /// 20,000 accounts; a workflow moves 200 of them (1 %) to a new plan tier within one poll.
    /// The incremental cycle covers only those 200, but overwrites are judged against the
    /// field's 20,000 values: it passes (it was held "on 200 of 200").
    async fn a_one_percent_bulk_edit_of_20000_records_passes(backend: Backend) {
        let Some(t) = app_on(backend, big_batches()).await else {
            return;
        };
        t.seed(20_000);
        let first = t.sync().await;
        passed(&first.cycles[0].guard);
        t.pendo.reset_requests();
        for i in (0..20_000).step_by(100) {
            t.crm
                .set_field("Account", &account_id(i), "Plan_Tier__c", json!("Scale"));
        }
        let report = t.sync().await;
        assert_eq!(report.cycles[0].changes, 200);
        assert_eq!(passed(&report.cycles[0].guard), 200);
        assert_eq!(written(&t).len(), 200);
        assert_eq!(
            t.pendo.value(Kind::Account, &account_id(100), "plantier"),
            Some(json!("Scale"))
        );
        // The same edit of 60 % at once is held: overwrites past the limit of the mapping.
        for i in 0..12_000 {
            t.crm
                .set_field("Account", &account_id(i), "Plan_Tier__c", json!("Cents"));
        }
        let report = t.sync().await;
        let id = held(&report.cycles[0].guard);
        let reason = hold(&t, id).await.reason;
        assert!(
            reason.contains("would overwrite `plantier` on 12,000 of 20,000 accounts (60% > 50%)"),
            "{reason}"
        );
    }
}

on_both_backends! {
    /// `Plan_Tier__c` vanishes 40 accounts per poll (below `min_values` for any one cycle). The
    /// clears the guard let through add up over `guard.window` against the field's values
    /// across the mapping: the cycle that takes the sum past 10 % is held, a later cycle joins
    /// and the hold's reason and counts say what it holds now. A person's decision starts the
    /// sum again; sums older than the window no longer count.
    async fn a_property_vanishing_40_records_per_cycle_is_held_once_the_window_sum_passes(
        backend: Backend
    ) {
        let Some(t) = app_on(backend, Options::default()).await else {
            return;
        };
        t.seed(1_000);
        t.sync().await;
        let mut next = 0;
        let mut vanish = |t: &TestApp| {
            for i in next..next + 40 {
                t.crm.set_field("Account", &account_id(i), "Plan_Tier__c", json!(null));
            }
            next += 40;
        };
        // 40 and 80 of 1,000: within 10 %.
        for _ in 0..2 {
            vanish(&t);
            let report = t.sync().await;
            assert_eq!(passed(&report.cycles[0].guard), 40);
        }
        // 120 of the 920 values left: held.
        t.pendo.reset_requests();
        vanish(&t);
        let report = t.sync().await;
        let id = held(&report.cycles[0].guard);
        assert!(written(&t).is_empty(), "nothing of a held cycle goes out");
        let h = hold(&t, id).await;
        assert_eq!(
            h.reason,
            "would clear `plantier` on 120 of 920 accounts within 24h (13% > 10%)"
        );
        assert_eq!(h.counts["plantier"].clears, 40);
        // The next 40 join the hold: its reason and counts describe all 80 it holds now.
        vanish(&t);
        let report = t.sync().await;
        assert_eq!(held(&report.cycles[0].guard), id);
        let h = hold(&t, id).await;
        assert_eq!(h.counts["plantier"].clears, 80);
        assert_eq!(h.held_values, 80);
        assert_eq!(
            h.reason,
            "would clear `plantier` on 160 of 920 accounts within 24h (17% > 10%)"
        );
        // Approved: the 80 go out, and the sum starts again, so the next 40 pass.
        decide(&t, id, true).await;
        let report = t.sync().await;
        assert_eq!(report.drain.unwrap().confirmed, 80);
        vanish(&t);
        let report = t.sync().await;
        assert_eq!(passed(&report.cycles[0].guard), 40);
        vanish(&t);
        let report = t.sync().await;
        assert_eq!(passed(&report.cycles[0].guard), 40);
        // Sums older than the window are gone: move them back two days, and 40 more pass
        // where the sum (40 + 40 + 40 of 760) would have held them.
        age_guard_window(&t, 48 * 3600 * 1000).await;
        vanish(&t);
        let report = t.sync().await;
        assert_eq!(passed(&report.cycles[0].guard), 40);
        t.assert_converged();
    }
}

/// Another integration wrote the accounts' fields into Pendo before pendo-sync: every field
/// equal to the CRM, except the plan tier, stale on 60 % of them.
fn prefill_pendo(t: &TestApp) -> Vec<String> {
    let mut stale = Vec::new();
    for (id, fields) in t.expected() {
        for (field, value) in fields {
            t.pendo.set_value(Kind::Account, &id, &field, value);
        }
        let i: usize = id[4..].parse().unwrap();
        if i % 10 < 6 {
            t.pendo
                .set_value(Kind::Account, &id, "plantier", json!("Legacy"));
            stale.push(id);
        }
    }
    stale.sort();
    stale
}

on_both_backends! {
    /// The first sync over values another integration wrote: what Pendo holds is read before
    /// the first push, equal values are adopted (never sent), and the stale plan tiers count as
    /// overwrites of Pendo's values: held beyond the limit. Approved, only they go out.
    async fn a_first_sync_over_another_integrations_values_is_held_and_sends_none_of_the_equal_ones(
        backend: Backend
    ) {
        let Some(t) = app_on(backend, Options::default()).await else {
            return;
        };
        let n = 300;
        t.seed(n);
        let stale = prefill_pendo(&t);
        assert_eq!(stale.len(), 180);
        // The dry run judges as the sync will: only the stale values would change, held.
        let app = t.app().await;
        let dry = app
            .sync(None, Mode::Incremental, true, &CancellationToken::new(), &())
            .await
            .unwrap();
        app.store.close().await;
        assert_eq!(dry.cycles[0].dry_run_changes.len(), 180);
        assert_eq!(
            dry.cycles[0].would_hold.as_deref(),
            Some("would overwrite `plantier` on 180 of 300 accounts (60% > 50%)")
        );
        t.pendo.reset_requests();
        let report = t.sync().await;
        let id = held(&report.cycles[0].guard);
        assert!(written(&t).is_empty(), "nothing is sent: {:?}", written(&t));
        let h = hold(&t, id).await;
        assert_eq!(
            h.reason,
            "would overwrite `plantier` on 180 of 300 accounts (60% > 50%)"
        );
        assert_eq!(h.held_values, 180);
        assert_eq!(h.counts["plantier"].overwrites, 180);
        assert_eq!(h.counts["plantier"].sets, 0);
        assert!(h.sample.iter().all(|c| c.from.as_deref() == Some("\"Legacy\"")), "{:?}", h.sample);
        // `why` tells where the shadow's values came from.
        let store = Store::open_settings(&t.settings.state).await.unwrap();
        let events = store
            .history(Kind::Account, &account_id(1), Some("arr"), 10)
            .await
            .unwrap();
        store.close().await;
        assert!(
            events.iter().any(|e| e.event == pendo_sync::store::Event::Adopted),
            "{events:?}"
        );

        decide(&t, id, true).await;
        let app = t.app().await;
        app.drain(&CancellationToken::new(), std::time::Duration::from_secs(5))
            .await
            .unwrap();
        app.store.close().await;
        let mut sent = written(&t);
        sent.sort();
        let expected: Vec<(String, String)> =
            stale.iter().map(|id| (id.clone(), "plantier".to_owned())).collect();
        assert_eq!(sent, expected, "only the differing values went out");
        t.assert_converged();
        // Nothing left to adopt or send: the next reconcile reads Pendo no more and sends nothing.
        t.pendo.reset_requests();
        let report = t.sync_mode(Mode::Reconcile).await;
        assert_eq!(report.cycles[0].changes, 0);
        assert!(t.pendo.requests().iter().all(|r| r.path != "/api/v1/aggregation"));
    }
}

/// `audit --against pendo` on the same world judges as the first sync would: Pendo's values
/// stand where the shadow holds none.
#[tokio::test]
async fn the_audit_against_pendo_counts_what_adoption_would() {
    let t = TestApp::new().await;
    let n = 300;
    t.seed(n);
    prefill_pendo(&t);
    let mut connectors = pendo_sync::app::Connectors::new();
    connectors.insert(
        pendo_sync::config::Source::Salesforce,
        std::sync::Arc::new(t.crm.clone()),
    );
    let options = pendo_sync::audit::AuditOptions {
        against: pendo_sync::audit::Against::Pendo,
        ..Default::default()
    };
    let report = pendo_sync::audit::audit(&t.settings, &connectors, &options)
        .await
        .unwrap();
    assert_eq!(
        report.mappings[0].guard.as_deref(),
        Some("would hold: would overwrite `plantier` on 180 of 300 accounts (60% > 50%)"),
        "{:?}",
        report.mappings[0]
    );
}
