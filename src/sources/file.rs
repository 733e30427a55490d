//! The targets file source (hosts, VMs, Nomad): a YAML file, validated entry by entry and
//! hot-reloaded. A broken edit keeps the last good snapshot running.

use super::TargetSnapshot;
use crate::metrics::Metrics;
use crate::model::{PortRange, Scheme, Target, TargetId};
use crate::validate;
use serde_norway::{Mapping, Value};
use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Largest targets file accepted; a larger one is refused before parsing.
pub const MAX_FILE_BYTES: usize = 4 * 1024 * 1024;
/// Largest number of entries one file may declare.
pub const MAX_TARGETS: usize = 20_000;

const FIELDS: [&str; 7] = [
    "service", "address", "ports", "path", "scheme", "tags", "meta",
];

/// One problem in a targets file, located by entry index and field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileError {
    pub entry: Option<usize>,
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for FileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.entry, &self.field) {
            (Some(i), Some(field)) => write!(f, "targets[{i}].{field}: {}", self.message),
            (Some(i), None) => write!(f, "targets[{i}]: {}", self.message),
            (None, Some(field)) => write!(f, "{field}: {}", self.message),
            (None, None) => f.write_str(&self.message),
        }
    }
}

fn top(message: impl Into<String>) -> FileError {
    FileError {
        entry: None,
        field: None,
        message: message.into(),
    }
}

fn at(entry: usize, field: &str, message: impl Into<String>) -> FileError {
    FileError {
        entry: Some(entry),
        field: Some(field.into()),
        message: message.into(),
    }
}

/// Parses and validates the whole file, returning every error found, not just the first.
pub fn parse_targets(text: &str) -> Result<Vec<Target>, Vec<FileError>> {
    if text.len() > MAX_FILE_BYTES {
        return Err(vec![top(format!(
            "file is {} bytes; at most {MAX_FILE_BYTES} allowed",
            text.len()
        ))]);
    }
    let root: Value =
        serde_norway::from_str(text).map_err(|e| vec![top(format!("not valid YAML: {e}"))])?;
    let root = match root {
        Value::Mapping(m) => m,
        Value::Null => {
            return Err(vec![top(
                "file is empty; expected a mapping with a `targets` list",
            )]);
        }
        _ => {
            return Err(vec![top(
                "expected a mapping with a `targets` list at the top level",
            )]);
        }
    };
    let mut errors = Vec::new();
    for key in root.keys() {
        if key.as_str() != Some("targets") {
            errors.push(FileError {
                entry: None,
                field: Some(describe_key(key)),
                message: "unknown top-level key (expected only `targets`)".into(),
            });
        }
    }
    let entries = match root.get("targets") {
        Some(Value::Sequence(s)) => s.as_slice(),
        Some(Value::Null) | None => &[],
        Some(_) => {
            errors.push(FileError {
                entry: None,
                field: Some("targets".into()),
                message: "must be a list".into(),
            });
            &[]
        }
    };
    if entries.len() > MAX_TARGETS {
        errors.push(FileError {
            entry: None,
            field: Some("targets".into()),
            message: format!("{} entries; at most {MAX_TARGETS} allowed", entries.len()),
        });
        return Err(errors);
    }
    let mut targets: Vec<(usize, Target)> = Vec::new();
    for (index, entry) in entries.iter().enumerate() {
        if let Some(target) = parse_entry(index, entry, &mut errors) {
            if let Some((other, _)) = targets
                .iter()
                .find(|(_, t)| t.address == target.address && t.ports.overlaps(&target.ports))
            {
                errors.push(at(
                    index,
                    "ports",
                    format!(
                        "{} on {} overlaps targets[{other}]; one port belongs to one target",
                        target.ports, target.address
                    ),
                ));
                continue;
            }
            targets.push((index, target));
        }
    }
    if errors.is_empty() {
        Ok(targets.into_iter().map(|(_, t)| t).collect())
    } else {
        Err(errors)
    }
}

