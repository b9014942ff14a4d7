//! The fault suite: real connectors against the Salesforce and HubSpot simulators, the Pendo
//! simulator misbehaving, an `App` per "process". Every scenario ends the same way: Pendo equals
//! the CRMs, the outbox is empty (a transient fault never dead-letters), and the request rate
//! each simulator measured stays within the configured limit plus the limiter's burst.

use std::time::Duration;

use pendo_sync::domain::Kind;
use pendo_sync::sim::hubspot::SimFaults;
use pendo_sync::sim::pendo::{PendoFaults, SimRateLimit};
use pendo_sync::sim::salesforce::SalesforceFault;
use serde_json::json;

use crate::crm_harness::{Crm, CrmOptions, hs_contact_id, sf_account_id};

/// Edits a spread of records in both CRMs so an incremental run has work.
fn edit_some(crm: &Crm, round: usize, accounts: usize, contacts: usize) {
    for i in (round % 3..accounts).step_by(3) {
        crm.sf.set_field(
            "Account",
            &sf_account_id(i),
            "ARR__c",
            json!(10_000.0 * round as f64 + i as f64),
        );
    }
    for i in (round % 2..contacts).step_by(2) {
        crm.hs.upsert(
            "contacts",
            hs_contact_id(i),
            json!({"lifecyclestage": format!("stage-{round}")}),
        );
    }
}

