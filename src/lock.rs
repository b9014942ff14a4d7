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
//!
//! On PostgreSQL (`state.url`) there is no file to lock: the same guard is the leader lease
//! (`store/pg`), taken with [`InstanceLock::acquire_for`] and renewed every `lease_ttl / 3` by
//! a task it owns. The store's writes are fenced with it, so a holder that stalls past its lease
//! commits nothing; the holder learns it lost the lease through [`InstanceLock::lost`].

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
    /// The host (PostgreSQL leases: replicas run on different hosts).
    pub host: Option<String>,
    pub pid: Option<u32>,
    /// The command that holds it: `run`, `sync`, `resync`.
    pub role: Option<String>,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let pid = self
            .pid
            .map_or_else(|| "unknown".to_owned(), |p| p.to_string());
        let host = self
            .host
            .as_deref()
            .map(|h| format!(" on {h}"))
            .unwrap_or_default();
        match &self.role {
            Some(role) => write!(f, "pendo-sync {role} (pid {pid}{host})"),
            None => write!(f, "a pendo-sync process (pid {pid}{host})"),
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
    _file: Option<File>,
    lease: Option<Lease>,
}

/// A held leader lease and the task renewing it.
#[derive(Debug)]
struct Lease {
    store: crate::store::pg::Backend,
    holder: String,
    epoch: i64,
    renewer: tokio::task::JoinHandle<()>,
    lost: tokio_util::sync::CancellationToken,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.renewer.abort();
        if self.holder.is_empty() {
            return; // released already
        }
        // Hand the lease over at once rather than at expiry (best effort: a process that
        // ends before this runs leaves it to expire). `InstanceLock::release` does it for sure.
        let store = self.store.clone();
        let (holder, epoch) = (std::mem::take(&mut self.holder), self.epoch);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Err(e) = store.release_lease(&holder, epoch).await {
                    tracing::warn!(error = %e, "Could not hand the leader lease over; it expires by itself in the database.");
                }
            });
        }
    }
}

/// `host pid role`: who holds a lease, as the lease row stores it.
fn lease_holder_id(role: &str) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty() && !h.contains(' '))
        .unwrap_or_else(|| "unknown-host".into());
    format!("{host} {} {role}", std::process::id())
}

