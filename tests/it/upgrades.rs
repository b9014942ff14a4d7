//! Upgrades (DESIGN "State on PostgreSQL", Upgrades): a state made by the previous release's
//! migrations is upgraded in place and keeps its data; a state a newer release migrated is
//! refused with both versions named, not half-used.

use std::path::{Path, PathBuf};

use pendo_sync::store::Store;

use crate::helpers::TestApp;
use crate::pg::Backend;

/// The migrations of `backend` up to the last one but one, copied into `into`.
fn previous_migrations(backend: Backend, into: &Path) -> PathBuf {
    let name = match backend {
        Backend::Sqlite => "sqlite",
        Backend::Postgres => "postgres",
    };
    let source = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("migrations")
        .join(name);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&source)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files.pop();
    let dir = into.join(format!("previous-{name}"));
    std::fs::create_dir_all(&dir).unwrap();
    for f in &files {
        std::fs::copy(f, dir.join(f.file_name().unwrap())).unwrap();
    }
    dir
}

async fn latest_version(store: &Store) -> i64 {
    let sql = "SELECT max(version) FROM _sqlx_migrations";
    match store.postgres() {
        Some(pg) => sqlx::query_scalar(sql).fetch_one(pg.pool()).await.unwrap(),
        None => sqlx::query_scalar(sql)
            .fetch_one(store.pool())
            .await
            .unwrap(),
    }
}

crate::on_both_backends! {
    async fn a_state_of_the_previous_release_is_upgraded_and_a_newer_one_refused(backend: Backend) {
        let Some(t) = TestApp::on(backend).await else {
            return;
        };
        let previous = previous_migrations(backend, t.dir.path());
        let migrator = sqlx::migrate::Migrator::new(previous.as_path()).await.unwrap();
        let known = sqlx::migrate::Migrator::new(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("migrations")
                .join(if backend == Backend::Sqlite { "sqlite" } else { "postgres" })
                .as_path(),
        )
        .await
        .unwrap()
        .iter()
        .map(|m| m.version)
        .max()
        .unwrap();
        // The previous release's state, with a sync's worth of data in it.
        match &t.settings.state.url() {
            Some(url) => {
                use secrecy::ExposeSecret;
                let pool = sqlx::PgPool::connect(url.expose_secret()).await.unwrap();
                migrator.run(&pool).await.unwrap();
                pool.close().await;
            }
            None => {
                let path = t.settings.state.path.clone();
                let pool = sqlx::SqlitePool::connect_with(
                    sqlx::sqlite::SqliteConnectOptions::new()
                        .filename(&path)
                        .create_if_missing(true),
                )
                .await
                .unwrap();
                migrator.run(&pool).await.unwrap();
                pool.close().await;
            }
        }
        // This release upgrades it and syncs.
        t.seed(20);
        let report = t.sync().await;
        assert!(report.failed.is_empty(), "{report:?}");
        t.assert_converged();
        let app = t.app().await;
        assert_eq!(latest_version(&app.store).await, known);

        // A newer release migrated it further: this one refuses it, naming both versions.
        let future = known + 1;
        let insert = "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)
                      VALUES ($1, 'from a newer pendo-sync', true, $2, 0)";
        match app.store.postgres() {
            Some(pg) => {
                sqlx::query(insert)
                    .bind(future)
                    .bind(vec![0u8])
                    .execute(pg.pool())
                    .await
                    .unwrap();
            }
            None => {
                sqlx::query(insert)
                    .bind(future)
                    .bind(vec![0u8])
                    .execute(app.store.pool())
                    .await
                    .unwrap();
            }
        }
        app.store.close().await;
        let err = Store::open_settings(&t.settings.state).await.unwrap_err().to_string();
        assert!(
            err.contains(&format!("schema version {future}"))
                && err.contains(&format!("version {known})")),
            "{err}"
        );
        let kind = if backend == Backend::Sqlite { "state file" } else { "database" };
        assert!(err.starts_with(kind), "{err}");
        // Read-only commands (status, the console of an older replica) still read it.
        let read = Store::open_settings_read_only(&t.settings.state).await;
        assert!(read.is_ok(), "{:?}", read.err());
    }
}

/// Migrations only add (tables, columns, indexes), so a leader of the previous release keeps
/// working while a newer standby migrates. The ones before this rule (SQLite 0001–0007,
/// PostgreSQL 0001–0003) ran before any replica could; every later one is checked.
#[test]
fn migrations_from_now_on_only_add() {
    for (dir, first_checked) in [("sqlite", 8), ("postgres", 4)] {
        let source = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("migrations")
            .join(dir);
        for entry in std::fs::read_dir(&source).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let version: u32 = name.split('_').next().unwrap().parse().unwrap();
            if version < first_checked {
                continue;
            }
            let sql: String = std::fs::read_to_string(&path)
                .unwrap()
                .lines()
                .filter(|l| !l.trim_start().starts_with("--"))
                .collect::<Vec<_>>()
                .join("\n")
                .to_uppercase();
            for word in ["DROP ", "RENAME", "ALTER COLUMN", "DELETE ", "UPDATE "] {
                assert!(
                    !sql.contains(word),
                    "{dir}/{name} has {word:?}: migrations only add (an older leader may still run)"
                );
            }
        }
    }
}
