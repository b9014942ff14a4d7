//! A throwaway PostgreSQL cluster for the tests: Debian's `initdb` and `pg_ctl` in a temp
//! directory, on a free loopback port, started once per test binary run; a database per test.
//!
//! PostgreSQL refuses to run as root, so as root (CI) the cluster runs as the `postgres` OS
//! user. A watchdog shell stops it and removes its directory when this process ends, however it
//! ends. Without PostgreSQL installed a test prints SKIPPED, except under `CI=true`, where a
//! missing server is a failure (`.ci/run` installs it).

/// A fresh database on the test cluster (see `pendo_sync::sim::postgres`).
pub async fn database() -> Option<String> {
    pendo_sync::sim::postgres::database().await
}

/// Which state a parametrised test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    /// The state URL for this back-end (`None`: SQLite), or `Err(())` when PostgreSQL is not
    /// available here (the test says SKIPPED and passes).
    pub async fn state_url(self) -> Result<Option<String>, ()> {
        match self {
            Backend::Sqlite => Ok(None),
            Backend::Postgres => match database().await {
                Some(url) => Ok(Some(url)),
                None => {
                    eprintln!("SKIPPED: PostgreSQL is not installed");
                    Err(())
                }
            },
        }
    }
}

impl Backend {
    /// A writable store on this back-end: a SQLite file in `dir`, or a fresh PostgreSQL
    /// database with the leader lease taken (every write checks it). `None`: PostgreSQL is not
    /// available here (SKIPPED).
    pub async fn open_store(self, dir: &std::path::Path) -> Option<pendo_sync::store::Store> {
        use pendo_sync::config::StateSettings;
        use pendo_sync::store::Store;
        let url = self.state_url().await.ok()?;
        let state = match url {
            None => StateSettings::sqlite(dir.join("state.db")),
            Some(url) => StateSettings::postgres(&url),
        };
        let store = Store::open_settings(&state).await.expect("open the state");
        if let Some(pg) = store.postgres() {
            let taken = pg
                .try_take_lease("test 1 run", std::time::Duration::from_secs(60))
                .await
                .expect("take the lease");
            assert!(taken.is_some(), "a fresh database has no leader");
        }
        Some(store)
    }
}

/// The PostgreSQL URL of a test app's state.
pub fn state_url(t: &crate::helpers::TestApp) -> String {
    use secrecy::ExposeSecret;
    let url = t.settings.state.url().expect("a PostgreSQL state");
    url.expose_secret().to_owned()
}

