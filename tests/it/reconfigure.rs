//! When the configuration changes (DESIGN.md): a new field is filled at the next cycle without
//! re-sending the rest; a removed field or mapping is forgotten with its holds, and Pendo keeps
//! what it holds.

use std::sync::Arc;

use pendo_sync::config::Settings;
use pendo_sync::domain::Kind;
use pendo_sync::store::{GuardOutcome, QueueFilter, Store};
use serde_json::json;

use crate::helpers::{Options, TestApp, account_id};
use crate::on_both_backends;

/// The test app's settings with `edit` applied to them.
fn edited(t: &TestApp, edit: impl FnOnce(&mut Settings)) -> Arc<Settings> {
    let mut s = (*t.settings).clone();
    edit(&mut s);
    Arc::new(s)
}

fn without_field(t: &TestApp, field: &str) -> Arc<Settings> {
    edited(t, |s| {
        s.mappings[0].fields.remove(field);
    })
}

async fn plan_lines(settings: &Settings) -> Vec<String> {
    let store = Store::open_settings(&settings.state).await.unwrap();
    let lines = pendo_sync::reconfigure::plan(settings, &store)
        .await
        .unwrap()
        .lines();
    store.close().await;
    lines
}

on_both_backends! {
    /// A field added to a mapping reaches every record at the next cycle, though no record
    /// changed in the CRM, and nothing else is sent again.
    async fn a_new_field_is_filled_at_the_next_cycle(backend: Backend) {
        let Some(t) = TestApp::on(backend).await else {
            return;
        };
        t.seed(60);
        t.sync_with(without_field(&t, "isstrategic")).await;
        assert!(
            t.pendo.values(Kind::Account).values().all(|f| !f.contains_key("isstrategic")),
            "not mapped yet"
        );
        let lines = plan_lines(&t.settings).await;
        assert!(
            lines.iter().any(|l| l.contains("accounts: field `isstrategic` added")),
            "{lines:?}"
        );

        t.pendo.reset_requests();
        t.sync().await;
        let written: Vec<_> = t
            .pendo
            .requests()
            .iter()
            .flat_map(|r| r.written_values())
            .collect();
        let others = written.iter().filter(|(_, f, _)| f != "isstrategic").count();
        assert_eq!(others, 0, "nothing but the new field is sent: {written:?}");
        assert_eq!(written.len(), 60);
        t.assert_converged();
        assert!(plan_lines(&t.settings).await.is_empty(), "remembered");

        // And the next cycle is incremental again: nothing is read or sent.
        t.pendo.reset_requests();
        let report = t.sync().await;
        assert_eq!(report.cycles[0].pulled, 0);
        assert!(t.pendo.requests().is_empty());
    }
}

on_both_backends! {
    /// A removed field's held values and shadow are forgotten and its hold closed; a removed
    /// (here: renamed) mapping's state too. Pendo is never cleared because of either.
    async fn a_removed_field_or_mapping_is_forgotten_and_pendo_keeps_its_values(backend: Backend) {
        let Some(state_url) = backend.state_url().await.ok() else {
            return;
        };
        let t = TestApp::with(Options {
            state_url,
            extra_mappings: "[guard]\nmin_values = 1\n".into(),
            ..Options::default()
        })
        .await;
        t.seed(20);
        t.sync().await;
        let before = t.pendo.values(Kind::Account);
        // Every ARR changes: more than half of the values overwritten, held.
        for i in 0..20 {
            t.crm
                .set_field("Account", &account_id(i), "ARR__c", json!(i as f64 * 7.0 + 1.0));
        }
        let report = t.sync().await;
        assert!(
            matches!(report.cycles[0].guard, Some(GuardOutcome::Held { .. })),
            "{:?}",
            report.cycles[0].guard
        );

        let no_arr = without_field(&t, "arr");
        let lines = plan_lines(&no_arr).await;
        assert!(
            lines.iter().any(|l| l.contains("accounts: field `arr` removed")),
            "{lines:?}"
        );
        t.pendo.reset_requests();
        let report = t.sync_with(no_arr.clone()).await;
        assert!(report.failed.is_empty(), "{report:?}");
        let store = Store::open_settings(&no_arr.state).await.unwrap();
        let queued = store.outbox_list(&QueueFilter::default(), 1000).await.unwrap();
        assert!(queued.is_empty(), "{queued:?}");
        let holds = store.holds(false).await.unwrap();
        assert_eq!(holds.len(), 1);
        assert_eq!(holds[0].state, "rejected");
        assert_eq!(holds[0].decision_reason.as_deref(), Some("removed from the configuration"));
        let ids: Vec<String> = (0..20).map(account_id).collect();
        let id_refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        let shadow = store.load_shadow(Kind::Account, &id_refs).await.unwrap();
        assert!(shadow.values().all(|f| !f.contains_key("arr") && f.contains_key("plantier")));
        store.close().await;
        assert!(t.pendo.requests().is_empty(), "nothing sent");
        assert_eq!(t.pendo.values(Kind::Account), before, "Pendo keeps its values");

        // The mapping renamed: the old name's state is forgotten, never cleared in Pendo; the
        // new name starts as a new mapping.
        let renamed = edited(&t, |s| {
            s.mappings[0].fields.remove("arr");
            s.mappings[0].name = "accounts-v2".into();
        });
        let lines = plan_lines(&renamed).await;
        assert!(
            lines.iter().any(|l| l.starts_with("accounts: mapping removed")),
            "{lines:?}"
        );
        let report = t.sync_with(renamed.clone()).await;
        assert!(report.failed.is_empty(), "{report:?}");
        let cleared = t
            .pendo
            .requests()
            .iter()
            .flat_map(|r| r.written_values())
            .filter(|(_, _, v)| v.is_null())
            .count();
        assert_eq!(cleared, 0);
        assert!(plan_lines(&renamed).await.is_empty());
    }
}
