//! The change watch: a blocking query on the node tells the sink when a re-read is due.

use super::SINK;
use super::client::{ConsulClient, Watched};
use crate::metrics::Metrics;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Watches the node from the index of the sink's last read, and tells the sink when a
/// re-read is due. After telling, it waits for that re-read before watching again.
pub(super) async fn watch_changes(
    client: Arc<ConsulClient>,
    mut reads: tokio::sync::watch::Receiver<Option<u64>>,
    changes: Arc<tokio::sync::Notify>,
    metrics: Arc<Metrics>,
) {
    // The blocking wait is the resync interval. A snapshot restore answers a blocked query at
    // once with a lower index; a Consul that lost its data some other way (a new cluster) is
    // only noticed when the wait runs out, and this bounds how long that takes.
    let wait = client.settings.resync_interval;
    // A server that answers at once without a new index (no blocking support, a caching
    // proxy) must not become a busy loop.
    let min_spacing = wait.min(Duration::from_secs(1));
    loop {
        let Some(index) = *reads.borrow_and_update() else {
            if reads.changed().await.is_err() {
                return;
            }
            continue;
        };
        let started = Instant::now();
        let watched = if index == 0 {
            // No X-Consul-Index to block on: fall back to a re-read every interval.
            tokio::time::sleep(wait).await;
            Watched::Changed
        } else {
            metrics.sink_request(SINK, "watch");
            client.wait_for_change(index, wait).await
        };
        if watched == Watched::Changed {
            changes.notify_one();
            if reads.changed().await.is_err() {
                return;
            }
        }
        tokio::time::sleep_until(started + min_spacing).await;
    }
}