/// Runs one test body on SQLite and on PostgreSQL, as two tests: `name::sqlite`,
/// `name::postgres`. `multi_thread:` first runs them on two worker threads (tests that drive
/// child processes and serve simulators at once).
#[macro_export]
macro_rules! on_both_backends {
    (multi_thread: $(#[$meta:meta])* async fn $name:ident($backend:ident: Backend) $body:block) => {
        $crate::on_both_backends!(@emit [flavor = "multi_thread", worker_threads = 2] $(#[$meta])* $name $backend $body);
    };
    ($(#[$meta:meta])* async fn $name:ident($backend:ident: Backend) $body:block) => {
        $crate::on_both_backends!(@emit [] $(#[$meta])* $name $backend $body);
    };
    (@emit [$($flavor:tt)*] $(#[$meta:meta])* $name:ident $backend:ident $body:block) => {
        $(#[$meta])*
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            async fn body($backend: $crate::pg::Backend) $body
            #[tokio::test($($flavor)*)]
            async fn sqlite() {
                body($crate::pg::Backend::Sqlite).await
            }
            #[tokio::test($($flavor)*)]
            async fn postgres() {
                body($crate::pg::Backend::Postgres).await
            }
        }
    };
}

/// Every row of every table of the database at `url`, hashed: equal before and after means
/// nothing was written (the dry-run guarantee on PostgreSQL, where there is no file to compare).
pub async fn fingerprint(url: &str) -> String {
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(url)
        .await
        .expect("connect");
    let tables: Vec<(String,)> = sqlx::query_as(
        "SELECT tablename::text FROM pg_tables WHERE schemaname = 'public' ORDER BY tablename",
    )
    .fetch_all(&mut conn)
    .await
    .expect("tables");
    let mut out = String::new();
    for (table,) in tables {
        let (digest,): (Option<String>,) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT md5(string_agg(t::text, ',' ORDER BY t::text)) FROM \"{table}\" AS t"
        )))
        .fetch_one(&mut conn)
        .await
        .expect("table digest");
        out.push_str(&format!("{table}:{}\n", digest.unwrap_or_default()));
    }
    out
}

/// Fencing: a leader whose lease expired and was taken commits nothing more, and learns so.
#[tokio::test]
async fn a_leader_that_lost_its_lease_commits_nothing() {
    use pendo_sync::config::StateSettings;
    use pendo_sync::store::{Store, StoreError};
    use std::time::Duration;
    let Some(t) = crate::helpers::TestApp::on(Backend::Postgres).await else {
        return;
    };
    let url = state_url(&t);
    let state: StateSettings = t.settings.state.clone();
    let a = Store::open_settings(&state).await.unwrap();
    let b = Store::open_settings(&state).await.unwrap();
    let ttl = Duration::from_secs(3);
    let pa = a.postgres().unwrap();
    let pb = b.postgres().unwrap();
    assert_eq!(
        pa.try_take_lease("host-a 1 run", ttl).await.unwrap(),
        Some(1)
    );
    assert_eq!(pb.try_take_lease("host-b 2 run", ttl).await.unwrap(), None);
    a.kv_set("before", &serde_json::json!(1)).await.unwrap();
    // A stalls past its lease (here: the clock moves, not the process): B takes over.
    let mut raw = <sqlx::PgConnection as sqlx::Connection>::connect(&url)
        .await
        .unwrap();
    sqlx::query("UPDATE leader_lease SET expires_at = clock_timestamp() - interval '1 second'")
        .execute(&mut raw)
        .await
        .unwrap();
    assert_eq!(
        pb.try_take_lease("host-b 2 run", ttl).await.unwrap(),
        Some(2)
    );
    // A wakes up and writes: refused, nothing committed, and it knows it lost the lease.
    let err = a.kv_set("after", &serde_json::json!(1)).await.unwrap_err();
    assert!(matches!(err, StoreError::LostLease { epoch: 1 }), "{err}");
    assert!(a.fence().was_lost());
    assert_eq!(b.kv_get("after").await.unwrap(), None);
    assert_eq!(
        b.kv_get("before").await.unwrap(),
        Some(serde_json::json!(1))
    );
    // And every later write too, without asking the database.
    assert!(a.kv_set("later", &serde_json::json!(1)).await.is_err());
    // B writes under epoch 2.
    b.kv_set("after", &serde_json::json!(2)).await.unwrap();
    // Renewal by the old holder fails; by the new one succeeds.
    assert!(!pa.renew_lease(ttl).await.unwrap());
    assert!(pb.renew_lease(ttl).await.unwrap());
    let holder = pb.lease_holder().await.unwrap().unwrap();
    assert_eq!((holder.holder.as_str(), holder.epoch), ("host-b 2 run", 2));
    assert!(holder.expires_in_ms > 0);
}

/// Found by the e2e bench on PostgreSQL: writing transactions (pages of 10,000 new records)
/// share-locked the lease row, so the leader's own renewal waited for them, the lease expired
/// meanwhile, and the leader lost it while alive and well. Renewals must go through while the
/// leader's transactions run; a standby's takeover must still wait for them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_write_does_not_block_its_lease_renewal_and_a_takeover_waits_for_it() {
    use pendo_sync::config::StateSettings;
    use pendo_sync::store::{PausePoint, Store};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};
    let Some(url) = database().await else {
        eprintln!("SKIPPED: PostgreSQL is not installed");
        return;
    };
    let state = StateSettings::postgres(&url);
    let a = Store::open_settings(&state).await.unwrap();
    let b = Store::open_settings(&state).await.unwrap();
    let ttl = Duration::from_secs(3);
    let pa = a.postgres().unwrap().clone();
    assert_eq!(
        pa.try_take_lease("host-a 1 run", ttl).await.unwrap(),
        Some(1)
    );
    // One write of A's stays inside its transaction for 1.2 s (under the server's idle limit of
    // half a lease, which ends a stalled leader's transaction).
    let once = Arc::new(AtomicBool::new(false));
    a.set_pause_hook(Some(Arc::new(move |point| {
        let first = point == PausePoint::InFencedWrite && !once.swap(true, Ordering::SeqCst);
        Box::pin(async move {
            if first {
                tokio::time::sleep(Duration::from_millis(1200)).await;
            }
        })
    })));
    let writer = {
        let a = a.clone();
        tokio::spawn(async move { a.kv_set("long", &serde_json::json!(1)).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    // A renews meanwhile, at once.
    let started = Instant::now();
    assert!(pa.renew_lease(ttl).await.unwrap(), "the renewal failed");
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "the renewal waited {:?} for A's own transaction",
        started.elapsed()
    );
    assert!(!writer.is_finished(), "the write did not last long enough");
    writer.await.unwrap().unwrap();
    a.set_pause_hook(None);
    // B's takeover of an expired lease waits for A's transaction in flight.
    let once = Arc::new(AtomicBool::new(false));
    a.set_pause_hook(Some(Arc::new(move |point| {
        let first = point == PausePoint::InFencedWrite && !once.swap(true, Ordering::SeqCst);
        Box::pin(async move {
            if first {
                tokio::time::sleep(Duration::from_millis(1000)).await;
            }
        })
    })));
    let writer = {
        let a = a.clone();
        tokio::spawn(async move { a.kv_set("in-flight", &serde_json::json!(1)).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut raw = <sqlx::PgConnection as sqlx::Connection>::connect(&url)
        .await
        .unwrap();
    sqlx::query("UPDATE leader_lease SET expires_at = clock_timestamp() - interval '1 second'")
        .execute(&mut raw)
        .await
        .unwrap();
    let pb = b.postgres().unwrap();
    assert_eq!(
        pb.try_take_lease("host-b 2 run", ttl).await.unwrap(),
        Some(2)
    );
    // The takeover returned only after A's transaction ended: it committed before epoch 2.
    assert!(
        writer.is_finished(),
        "the takeover did not wait for A's write"
    );
    writer.await.unwrap().unwrap();
    assert_eq!(
        b.kv_get("in-flight").await.unwrap(),
        Some(serde_json::json!(1))
    );
}

/// A guard pass turns a whole cycle's staged rows pending at once: the writer's first claims
/// must not be planned on statistics that still see them staged (a 100,000-record first push
/// claimed at 100+ ms a batch until the next refresh). The pass refreshes them before it returns.
#[tokio::test]
async fn a_guard_pass_leaves_the_planner_seeing_the_rows_pending() {
    let Some(t) = crate::helpers::TestApp::on(Backend::Postgres).await else {
        return;
    };
    let url = state_url(&t);
    // 3,000 records, 15,000 values: past the refresh threshold while they are staged.
    t.seed(3_000);
    t.cycle(pendo_sync::engine::Mode::Incremental).await;
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&url)
        .await
        .unwrap();
    let (pending,): (i64,) = sqlx::query_as("SELECT count(*) FROM outbox WHERE state = 'pending'")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(pending, 15_000, "the guard passed the cycle");
    let (seen,): (Option<String>,) = sqlx::query_as(
        "SELECT most_common_vals::text FROM pg_stats
         WHERE tablename = 'outbox' AND attname = 'state'",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(
        seen.as_deref(),
        Some("{pending}"),
        "the planner's picture of outbox.state"
    );
}

/// Guarantee 10 and "latest wins" across a leader change: a leader that stalled between its
/// claim and its send (a GC pause, SIGSTOP, a partition) wakes up after another replica took
/// over and confirmed a newer value. It must send nothing: it judges by its own clock that its
/// lease may have passed. And the new leader leaves the rows the old one had in flight alone
/// for the old one's send window (`pendo.timeout`), so a request it did get out cannot land
/// after the newer value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_stalled_before_sending_sends_nothing_after_a_takeover() {
    use pendo_sync::domain::Kind;
    use pendo_sync::engine::Mode;
    use pendo_sync::lock::InstanceLock;
    use pendo_sync::store::PausePoint;
    use std::sync::Arc;
    use std::time::{Duration, Instant};
    use tokio::sync::Notify;
    let Some(t) = crate::helpers::TestApp::on(Backend::Postgres).await else {
        return;
    };
    let id = crate::helpers::account_id(0);
    let mapping = t.settings.mapping("accounts").unwrap().clone();
    t.seed(3);
    t.sync().await;
    let wait = Duration::from_secs(30);

    // A leads, queues "Stale" and stalls between its claim and its send.
    let a = t.app().await;
    let lock_a = InstanceLock::acquire_for(&a.store, &t.settings.state, "run", wait)
        .await
        .unwrap();
    a.writer.start(&lock_a).await.unwrap();
    t.crm
        .set_field("Account", &id, "Plan_Tier__c", serde_json::json!("Stale"));
    a.cycle(&mapping, Mode::Incremental, false, &())
        .await
        .unwrap();
    let (stalled, resume) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    {
        let (stalled, resume) = (stalled.clone(), resume.clone());
        a.store.set_pause_hook(Some(Arc::new(move |point| {
            let (stalled, resume) = (stalled.clone(), resume.clone());
            Box::pin(async move {
                if point == PausePoint::BeforeSend {
                    stalled.notify_one();
                    resume.notified().await;
                }
            })
        })));
    }
    let step_a = {
        let writer = a.writer.clone();
        tokio::spawn(async move { writer.step(Kind::Account).await })
    };
    stalled.notified().await;
    // The whole process stalls: its renewals stop too.
    lock_a.stop_renewing();

    // B takes over once A's lease expired, and sends the newer value.
    let b = t.app().await;
    let lock_b = InstanceLock::acquire_for(&b.store, &t.settings.state, "run", wait)
        .await
        .unwrap();
    let took_over = Instant::now();
    b.writer.start(&lock_b).await.unwrap();
    t.crm
        .set_field("Account", &id, "Plan_Tier__c", serde_json::json!("Fresh"));
    b.cycle(&mapping, Mode::Incremental, false, &())
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while t.pendo.value(Kind::Account, &id, "plantier") != Some(serde_json::json!("Fresh")) {
        assert!(Instant::now() < deadline, "B never sent the newer value");
        b.writer.step(Kind::Account).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The row A had in flight waited out A's send window (pendo.timeout, 5 s here).
    assert!(
        took_over.elapsed() >= t.settings.pendo.timeout,
        "B re-sent A's in-flight row {:?} after the takeover",
        took_over.elapsed()
    );

    // A wakes up: it sends nothing, and commits nothing.
    let requests_before = t.pendo.requests().len();
    resume.notify_one();
    let outcome = step_a.await.unwrap();
    assert!(outcome.is_err(), "A's settle committed: {outcome:?}");
    assert_eq!(
        t.pendo.requests().len(),
        requests_before,
        "A sent after its lease passed"
    );
    assert_eq!(
        t.pendo.value(Kind::Account, &id, "plantier"),
        Some(serde_json::json!("Fresh"))
    );
    let shadow = b
        .store
        .load_shadow(Kind::Account, &[id.as_str()])
        .await
        .unwrap();
    assert_eq!(
        shadow[&id].get("plantier"),
        Some(&serde_json::json!("Fresh")),
        "{shadow:?}"
    );
    assert!(
        !t.pendo.requests().iter().any(|r| r
            .body
            .as_ref()
            .is_some_and(|b| b.to_string().contains("Stale"))),
        "the stale value reached Pendo"
    );
    lock_b.release().await;
}

/// The lease is renewed on a connection of its own: a leader whose pool is busy (long pages,
/// settles, scrapes reading the outbox) for twice the lease's length keeps it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lease_is_renewed_while_the_pool_is_saturated() {
    use pendo_sync::lock::InstanceLock;
    use std::time::Duration;
    let Some(t) = crate::helpers::TestApp::on(Backend::Postgres).await else {
        return;
    };
    let app = t.app().await;
    let ttl = t.settings.state.lease_ttl;
    let lock = InstanceLock::acquire_for(&app.store, &t.settings.state, "run", Duration::ZERO)
        .await
        .unwrap();
    let pool = app.store.postgres().unwrap().pool().clone();
    let mut held = Vec::new();
    while let Ok(Ok(conn)) = tokio::time::timeout(Duration::from_millis(500), pool.acquire()).await
    {
        held.push(conn);
    }
    assert!(
        held.len() >= 8,
        "the pool was not saturated: {}",
        held.len()
    );
    tokio::time::sleep(ttl * 2).await;
    assert!(!lock.lost().is_cancelled(), "the leader lost its lease");
    assert!(app.store.may_send());
    drop(held);
    let holder = app
        .store
        .postgres()
        .unwrap()
        .lease_holder()
        .await
        .unwrap()
        .unwrap();
    assert_eq!(holder.epoch, 1);
    assert!(holder.expires_in_ms > 0, "{holder:?}");
    lock.release().await;
}