fn describe_key(key: &Value) -> String {
    match key {
        Value::String(s) => s.clone(),
        other => format!("{other:?}"),
    }
}

fn parse_entry(index: usize, entry: &Value, errors: &mut Vec<FileError>) -> Option<Target> {
    let Value::Mapping(map) = entry else {
        errors.push(FileError {
            entry: Some(index),
            field: None,
            message: "must be a mapping".into(),
        });
        return None;
    };
    let before = errors.len();
    for key in map.keys() {
        let name = describe_key(key);
        if !FIELDS.contains(&name.as_str()) {
            errors.push(at(
                index,
                &name,
                format!("unknown field (expected one of {})", FIELDS.join(", ")),
            ));
        }
    }
    let service = required_str(map, index, "service", errors).and_then(|s| {
        check(validate::service_name(s), index, "service", errors).map(|_| s.to_string())
    });
    let address =
        required_str(map, index, "address", errors).and_then(|s| match s.parse::<IpAddr>() {
            Ok(ip) if ip.is_unspecified() || ip.is_multicast() => {
                errors.push(at(
                    index,
                    "address",
                    format!("{s} cannot be probed; give the worker host's own IP"),
                ));
                None
            }
            Ok(ip) => Some(ip),
            Err(_) => {
                errors.push(at(
                    index,
                    "address",
                    format!("{s:?} is not an IP address (host names are not resolved)"),
                ));
                None
            }
        });
    let ports = match map.get("ports") {
        None => {
            errors.push(at(index, "ports", "required (e.g. \"9011-9020\")"));
            None
        }
        Some(Value::Number(n)) => match n.as_u64().and_then(|p| u16::try_from(p).ok()) {
            Some(p) => check(PortRange::new(p, p), index, "ports", errors),
            None => {
                errors.push(at(
                    index,
                    "ports",
                    format!("port {n} is not a number from 1 to 65535"),
                ));
                None
            }
        },
        Some(Value::String(s)) => check(s.parse::<PortRange>(), index, "ports", errors),
        Some(_) => {
            errors.push(at(
                index,
                "ports",
                "must be a string like \"9011-9020\" or a port number",
            ));
            None
        }
    };
    let path = optional_str(map, index, "path", errors)
        .map(|p| check(validate::metrics_path(p), index, "path", errors).map(|_| p.to_string()))
        .unwrap_or(Some("/metrics".into()));
    let scheme = optional_str(map, index, "scheme", errors)
        .map(|s| check(s.parse::<Scheme>(), index, "scheme", errors))
        .unwrap_or(Some(Scheme::Http));
    let tags = match map.get("tags") {
        None | Some(Value::Null) => Some(Vec::new()),
        Some(Value::Sequence(items)) => {
            let tags: Option<Vec<String>> = items
                .iter()
                .map(|v| v.as_str().map(str::to_string))
                .collect();
            match tags {
                Some(tags) => check(validate::tags(&tags), index, "tags", errors).map(|_| tags),
                None => {
                    errors.push(at(index, "tags", "every tag must be a string"));
                    None
                }
            }
        }
        Some(_) => {
            errors.push(at(index, "tags", "must be a list of strings"));
            None
        }
    };
    let meta = match map.get("meta") {
        None | Some(Value::Null) => Some(BTreeMap::new()),
        Some(Value::Mapping(m)) => {
            let mut meta = BTreeMap::new();
            let mut ok = true;
            for (k, v) in m {
                let key = describe_key(k);
                let value = match v {
                    Value::String(s) => Some(s.clone()),
                    Value::Number(n) => Some(n.to_string()),
                    Value::Bool(b) => Some(b.to_string()),
                    _ => None,
                };
                match (k.as_str(), value) {
                    (Some(_), Some(value)) => {
                        meta.insert(key, value);
                    }
                    _ => {
                        errors.push(at(
                            index,
                            &format!("meta.{key}"),
                            "keys and values must be strings",
                        ));
                        ok = false;
                    }
                }
            }
            if ok {
                check(validate::meta(&meta), index, "meta", errors).map(|_| meta)
            } else {
                None
            }
        }
        Some(_) => {
            errors.push(at(index, "meta", "must be a mapping of strings"));
            None
        }
    };
    if errors.len() != before {
        return None;
    }
    let (service, address, ports) = (service?, address?, ports?);
    Some(Target {
        id: TargetId::new(format!("file:{address}:{ports}")),
        service,
        address,
        ports,
        path: path?,
        scheme: scheme?,
        tags: tags?,
        meta: meta?,
        revision: 0,
        probe_interval: None,
    })
}

