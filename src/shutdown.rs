//! Shutdown: a [`CancellationToken`] that SIGTERM or SIGINT cancels. Every long-running piece
//! takes it (mini-redis style), so stopping is one path whatever asked for it.

use tokio_util::sync::CancellationToken;

/// A token cancelled by SIGINT/SIGTERM: work stops between batches, what Pendo confirmed is kept.
pub fn shutdown_token() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!(
            "Stopping: finishing the requests in flight, leaving the rest in the outbox."
        );
        t.cancel();
    });
    token
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler installs");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}
