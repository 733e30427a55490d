//! Shutdown: the signals that end the process, and the Consul sink's last pass.

use crate::pipeline;
use crate::sinks::consul;

/// Resolves on SIGTERM or SIGINT.
pub async fn signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate => {}
    }
}

/// Stops the Consul sink (if any). With `deregister_on_exit` it finishes its pass, then
/// removes this owner's entries; otherwise they stay in place for the next instance.
pub(super) async fn stop_sink(
    sink_task: Option<tokio::task::JoinHandle<consul::Sink>>,
    stop_sink: tokio::sync::oneshot::Sender<()>,
    deregister_on_exit: bool,
) {
    let Some(task) = sink_task else {
        tracing::info!("shutting down");
        return;
    };
    if !deregister_on_exit {
        task.abort();
        let _ = task.await;
        tracing::info!("shutting down; catalog entries are left in place for the next instance");
        return;
    }
    // The running sink finishes its pass and hands itself back for the last one.
    let _ = stop_sink.send(());
    let limit = std::time::Duration::from_secs(10);
    let mut sink = match tokio::time::timeout(limit, task).await {
        Ok(Ok(sink)) => sink,
        _ => {
            tracing::error!(
                "shutting down; the Consul sink did not stop within 10s, entries are left in place"
            );
            return;
        }
    };
    // Re-read first: the last pass must see what Consul has now.
    sink.invalidate();
    let empty = pipeline::DesiredState {
        catalog: Default::default(),
        complete: true,
    };
    match tokio::time::timeout(std::time::Duration::from_secs(10), sink.sync(&empty)).await {
        Ok(Ok(outcome)) => tracing::info!(
            deregistered = outcome.deregistered,
            "shutting down; deregistered this owner's entries"
        ),
        Ok(Err(e)) => {
            tracing::error!(error = %e, "shutting down; could not deregister this owner's entries")
        }
        Err(_) => tracing::error!("shutting down; deregistration timed out after 10s"),
    }
}
