//! Each Pendo answer: where the shadow and the outbox end up, and that nothing is lost.

use pendo_sync::domain::Kind;
use pendo_sync::engine::Mode;
use pendo_sync::sim::pendo::PendoFaults;
use pendo_sync::store::{QueueFilter, QueueState};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::helpers::{ACCOUNT_FIELDS, Options, TestApp, account, account_id};

async fn outbox_states(t: &TestApp) -> Vec<(String, QueueState, String)> {
    let app = t.app().await;
    let rows = app
        .store
        .outbox_list(&QueueFilter::default(), 1000)
        .await
        .unwrap();
    app.store.close().await;
    rows.into_iter()
        .map(|r| (r.pendo_id, r.state, r.last_error.unwrap_or_default()))
        .collect()
}

#[tokio::test]
async fn missing_ids_become_unmatched_and_are_not_confirmed() {
    let t = TestApp::new().await;
    t.seed(4);
    t.crm.upsert("Account", "001UNKNOWN", account(9)); // not known to Pendo
    t.crm
        .set_field("Account", "001UNKNOWN", "Id", json!("001UNKNOWN"));
    let report = t.sync().await;
    assert_eq!(report.drain.as_ref().unwrap().unmatched, 1);
    let states = outbox_states(&t).await;
    assert_eq!(
        states.len(),
        5,
        "one row per field of the unknown id: {states:?}"
    );
    assert!(states.iter().all(|(id, s, e)| id == "001UNKNOWN"
        && *s == QueueState::Unmatched
        && e.contains("create_missing")));
    let app = t.app().await;
    assert!(
        app.store
            .load_shadow(Kind::Account, &["001UNKNOWN"])
            .await
            .unwrap()
            .is_empty()
    );
    // Not retried every cycle: the next sync sends nothing for it.
    t.pendo.reset_requests();
    t.sync().await;
    assert!(t.writes().is_empty());
}

#[tokio::test]
async fn create_missing_creates_unknown_accounts() {
    let t = TestApp::with(Options {
        create_missing: true,
        ..Options::default()
    })
    .await;
    for i in 0..3 {
        t.crm.upsert("Account", &account_id(i), account(i)); // Pendo knows none of them
    }
    t.sync().await;
    assert!(
        t.writes()
            .iter()
            .all(|w| w.query.as_deref() == Some("create=true"))
    );
    t.assert_converged();
    assert!(outbox_states(&t).await.is_empty());
}

#[tokio::test]
async fn per_record_errors_are_kept_with_their_text_then_dead_lettered() {
    for as_strings in [false, true] {
        // Pendo declares owneremail as a number: every value we send for it is an error.
        let mut schema = ACCOUNT_FIELDS.to_vec();
        schema[2] = ("owneremail", "number");
        let t = TestApp::with(Options {
            schema,
            max_attempts: 4,
            errors_as_strings: as_strings,
            ..Options::default()
        })
        .await;
        t.seed(3);
        t.sync().await;
        let states = outbox_states(&t).await;
        assert_eq!(states.len(), 15, "{states:?}");
        for (_, state, error) in &states {
            assert_eq!(*state, QueueState::Dead, "{states:?}");
            assert!(error.contains("Pendo reported an error"), "{error}");
        }
        // Nothing of an errored record entered the shadow.
        let app = t.app().await;
        assert!(
            app.store
                .load_shadow(Kind::Account, &[&account_id(0)])
                .await
                .unwrap()
                .is_empty()
        );
        // `queue retry` brings them back.
        assert_eq!(
            app.store
                .outbox_retry(
                    &QueueFilter {
                        state: Some(QueueState::Dead),
                        ..Default::default()
                    },
                    "test",
                )
                .await
                .unwrap(),
            15
        );
    }
}