/// Who holds a lease, from the holder text its row stores (`host pid role`).
pub fn parse_lease_holder(text: &str) -> Holder {
    let mut words = text.split_whitespace();
    Holder {
        host: words.next().map(str::to_owned),
        pid: words.next().and_then(|p| p.parse().ok()),
        role: words.next().map(str::to_owned),
    }
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
        Ok(InstanceLock {
            _file: Some(file),
            lease: None,
        })
    }

    /// The one-writer guard of `store`: the file lock beside a SQLite state, or the leader lease
    /// of a PostgreSQL one, waiting up to `wait` for its holder to let go.
    pub async fn acquire_for(
        store: &crate::store::Store,
        state: &crate::config::StateSettings,
        role: &str,
        wait: Duration,
    ) -> Result<InstanceLock, LockError> {
        let Some(pg) = store.postgres() else {
            return InstanceLock::acquire_waiting(&state.path, role, wait).await;
        };
        let ttl = state.lease_ttl;
        let me = lease_holder_id(role);
        let deadline = tokio::time::Instant::now() + wait;
        let mut logged = false;
        loop {
            let taken = pg
                .try_take_lease(&me, ttl)
                .await
                .map_err(|e| LockError::Io(format!("cannot take the leader lease: {e}")))?;
            if let Some(epoch) = taken {
                tracing::info!(epoch, holder = %me, "Took the leader lease.");
                let lost = tokio_util::sync::CancellationToken::new();
                let renewer = tokio::spawn(renew(pg.clone(), ttl, lost.clone()));
                return Ok(InstanceLock {
                    _file: None,
                    lease: Some(Lease {
                        store: pg.clone(),
                        holder: me.clone(),
                        epoch,
                        renewer,
                        lost,
                    }),
                });
            }
            let holder = pg
                .lease_holder()
                .await
                .ok()
                .flatten()
                .map(|h| parse_lease_holder(&h.holder))
                .unwrap_or(Holder {
                    host: None,
                    pid: None,
                    role: None,
                });
            if tokio::time::Instant::now() >= deadline {
                return Err(LockError::Held {
                    path: PathBuf::from(format!("the leader lease of {}", state.display())),
                    holder,
                    waited: (!wait.is_zero()).then_some(wait),
                });
            }
            if !std::mem::replace(&mut logged, true) {
                tracing::info!(%holder, wait = %humantime::format_duration(wait), "Waiting for the leader lease.");
            }
            let poll = (ttl / 3).min(Duration::from_secs(1));
            tokio::time::sleep(poll.min(deadline - tokio::time::Instant::now())).await;
        }
    }

    /// Gives the lock up now: the file lock, or the leader lease handed over in the database
    /// (a standby leads at its next poll instead of at the lease's expiry). Call it before the
    /// store closes; a failure is logged, and the lease then expires by itself.
    pub async fn release(mut self) {
        if let Some(mut lease) = self.lease.take() {
            lease.renewer.abort();
            let holder = std::mem::take(&mut lease.holder);
            match lease.store.release_lease(&holder, lease.epoch).await {
                Ok(()) => tracing::info!(epoch = lease.epoch, "Handed the leader lease over."),
                Err(e) => {
                    tracing::warn!(error = %e, "Could not hand the leader lease over; it expires by itself in the database.")
                }
            }
        }
    }

    /// Stops renewing the lease without giving it up, as a leader that stalls (a long pause, a
    /// partition) does: for tests of what happens next.
    #[doc(hidden)]
    pub fn stop_renewing(&self) {
        if let Some(lease) = &self.lease {
            lease.renewer.abort();
        }
    }

    /// Cancelled when this process lost the leader lease (it expired before a renewal got
    /// through, or another replica took it): stop, nothing more will commit. Never cancelled
    /// for a file lock.
    pub fn lost(&self) -> tokio_util::sync::CancellationToken {
        self.lease
            .as_ref()
            .map(|l| l.lost.clone())
            .unwrap_or_default()
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

/// Renews the lease every `ttl / 3` until it is lost. A renewal that fails (the database is
/// unreachable) is retried at the same pace; once a whole `ttl` passed without one, the lease
/// is gone whatever the database says, and `lost` is cancelled.
async fn renew(
    store: crate::store::pg::Backend,
    ttl: Duration,
    lost: tokio_util::sync::CancellationToken,
) {
    let mut renewed = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(ttl / 3).await;
        // On the lease's own connection, and never longer than a renewal period: a database
        // that does not answer is retried at the same pace, not waited for.
        let attempt = tokio::time::timeout(ttl / 3, store.renew_lease(ttl)).await;
        let attempt = attempt.unwrap_or_else(|_| {
            Err(crate::store::StoreError::Io {
                path: store.path().to_owned(),
                message: format!(
                    "the database did not answer the lease renewal within {}",
                    humantime::format_duration(ttl / 3)
                ),
            })
        });
        match attempt {
            Ok(true) => renewed = tokio::time::Instant::now(),
            Ok(false) => {
                tracing::error!(
                    "Lost the leader lease (it expired or another replica took it); this process stops writing."
                );
                break;
            }
            Err(e) if renewed.elapsed() >= ttl => {
                tracing::error!(error = %e, "Could not renew the leader lease for a whole lease_ttl; this process stops writing.");
                store.fence.lost();
                break;
            }
            Err(e) => tracing::warn!(error = %e, "Could not renew the leader lease; trying again."),
        }
    }
    lost.cancel();
}

fn read_holder(file: &mut File) -> Holder {
    let mut text = String::new();
    let read = file
        .seek(SeekFrom::Start(0))
        .and_then(|_| file.read_to_string(&mut text));
    if read.is_err() {
        return Holder {
            host: None,
            pid: None,
            role: None,
        };
    }
    let mut words = text.split_whitespace();
    Holder {
        host: None,
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
