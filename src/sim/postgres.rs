//! A throwaway PostgreSQL server for tests and benchmarks: Debian's `initdb` and `pg_ctl` in a
//! temp directory, on a free loopback port, started once per process; a fresh database per
//! caller. PostgreSQL refuses to run as root, so as root (CI) it runs as the `postgres` OS user.
//! A watchdog shell stops it and removes its directory when this process ends, however it ends.
//! Nothing here is used by a real sync.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

struct Cluster {
    port: u16,
    log: PathBuf,
}

static CLUSTER: OnceLock<Option<Cluster>> = OnceLock::new();
static NEXT_DB: AtomicU32 = AtomicU32::new(0);
static DURABLE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Runs the server (if not started yet) with PostgreSQL's durable defaults (fsync, synchronous
/// commit, full-page writes), as a production server: for benchmarks. Tests leave them off,
/// which only matters if the machine itself crashes.
pub fn durable() {
    DURABLE.store(true, Ordering::SeqCst);
}

/// The newest installed server's `bin` directory, if PostgreSQL is installed.
pub fn bin_dir() -> Option<PathBuf> {
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
        // CI installs it (.ci/run): there, a missing server is a failure, not a skip.
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
    let fast = if DURABLE.load(Ordering::SeqCst) {
        ""
    } else {
        " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
    };
    // More server settings for a run (`-c log_min_duration_statement=100`, ...).
    let extra = std::env::var("PENDO_SYNC_PG_OPTS").unwrap_or_default();
    let opts = format!(
        "-p {port} -k {} -c listen_addresses=127.0.0.1 -c max_connections=200{fast} -c log_line_prefix=%m:%d: {extra}",
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
    watchdog(&stop, &dir);
    Some(Cluster { port, log })
}

/// Runs `stop` and removes `dir` once this process is gone (kill -9 of the runner included).
fn watchdog(stop: &str, dir: &Path) {
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
}

/// The server's log (each line starts `<time>:<database>:`), once the cluster has started.
pub fn server_log() -> Option<PathBuf> {
    CLUSTER.get()?.as_ref().map(|c| c.log.clone())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A fresh, empty database on this process's cluster (started on first use): its URL. `None`
/// where PostgreSQL is not installed (outside CI).
pub async fn database() -> Option<String> {
    create(None).await
}

/// A new database that starts as a copy of the one at `template` (no one may be connected to
/// it): what copying a SQLite file is to a benchmark. `None` as for [`database`].
pub async fn copy_of(template: &str) -> Option<String> {
    let name = template.rsplit('/').next().expect("a database URL");
    create(Some(name)).await
}

async fn create(template: Option<&str>) -> Option<String> {
    let cluster = CLUSTER.get_or_init(start).as_ref()?;
    // Unique across the processes of one test run (benchmark children share a cluster by URL,
    // not by this counter).
    let name = format!(
        "t{}_{}",
        std::process::id(),
        NEXT_DB.fetch_add(1, Ordering::Relaxed)
    );
    let admin = format!("postgres://postgres@127.0.0.1:{}/postgres", cluster.port);
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&admin)
        .await
        .expect("connect to the test cluster");
    let sql = match template {
        Some(t) => format!("CREATE DATABASE {name} TEMPLATE {t}"),
        None => format!("CREATE DATABASE {name}"),
    };
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .execute(&mut conn)
        .await
        .expect("create database");
    Some(format!(
        "postgres://postgres@127.0.0.1:{}/{name}",
        cluster.port
    ))
}

/// Drops the database at `url` (a benchmark's copy), closing what is connected to it.
pub async fn drop_database(url: &str) {
    let Some(cluster) = CLUSTER.get().and_then(Option::as_ref) else {
        return;
    };
    let name = url.rsplit('/').next().expect("a database URL");
    let admin = format!("postgres://postgres@127.0.0.1:{}/postgres", cluster.port);
    if let Ok(mut conn) = <sqlx::PgConnection as sqlx::Connection>::connect(&admin).await {
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
        )))
        .execute(&mut conn)
        .await;
    }
}

/// The PgBouncer settings pendo-sync needs, beyond the usual address, port and authentication
/// ones: what the README names, and all that [`pgbouncer`] sets. Transaction mode with Debian's
/// PgBouncer 1.18, which cannot carry named prepared statements.
pub const PGBOUNCER_SETTINGS: &str = "pool_mode = transaction\n";

/// A PgBouncer (Debian's package) in front of this process's cluster, stopped when dropped.
pub struct PgBouncer {
    port: u16,
    dir: PathBuf,
}

impl PgBouncer {
    /// `url` (a database on the test cluster, from [`database`]) through the bouncer.
    pub fn url_for(&self, url: &str) -> String {
        let (head, rest) = url.rsplit_once('@').expect("a URL with a user");
        let (_, path) = rest.split_once('/').expect("a URL with a database");
        format!("{head}@127.0.0.1:{}/{path}", self.port)
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(self.dir.join("pgbouncer.pid")) {
            let _ = Command::new("kill").arg(pid.trim()).status();
        }
    }
}

/// Starts a PgBouncer in transaction mode ([`PGBOUNCER_SETTINGS`]) on a free loopback port,
/// for every database of the test cluster. `None` where PgBouncer or PostgreSQL is not
/// installed (outside CI; `.ci/run` installs both). PgBouncer refuses to run as root, so as
/// root it runs as `postgres`, as the cluster does; a watchdog stops it when this process ends.
pub async fn pgbouncer() -> Option<PgBouncer> {
    // The cluster first (its port).
    database().await?;
    let cluster = CLUSTER.get()?.as_ref()?;
    let exe = ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists());
    let Some(exe) = exe else {
        assert!(
            std::env::var("CI").is_err(),
            "PgBouncer is not installed; .ci/run installs it"
        );
        return None;
    };
    let port = free_port();
    let dir = PathBuf::from(format!(
        "/tmp/pendo-sync-pgbouncer-{}-{port}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("pgbouncer dir");
    std::fs::write(dir.join("userlist.txt"), "\"postgres\" \"\"\n").expect("userlist");
    let ini = format!(
        "[databases]\n* = host=127.0.0.1 port={cluster}\n\n[pgbouncer]\n\
         listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n\
         auth_type = trust\nauth_file = {dir}/userlist.txt\n\
         pidfile = {dir}/pgbouncer.pid\nlogfile = {dir}/pgbouncer.log\n{PGBOUNCER_SETTINGS}",
        cluster = cluster.port,
        dir = dir.display()
    );
    std::fs::write(dir.join("pgbouncer.ini"), ini).expect("pgbouncer.ini");
    let root = is_root();
    if root {
        let ok = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(&dir)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "chown postgres {}", dir.display());
    }
    let run = format!(
        "{} {} -d {}/pgbouncer.ini",
        if root { "runuser -u postgres --" } else { "" },
        exe.display(),
        dir.display()
    );
    let out = Command::new("sh")
        .args(["-c", &run])
        .output()
        .expect("pgbouncer runs");
    assert!(
        out.status.success(),
        "pgbouncer: {}{}",
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(dir.join("pgbouncer.log")).unwrap_or_default()
    );
    // Stops it when this test process is gone (kill -9 of the runner included).
    watchdog(
        &format!("kill $(cat {}/pgbouncer.pid)", dir.display()),
        &dir,
    );
    // Daemonised: wait until it listens.
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Some(PgBouncer { port, dir });
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!(
        "pgbouncer does not listen on {port}: {}",
        std::fs::read_to_string(dir.join("pgbouncer.log")).unwrap_or_default()
    );
}
