//! The instance lock: `<state.path>.lock`, held by the one process that may write to a state
//! file's outbox (DESIGN guarantee 10).
//!
//! Every process that sends to Pendo takes it for its whole run: `run` for its life, `sync` and
//! an in-process `resync` for theirs. A second one waits a bounded time (`--wait-lock`) and then
//! gives up with a message naming the holder. Leases left in the outbox are only released by a
//! writer that holds the lock ([`crate::pendo::Writer::start`] takes it as proof): a lease held
//! by a live process means "in flight", and releasing it would send the batch twice.
//!
//! The lock is an OS file lock (`flock`): the OS drops it when the process ends, kill -9
//! included, so a stale file never blocks a restart. Two handles in one process exclude each
//! other too (the lock belongs to the open file), which the tests use.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How often a waiting process tries the lock again.
const RETRY_EVERY: Duration = Duration::from_millis(50);

/// The default of `--wait-lock`: long enough for a `sync` started a moment after another to
/// follow it, short enough for cron to notice a stuck one.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(5);

/// `<state.path>.lock`: the file whose exclusive lock marks the state file as served.
pub fn lock_path(state: &Path) -> PathBuf {
    let mut name = state.as_os_str().to_owned();
    name.push(".lock");
    PathBuf::from(name)
}

/// Who holds a lock, as the holder wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub pid: Option<u32>,
    /// The command that holds it: `run`, `sync`, `resync`.
    pub role: Option<String>,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let pid = self
            .pid
            .map_or_else(|| "unknown".to_owned(), |p| p.to_string());
        match &self.role {
            Some(role) => write!(f, "pendo-sync {role} (pid {pid})"),
            None => write!(f, "a pendo-sync process (pid {pid})"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "{holder} holds {path}{waited}; only one process may write to a state file at a time{hint}",
        path = path.display(),
        waited = waited.map(|w| format!(" (waited {})", humantime::format_duration(w))).unwrap_or_default(),
        hint = if holder.role.as_deref() == Some("run") {
            "; the service already syncs every schedule.poll_interval (use `resync` or its admin port to force a full pass)"
        } else {
            "; try again when it has finished, or raise --wait-lock"
        }
    )]
    Held {
        path: PathBuf,
        holder: Holder,
        waited: Option<Duration>,
    },
    #[error("{0}")]
    Io(String),
}

/// The exclusive lock, held until dropped (or the process ends).
#[derive(Debug)]
pub struct InstanceLock {
    _file: File,
}

impl InstanceLock {
    /// Takes the lock now, or says who holds it. `role` names this process in the file.
    pub fn acquire(state: &Path, role: &str) -> Result<InstanceLock, LockError> {
        let path = lock_path(state);
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| {
                LockError::Io(format!("cannot create directory {}: {e}", dir.display()))
            })?;
        }
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| LockError::Io(format!("cannot open {}: {e}", path.display())))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                return Err(LockError::Held {
                    holder: read_holder(&mut file),
                    path,
                    waited: None,
                });
            }
            Err(TryLockError::Error(e)) => {
                return Err(LockError::Io(format!(
                    "cannot lock {}: {e}",
                    path.display()
                )));
            }
        }
        // Truncate only once we hold the lock: the holder's pid must stay readable to others.
        let write = |file: &mut File| -> std::io::Result<()> {
            file.set_len(0)?;
            file.seek(SeekFrom::Start(0))?;
            writeln!(file, "{} {role}", std::process::id())?;
            file.sync_data()
        };
        write(&mut file)
            .map_err(|e| LockError::Io(format!("cannot write {}: {e}", path.display())))?;
        Ok(InstanceLock { _file: file })
    }

    /// Takes the lock, waiting up to `wait` for its holder to let go (tokio time, so tests run
    /// it on paused time).
    pub async fn acquire_waiting(
        state: &Path,
        role: &str,
        wait: Duration,
    ) -> Result<InstanceLock, LockError> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut logged = false;
        loop {
            match InstanceLock::acquire(state, role) {
                Err(LockError::Held { path, holder, .. }) => {
                    if tokio::time::Instant::now() >= deadline {
                        return Err(LockError::Held {
                            path,
                            holder,
                            waited: Some(wait),
                        });
                    }
                    if !std::mem::replace(&mut logged, true) {
                        tracing::info!(%holder, wait = %humantime::format_duration(wait), "Waiting for another process to release the state file.");
                    }
                    tokio::time::sleep(RETRY_EVERY.min(deadline - tokio::time::Instant::now()))
                        .await;
                }
                other => return other,
            }
        }
    }
}

fn read_holder(file: &mut File) -> Holder {
    let mut text = String::new();
    let read = file
        .seek(SeekFrom::Start(0))
        .and_then(|_| file.read_to_string(&mut text));
    if read.is_err() {
        return Holder {
            pid: None,
            role: None,
        };
    }
    let mut words = text.split_whitespace();
    Holder {
        pid: words.next().and_then(|p| p.parse().ok()),
        role: words.next().map(str::to_owned),
    }
}

/// Who holds the lock for `state`, if anyone. Only looks: the lock is released again at once if
/// it was free.
pub fn holder(state: &Path) -> Option<Holder> {
    let mut file = File::open(lock_path(state)).ok()?;
    match file.try_lock() {
        Ok(()) => None,
        Err(TryLockError::WouldBlock) => Some(read_holder(&mut file)),
        Err(TryLockError::Error(_)) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_second_process_waits_the_bounded_time_then_names_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state.db");
        let _first = InstanceLock::acquire(&state, "sync").unwrap();
        let started = tokio::time::Instant::now();
        let err = InstanceLock::acquire_waiting(&state, "sync", Duration::from_secs(5))
            .await
            .unwrap_err();
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        let text = err.to_string();
        assert!(
            text.contains(&format!("pendo-sync sync (pid {})", std::process::id())),
            "{text}"
        );
        assert!(text.contains("waited 5s"), "{text}");
        assert_eq!(holder(&state).unwrap().role.as_deref(), Some("sync"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_process_takes_the_lock_when_the_holder_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state.db");
        let first = InstanceLock::acquire(&state, "sync").unwrap();
        let release = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(2)).await;
            drop(first);
        });
        let started = tokio::time::Instant::now();
        let _second = InstanceLock::acquire_waiting(&state, "resync", Duration::from_secs(5))
            .await
            .unwrap();
        release.await.unwrap();
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_secs(2) && waited < Duration::from_secs(3),
            "{waited:?}"
        );
        assert_eq!(holder(&state).unwrap().role.as_deref(), Some("resync"));
    }
}