/// The limits every scenario checks, from each simulator's own log.
fn assert_rates(crm: &Crm, pendo_rps: usize, sf_rps: usize, hs_per_10s: usize) {
    crm.assert_rate("pendo", &crm.pendo_times(), 1000, pendo_rps + 1);
    crm.assert_rate("salesforce", &crm.sf_times(), 1000, sf_rps + 1);
    crm.assert_rate("hubspot", &crm.hs_times(false), 10_000, hs_per_10s + 1);
    // Finer than the vendor's window: the limiter spaces calls evenly, so any second holds at
    // most a tenth of the ten-second quota (plus the burst). With few calls per test this is
    // the check that would catch a missing limiter.
    crm.assert_rate("hubspot", &crm.hs_times(false), 1000, hs_per_10s / 10 + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pendo_server_errors_drops_latency_and_applied_then_500_converge() {
    let crm = Crm::start(CrmOptions {
        pendo_rps: 20.0,
        sf_rps: 20.0,
        hs_per_10s: 100,
        ..CrmOptions::default()
    })
    .await;
    crm.seed_accounts(40);
    crm.seed_contacts(30);
    crm.pendo.set_faults(PendoFaults {
        error_rate: 0.2,
        drop_rate: 0.05,
        applied_then_500_rate: 0.1,
        latency: Duration::from_millis(15),
        // Certain faults on top of the random ones, so the assertion below cannot miss.
        status_script: vec![503, 500],
        ..PendoFaults::default()
    });
    crm.sync_until_clean(4).await;
    crm.assert_converged();
    edit_some(&crm, 1, 40, 30);
    crm.sync_until_clean(4).await;
    crm.assert_converged();
    let statuses: Vec<u16> = crm.pendo.requests().iter().map(|r| r.status).collect();
    assert!(
        statuses.contains(&503) && statuses.contains(&200),
        "the faults fired: {statuses:?}"
    );
    assert_rates(&crm, 20, 20, 100);
}

/// The Pendo simulator allows 3 requests/s (burst 1) against a client configured for 10: 429
/// bursts. With Retry-After (1 s) a throttled batch is not re-sent before the server said.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pendo_429_bursts_with_retry_after_are_waited_out() {
    let crm = Crm::start(CrmOptions {
        pendo_rps: 10.0,
        pendo_sim_limit: Some(SimRateLimit {
            requests_per_second: 3.0,
            burst: 1,
            retry_after: true,
            window: None,
        }),
        batch_size: 4,
        retry_initial: "50ms",
        retry_max: "2s",
        ..CrmOptions::default()
    })
    .await;
    crm.seed_accounts(40);
    crm.seed_contacts(20);
    crm.sync_until_clean(3).await;
    crm.assert_converged();
    let requests = crm.pendo.requests();
    let limited: Vec<_> = requests.iter().filter(|r| r.status == 429).collect();
    assert!(
        limited.len() >= 3,
        "the simulator throttled: {}",
        limited.len()
    );
    // Retry-After honoured: the same batch body is not seen again within the second it asked.
    let mut resent = 0;
    for r in &limited {
        if let Some(next) = requests
            .iter()
            .find(|n| n.at_ms > r.at_ms && n.body.is_some() && n.body == r.body)
        {
            resent += 1;
            assert!(
                next.at_ms - r.at_ms >= 1000,
                "re-sent {} ms after a 429 with Retry-After: 1",
                next.at_ms - r.at_ms
            );
        }
    }
    assert!(resent > 0, "some throttled batch was re-sent as it was");
    assert_rates(&crm, 10, 50, 500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pendo_429_bursts_without_retry_after_back_off_and_converge() {
    let crm = Crm::start(CrmOptions {
        pendo_rps: 8.0,
        pendo_sim_limit: Some(SimRateLimit {
            requests_per_second: 4.0,
            burst: 2,
            retry_after: false,
            window: None,
        }),
        ..CrmOptions::default()
    })
    .await;
    crm.seed_accounts(30);
    crm.seed_contacts(20);
    // Scripted 429s on top (without Retry-After, as the configured limiter says).
    crm.pendo.set_faults(PendoFaults {
        status_script: vec![429, 429, 429, 429],
        ..PendoFaults::default()
    });
    crm.sync_until_clean(3).await;
    crm.assert_converged();
    let requests = crm.pendo.requests();
    assert!(requests.iter().filter(|r| r.status == 429).count() >= 4);
    edit_some(&crm, 2, 30, 20);
    crm.sync_until_clean(3).await;
    crm.assert_converged();
    assert_rates(&crm, 8, 50, 500);
}

/// Salesforce answers 20% of data calls 503, and every issued session is revoked in the middle
/// of a pull (401 INVALID_SESSION_ID): the connector logs in again and the pull goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn salesforce_server_errors_and_token_expiry_mid_pull_converge() {
    let crm = Crm::start(CrmOptions {
        sf_rps: 6.0,
        ..CrmOptions::default()
    })
    .await;
    crm.seed_accounts(50); // 5 pages of 10
    crm.seed_contacts(5);
    // 20% at random, and one certain 503 so the assertion below cannot miss by chance.
    let unavailable = r#"[{"message":"Service unavailable","errorCode":"SERVER_UNAVAILABLE"}]"#;
    crm.sf.set_fault(SalesforceFault {
        error_rate: 0.2,
        forced: [(503, unavailable.to_owned())].into(),
    });
    // Revoke the sessions once the pull is three data calls in (token, count, first page).
    let sf = crm.sf.clone();
    let revoker = tokio::spawn(async move {
        for _ in 0..2000 {
            let data = sf
                .requests()
                .iter()
                .filter(|(_, p, s)| p.starts_with("/services/data/") && *s == 200)
                .count();
            if data >= 2 {
                sf.expire_tokens();
                return true;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        false
    });
    crm.sync_until_clean(4).await;
    assert!(revoker.await.unwrap(), "the sessions were revoked mid-pull");
    crm.assert_converged();
    let log = crm.sf.requests();
    let expired = log
        .iter()
        .position(|(_, _, s)| *s == 401)
        .expect("a call met the revoked session");
    assert!(
        log[expired..]
            .iter()
            .any(|(_, p, _)| p == "/services/oauth2/token"),
        "logged in again after the 401"
    );
    assert!(
        log[expired + 1..]
            .iter()
            .any(|(_, p, s)| p.starts_with("/services/data/") && *s == 200),
        "the pull went on"
    );

    // Again in an incremental run: edits, 503s, and a revocation before the next run.
    edit_some(&crm, 1, 50, 5);
    crm.sf.expire_tokens();
    crm.sync_until_clean(4).await;
    crm.assert_converged();
    crm.sf.set_fault(SalesforceFault::default());
    assert!(
        crm.sf.requests().iter().any(|(_, _, s)| *s == 503),
        "the 503s fired"
    );
    assert_rates(&crm, 50, 6, 500);
}

/// HubSpot: ten-secondly 429s with and without Retry-After, secondly (search) 429s, and 503s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hubspot_429s_and_server_errors_converge() {
    for retry_after in [Some(1), None] {
        let mut opts = CrmOptions {
            hs_per_10s: 30,
            hs_search_rps: 3.0,
            ..CrmOptions::default()
        };
        opts.hs_sim.retry_after = retry_after;
        let crm = Crm::start(opts).await;
        crm.seed_accounts(5);
        crm.seed_contacts(250); // three list pages of 100
        crm.hs.set_fault(SimFaults {
            ten_secondly_429s: 3,
            server_errors: 2,
            ..SimFaults::default()
        });
        crm.sync_until_clean(3).await;
        crm.assert_converged();
        // Incremental runs search: secondly 429s there, 503s too.
        edit_some(&crm, 1, 5, 250);
        crm.hs.set_fault(SimFaults {
            secondly_429s: 2,
            server_errors: 2,
            ten_secondly_429s: 1,
            ..SimFaults::default()
        });
        crm.sync_until_clean(3).await;
        crm.assert_converged();
        let statuses: Vec<u16> = crm.hs.requests().iter().map(|r| r.status).collect();
        assert!(
            statuses.iter().filter(|s| **s == 429).count() >= 6,
            "{statuses:?}"
        );
        assert!(
            statuses.iter().filter(|s| **s == 503).count() >= 4,
            "{statuses:?}"
        );
        assert_rates(&crm, 50, 50, 30);
        crm.assert_rate("hubspot search", &crm.hs_times(true), 1000, 3 + 1);
    }
}

/// Everything at once, over three runs with edits in between.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_faults_at_once_over_several_runs() {
    let mut opts = CrmOptions {
        pendo_rps: 10.0,
        sf_rps: 8.0,
        hs_per_10s: 40,
        hs_search_rps: 4.0,
        pendo_sim_limit: Some(SimRateLimit {
            requests_per_second: 6.0,
            burst: 2,
            retry_after: true,
            window: None,
        }),
        retry_max: "1s",
        ..CrmOptions::default()
    };
    opts.hs_sim.retry_after = Some(1);
    let crm = Crm::start(opts).await;
    crm.seed_accounts(30);
    crm.seed_contacts(30);
    for round in 0..3 {
        crm.pendo.set_faults(PendoFaults {
            error_rate: 0.15,
            drop_rate: 0.05,
            applied_then_500_rate: 0.1,
            latency: Duration::from_millis(10),
            ..PendoFaults::default()
        });
        crm.sf.set_fault(SalesforceFault {
            error_rate: 0.1,
            ..SalesforceFault::default()
        });
        crm.hs.set_fault(SimFaults {
            ten_secondly_429s: 1,
            secondly_429s: 1,
            server_errors: 1,
            ..SimFaults::default()
        });
        if round == 1 {
            crm.sf.expire_tokens();
        }
        if round > 0 {
            edit_some(&crm, round, 30, 30);
        }
        crm.sync_until_clean(4).await;
        crm.assert_converged();
    }
    assert!(!crm.held(Kind::Visitor).is_empty());
    assert_rates(&crm, 10, 8, 40);
}
