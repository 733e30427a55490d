//! Follows this node's allocations with blocking queries and publishes target snapshots.

use super::alloc::{self, AllocError};
use super::client::NomadClient;
use crate::metrics::Metrics;
use crate::sources::{TargetSnapshot, share_unchanged};
use backon::BackoffBuilder;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{oneshot, watch};

const RETRY_MIN: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// Runs until the snapshot receivers are gone; with `namespace`, that namespace's
/// allocations only. `ready` fires after the first complete list,
/// so the first snapshot is whole (a partial one would make the sinks drop live entries).
#[tracing::instrument(name = "nomad_watch", skip_all, fields(node = %node_id))]
pub async fn run(
    client: NomadClient,
    node_id: String,
    namespace: Option<String>,
    targets: watch::Sender<TargetSnapshot>,
    metrics: Arc<Metrics>,
    ready: oneshot::Sender<()>,
) {
    let retries = backon::ExponentialBuilder::default()
        .with_min_delay(RETRY_MIN)
        .with_max_delay(RETRY_MAX)
        .with_jitter()
        .without_max_times();
    let mut backoff = retries.build();
    let mut ready = Some(ready);
    let mut index = 0;
    let mut reported: BTreeMap<String, String> = BTreeMap::new();
    loop {
        let result = tokio::select! {
            result = client.allocations(&node_id, index) => result,
            () = targets.closed() => return,
        };
        match result {
            Ok((mut allocs, next)) => {
                if let Some(namespace) = &namespace {
                    allocs.retain(|a| &a.namespace == namespace);
                }
                backoff = retries.build();
                // An index that went back (a restored or rebuilt cluster) starts over
                // (Nomad's blocking-query guidance).
                index = if next < index { 0 } else { next };
                let (found, problems) = alloc::resolve(&allocs);
                metrics.invalid_objects("allocation", problems.len());
                report(&problems, &allocs, &mut reported);
                let snapshot = share_unchanged(found, &targets.borrow());
                targets.send_replace(snapshot);
                if let Some(ready) = ready.take() {
                    tracing::info!(allocations = allocs.len(), "initial Nomad sync complete");
                    let _ = ready.send(());
                }
            }
            Err(e) => {
                let delay = backoff.next().unwrap_or(RETRY_MAX);
                tracing::warn!(error = %e, retry_in = ?delay, "listing this node's allocations failed; retrying with a full list");
                index = 0;
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// Logs each allocation's problem once, when it appears or changes.
fn report(
    problems: &BTreeMap<String, AllocError>,
    allocs: &[alloc::Allocation],
    reported: &mut BTreeMap<String, String>,
) {
    reported.retain(|id, _| problems.contains_key(id));
    for (id, problem) in problems {
        let text = problem.to_string();
        if reported.get(id) == Some(&text) {
            continue;
        }
        let job = allocs
            .iter()
            .find(|a| &a.id == id)
            .map_or("", |a| a.job_id.as_str());
        tracing::warn!(alloc_id = %id, job, problem = %text, "allocation's workersd meta refused; its workers are not published, other allocations are");
        reported.insert(id.clone(), text);
    }
}
