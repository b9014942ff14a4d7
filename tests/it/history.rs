//! Guarantee 11 (provenance): one value followed through every path a change can take, with the
//! exact sequence of events the history keeps for it; and retention.

use pendo_sync::domain::Kind;
use pendo_sync::engine::Mode;
use pendo_sync::sim::pendo::PendoFaults;
use pendo_sync::store::{Event, GuardOutcome, QueueFilter, SentBatch, Settlement, Store};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::helpers::{Options, TestApp, account_id};

async fn store(t: &TestApp) -> Store {
    Store::open(&t.settings.state.path).await.unwrap()
}

/// The events of (account `id`, `field`), oldest first, as `event value`.
async fn story(t: &TestApp, id: &str, field: &str) -> Vec<String> {
    let store = store(t).await;
    let mut events = store
        .history(Kind::Account, id, Some(field), 1_000)
        .await
        .unwrap();
    store.close().await;
    events.reverse();
    events
        .iter()
        .map(|e| format!("{} {}", e.event, e.value.as_deref().unwrap_or("-")))
        .collect()
}

/// One cycle without a drain (the value waits in the outbox).
async fn cycle_only(t: &TestApp) {
    t.cycle(Mode::Incremental).await;
}

async fn retry_by_hand(t: &TestApp, id: &str) {
    let store = store(t).await;
    let n = store
        .outbox_retry(
            &QueueFilter {
                pendo_id: Some(id.to_owned()),
                ..QueueFilter::default()
            },
            "queue retry by tester",
        )
        .await
        .unwrap();
    assert!(n > 0);
    store.close().await;
}

fn plan(t: &TestApp, i: usize, value: &str) {
    t.crm
        .set_field("Account", &account_id(i), "Plan_Tier__c", json!(value));
}

