//! A throwaway PostgreSQL cluster for the tests: Debian's `initdb` and `pg_ctl` in a temp
//! directory, on a free loopback port, started once per test binary run; a database per test.
//!
//! PostgreSQL refuses to run as root, so as root (CI) the cluster runs as the `postgres` OS
//! user. A watchdog shell stops it and removes its directory when this process ends, however it
//! ends. Without PostgreSQL installed a test prints SKIPPED, except under `CI=true`, where a
//! missing server is a failure (`.ci/run` installs it).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

struct Cluster {
    port: u16,
}

static CLUSTER: OnceLock<Option<Cluster>> = OnceLock::new();
static NEXT_DB: AtomicU32 = AtomicU32::new(0);

fn bin_dir() -> Option<PathBuf> {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("pg_ctl").exists())
        .collect();
    versions.sort();
    versions.pop()
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// Runs a PostgreSQL program, as `postgres` when we are root.
fn pg(bin: &Path, program: &str, args: &[&str]) -> std::process::Output {
    let exe = bin.join(program);
    let mut cmd = if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(&exe);
        c
    } else {
        Command::new(&exe)
    };
    cmd.args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"))
}

fn start() -> Option<Cluster> {
    let Some(bin) = bin_dir() else {
        assert!(
            std::env::var("CI").is_err(),
            "PostgreSQL is not installed (/usr/lib/postgresql/*/bin); .ci/run installs it"
        );
        return None;
    };
    let dir = PathBuf::from(format!("/tmp/pendo-sync-pg-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("cluster dir");
    if is_root() {
        let ok = Command::new("chown")
            .args(["postgres:postgres"])
            .arg(&dir)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "chown postgres {}", dir.display());
    }
    let data = dir.join("data");
    let out = pg(
        &bin,
        "initdb",
        &[
            "-D",
            data.to_str().unwrap(),
            "-A",
            "trust",
            "-U",
            "postgres",
            "--locale=C.UTF-8",
            "--no-sync",
        ],
    );
    assert!(
        out.status.success(),
        "initdb: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let port = free_port();
    let opts = format!(
        "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200",
        dir.display()
    );
    let log = dir.join("log");
    let out = pg(
        &bin,
        "pg_ctl",
        &[
            "-D",
            data.to_str().unwrap(),
            "-o",
            &opts,
            "-l",
            log.to_str().unwrap(),
            "-w",
            "start",
        ],
    );
    assert!(
        out.status.success(),
        "pg_ctl start: {}{}",
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    // Stops the cluster when this test process is gone (kill -9 of the runner included).
    let stop = if is_root() {
        format!(
            "runuser -u postgres -- {} -D {} -m immediate stop",
            bin.join("pg_ctl").display(),
            data.display()
        )
    } else {
        format!(
            "{} -D {} -m immediate stop",
            bin.join("pg_ctl").display(),
            data.display()
        )
    };
    let script = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 1; done; {stop} >/dev/null 2>&1; rm -rf {dir}",
        pid = std::process::id(),
        dir = dir.display()
    );
    // Not waited for: it outlives this process on purpose.
    #[allow(clippy::zombie_processes)]
    Command::new("setsid")
        .args(["sh", "-c", &script])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("watchdog starts");
    Some(Cluster { port })
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A fresh, empty database on the test cluster: its URL. `None` (the test is skipped) where
/// PostgreSQL is not installed outside CI.
pub async fn database() -> Option<String> {
    let cluster = CLUSTER.get_or_init(start).as_ref()?;
    let name = format!("t{}", NEXT_DB.fetch_add(1, Ordering::Relaxed));
    let admin = format!("postgres://postgres@127.0.0.1:{}/postgres", cluster.port);
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&admin)
        .await
        .expect("connect to the test cluster");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await
        .expect("create database");
    Some(format!(
        "postgres://postgres@127.0.0.1:{}/{name}",
        cluster.port
    ))
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
    let Some(url) = database().await else {
        eprintln!("SKIPPED: PostgreSQL is not installed");
        return;
    };
    let t = crate::helpers::TestApp::with(crate::helpers::Options {
        state_url: Some(url.clone()),
        ..Default::default()
    })
    .await;
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
