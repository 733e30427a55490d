//! The status page on `--listen`: `/` is a small HTML page (no script, no external asset)
//! and `/status` the same as JSON for scripts. Every target with its live ports and each
//! port's last probe result and when; where each target came from (its source meta, e.g.
//! the Kubernetes namespace, pod and container); the Consul sink's last sync, write and
//! error and the entries it holds back; readiness. Building the page is pure.

use super::admin_server::Readiness;
use crate::probe::results::{ProbeResults, TargetResults};
use crate::sinks::consul::SharedSinkStatus;
use crate::sinks::consul::quarantine::RefusedEntries;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Arc;
use std::time::SystemTime;
use tokio::sync::watch;

/// Meta keys that say where a target came from, shown beside it.
const SOURCE_META: [&str; 4] = ["k8s-namespace", "k8s-pod", "k8s-container", "k8s-node"];

/// What the page reads.
#[derive(Clone)]
pub struct Sources {
    pub results: Arc<ProbeResults>,
    pub readiness: Arc<Readiness>,
    pub consul: Option<SharedSinkStatus>,
    pub refused: Option<watch::Receiver<RefusedEntries>>,
}

#[derive(Debug, Serialize)]
pub struct Status {
    pub ready: bool,
    pub problems: Vec<&'static str>,
    pub notes: Vec<&'static str>,
    pub targets: Vec<TargetStatus>,
    pub consul: Option<ConsulStatus>,
}

#[derive(Debug, Serialize)]
pub struct TargetStatus {
    pub id: String,
    pub service: String,
    pub address: String,
    pub ports: String,
    pub path: String,
    /// Where it came from (Kubernetes namespace, pod, container, node), when known.
    pub source: BTreeMap<String, String>,
    pub live: Vec<u16>,
    pub swept_at: String,
    pub results: Vec<PortView>,
}

#[derive(Debug, Serialize)]
pub struct PortView {
    pub port: u16,
    pub result: &'static str,
    pub at: String,
    pub held: bool,
}

#[derive(Debug, Serialize)]
pub struct ConsulStatus {
    pub last_sync: Option<String>,
    pub last_write: Option<String>,
    pub failing: bool,
    pub last_error: Option<ErrorView>,
    /// Entries Consul refused on their own, held back and retried.
    pub withheld: Vec<WithheldView>,
}

#[derive(Debug, Serialize)]
pub struct ErrorView {
    pub message: String,
    pub at: String,
}

#[derive(Debug, Serialize)]
pub struct WithheldView {
    pub id: String,
    pub error: String,
}

fn time(at: SystemTime) -> String {
    humantime::format_rfc3339_seconds(at).to_string()
}

fn target_status(t: TargetResults) -> TargetStatus {
    let live = t
        .ports
        .iter()
        .filter(|(_, r)| r.status == crate::probe::PortStatus::Live)
        .map(|(p, _)| *p)
        .collect();
    let source = SOURCE_META
        .iter()
        .filter_map(|k| Some((k.to_string(), t.target.meta.get(*k)?.clone())))
        .collect();
    TargetStatus {
        id: t.target.id.to_string(),
        service: t.target.service.clone(),
        address: t.target.address.to_string(),
        ports: t.target.ports.to_string(),
        path: t.target.path.clone(),
        source,
        live,
        swept_at: time(t.swept_at),
        results: t
            .ports
            .iter()
            .map(|(port, r)| PortView {
                port: *port,
                result: r.status.label(),
                at: time(r.at),
                held: r.held,
            })
            .collect(),
    }
}

/// The status now.
pub fn status(sources: &Sources) -> Status {
    let consul = sources.consul.as_ref().map(|shared| {
        let sink = shared.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let withheld = sources
            .refused
            .as_ref()
            .map(|r| r.borrow().clone())
            .unwrap_or_default();
        ConsulStatus {
            last_sync: sink.last_sync.map(time),
            last_write: sink.last_write.map(time),
            failing: sink.failing,
            last_error: sink.last_error.map(|(message, at)| ErrorView {
                message,
                at: time(at),
            }),
            withheld: withheld
                .iter()
                .map(|r| WithheldView {
                    id: r.instance.id.to_string(),
                    error: r.error.clone(),
                })
                .collect(),
        }
    });
    let problems = sources.readiness.problems();
    Status {
        ready: problems.is_empty(),
        problems,
        notes: sources.readiness.notes(),
        targets: sources
            .results
            .snapshot()
            .into_iter()
            .map(target_status)
            .collect(),
        consul,
    }
}

fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The page. Every value is escaped; ids (`target-…`, `consul`) let tests and scripts find
/// parts of the rendered document.
pub fn html(status: &Status) -> String {
    let mut page = String::from(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>workersd status</title>\n<style>body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse;margin-bottom:1em}td,th{border:1px solid #ccc;padding:.2em .5em;text-align:left}.live{color:#060}.bad{color:#a00}</style></head><body>\n<h1>workersd</h1>\n",
    );
    let readiness = if status.ready {
        "ready".to_string()
    } else {
        format!("not ready: {}", status.problems.join(", "))
    };
    let _ = writeln!(page, "<p id=\"readiness\">{}</p>", escape(&readiness));
    for note in &status.notes {
        let _ = writeln!(page, "<p class=\"note\">{}</p>", escape(note));
    }
    if let Some(consul) = &status.consul {
        let never = || "never".to_string();
        let _ = writeln!(
            page,
            "<h2>Consul</h2>\n<table id=\"consul\"><tr><th>state</th><td class=\"{}\">{}</td></tr><tr><th>last sync</th><td>{}</td></tr><tr><th>last write</th><td>{}</td></tr><tr><th>last error</th><td>{}</td></tr><tr><th>withheld entries</th><td>{}</td></tr></table>",
            if consul.failing { "bad" } else { "live" },
            if consul.failing { "failing" } else { "ok" },
            escape(&consul.last_sync.clone().unwrap_or_else(never)),
            escape(&consul.last_write.clone().unwrap_or_else(never)),
            consul.last_error.as_ref().map_or_else(
                || "none".to_string(),
                |e| escape(&format!("{} ({})", e.message, e.at))
            ),
            consul.withheld.len(),
        );
        if !consul.withheld.is_empty() {
            page.push_str(
                "<table id=\"withheld\"><tr><th>service ID</th><th>Consul's error</th></tr>\n",
            );
            for w in &consul.withheld {
                let _ = writeln!(
                    page,
                    "<tr><td>{}</td><td>{}</td></tr>",
                    escape(&w.id),
                    escape(&w.error)
                );
            }
            page.push_str("</table>\n");
        }
    }
    let live: usize = status.targets.iter().map(|t| t.live.len()).sum();
    let _ = writeln!(
        page,
        "<h2>Targets</h2>\n<p id=\"summary\">{} targets, {live} live workers</p>",
        status.targets.len()
    );
    for t in &status.targets {
        let source: Vec<String> = t.source.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let _ = writeln!(
            page,
            "<h3>{}</h3>\n<table class=\"target\" id=\"target-{}\" data-live=\"{}\"><tr><th>service</th><td>{}</td></tr><tr><th>address</th><td>{}</td></tr><tr><th>ports</th><td>{}</td></tr><tr><th>path</th><td>{}</td></tr><tr><th>source</th><td>{}</td></tr><tr><th>live</th><td class=\"live\">{}</td></tr><tr><th>last sweep</th><td>{}</td></tr></table>",
            escape(&t.id),
            escape(&t.id),
            t.live.len(),
            escape(&t.service),
            escape(&t.address),
            escape(&t.ports),
            escape(&t.path),
            escape(&source.join(", ")),
            t.live
                .iter()
                .map(u16::to_string)
                .collect::<Vec<_>>()
                .join(" "),
            escape(&t.swept_at),
        );
        page.push_str(
            "<table class=\"ports\"><tr><th>port</th><th>last result</th><th>at</th></tr>\n",
        );
        for p in &t.results {
            let class = if p.result == "live" { "live" } else { "bad" };
            let held = if p.held { " (held)" } else { "" };
            let _ = writeln!(
                page,
                "<tr><td>{}</td><td class=\"{class}\">{}{held}</td><td>{}</td></tr>",
                p.port,
                p.result,
                escape(&p.at)
            );
        }
        page.push_str("</table>\n");
    }
    page.push_str(
        "<p><a href=\"/status\">JSON</a> · <a href=\"/metrics\">metrics</a></p>\n</body></html>\n",
    );
    page
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::target;
    use crate::probe::PortStatus;
    use std::time::Duration;

    fn sources() -> Sources {
        let results = Arc::new(ProbeResults::default());
        let t = Arc::new(
            target("shop/web-1/web")
                .meta("k8s-pod", "web-1")
                .meta("team", "<script>")
                .build(),
        );
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        results.record(
            &t,
            &[(9011, PortStatus::Live), (9012, PortStatus::HttpStatus)],
            [],
            at,
        );
        let consul = SharedSinkStatus::default();
        crate::sinks::consul::note_pass(
            &consul,
            Err(&crate::sinks::consul::ConsulError::Forbidden(
                "ACL not found <x>".into(),
            )),
        );
        Sources {
            results,
            readiness: Arc::new(Readiness::default()),
            consul: Some(consul),
            refused: None,
        }
    }

    #[test]
    fn the_status_lists_targets_ports_and_the_sink() {
        let status = status(&sources());
        assert!(!status.ready);
        let (t,) = <[TargetStatus; 1]>::try_from(status.targets)
            .map(|[t]| (t,))
            .unwrap();
        assert_eq!(t.live, [9011]);
        assert_eq!(
            t.source,
            BTreeMap::from([("k8s-pod".into(), "web-1".into())])
        );
        let results: Vec<_> = t.results.iter().map(|p| (p.port, p.result)).collect();
        assert_eq!(results, [(9011, "live"), (9012, "http_status")]);
        assert_eq!(t.swept_at, "2027-01-15T08:00:00Z");
        let consul = status.consul.unwrap();
        assert!(consul.failing && consul.last_sync.is_none());
        assert!(consul.last_error.unwrap().message.contains("ACL not found"));
    }

    #[test]
    fn the_page_escapes_every_value_and_carries_ids_for_scripts() {
        let page = html(&status(&sources()));
        assert!(
            page.contains("id=\"target-shop/web-1/web\" data-live=\"1\""),
            "{page}"
        );
        assert!(page.contains("ACL not found &lt;x&gt;"), "{page}");
        assert!(!page.contains("<x>"));
        assert!(
            !page.contains("<script"),
            "no script, even from a value: {page}"
        );
        assert!(
            page.contains("<td class=\"bad\">http_status</td>"),
            "{page}"
        );
    }
}
