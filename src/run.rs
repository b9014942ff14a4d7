//! `pendo-sync run`: the process around the [`Service`]: signals, the instance lock, metrics,
//! the admin port, and a graceful stop.
//!
//! On SIGTERM/SIGINT the loops stop taking work; a cycle in progress is abandoned (its committed
//! pages are kept); batches in flight finish and settle. The process exits 0 once the tasks are
//! done, or after `pendo.timeout` + 15 s if a request hangs (an unsettled batch is only leased,
//! and is sent again at the next start).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio_util::task::TaskTracker;

use crate::app::{App, AppError};
use crate::config::Settings;
use crate::service::Service;

/// Extra time given to in-flight requests at shutdown, beyond `pendo.timeout`.
const SHUTDOWN_SLACK: Duration = Duration::from_secs(15);

/// How long `run` waits for the instance lock (or the lease): `resync` and `healthcheck` look at
/// the lock by taking it for an instant.
const LOCK_WAIT: Duration = Duration::from_secs(2);

/// Installs the Prometheus recorder as the process's global recorder (first call wins).
fn install_metrics() -> Option<PrometheusHandle> {
    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    match metrics::set_global_recorder(recorder) {
        Ok(()) => Some(handle),
        Err(_) => {
            tracing::warn!("A metrics recorder was already installed; /metrics serves nothing.");
            None
        }
    }
}

/// `pendo-sync run`.
pub async fn run(settings: Arc<Settings>) -> Result<u8, AppError> {
    // Signals first: a SIGTERM during start-up must stop us cleanly, not kill us.
    let cancel = crate::shutdown::shutdown_token();
    // The lock next: a second instance must say so, not fail later on the admin port.
    // A short wait: `resync` and `healthcheck` look at the lock by taking it for an instant.
    // (PostgreSQL: the lease, a row in the database, once it is open.)
    let file_lock = if settings.state.is_postgres() {
        None
    } else {
        Some(
            crate::lock::InstanceLock::acquire_waiting(&settings.state.path, "run", LOCK_WAIT)
                .await?,
        )
    };
    let metrics = install_metrics();
    let admin_tokens = crate::service::AdminTokens::resolve(&settings.admin)?;
    let app = App::open_configured(settings.clone()).await?;
    let listen = settings.admin.listen.clone();
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .map_err(|e| AppError::Runtime(format!("cannot listen on admin.listen = {listen}: {e}")))?;

    let tracker = TaskTracker::new();
    let service = Service::new(
        settings.clone(),
        app,
        metrics,
        admin_tokens,
        cancel.clone(),
        tracker.clone(),
    );

    // The admin port first: a standby serves it (health, metrics, status, the console, and
    // requests the leader carries out) while it waits for the lease.
    let admin_failed = Arc::new(AtomicBool::new(false));
    {
        let service = service.clone();
        let failed = admin_failed.clone();
        tracker.spawn(async move {
            if let Err(e) = crate::admin::serve(service.clone(), listener).await {
                tracing::error!(error = %e, "The admin server failed; stopping.");
                failed.store(true, Ordering::SeqCst);
                service.cancel.cancel();
            }
        });
    }
    tracker.spawn(service.clone().database_watch());
    tracker.spawn(service.clone().state_gauges_loop());
    service.set_leader(false);
    let lock = match file_lock {
        Some(lock) => lock,
        None => match wait_for_lease(&service, &settings).await? {
            Some(lock) => lock,
            // Stopped while a standby.
            None => return finish(&service, &tracker, &settings, &admin_failed, None, None).await,
        },
    };
    // A leader that lost its lease commits nothing more: it stops, and its supervisor starts
    // it again (as a standby, until the lease is free).
    let lost = lock.lost();
    {
        let cancel = cancel.clone();
        let lost = lost.clone();
        tokio::spawn(async move {
            lost.cancelled().await;
            cancel.cancel();
        });
    }
    // Once per leadership: releases leases a crashed predecessor left, lifts an old pause.
    service.start_writer(&lock).await?;
    service.spawn_tasks();
    tracing::info!(
        mappings = settings.mappings.len(),
        poll_interval = %humantime::format_duration(settings.schedule.poll_interval),
        reconcile_interval = %humantime::format_duration(settings.schedule.reconcile_interval),
        admin = %listen,
        "Service started."
    );

    cancel.cancelled().await;
    finish(
        &service,
        &tracker,
        &settings,
        &admin_failed,
        Some(&lost),
        Some(lock),
    )
    .await
}

/// Waits as a standby until this process takes the leader lease; `None` if it is stopped
/// first.
async fn wait_for_lease(
    service: &Arc<Service>,
    settings: &Settings,
) -> Result<Option<crate::lock::InstanceLock>, AppError> {
    tracing::info!("Standing by: the admin port serves, the leader lease is polled.");
    loop {
        let attempt = crate::lock::InstanceLock::acquire_for(
            &service.store,
            &settings.state,
            "run",
            Duration::from_secs(3600),
        );
        tokio::select! {
            _ = service.cancel.cancelled() => return Ok(None),
            taken = attempt => match taken {
                Ok(lock) => return Ok(Some(lock)),
                // An hour as a standby: keep waiting.
                Err(crate::lock::LockError::Held { .. }) => {}
                Err(e) => return Err(e.into()),
            },
        }
    }
}

/// The end of a run: tasks finished (or given up on), state closed, the exit code.
async fn finish(
    service: &Arc<Service>,
    tracker: &TaskTracker,
    settings: &Settings,
    admin_failed: &AtomicBool,
    lost: Option<&tokio_util::sync::CancellationToken>,
    lock: Option<crate::lock::InstanceLock>,
) -> Result<u8, AppError> {
    tracker.close();
    let grace = settings.pendo.timeout + SHUTDOWN_SLACK;
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!(
            "Requests still in flight after {}; leaving them in the outbox to be sent again at the next start.",
            humantime::format_duration(grace)
        );
    }
    // The lease goes before the store closes (it needs the database to hand it over): a
    // standby leads at its next poll, not at the lease's expiry. The work is done by now.
    service.set_leader(false);
    if let Some(lock) = lock {
        lock.release().await;
    }
    service.close().await;
    if admin_failed.load(Ordering::SeqCst) {
        return Ok(1);
    }
    if lost.is_some_and(|l| l.is_cancelled()) {
        tracing::error!(
            "Stopped after losing the leader lease; what Pendo confirmed before is committed."
        );
        return Ok(1);
    }
    tracing::info!("Stopped; what Pendo confirmed is committed, the rest waits in the outbox.");
    Ok(0)
}
