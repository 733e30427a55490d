//! The loop: a source's snapshots go to the prober, probe reports into the desired catalog,
//! and the desired state out to every sink.

use crate::catalog::DesiredCatalog;
pub use crate::catalog::{DesiredRx, DesiredState, desired_channel};
use crate::metrics::Metrics;
use crate::probe::results::ProbeResults;
use crate::probe::{ProbeReport, ProbeSettings, Prober};
use crate::sources::TargetSnapshot;
use std::sync::Arc;
use tokio::sync::{mpsc, watch};

/// Runs until the targets channel closes.
pub async fn run(
    owner: String,
    targets: watch::Receiver<TargetSnapshot>,
    settings: ProbeSettings,
    metrics: Arc<Metrics>,
    out: watch::Sender<Arc<DesiredState>>,
) {
    run_recording(owner, targets, settings, metrics, out, None).await;
}

/// As [`run`], recording every port's last probe result in `results` (the status page).
pub async fn run_recording(
    owner: String,
    mut targets: watch::Receiver<TargetSnapshot>,
    settings: ProbeSettings,
    metrics: Arc<Metrics>,
    out: watch::Sender<Arc<DesiredState>>,
    results: Option<Arc<ProbeResults>>,
) {
    let (report_tx, mut reports) = mpsc::channel::<ProbeReport>(4096);
    let mut prober = Prober::new(settings, metrics.clone(), report_tx);
    if let Some(results) = results {
        prober = prober.recording(results);
    }
    let mut desired = DesiredCatalog::new(&owner);
    let snapshot = targets.borrow_and_update().clone();
    desired.apply_snapshot(&snapshot);
    prober.sync(desired.targets());
    publish(&mut desired, &metrics, &out);
    loop {
        tokio::select! {
            changed = targets.changed() => {
                if changed.is_err() {
                    return;
                }
                let snapshot = targets.borrow_and_update().clone();
                desired.apply_snapshot(&snapshot);
                prober.sync(desired.targets());
            }
            Some(report) = reports.recv() => {
                accept(&mut desired, &prober, report);
                // Coalesce a burst of reports into one rebuild.
                while let Ok(report) = reports.try_recv() {
                    accept(&mut desired, &prober, report);
                }
            }
        }
        publish(&mut desired, &metrics, &out);
    }
}

fn accept(desired: &mut DesiredCatalog, prober: &Prober, report: ProbeReport) {
    if prober.generation(&report.target) != Some(report.generation) {
        return; // from a loop that has since been restarted or stopped
    }
    desired.set_live(report.target, report.live);
}

/// Publishes the desired state when it may have changed (no clone or comparison otherwise).
fn publish(
    catalog: &mut DesiredCatalog,
    metrics: &Metrics,
    out: &watch::Sender<Arc<DesiredState>>,
) {
    let Some(desired) = catalog.take_changed() else {
        return;
    };
    metrics.targets.set(catalog.target_count() as i64);
    metrics.live_endpoints.set(desired.catalog.len() as i64);
    out.send_if_modified(|current| {
        if **current == desired {
            false
        } else {
            *current = Arc::new(desired);
            true
        }
    });
}
