//! Guarantee 2: a crash at any step of a batch, then a restart, converges; at most the batches in
//! flight at the crash are sent twice.

use std::sync::Arc;
use std::time::Duration;

use pendo_sync::app::{App, Connectors};
use pendo_sync::config::Source;
use pendo_sync::engine::Mode;
use pendo_sync::pendo::{FailPoint, Writer, WriterConfig};
use pendo_sync::sim::pendo::PendoFaults;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::helpers::{TestApp, account_id};

async fn app_failing_at(t: &TestApp, point: FailPoint) -> App {
    let mut app = t.app().await;
    let mut cfg = WriterConfig::from_settings(&t.settings.pendo, t.settings.schedule.poll_interval);
    cfg.fail_point = Some(point);
    app.writer = Writer::new(app.store.clone(), t.pendo_client(), cfg);
    app
}

#[tokio::test]
async fn a_failure_at_every_step_of_a_batch_then_a_restart_converges() {
    for point in [
        FailPoint::BeforeSend,
        FailPoint::AfterSend,
        FailPoint::DuringSettle,
    ] {
        let t = TestApp::new().await;
        t.seed(30);
        let app = app_failing_at(&t, point).await;
        let err = app
            .sync(
                None,
                Mode::Incremental,
                false,
                &CancellationToken::new(),
                &(),
            )
            .await
            .expect_err("the injected failure stops the sync");
        assert!(err.to_string().contains("injected"), "{err}");
        app.store.close().await;
        let sent_before_restart = t.writes().len();
        // Restart: the watermark moved with the outbox, the leases are released, all is sent.
        t.sync().await;
        t.assert_converged();
        // One batch of 30 was in flight; at most it is sent twice.
        let total = t.writes().len();
        assert!(
            total <= sent_before_restart + 1,
            "{point:?}: {sent_before_restart} then {total}"
        );
        t.pendo.reset_requests();
        t.sync().await;
        assert!(
            t.writes().is_empty(),
            "{point:?}: converged state sends nothing more"
        );
    }
}

#[tokio::test]
async fn a_sync_killed_at_random_moments_converges_after_restarts() {
    let t = TestApp::with(crate::helpers::Options {
        batch_size: 7,
        ..Default::default()
    })
    .await;
    t.seed(120);
    t.pendo.set_faults(PendoFaults {
        latency: Duration::from_millis(3),
        ..Default::default()
    });
    let mut rng = fastrand::Rng::with_seed(7);
    for round in 0..12 {
        // Change a few CRM records between crashes.
        for _ in 0..5 {
            let i = rng.usize(0..120);
            t.crm
                .set_field("Account", &account_id(i), "ARR__c", json!(round * 1000 + i));
        }
        let crm = t.crm.clone();
        let settings = t.settings.clone();
        let task = tokio::spawn(async move {
            let mut connectors = Connectors::new();
            connectors.insert(Source::Salesforce, Arc::new(crm));
            let app = App::open(settings, connectors).await.unwrap();
            app.sync(
                None,
                Mode::Incremental,
                false,
                &CancellationToken::new(),
                &(),
            )
            .await
        });
        // Dropping the task's future is a crash as far as the state file can tell: whatever
        // transaction was open is rolled back, nothing after it runs.
        tokio::time::sleep(Duration::from_millis(rng.u64(0..40))).await;
        task.abort();
        let _ = task.await;
    }
    t.pendo.set_faults(PendoFaults::default());
    t.sync().await;
    t.assert_converged();
}
