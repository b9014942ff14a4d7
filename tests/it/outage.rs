//! The database goes away under a running leader and comes back: the admin port keeps
//! answering, the log says so once, nothing is lost. The test cluster is shared by the whole
//! test binary, so the outage is made by a TCP proxy between the service and PostgreSQL that
//! drops every connection and refuses new ones (what a stopped or restarting server looks like
//! to a client), not by stopping the server.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pendo_sync::sim::salesforce::account_id;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};

use crate::service::{Env, Options};

/// A loopback TCP proxy to `upstream` that can be cut and restored. Cut, it drops every open
/// connection and stops listening, so new ones are refused: what a stopped server looks like.
pub(crate) struct Proxy {
    port: u16,
    down: tokio::sync::watch::Sender<bool>,
    stalled: tokio::sync::watch::Sender<bool>,
    /// Stall once a request containing these bytes went through.
    stall_on: Arc<Mutex<Option<Vec<u8>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Proxy {
    pub(crate) async fn start(upstream: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (down, downs) = tokio::sync::watch::channel(false);
        let (stalled, stalls) = tokio::sync::watch::channel(false);
        let stall_on: Arc<Mutex<Option<Vec<u8>>>> = Arc::default();
        let (stall_tx, armed) = (stalled.clone(), stall_on.clone());
        let task = tokio::spawn(async move {
            let mut listener = Some(listener);
            let mut state = downs.clone();
            loop {
                let Some(open) = listener.take() else {
                    // Down: wait to be restored, then listen on the same port again.
                    let _ = state.wait_for(|down| !*down).await;
                    while listener.is_none() {
                        match TcpListener::bind(("127.0.0.1", port)).await {
                            Ok(l) => listener = Some(l),
                            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                        }
                    }
                    continue;
                };
                tokio::select! {
                    accepted = open.accept() => {
                        listener = Some(open);
                        let Ok((client, _)) = accepted else { continue };
                        let (upstream, mut downs) = (upstream.clone(), downs.clone());
                        let stalls = stalls.clone();
                        let (stall_tx, armed) = (stall_tx.clone(), armed.clone());
                        tokio::spawn(async move {
                            let Ok(server) = TcpStream::connect(&upstream).await else {
                                return;
                            };
                            tokio::select! {
                                _ = relay(client, server, stalls, stall_tx, armed) => {}
                                _ = downs.wait_for(|down| *down) => {}
                            }
                        });
                    }
                    _ = state.wait_for(|down| *down) => drop(open),
                }
            }
        });
        Proxy {
            port,
            down,
            stalled,
            stall_on,
            task,
        }
    }

    /// `url` (a PostgreSQL URL on the test cluster) with its port replaced by the proxy's.
    pub(crate) fn url_for(&self, url: &str) -> String {
        let (head, rest) = url.rsplit_once('@').expect("a URL with a user");
        let (_, path) = rest.split_once('/').expect("a URL with a database");
        format!("{head}@127.0.0.1:{}/{path}", self.port)
    }

    pub(crate) fn cut(&self) {
        self.down.send_replace(true);
    }

    pub(crate) fn restore(&self) {
        self.down.send_replace(false);
    }

    /// Once a request containing `bytes` has gone to the server, holds back what the server
    /// sends until [`Proxy::resume`]: a server that has done the work but whose answer is slow
    /// to arrive.
    pub(crate) fn stall_after(&self, bytes: &[u8]) {
        *self.stall_on.lock().unwrap() = Some(bytes.to_vec());
    }

    pub(crate) fn resume(&self) {
        self.stalled.send_replace(false);
    }
}

/// Copies both ways; the server's bytes wait while `stalled` says so, which a request
/// containing the `armed` bytes turns on.
async fn relay(
    client: TcpStream,
    server: TcpStream,
    mut stalled: tokio::sync::watch::Receiver<bool>,
    stall: tokio::sync::watch::Sender<bool>,
    armed: Arc<Mutex<Option<Vec<u8>>>>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut client_rx, mut client_tx) = client.into_split();
    let (mut server_rx, mut server_tx) = server.into_split();
    let up = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = client_rx.read(&mut buf).await?;
            if n == 0 {
                return Ok::<_, std::io::Error>(());
            }
            {
                let mut armed = armed.lock().unwrap();
                if armed
                    .as_ref()
                    .is_some_and(|p| buf[..n].windows(p.len()).any(|w| w == p.as_slice()))
                {
                    *armed = None;
                    stall.send_replace(true);
                }
            }
            server_tx.write_all(&buf[..n]).await?;
        }
    };
    let down = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = server_rx.read(&mut buf).await?;
            if n == 0 {
                return Ok::<_, std::io::Error>(());
            }
            let _ = stalled.wait_for(|s| !*s).await;
            client_tx.write_all(&buf[..n]).await?;
        }
    };
    tokio::select! {
        _ = up => {}
        _ = down => {}
    }
}