#[tokio::test]
async fn first_sync_change_supersession_429_retry_400_dead_and_a_retry_by_hand() {
    let t = TestApp::new().await;
    t.seed(3);
    let id = account_id(1);
    let mut expected = vec![r#"detected "Growth""#, r#"confirmed "Growth""#];
    t.sync().await;
    assert_eq!(story(&t, &id, "plantier").await, expected);

    // A change.
    plan(&t, 1, "Pro");
    t.sync().await;
    expected.extend([r#"detected "Pro""#, r#"confirmed "Pro""#]);
    assert_eq!(story(&t, &id, "plantier").await, expected);

    // A change superseded before it was sent: two cycles, then one drain.
    plan(&t, 1, "A");
    cycle_only(&t).await;
    plan(&t, 1, "B");
    cycle_only(&t).await;
    t.sync().await;
    expected.extend([
        r#"detected "A""#,
        r#"superseded "A""#,
        r#"detected "B""#,
        r#"confirmed "B""#,
    ]);
    assert_eq!(story(&t, &id, "plantier").await, expected);

    // 429s past the in-process attempts: a failed send, then a confirmed one.
    t.pendo.set_faults(PendoFaults {
        status_script: vec![429; 3],
        ..PendoFaults::default()
    });
    plan(&t, 1, "C");
    t.sync().await;
    expected.extend([r#"detected "C""#, r#"failed "C""#, r#"confirmed "C""#]);
    assert_eq!(story(&t, &id, "plantier").await, expected);
    let s = store(&t).await;
    let events = s
        .history(Kind::Account, &id, Some("plantier"), 2)
        .await
        .unwrap();
    let failed = &events[1];
    assert_eq!(failed.event, Event::Failed);
    let batch = failed
        .batch
        .as_ref()
        .expect("the failed send names its batch");
    assert_eq!(batch.attempts, 3);
    assert!(batch.answer.contains("429"), "{}", batch.answer);
    assert!(
        failed.detail.is_none(),
        "the batch's answer is not copied per value"
    );
    let confirmed = &events[0];
    assert!(
        confirmed
            .batch
            .as_ref()
            .unwrap()
            .answer
            .starts_with("2xx for 1 records")
    );
    s.close().await;

    // A 400 for this record alone: dead; retried by hand, then confirmed.
    t.pendo.set_faults(PendoFaults {
        status_script: vec![400],
        ..PendoFaults::default()
    });
    plan(&t, 1, "D");
    t.sync().await;
    retry_by_hand(&t, &id).await;
    t.sync().await;
    expected.extend([
        r#"detected "D""#,
        r#"dead "D""#,
        r#"retried "D""#,
        r#"confirmed "D""#,
    ]);
    assert_eq!(story(&t, &id, "plantier").await, expected);
    let s = store(&t).await;
    let events = s
        .history(Kind::Account, &id, Some("plantier"), 3)
        .await
        .unwrap();
    assert_eq!(events[1].detail.as_deref(), Some("queue retry by tester"));
    assert!(
        events[2].batch.as_ref().unwrap().answer.contains("400"),
        "{:?}",
        events[2]
    );
    // The detection names the CRM record and the cycle.
    let detected = s
        .last_events(Kind::Account, &id, &[Event::Detected])
        .await
        .unwrap();
    let d = detected.iter().find(|e| e.field == "plantier").unwrap();
    assert_eq!(d.crm_id.as_deref(), Some(id.as_str()));
    assert_eq!(d.mapping.as_deref(), Some("accounts"));
    assert!(d.cycle.is_some());
    s.close().await;
    t.assert_converged();

    // The status model's chart (the console's) counts every HTTP request Pendo saw, the 429s
    // retried in-process included, and every cycle.
    let s = store(&t).await;
    let report = pendo_sync::status::status_report(&t.settings, &s)
        .await
        .unwrap();
    assert_eq!(report.chart.len(), 96);
    let charted: i64 = report.chart.iter().map(|c| c.pendo_requests).sum();
    let busy: Vec<_> = report.chart.iter().filter(|c| c.cycles > 0).collect();
    assert_eq!(charted as usize, t.writes().len(), "{busy:?}");
    let cycles: i64 = report.chart.iter().map(|c| c.cycles).sum();
    let runs: i64 = sqlx::query_scalar("SELECT count(*) FROM runs")
        .fetch_one(s.pool())
        .await
        .unwrap();
    assert_eq!(cycles, runs);
    s.close().await;
}

#[tokio::test]
async fn missing_then_retried_by_hand_and_per_record_errors_until_dead() {
    let t = TestApp::new().await;
    // Pendo does not know this account yet.
    let id = account_id(0);
    t.crm.upsert("Account", &id, crate::helpers::account(0));
    t.sync().await;
    assert_eq!(
        story(&t, &id, "plantier").await,
        [r#"detected "Starter""#, r#"missing "Starter""#]
    );
    t.pendo.add_entity(Kind::Account, &id);
    retry_by_hand(&t, &id).await;
    t.sync().await;
    assert_eq!(
        story(&t, &id, "plantier").await,
        [
            r#"detected "Starter""#,
            r#"missing "Starter""#,
            r#"retried "Starter""#,
            r#"confirmed "Starter""#
        ]
    );

    // Pendo declares owneremail a number: each send of the record is a per-record error, the
    // second one (max_attempts = 2) is the last. Each failure keeps Pendo's own text.
    let mut schema = crate::helpers::ACCOUNT_FIELDS.to_vec();
    schema[2] = ("owneremail", "number");
    let t = TestApp::with(Options {
        schema,
        max_attempts: 2,
        ..Options::default()
    })
    .await;
    t.seed(1);
    t.sync().await;
    let value = r#""owner0@acme.test""#;
    assert_eq!(
        story(&t, &id, "owneremail").await,
        [
            format!("detected {value}"),
            format!("failed {value}"),
            format!("dead {value}"),
        ]
    );
    let s = store(&t).await;
    let events = s
        .history(Kind::Account, &id, Some("owneremail"), 2)
        .await
        .unwrap();
    for e in &events {
        let text = e.detail.as_deref().unwrap_or_default();
        assert!(text.contains("Pendo reported an error"), "{e:?}");
    }
    s.close().await;
}

#[tokio::test]
async fn held_approved_and_held_rejected() {
    let t = TestApp::with(Options {
        extra_mappings: "[guard]\nmin_values = 1\n".into(),
        ..Options::default()
    })
    .await;
    t.seed(3);
    t.sync().await;
    let id = account_id(1);
    for i in 0..3 {
        plan(&t, i, "Held1");
    }
    let report = t.sync().await;
    let Some(GuardOutcome::Held { hold_id, .. }) = report.cycles[0].guard else {
        panic!("{:?}", report.cycles[0].guard)
    };
    let s = store(&t).await;
    s.decide_hold(hold_id, true, "tester", Some("expected renaming"))
        .await
        .unwrap();
    s.close().await;
    t.sync().await;
    let mut expected = vec![
        r#"detected "Growth""#,
        r#"confirmed "Growth""#,
        r#"detected "Held1""#,
        r#"held "Held1""#,
        r#"approved "Held1""#,
        r#"confirmed "Held1""#,
    ];
    assert_eq!(story(&t, &id, "plantier").await, expected);
    let s = store(&t).await;
    let events = s
        .history(Kind::Account, &id, Some("plantier"), 2)
        .await
        .unwrap();
    let hold = events[1].hold.as_ref().unwrap();
    assert_eq!(
        (
            hold.id,
            hold.decided_by.as_deref(),
            hold.decision_reason.as_deref()
        ),
        (hold_id, Some("tester"), Some("expected renaming"))
    );
    s.close().await;

    for i in 0..3 {
        plan(&t, i, "Held2");
    }
    let report = t.sync().await;
    let Some(GuardOutcome::Held { hold_id, .. }) = report.cycles[0].guard else {
        panic!("{:?}", report.cycles[0].guard)
    };
    let s = store(&t).await;
    s.decide_hold(hold_id, false, "tester", None).await.unwrap();
    s.close().await;
    expected.extend([
        r#"detected "Held2""#,
        r#"held "Held2""#,
        r#"rejected "Held2""#,
    ]);
    assert_eq!(story(&t, &id, "plantier").await, expected);
}

#[tokio::test]
async fn a_record_deleted_with_on_delete_clear_is_cleared_and_says_why() {
    let t = TestApp::new().await;
    t.seed(3);
    t.sync().await;
    let id = account_id(1);
    t.crm.delete("Account", &id);
    t.sync().await;
    assert_eq!(
        story(&t, &id, "plantier").await,
        [
            r#"detected "Growth""#,
            r#"confirmed "Growth""#,
            "cleared null",
            "confirmed null"
        ]
    );
    let s = store(&t).await;
    let events = s
        .history(Kind::Account, &id, Some("plantier"), 2)
        .await
        .unwrap();
    assert_eq!(events[1].detail.as_deref(), Some("deleted in the CRM"));
    assert_eq!(events[1].crm_id.as_deref(), Some(id.as_str()));
    s.close().await;
}

#[tokio::test]
async fn retention_deletes_only_expired_events_in_batches() {
    let t = TestApp::new().await;
    t.seed(20);
    t.sync().await;
    let s = store(&t).await;
    let total = s.history_count().await.unwrap();
    assert_eq!(
        total,
        20 * 5 * 2,
        "a detection and a confirmation per value"
    );
    // Age the first 150 events by a year.
    sqlx::query(
        "UPDATE history SET at = at - 31536000000 WHERE id <= (SELECT min(id) + 149 FROM history)",
    )
    .execute(s.pool())
    .await
    .unwrap();
    let before = pendo_sync::domain::now_ms() - 86_400_000;
    assert_eq!(s.prune_history(before, 100).await.unwrap(), 100);
    assert_eq!(s.prune_history(before, 100).await.unwrap(), 50);
    assert_eq!(s.prune_history(before, 100).await.unwrap(), 0);
    assert_eq!(s.history_count().await.unwrap(), total - 150);
    // A batch answered just before the cut-off, whose values settled just after it: the events
    // stay, and so does the batch they point at.
    sqlx::query("UPDATE history SET at = ?1 + 60000")
        .bind(before)
        .execute(s.pool())
        .await
        .unwrap();
    sqlx::query("UPDATE history_batches SET sent_at = ?1 - 61000, answered_at = ?1 - 60000")
        .bind(before)
        .execute(s.pool())
        .await
        .unwrap();
    assert_eq!(s.prune_history(before, 100).await.unwrap(), 0);
    let last = s
        .history(Kind::Account, &account_id(19), Some("plantier"), 1)
        .await
        .unwrap();
    assert_eq!(last[0].event, Event::Confirmed);
    assert!(
        last[0].batch.is_some(),
        "the batch of a kept confirmation was pruned"
    );
    s.close().await;
    // The app's pruning uses history.retention (90 days by default): nothing else is old.
    let app = t.app().await;
    assert_eq!(
        app.prune_history(&CancellationToken::new()).await.unwrap(),
        0
    );
    app.store.close().await;
}

/// A forward clock step, corrected later: the events written while the clock ran a day ahead
/// are the lowest ids but dated in the future, and the events after them in id order are a year
/// old. Retention goes by time, so it deletes the old ones behind them and keeps the rest.
#[tokio::test]
async fn retention_deletes_old_events_behind_events_dated_in_the_future() {
    let t = TestApp::new().await;
    t.seed(20);
    t.sync().await;
    let s = store(&t).await;
    let count = |s: &Store| {
        let pool = s.pool().clone();
        async move {
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM history")
                .fetch_one(&pool)
                .await
                .unwrap();
            n
        }
    };
    let total = count(&s).await;
    assert_eq!(
        total,
        20 * 5 * 2,
        "a detection and a confirmation per value"
    );
    let now = pendo_sync::domain::now_ms();
    // The first 150 events: written while the clock was a day ahead.
    sqlx::query(
        "UPDATE history SET at = ?1 + 86400000 WHERE id <= (SELECT min(id) + 149 FROM history)",
    )
    .bind(now)
    .execute(s.pool())
    .await
    .unwrap();
    // The other 50, after them in id order: a year old.
    sqlx::query(
        "UPDATE history SET at = ?1 - 31536000000 WHERE id > (SELECT min(id) + 149 FROM history)",
    )
    .bind(now)
    .execute(s.pool())
    .await
    .unwrap();
    let before = now - 86_400_000;
    assert_eq!(s.prune_history(before, 30).await.unwrap(), 30);
    assert_eq!(s.prune_history(before, 30).await.unwrap(), 20);
    assert_eq!(s.prune_history(before, 30).await.unwrap(), 0);
    assert_eq!(count(&s).await, total - 50);
    let expired: i64 = sqlx::query_scalar("SELECT count(*) FROM history WHERE at < ?1")
        .bind(before)
        .fetch_one(s.pool())
        .await
        .unwrap();
    assert_eq!(expired, 0, "an expired event was kept");
    s.close().await;
}

/// The cycle log (`runs`) grows by a row per cycle per mapping, forever until this: retention
/// deletes cycles older than `history.retention` too, except each mapping's last cycle and last
/// successful one (what status, freshness and the console show).
#[tokio::test]
async fn retention_deletes_old_cycles_but_keeps_each_mapping_s_last_and_last_success() {
    let t = TestApp::new().await;
    t.seed(3);
    for _ in 0..4 {
        t.sync().await;
    }
    let s = store(&t).await;
    let runs_of = |s: &Store| {
        let pool = s.pool().clone();
        async move {
            sqlx::query_as::<_, (i64, String, Option<bool>)>(
                "SELECT id, mapping, ok FROM runs ORDER BY id",
            )
            .fetch_all(&pool)
            .await
            .unwrap()
        }
    };
    let all = runs_of(&s).await;
    let mapping = all[0].1.clone();
    let mine: Vec<i64> = all.iter().filter(|r| r.1 == mapping).map(|r| r.0).collect();
    assert_eq!(mine.len(), 4, "{all:?}");
    // A year old, all of them; the mapping's last cycle failed.
    sqlx::query("UPDATE runs SET started_at = started_at - 31536000000, finished_at = finished_at - 31536000000")
        .execute(s.pool())
        .await
        .unwrap();
    sqlx::query("UPDATE runs SET ok = 0, error = 'CRM down' WHERE id = ?1")
        .bind(mine[3])
        .execute(s.pool())
        .await
        .unwrap();
    // Resync jobs age out with them once finished: one finished a year ago, one just now, one
    // still queued.
    let job = |id: &str, finished_at: Option<i64>| pendo_sync::store::ResyncRecord {
        id: id.into(),
        mappings: vec![mapping.clone()],
        kind: None,
        state: if finished_at.is_some() {
            "done"
        } else {
            "queued"
        }
        .into(),
        records_read: 0,
        changes: 0,
        pushed: 0,
        held: Vec::new(),
        error: None,
        requested_at: 0,
        started_at: None,
        finished_at,
    };
    let now = pendo_sync::domain::now_ms();
    for j in [
        job("old", Some(now - 31_536_000_000)),
        job("new", Some(now)),
        job("queued", None),
    ] {
        s.save_resync(&j).await.unwrap();
    }
    s.close().await;
    let app = t.app().await;
    app.prune_history(&CancellationToken::new()).await.unwrap();
    assert!(app.store.resync("old").await.unwrap().is_none());
    assert!(app.store.resync("new").await.unwrap().is_some());
    assert!(app.store.resync("queued").await.unwrap().is_some());
    let left: Vec<i64> = runs_of(&app.store)
        .await
        .into_iter()
        .filter(|r| r.1 == mapping)
        .map(|r| r.0)
        .collect();
    assert_eq!(
        left,
        vec![mine[2], mine[3]],
        "the last success and the last cycle stay"
    );
    app.store.close().await;
}

/// A value confirmed by Pendo after a newer CRM value replaced it in the queue (it was in
/// flight) is in the shadow: its confirmation is an event too, even when the newer value is then
/// dropped. Made deterministic by doing the writer's steps by hand: lease, a cycle, settle.
#[tokio::test]
async fn a_value_confirmed_after_a_newer_one_replaced_it_in_flight_keeps_its_confirmation() {
    let t = TestApp::new().await;
    t.seed(1);
    t.sync().await;
    let id = account_id(0);
    plan(&t, 0, "A");
    cycle_only(&t).await;
    let s = store(&t).await;
    let in_flight = s.claim_due(Kind::Account, i64::MAX, 10).await.unwrap();
    assert_eq!(in_flight.len(), 1);
    s.close().await;
    plan(&t, 0, "B");
    cycle_only(&t).await;
    let s = store(&t).await;
    let batch = SentBatch {
        kind: Kind::Account,
        sent_at: 1,
        answered_at: 2,
        records: 1,
        attempts: 1,
        answer: "2xx for 1 records: 1 updated, 0 missing, 0 with errors".into(),
    };
    let outcomes: Vec<_> = in_flight
        .into_iter()
        .map(|e| (e, Settlement::Confirmed))
        .collect();
    s.settle_sent(&outcomes, &[batch], &[Some(0)])
        .await
        .unwrap();
    s.outbox_drop(
        &QueueFilter {
            pendo_id: Some(id.clone()),
            ..QueueFilter::default()
        },
        "queue drop by tester",
    )
    .await
    .unwrap();
    let shadow = s.load_shadow(Kind::Account, &[&id]).await.unwrap();
    assert_eq!(shadow[&id]["plantier"], json!("A"));
    s.close().await;
    assert_eq!(
        story(&t, &id, "plantier").await,
        [
            r#"detected "Starter""#,
            r#"confirmed "Starter""#,
            r#"detected "A""#,
            r#"superseded "A""#,
            r#"detected "B""#,
            r#"confirmed "A""#,
            r#"dropped "B""#,
        ]
    );
}

/// A second resync before the first one's values went out changes no outbox row: no second
/// detection.
#[tokio::test]
async fn a_second_resync_before_the_drain_detects_nothing_new() {
    let t = TestApp::new().await;
    t.seed(1);
    t.sync().await;
    for _ in 0..2 {
        t.cycle(Mode::Resync).await;
    }
    t.sync().await;
    assert_eq!(
        story(&t, &account_id(0), "plantier").await,
        [
            r#"detected "Starter""#,
            r#"confirmed "Starter""#,
            r#"detected "Starter""#,
            r#"confirmed "Starter""#,
        ]
    );
}

/// `why --live`'s verdicts where the CRM cannot be compared plainly (through the fixture CRM's
/// `fetch` and the Pendo simulator): a value sent and applied whose answer was lost is not "an
/// edit in Pendo"; two records claiming the id are ambiguous, whatever either holds; an id no
/// CRM record claims any more is not "CRM, pendo-sync and Pendo agree".
#[tokio::test]
async fn why_live_does_not_claim_what_it_did_not_compare() {
    use pendo_sync::why::{LiveSources, WhyOptions, explain};
    let t = TestApp::new().await;
    t.seed(3);
    t.sync().await;
    let connectors = t.connectors();
    let pendo = t.pendo_client();
    let options = WhyOptions {
        field: Some("plantier".into()),
        limit: 10,
        live: true,
    };
    let verdict = |id: String| {
        let (t, connectors, pendo, options) = (&t, &connectors, &pendo, &options);
        async move {
            let s = store(t).await;
            let sources = LiveSources { connectors, pendo };
            let r = explain(&t.settings, &s, Kind::Account, &id, options, Some(sources))
                .await
                .unwrap();
            s.close().await;
            r.verdict.unwrap()
        }
    };
    assert_eq!(
        verdict(account_id(0)).await,
        "CRM, pendo-sync and Pendo agree"
    );

    // Sent and applied, but the answer never settled: queued, and Pendo holds it.
    plan(&t, 0, "Sent");
    cycle_only(&t).await;
    t.pendo
        .set_value(Kind::Account, &account_id(0), "plantier", json!("Sent"));
    let v = verdict(account_id(0)).await;
    assert!(
        v.contains("Pendo holds the queued \"Sent\" (pending, 0 attempt(s)): sent, but"),
        "{v}"
    );

    // A second CRM record claims account 1's id with other values.
    let mut twin = crate::helpers::account(1);
    twin["Plan_Tier__c"] = json!("Other");
    t.crm.upsert("Account", "001Z000000000001", twin);
    cycle_only(&t).await;
    let v = verdict(account_id(1)).await;
    assert!(
        v.contains("2 CRM records claim this id") && v.contains("nothing is sent"),
        "{v}"
    );

    // No CRM record claims account 2 any more (its claim forgotten): not "agree".
    let s = store(&t).await;
    sqlx::query("DELETE FROM claims WHERE pendo_id = ?1")
        .bind(account_id(2))
        .execute(s.pool())
        .await
        .unwrap();
    s.close().await;
    let v = verdict(account_id(2)).await;
    assert!(v.starts_with("what could be compared agrees"), "{v}");
}
