//! More than one `run` on one PostgreSQL state: one leader, standbys that serve the admin port
//! and take over, fencing of a leader that stalled. Real binaries, a real PostgreSQL
//! (`pg.rs`), the simulators over loopback; `lease_ttl` is 3 s in these configs.

use std::time::{Duration, Instant};

use pendo_sync::sim::pendo::PendoFaults;
use pendo_sync::sim::salesforce::account_id;
use serde_json::{Value, json};

use crate::service::{ADMIN_TOKEN, Env, Options, Service, free_port, get_at};

/// Twice the test configs' `lease_ttl`: the longest a standby may take to write after the
/// leader died.
const TAKEOVER: Duration = Duration::from_secs(6);

async fn env(accounts: usize, batch_size: usize) -> Option<Env> {
    let Some(url) = crate::pg::database().await else {
        eprintln!("SKIPPED: PostgreSQL is not installed");
        return None;
    };
    Some(
        Env::new(Options {
            accounts,
            batch_size,
            state_url: Some(url),
            ..Options::default()
        })
        .await,
    )
}

/// Waits until the replica at `admin` answers `/readyz` 200 with `role`.
async fn wait_role(admin: &str, role: &str, svc: &Service, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let (status, body) = get_at(admin, "/readyz").await;
        let doc: Value = serde_json::from_str(&body).unwrap_or_default();
        if status == 200 && doc["role"] == json!(role) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{admin} is not {role} after {limit:?}: {status} {body}; log:\n{}",
            svc.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn leader_gauge(metrics: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with("pendo_sync_leader "))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

fn last_write_ms(env: &Env) -> i64 {
    env.pendo
        .requests()
        .iter()
        .filter(|r| r.method == "POST")
        .map(|r| r.at_ms)
        .max()
        .unwrap_or(0)
}

fn now_ms() -> i64 {
    pendo_sync::domain::now_ms()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_serves_the_admin_port_carries_requests_to_the_leader_and_takes_over() {
    let Some(mut env) = env(30, 50).await else {
        return;
    };
    let (a_admin, b_admin) = (env.admin.clone(), format!("127.0.0.1:{}", free_port()));
    let mut a = env.start_on(&a_admin);
    wait_role(&a_admin, "leader", &a, Duration::from_secs(20)).await;
    env.wait_converged(&a, Duration::from_secs(30)).await;
    let b = env.start_on(&b_admin);
    wait_role(&b_admin, "standby", &b, Duration::from_secs(20)).await;

    // The standby's admin port: metrics say so, status and the console read the shared state.
    let (_, metrics) = get_at(&b_admin, "/metrics").await;
    assert_eq!(leader_gauge(&metrics), Some(0.0), "{metrics}");
    let (_, metrics) = get_at(&a_admin, "/metrics").await;
    assert_eq!(leader_gauge(&metrics), Some(1.0), "{metrics}");
    let (code, body) = get_at(&b_admin, "/v1/status").await;
    assert_eq!(code, 200, "{body}");
    let status: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status["outbox"]["pending"], json!(0), "{body}");
    assert_eq!(get_at(&b_admin, "/").await.0, 200);

    // A resync asked of the standby is carried out by the leader, and followed on the standby.
    let writes = env.pendo_writes();
    let answer = reqwest::Client::new()
        .post(format!("http://{b_admin}/v1/resync"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 202);
    let id = answer.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, body) = get_at(&b_admin, &format!("/v1/resync/{id}")).await;
        let job: Value = serde_json::from_str(&body).unwrap_or_default();
        if job["state"] == json!("done") {
            assert_eq!(job["records_read"], json!(30), "{body}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{body}; leader log:\n{}",
            a.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(env.pendo_writes() > writes, "the resync sent nothing");
    // The standby's state gauges follow what the leader wrote (they are read in the
    // background, every few seconds, whoever changed the state).
    let events_before = status["history"]["events"].as_i64().unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (_, body) = get_at(&b_admin, "/v1/status").await;
        let now: Value = serde_json::from_str(&body).unwrap_or_default();
        let events = now["history"]["events"].as_i64().unwrap_or(0);
        let (_, metrics) = get_at(&b_admin, "/metrics").await;
        let gauge = metrics
            .lines()
            .find(|l| l.starts_with("pendo_sync_history_events "))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok());
        if events > events_before && gauge == Some(events as f64) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{events_before} -> {events}: {metrics}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        b.log().lines().all(|l| !l.contains("Cycle")),
        "the standby ran a cycle:\n{}",
        b.log()
    );

    // A queue action on the standby is one transaction on the shared state.
    let answer = reqwest::Client::new()
        .post(format!("http://{b_admin}/v1/queue/retry"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"state": "dead"}))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200, "{:?}", answer.text().await);

    // The CLI finds the leader by its lease and queues through the state.
    let out = env.cli(&["resync", "--mapping", "sf-accounts"]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("queued for the leader"), "{stdout}");
    assert!(stdout.contains(": done,"), "{stdout}");

    // The leader stops cleanly: the standby takes over at once (the lease was handed over)
    // and syncs the next change.
    a.sigterm();
    assert!(a.exit_within(Duration::from_secs(20)).await.success());
    wait_role(&b_admin, "leader", &b, TAKEOVER).await;
    env.sf
        .set_field("Account", &account_id(3), "ARR__c", json!(31337.0));
    env.wait_converged(&b, Duration::from_secs(20)).await;
    let (_, metrics) = get_at(&b_admin, "/metrics").await;
    assert_eq!(leader_gauge(&metrics), Some(1.0), "{metrics}");
}