#[tokio::test]
async fn a_400_for_the_batch_is_bisected_and_only_the_bad_records_die() {
    // isstrategic is not declared in Pendo: any record carrying it makes the whole batch a 400.
    let schema: Vec<_> = ACCOUNT_FIELDS
        .iter()
        .copied()
        .filter(|(f, _)| *f != "isstrategic")
        .collect();
    let t = TestApp::with(Options {
        schema,
        ..Options::default()
    })
    .await;
    for i in 0..10 {
        let mut a = account(i);
        a["Strategic__c"] = json!(null);
        t.crm.upsert("Account", &account_id(i), a);
        t.pendo.add_entity(Kind::Account, &account_id(i));
    }
    t.sync().await;
    for i in 0..10 {
        t.crm
            .set_field("Account", &account_id(i), "Plan_Tier__c", json!("Gold"));
    }
    t.crm
        .set_field("Account", &account_id(2), "Strategic__c", json!(true));
    t.crm
        .set_field("Account", &account_id(7), "Strategic__c", json!(true));
    t.sync().await;
    for i in 0..10 {
        let gold = t.pendo.value(Kind::Account, &account_id(i), "plantier") == Some(json!("Gold"));
        assert_eq!(gold, i != 2 && i != 7, "account {i}");
    }
    let dead = outbox_states(&t).await;
    let ids: std::collections::BTreeSet<_> = dead.iter().map(|(id, _, _)| id.clone()).collect();
    assert_eq!(ids, [account_id(2), account_id(7)].into_iter().collect());
    assert!(
        dead.iter().all(|(_, s, e)| *s == QueueState::Dead
            && e.contains("400")
            && e.contains("isstrategic")),
        "{dead:?}"
    );
}

#[tokio::test]
async fn timeouts_rate_limits_and_server_errors_are_retried_until_pendo_has_everything() {
    let t = TestApp::new().await;
    t.seed(60);
    // 408 halves the batch; 429 with Retry-After (the simulator sends 1 s, bounded by retry_max);
    // then 5xx, dropped connections and "applied but answered 500" at random.
    t.pendo.set_faults(PendoFaults {
        status_script: vec![408, 429, 503, 500],
        ..Default::default()
    });
    t.sync().await;
    t.assert_converged();
    t.pendo.set_faults(PendoFaults {
        error_rate: 0.2,
        drop_rate: 0.1,
        applied_then_500_rate: 0.2,
        ..Default::default()
    });
    for i in 0..60 {
        t.crm
            .set_field("Account", &account_id(i), "ARR__c", json!(i as f64 + 0.25));
    }
    let t = {
        let mut t = t;
        t.settings = std::sync::Arc::new({
            let mut s = (*t.settings).clone();
            s.pendo.max_attempts = 50;
            s
        });
        t
    };
    t.sync().await;
    t.pendo.set_faults(PendoFaults::default());
    t.assert_converged();
    assert!(
        outbox_states(&t).await.is_empty(),
        "no dead letter for a transient fault"
    );
}

#[tokio::test]
async fn a_413_halves_the_batch_until_pendo_takes_it_and_nothing_dies() {
    let t = TestApp::new().await;
    t.seed(60);
    // A proxy before Pendo refuses bodies of more than 10 records (the batch size is 50).
    t.pendo.set_faults(PendoFaults {
        max_batch_records: Some(10),
        ..Default::default()
    });
    let report = t.sync().await;
    t.assert_converged();
    assert!(
        outbox_states(&t).await.is_empty(),
        "every value arrives, none dead or waiting"
    );
    assert_eq!(report.drain.as_ref().unwrap().failed, 0);
    let writes = t.writes();
    assert!(writes.iter().any(|r| r.status == 413), "the cap was hit");
    for w in writes.iter().filter(|r| r.status == 200) {
        let records = w
            .body
            .as_ref()
            .and_then(|b| b.as_array())
            .map_or(0, Vec::len);
        assert!(records <= 10, "{records} records accepted above the cap");
    }
}

/// Pendo's string errors name the id first (`"<id>: <text>"`). With `acme` and `acme:eu` in
/// one batch, an error for `acme:eu` is `acme:eu`'s, not `acme`'s: else `acme:eu` would be
/// confirmed into the shadow although Pendo refused it.
#[tokio::test]
async fn a_string_error_is_given_to_its_id_not_to_an_id_that_prefixes_it() {
    let t = TestApp::with(Options {
        errors_as_strings: true,
        ..Options::default()
    })
    .await;
    for (i, id) in ["acme", "acme:eu"].into_iter().enumerate() {
        let mut record = account(i);
        record["Id"] = json!(id);
        t.crm.upsert("Account", id, record);
        t.pendo.add_entity(Kind::Account, id);
    }
    t.pendo.set_faults(PendoFaults {
        error_ids: vec!["acme:eu".into()],
        ..Default::default()
    });
    t.sync().await;
    assert!(t.pendo.value(Kind::Account, "acme", "plantier").is_some());
    assert_eq!(t.pendo.value(Kind::Account, "acme:eu", "plantier"), None);
    let app = t.app().await;
    let shadow = app
        .store
        .load_shadow(Kind::Account, &["acme", "acme:eu"])
        .await
        .unwrap();
    app.store.close().await;
    assert!(
        shadow
            .get("acme")
            .is_some_and(|f| f.contains_key("plantier")),
        "{shadow:?}"
    );
    assert!(
        !shadow.contains_key("acme:eu"),
        "acme:eu was confirmed although Pendo refused it: {shadow:?}"
    );
    let states = outbox_states(&t).await;
    assert!(!states.is_empty());
    assert!(
        states
            .iter()
            .all(|(id, _, e)| id == "acme:eu" && e.contains("refused by the simulator")),
        "{states:?}"
    );
}