fn check<T, E: fmt::Display>(
    result: Result<T, E>,
    index: usize,
    field: &str,
    errors: &mut Vec<FileError>,
) -> Option<T> {
    result
        .map_err(|e| errors.push(at(index, field, e.to_string())))
        .ok()
}

fn required_str<'a>(
    map: &'a Mapping,
    index: usize,
    field: &str,
    errors: &mut Vec<FileError>,
) -> Option<&'a str> {
    match map.get(field) {
        None | Some(Value::Null) => {
            errors.push(at(index, field, "required"));
            None
        }
        Some(Value::String(s)) => Some(s.as_str()),
        Some(_) => {
            errors.push(at(index, field, "must be a string"));
            None
        }
    }
}

fn optional_str<'a>(
    map: &'a Mapping,
    index: usize,
    field: &str,
    errors: &mut Vec<FileError>,
) -> Option<&'a str> {
    match map.get(field) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.as_str()),
        Some(_) => {
            errors.push(at(index, field, "must be a string"));
            // A wrong type is reported once; the entry is rejected by the error count.
            Some("")
        }
    }
}

/// Reads and validates a targets file.
pub fn load_targets(path: &Path) -> Result<Vec<Target>, Vec<FileError>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| vec![top(format!("cannot read {}: {e}", path.display()))])?;
    parse_targets(&text)
}