fn upstream_of(url: &str) -> String {
    let rest = url.rsplit_once('@').expect("a URL with a user").1;
    rest.split_once('/')
        .expect("a URL with a database")
        .0
        .to_owned()
}

/// The test cluster's log lines about database `name`.
fn server_log_lines(name: &str) -> Vec<String> {
    let path = pendo_sync::sim::postgres::server_log().expect("the test cluster runs");
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let tag = format!(":{name}:");
    text.lines()
        .filter(|l| l.contains(&tag))
        .map(str::to_owned)
        .collect()
}

/// GET with a 2 s limit, as a kubelet's probe or a scraper would: status (0: no answer in time).
async fn probe(admin: &str, path: &str) -> (u16, String) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    match client.get(format!("http://{admin}{path}")).send().await {
        Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
        Err(e) => (0, e.to_string()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_answers_503_logs_once_and_loses_nothing() {
    let Some(direct) = crate::pg::database().await else {
        eprintln!("SKIPPED: PostgreSQL is not installed");
        return;
    };
    let proxy = Proxy::start(upstream_of(&direct)).await;
    let mut env = Env::new(Options {
        accounts: 40,
        batch_size: 10,
        state_url: Some(proxy.url_for(&direct)),
        ..Options::default()
    })
    .await;
    // The lease outlives the outage: this test is about the outage, not the takeover.
    let svc = env.start_with(
        &env.admin.clone(),
        &[("PENDO_SYNC__STATE__LEASE_TTL", "30s")],
    );
    env.wait_ready(&svc, Duration::from_secs(30)).await;
    env.wait_converged(&svc, Duration::from_secs(30)).await;

    proxy.cut();
    let cut_at = Instant::now();
    // Changes made while the database is away, and a scraper and a prober that give up after
    // 2 s, as real ones do.
    for i in 0..10 {
        env.sf.set_field(
            "Account",
            &account_id(i),
            "Plan_Tier__c",
            json!(format!("During the outage {i}")),
        );
    }
    let mut samples = Vec::new();
    while cut_at.elapsed() < Duration::from_secs(8) {
        let asked = Instant::now();
        let (ready, metrics) =
            tokio::join!(probe(&env.admin, "/readyz"), probe(&env.admin, "/metrics"));
        samples.push((cut_at.elapsed(), asked.elapsed(), ready, metrics.0));
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    proxy.restore();
    let restored = Instant::now();

    for (at, took, (status, body), metrics) in &samples {
        assert!(
            *status != 0 && *took < Duration::from_secs(2),
            "/readyz did not answer within 2 s at {at:?} into the outage: {body}; log:\n{}",
            svc.log()
        );
        assert_eq!(*metrics, 200, "/metrics at {at:?} into the outage");
    }
    // After the first second, every answer is a 503 that names the database.
    let late: Vec<_> = samples
        .iter()
        .filter(|(at, ..)| *at > Duration::from_secs(2))
        .collect();
    assert!(!late.is_empty());
    for (at, _, (status, body), _) in late {
        assert_eq!(*status, 503, "at {at:?}: {body}");
        let doc: Value = serde_json::from_str(body).unwrap_or_default();
        let reasons = doc["reasons"].to_string();
        assert!(reasons.contains("database"), "at {at:?}: {body}");
        assert!(!reasons.contains("state file"), "at {at:?}: {body}");
    }

    // Back: the changes made meanwhile reach Pendo, with no restart.
    env.wait_converged(&svc, Duration::from_secs(30)).await;
    env.wait_ready(&svc, Duration::from_secs(10)).await;
    eprintln!(
        "converged {:?} after the database came back",
        restored.elapsed()
    );
    let log = svc.log();
    let lost = log.matches("Lost the database").count();
    let back = log.matches("The database is back").count();
    assert_eq!(
        (lost, back),
        (1, 1),
        "one WARN when lost, one INFO when back:\n{log}"
    );
    let errors: Vec<&str> = log.lines().filter(|l| l.contains("ERROR")).collect();
    assert!(
        errors.is_empty(),
        "an outage the service rode out is not an error, line after line:\n{}",
        errors.join("\n")
    );
    let name = direct.rsplit('/').next().unwrap();
    let warnings: Vec<String> = server_log_lines(name)
        .into_iter()
        .filter(|l| l.contains("already a transaction in progress"))
        .collect();
    assert!(
        warnings.is_empty(),
        "a BEGIN was sent on a connection with an open transaction:\n{}",
        warnings.join("\n")
    );
}

/// A read whose caller gives up while its BEGIN is on the way (a client that went away, a
/// timeout) leaves no connection inside a transaction: before, sqlx counted the transaction
/// only once the server's answer arrived, and the connection went back to the pool inside it
/// (the next BEGIN there: "there is already a transaction in progress").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_given_up_during_its_begin_leaves_no_open_transaction() {
    let Some(direct) = crate::pg::database().await else {
        eprintln!("SKIPPED: PostgreSQL is not installed");
        return;
    };
    let proxy = Proxy::start(upstream_of(&direct)).await;
    let state = pendo_sync::config::StateSettings::postgres(&proxy.url_for(&direct));
    let store = pendo_sync::store::Store::open_settings(&state)
        .await
        .expect("the state opens");
    let kind = pendo_sync::domain::Kind::Account;
    store.load_diff_state(kind, &["a"]).await.expect("a read");

    proxy.stall_after(b"BEGIN");
    let given_up = tokio::time::timeout(
        Duration::from_millis(300),
        store.load_diff_state(kind, &["a"]),
    )
    .await;
    assert!(
        given_up.is_err(),
        "the read should have waited for the stalled answer"
    );
    proxy.resume();

    // Whatever the abandoned BEGIN left is settled within a moment (the pool tests a returned
    // connection); a connection idle inside a transaction stays so.
    let name = direct.rsplit('/').next().unwrap().to_owned();
    let mut admin = <sqlx::PgConnection as sqlx::Connection>::connect(&direct)
        .await
        .expect("connect");
    let mut open = -1;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        open = sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = $1 AND application_name = 'pendo-sync'
               AND state LIKE 'idle in transaction%'",
        )
        .bind(&name)
        .fetch_one(&mut admin)
        .await
        .unwrap();
        if open == 0 {
            break;
        }
    }
    assert_eq!(
        open, 0,
        "a connection went back to the pool inside a transaction"
    );
    // And every later transaction is its own.
    for _ in 0..10 {
        store.load_diff_state(kind, &["a"]).await.expect("a read");
    }
    let warnings: Vec<String> = server_log_lines(&name)
        .into_iter()
        .filter(|l| l.contains("already a transaction in progress"))
        .collect();
    assert!(warnings.is_empty(), "{}", warnings.join("\n"));
}