/// Two replicas; the leader is killed (-9) while it pushes, 20 times, and restarted as the
/// standby each time. The standby's first Pendo write comes within 2 × lease_ttl of the kill,
/// and Pendo ends equal to the CRM. Prints the takeover times (BENCHMARKS.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_killed_during_a_push_20_times_a_standby_takes_over_and_nothing_is_lost() {
    let Some(mut env) = env(300, 10).await else {
        return;
    };
    let admins = [env.admin.clone(), format!("127.0.0.1:{}", free_port())];
    let mut leader = env.start_on(&admins[0]);
    wait_role(&admins[0], "leader", &leader, Duration::from_secs(20)).await;
    env.wait_converged(&leader, Duration::from_secs(60)).await;
    let mut standby = env.start_on(&admins[1]);
    wait_role(&admins[1], "standby", &standby, Duration::from_secs(20)).await;
    // Pushes long enough to be cut: 10 values a request, 20 ms each.
    env.pendo.set_faults(PendoFaults {
        latency: Duration::from_millis(20),
        ..PendoFaults::default()
    });
    let mut rng = fastrand::Rng::with_seed(7);
    let mut takeovers = Vec::new();
    let mut which = 0;
    for round in 0..20 {
        for _ in 0..120 {
            let i = rng.usize(0..300);
            env.sf.set_field(
                "Account",
                &account_id(i),
                "ARR__c",
                json!((round * 1000 + i) as f64),
            );
        }
        let writes = env.pendo_writes();
        let deadline = Instant::now() + Duration::from_secs(20);
        while env.pendo_writes() == writes {
            assert!(
                Instant::now() < deadline,
                "round {round}: no push began; log:\n{}",
                leader.log()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_millis(rng.u64(0..100))).await;
        let killed_at = now_ms();
        leader.crash();
        // One more change, so the new leader has something to send whatever the old one did.
        env.sf.set_field(
            "Account",
            &account_id(round),
            "Plan_Tier__c",
            json!(format!("Tier {round}")),
        );
        let deadline = Instant::now() + TAKEOVER + Duration::from_secs(10);
        while last_write_ms(&env) <= killed_at {
            assert!(
                Instant::now() < deadline,
                "round {round}: no Pendo write after the kill; standby log:\n{}",
                standby.log()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let first = env
            .pendo
            .requests()
            .iter()
            .filter(|r| r.method == "POST" && r.at_ms > killed_at)
            .map(|r| r.at_ms)
            .min()
            .unwrap();
        takeovers.push(first - killed_at);
        // The killed one comes back as the standby.
        let restarted = env.start_on(&admins[which]);
        which = 1 - which;
        leader = std::mem::replace(&mut standby, restarted);
    }
    env.pendo.set_faults(PendoFaults::default());
    env.wait_converged(&leader, Duration::from_secs(60)).await;
    let mut sorted = takeovers.clone();
    sorted.sort_unstable();
    eprintln!(
        "takeover (kill -9 to the new leader's first Pendo write), 20 kills: median {} ms, max {} ms",
        sorted[sorted.len() / 2],
        sorted[sorted.len() - 1]
    );
    for (round, ms) in takeovers.iter().enumerate() {
        assert!(
            *ms <= TAKEOVER.as_millis() as i64,
            "round {round}: the standby's first write came {ms} ms after the kill (takeovers: {takeovers:?})"
        );
    }
}

/// A leader stopped (SIGSTOP) past its lease: the standby takes over; resumed, the old leader
/// commits nothing (its writes are fenced) and steps down (exits 1, to come back as a standby).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_stopped_past_its_lease_commits_nothing_when_resumed_and_steps_down() {
    let Some(mut env) = env(40, 50).await else {
        return;
    };
    let (a_admin, b_admin) = (env.admin.clone(), format!("127.0.0.1:{}", free_port()));
    let mut a = env.start_on(&a_admin);
    wait_role(&a_admin, "leader", &a, Duration::from_secs(20)).await;
    env.wait_converged(&a, Duration::from_secs(30)).await;
    let b = env.start_on(&b_admin);
    wait_role(&b_admin, "standby", &b, Duration::from_secs(20)).await;

    signal(&a, "STOP");
    wait_role(&b_admin, "leader", &b, TAKEOVER + Duration::from_secs(2)).await;
    env.sf
        .set_field("Account", &account_id(1), "ARR__c", json!(4242.0));
    env.wait_converged(&b, Duration::from_secs(20)).await;
    let writes = env.pendo_writes();

    signal(&a, "CONT");
    let status = a.exit_within(Duration::from_secs(20)).await;
    assert_eq!(status.code(), Some(1), "log:\n{}", a.log());
    let log = a.log();
    assert!(
        log.to_lowercase().contains("lost the leader lease"),
        "{log}"
    );
    // B is still the leader and everything still agrees; A sent nothing after it resumed.
    wait_role(&b_admin, "leader", &b, Duration::from_secs(2)).await;
    assert_eq!(
        env.pendo_writes(),
        writes,
        "the stale leader wrote to Pendo"
    );
    assert!(env.differences().is_empty(), "{:?}", env.differences());
}

fn signal(svc: &Service, name: &str) {
    let ok = std::process::Command::new("kill")
        .args([&format!("-{name}"), &svc.pid().to_string()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill -{name}");
}

/// A rolling deploy: the leader gets SIGTERM, finishes its work and hands the lease over in the
/// database before it closes its connections, so the standby leads at its next poll (within
/// 2 s), not at the lease's expiry (30 s here); a change made meanwhile reaches Pendo as soon.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_stopped_with_sigterm_hands_its_lease_over_at_once() {
    let Some(mut env) = env(20, 50).await else {
        return;
    };
    let long = [("PENDO_SYNC__STATE__LEASE_TTL", "30s")];
    let (a_admin, b_admin) = (env.admin.clone(), format!("127.0.0.1:{}", free_port()));
    let mut a = env.start_with(&a_admin, &long);
    wait_role(&a_admin, "leader", &a, Duration::from_secs(20)).await;
    env.wait_converged(&a, Duration::from_secs(30)).await;
    let b = env.start_with(&b_admin, &long);
    wait_role(&b_admin, "standby", &b, Duration::from_secs(20)).await;

    let stopped = Instant::now();
    a.sigterm();
    assert_eq!(a.exit_within(Duration::from_secs(20)).await.code(), Some(0));
    let exited = stopped.elapsed();
    env.sf.set_field(
        "Account",
        &account_id(3),
        "Plan_Tier__c",
        json!("Handed over"),
    );
    wait_role(&b_admin, "leader", &b, Duration::from_secs(2)).await;
    let led = stopped.elapsed();
    assert!(
        a.log().contains("Handed the leader lease over."),
        "{}",
        a.log()
    );
    assert!(!a.log().contains("closed pool"), "{}", a.log());
    env.wait_converged(&b, Duration::from_secs(5)).await;
    eprintln!(
        "SIGTERM to exit {exited:?}; to the standby leading {led:?}; converged after {:?}",
        stopped.elapsed()
    );
}

/// Two replicas started at the same moment through Debian's PgBouncer in transaction mode,
/// with exactly the settings the README names (`PGBOUNCER_SETTINGS`): both start (the
/// migrations serialise on a transaction-scoped lock), one leads, a kill -9 of the leader
/// hands over, the restarted one stands by, and nothing on the way fails on a startup
/// parameter or a prepared statement another client left on a server connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_through_pgbouncer_in_transaction_mode_start_lead_and_take_over() {
    let Some(direct) = crate::pg::database().await else {
        eprintln!("SKIPPED: PostgreSQL is not installed");
        return;
    };
    let Some(bouncer) = pendo_sync::sim::postgres::pgbouncer().await else {
        eprintln!("SKIPPED: PgBouncer is not installed");
        return;
    };
    let mut env = Env::new(Options {
        accounts: 40,
        batch_size: 10,
        state_url: Some(bouncer.url_for(&direct)),
        ..Options::default()
    })
    .await;
    let admins = [env.admin.clone(), format!("127.0.0.1:{}", free_port())];
    let mut replicas = vec![env.start_on(&admins[0]), env.start_on(&admins[1])];
    // One of them leads, the other stands by.
    let deadline = Instant::now() + Duration::from_secs(30);
    let leader = loop {
        let mut roles = Vec::new();
        for admin in &admins {
            let (status, body) = get_at(admin, "/readyz").await;
            let doc: Value = serde_json::from_str(&body).unwrap_or_default();
            roles.push((status, doc["role"].as_str().unwrap_or("").to_owned()));
        }
        let leaders: Vec<usize> = (0..2).filter(|&i| roles[i].1 == "leader").collect();
        if leaders.len() == 1 && roles.iter().all(|(s, _)| *s == 200) {
            break leaders[0];
        }
        assert!(
            Instant::now() < deadline,
            "no single leader through PgBouncer: {roles:?}; logs:\n{}\n---\n{}",
            replicas[0].log(),
            replicas[1].log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let standby = 1 - leader;
    env.wait_converged(&replicas[leader], Duration::from_secs(30))
        .await;
    let (_, metrics) = get_at(&admins[standby], "/metrics").await;
    assert_eq!(leader_gauge(&metrics), Some(0.0), "{metrics}");

    // kill -9 of the leader: the standby takes over and carries a change made meanwhile.
    replicas[leader].crash();
    env.sf.set_field(
        "Account",
        &account_id(5),
        "Plan_Tier__c",
        json!("Through the pooler"),
    );
    wait_role(
        &admins[standby],
        "leader",
        &replicas[standby],
        TAKEOVER + Duration::from_secs(5),
    )
    .await;
    env.wait_converged(&replicas[standby], Duration::from_secs(30))
        .await;
    // The killed one comes back as a standby.
    let old_admin = admins[leader].clone();
    replicas[leader] = env.start_on(&old_admin);
    wait_role(
        &old_admin,
        "standby",
        &replicas[leader],
        Duration::from_secs(20),
    )
    .await;
    let (_, metrics) = get_at(&old_admin, "/metrics").await;
    assert_eq!(leader_gauge(&metrics), Some(0.0), "{metrics}");

    for svc in &replicas {
        let log = svc.log();
        for bad in [
            "unsupported startup parameter",
            "prepared statement",
            "ERROR",
        ] {
            assert!(!log.contains(bad), "{bad:?} in a replica's log:\n{log}");
        }
    }
}