/// A queued value the state can no longer read (a damaged file, a bad hand edit) is not a
/// null: sent as one, it would clear what Pendo holds. It is dead-lettered with a message naming
/// the field; the record's other values and the rest of the batch go out.
#[tokio::test]
async fn a_stored_value_that_cannot_be_read_is_dead_lettered_not_sent_as_a_clear() {
    let t = TestApp::new().await;
    t.seed(3);
    t.sync().await;
    let id = account_id(1);
    assert_eq!(
        t.pendo.value(Kind::Account, &id, "plantier"),
        Some(json!("Growth"))
    );
    t.crm
        .set_field("Account", &id, "Plan_Tier__c", json!("Platinum"));
    t.crm.set_field("Account", &id, "ARR__c", json!(777.5));
    t.crm
        .set_field("Account", &account_id(2), "ARR__c", json!(888.5));
    let app = t.app().await;
    app.cycle(&t.settings.mappings[0], Mode::Incremental, false, &())
        .await
        .unwrap();
    let damaged = sqlx::query(
        "UPDATE outbox SET value = 'not a value{' WHERE pendo_id = ?1 AND field = 'plantier'",
    )
    .bind(id.clone())
    .execute(app.store.pool())
    .await
    .unwrap()
    .rows_affected();
    assert_eq!(damaged, 1);
    t.pendo.reset_requests();
    app.drain(&CancellationToken::new(), std::time::Duration::ZERO)
        .await
        .unwrap();
    app.store.close().await;

    let sent: Vec<(String, String, serde_json::Value)> =
        t.writes().iter().flat_map(|w| w.written_values()).collect();
    assert!(
        !sent.iter().any(|(i, f, _)| *i == id && f == "plantier"),
        "the unreadable value was sent: {sent:?}"
    );
    assert_eq!(
        t.pendo.value(Kind::Account, &id, "plantier"),
        Some(json!("Growth")),
        "Pendo's value was cleared"
    );
    assert_eq!(t.pendo.value(Kind::Account, &id, "arr"), Some(json!(777.5)));
    assert_eq!(
        t.pendo.value(Kind::Account, &account_id(2), "arr"),
        Some(json!(888.5))
    );
    let states = outbox_states(&t).await;
    assert_eq!(states.len(), 1, "{states:?}");
    let (dead_id, state, error) = &states[0];
    assert_eq!((dead_id, *state), (&id, QueueState::Dead));
    assert!(
        error.contains("field \"plantier\"") && error.contains("could not be read"),
        "{error}"
    );
}

#[tokio::test]
async fn a_refused_key_pauses_the_writer_and_keeps_the_outbox() {
    let t = TestApp::new().await;
    t.seed(5);
    t.pendo.set_faults(PendoFaults {
        status_script: vec![403],
        ..Default::default()
    });
    let report = t.sync().await;
    let paused = report.drain.unwrap().paused.expect("writer paused");
    assert!(
        paused.contains("check the integration key, its region"),
        "{paused}"
    );
    assert_eq!(t.writes().len(), 1, "nothing more is sent once paused");
    assert_eq!(outbox_states(&t).await.len(), 25);
    let app = t.app().await;
    let status = pendo_sync::status::status_report(&t.settings, &app.store)
        .await
        .unwrap();
    assert!(status.writer_paused.is_some());
    app.store.close().await;
    // The operator fixes the key; the next run sends everything that waited.
    t.sync().await;
    t.assert_converged();
    assert!(outbox_states(&t).await.is_empty());
}

#[tokio::test]
async fn resync_repairs_values_wiped_in_pendo() {
    let t = TestApp::new().await;
    t.seed(10);
    t.sync().await;
    t.pendo.clear_all_values(Kind::Account);
    t.pendo.set_value(
        Kind::Account,
        &account_id(1),
        "plantier",
        json!("edited in Pendo"),
    );
    t.sync().await; // the shadow says all is well: nothing to send
    assert!(t.held().is_empty() || t.held().len() == 1);
    t.sync_mode(Mode::Resync).await;
    t.assert_converged();
    let _ = CancellationToken::new();
}