/// Polls the file (content, not mtime: ConfigMap symlink swaps keep odd mtimes) and publishes
/// each new valid snapshot. Invalid edits are logged entry by entry and counted; the last good
/// snapshot stays in force.
pub async fn watch_targets_file(
    path: PathBuf,
    poll_interval: Duration,
    initial_text: String,
    tx: watch::Sender<TargetSnapshot>,
    metrics: Arc<Metrics>,
) {
    let mut last_text = initial_text;
    let mut ticker = tokio::time::interval(poll_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // SIGHUP, the usual "reload" signal, re-reads at once instead of killing the process.
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            Some(()) = async { match hangup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                tracing::info!(file = %path.display(), "SIGHUP: re-reading the targets file");
                // A re-read of unchanged content is reported too, so the operator sees it worked.
                last_text.clear();
            }
        }
        let text = match tokio::fs::read_to_string(&path).await {
            Ok(text) => text,
            Err(e) => {
                if last_text.is_empty() {
                    continue;
                }
                tracing::warn!(file = %path.display(), error = %e, "cannot read targets file; keeping the last good configuration");
                metrics.config_reload("error");
                last_text = String::new();
                continue;
            }
        };
        if text == last_text {
            continue;
        }
        last_text = text;
        match parse_targets(&last_text) {
            Ok(targets) => {
                tracing::info!(file = %path.display(), targets = targets.len(), "targets file reloaded");
                metrics.config_reload("ok");
                let snapshot = super::share_unchanged(targets, &tx.borrow());
                tx.send_replace(snapshot);
            }
            Err(errors) => {
                metrics.config_reload("error");
                for error in &errors {
                    tracing::error!(file = %path.display(), error = %error, "invalid targets file; keeping the last good configuration");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors_of(text: &str) -> Vec<String> {
        parse_targets(text)
            .unwrap_err()
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn parses_a_full_entry_and_defaults() {
        let targets = parse_targets(
            r#"
targets:
  - service: clever
    address: 127.0.0.1
    ports: 9011-9020
    path: /custom
    scheme: https
    tags: [gunicorn]
    meta: {team: web, shard: 3}
  - service: other
    address: "::1"
    ports: 8080
"#,
        )
        .unwrap();
        assert_eq!(targets.len(), 2);
        let t = &targets[0];
        assert_eq!(t.service, "clever");
        assert_eq!(t.ports, PortRange::new(9011, 9020).unwrap());
        assert_eq!(t.path, "/custom");
        assert_eq!(t.scheme, Scheme::Https);
        assert_eq!(t.tags, vec!["gunicorn"]);
        assert_eq!(t.meta["shard"], "3");
        assert_eq!(targets[1].path, "/metrics");
        assert_eq!(targets[1].scheme, Scheme::Http);
        assert_eq!(targets[1].ports.len(), 1);
        assert_ne!(targets[0].id, targets[1].id);
    }

    #[test]
    fn every_bad_field_is_named() {
        let errors = errors_of(
            r#"
targets:
  - service: bad_name
    address: example.com
    ports: 9020-9011
  - service: ok
    address: 127.0.0.1
    ports: 1-65535
    scheme: ftp
    path: metrics
    tags: "x"
    meta: {consul-x: y}
    colour: blue
  - address: 127.0.0.1
  - just a string
"#,
        );
        let expected = [
            "targets[0].service:",
            "targets[0].address:",
            "targets[0].ports: range 9020-9011 is reversed",
            "targets[1].ports: range 1-65535 spans 65535 ports",
            "targets[1].scheme:",
            "targets[1].path:",
            "targets[1].tags:",
            "targets[1].meta:",
            "targets[1].colour: unknown field",
            "targets[2].service: required",
            "targets[2].ports: required",
            "targets[3]: must be a mapping",
        ];
        for want in expected {
            assert!(
                errors.iter().any(|e| e.starts_with(want)),
                "missing {want:?} in {errors:#?}"
            );
        }
        assert_eq!(errors.len(), expected.len(), "{errors:#?}");
    }

    #[test]
    fn overlapping_ranges_on_one_address_are_rejected() {
        let errors = errors_of(
            r#"
targets:
  - {service: a, address: 127.0.0.1, ports: 9011-9020}
  - {service: b, address: 127.0.0.2, ports: 9011-9020}
  - {service: c, address: 127.0.0.1, ports: 9020-9030}
"#,
        );
        assert_eq!(errors.len(), 1);
        assert!(
            errors[0].starts_with("targets[2].ports:") && errors[0].contains("targets[0]"),
            "{errors:?}"
        );
    }

    #[test]
    fn structural_errors() {
        assert!(errors_of("")[0].contains("empty"));
        assert!(errors_of("[1, 2]")[0].contains("mapping"));
        assert!(errors_of("targets: 3")[0].starts_with("targets: must be a list"));
        assert!(errors_of("targets: [\n")[0].contains("not valid YAML"));
        assert!(errors_of("targets: []\nextra: 1")[0].starts_with("extra: unknown top-level key"));
        assert!(
            errors_of("targets:\n  - {service: a, address: 0.0.0.0, ports: 1}")[0]
                .contains("cannot be probed")
        );
        assert!(
            errors_of("targets:\n  - {service: a, address: 1.2.3.4, ports: 70000}")[0]
                .contains("65535")
        );
        assert!(parse_targets("targets: []").unwrap().is_empty());
        assert!(parse_targets("targets:").unwrap().is_empty());
    }

    #[test]
    fn oversized_inputs_are_refused() {
        let huge = format!("targets: []\n#{}", "x".repeat(MAX_FILE_BYTES));
        assert!(errors_of(&huge)[0].contains("at most"));
        let many: String = (0..=MAX_TARGETS)
            .map(|i| {
                format!(
                    "  - {{service: a, address: 10.0.{}.{}, ports: 1}}\n",
                    i / 250,
                    i % 250
                )
            })
            .collect();
        assert!(errors_of(&format!("targets:\n{many}"))[0].contains("entries"));
    }
}
