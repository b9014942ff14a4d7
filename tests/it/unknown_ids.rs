//! Ids Pendo does not know yet (DESIGN.md): an unknown id costs one attempt and one event per
//! value, is never re-sent blindly, and is sent as soon as Pendo is found to know it, by
//! discovery (`firstvisit`) or by the full check every `unmatched_retry`.

use std::time::Duration;

use pendo_sync::domain::Kind;
use pendo_sync::sim::pendo::RecordedRequest;
use pendo_sync::store::Store;

use crate::helpers::{Options, TestApp, account_id};
use crate::on_both_backends;
use crate::pg::Backend;

async fn app_on(backend: Backend, opts: Options) -> Option<TestApp> {
    let state_url = backend.state_url().await.ok()?;
    Some(TestApp::with(Options { state_url, ..opts }).await)
}

async fn history_events(t: &TestApp) -> i64 {
    let store = Store::open_settings(&t.settings.state).await.unwrap();
    let n = store.history_count().await.unwrap();
    store.close().await;
    n
}

fn writes(requests: &[RecordedRequest]) -> usize {
    requests
        .iter()
        .filter(|r| r.path.contains("/custom/value"))
        .count()
}

fn id_reads(requests: &[RecordedRequest]) -> Vec<&RecordedRequest> {
    requests
        .iter()
        .filter(|r| r.path == "/api/v1/aggregation")
        .collect()
}

/// On PostgreSQL, the server logs every statement of this test's database; the count of those
/// that settle unmatched rows.
struct StatementLog {
    database: String,
}

impl StatementLog {
    async fn start(t: &TestApp) -> StatementLog {
        let url = crate::pg::state_url(t);
        let database = url.rsplit('/').next().unwrap().to_owned();
        let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&url)
            .await
            .unwrap();
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "ALTER DATABASE \"{database}\" SET log_statement = 'all'"
        )))
        .execute(&mut conn)
        .await
        .unwrap();
        StatementLog { database }
    }

    fn count(&self, statement: &str) -> usize {
        let log = pendo_sync::sim::postgres::server_log().expect("the test cluster runs");
        let text = std::fs::read_to_string(log).unwrap();
        let ours = format!(":{}:", self.database);
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.contains(&ours) && l.contains(statement))
            .collect();
        lines.len()
    }
}

on_both_backends! {
    /// 1,000 accounts, 900 of them unknown to Pendo, over five full-check periods: one event per
    /// value when it becomes unmatched and none after, no value sent again, one id-only read per
    /// period, and the unmatched rows settled a statement per field, not per record.
    async fn unknown_ids_cost_one_event_each_and_are_not_sent_again(backend: Backend) {
        let Some(t) = app_on(
            backend,
            Options {
                unmatched_retry: "1s",
                discovery_interval: Some("1s"),
                ..Options::default()
            },
        )
        .await
        else {
            return;
        };
        let statements = match backend {
            Backend::Postgres => Some(StatementLog::start(&t).await),
            Backend::Sqlite => None,
        };
        let (n, known) = (1000, 100);
        t.seed(n);
        for i in known..n {
            t.pendo.remove_entity(Kind::Account, &account_id(i));
        }
        let report = t.sync().await;
        let drain = report.drain.unwrap();
        assert_eq!((drain.confirmed, drain.unmatched), (known as u64, (n - known) as u64));
        let first = t.pendo.requests();
        let batches = writes(&first);
        assert_eq!(batches, n / 50);
        // Detected and confirmed, or detected and missing: two events per value.
        let values = (n * 5) as i64;
        assert_eq!(history_events(&t).await, 2 * values);
        if let Some(log) = &statements {
            // A statement per field and enqueue version: the CRM's pages hold 40 records, so a
            // batch of 50 spans at most 3 pages' versions. (One per record would be 250.)
            let settles = log.count("UPDATE outbox SET state = 'unmatched'");
            assert!(
                settles <= 5 * 3 * batches,
                "{settles} statements settled unmatched rows in {batches} batches of 5 fields"
            );
        }

        t.pendo.reset_requests();
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_millis(1100)).await;
            t.sync().await;
        }
        let later = t.pendo.requests();
        assert_eq!(writes(&later), 0, "no value went again to an id Pendo does not know");
        let reads = id_reads(&later);
        assert_eq!(reads.len(), 5, "one read of Pendo's ids per period");
        for read in reads {
            let body = read.body.as_ref().unwrap().to_string();
            assert!(body.contains(r#""select":{"accountId":"accountId"}"#), "{body}");
        }
        assert_eq!(history_events(&t).await, 2 * values, "staying unknown writes nothing");
    }
}

on_both_backends! {
    /// An id Pendo comes to know gets its values at the next poll (discovery, filtered on
    /// `firstvisit`); one whose `firstvisit` discovery cannot see (created through the API, or
    /// processed late) at the full check.
    async fn ids_pendo_comes_to_know_get_their_values_by_discovery_or_the_full_check(
        backend: Backend
    ) {
        let Some(t) = app_on(
            backend,
            Options {
                unmatched_retry: "4s",
                discovery_interval: Some("1s"),
                ..Options::default()
            },
        )
        .await
        else {
            return;
        };
        t.seed(4);
        let (visitor, api_created) = (account_id(2), account_id(3));
        for id in [&visitor, &api_created] {
            t.pendo.remove_entity(Kind::Account, id);
        }
        assert_eq!(t.sync().await.drain.unwrap().unmatched, 2);

        t.pendo.add_entity(Kind::Account, &visitor);
        let two_days_ago = pendo_sync::domain::now_ms() - 2 * 86_400_000;
        t.pendo
            .add_entity_first_visited(Kind::Account, &api_created, two_days_ago);
        t.pendo.reset_requests();
        t.sync().await;
        let after_discovery = std::time::Instant::now();
        let held = t.held();
        assert_eq!(held.get(&visitor).map(|f| f.len()), Some(5), "{held:?}");
        assert!(!held.contains_key(&api_created), "not seen by discovery");
        let requests = t.pendo.requests();
        let reads = id_reads(&requests);
        assert_eq!(reads.len(), 1);
        let body = reads[0].body.as_ref().unwrap().to_string();
        assert!(body.contains("metadata.auto.firstvisit >= "), "{body}");

        // The full check, once `unmatched_retry` has passed since the first read.
        t.sync().await;
        assert!(!t.held().contains_key(&api_created), "no full check before its time");
        let full_check_due = Duration::from_millis(4100).saturating_sub(after_discovery.elapsed());
        tokio::time::sleep(full_check_due).await;
        t.pendo.reset_requests();
        t.sync().await;
        t.assert_converged();
        let requests = t.pendo.requests();
        let body = id_reads(&requests)[0].body.as_ref().unwrap().to_string();
        assert!(!body.contains("filter"), "the full check reads every id: {body}");
    }
}
