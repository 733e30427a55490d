//! The targets file source (hosts, VMs, Nomad): a YAML file, validated entry by entry and
//! hot-reloaded. A broken edit keeps the last good snapshot running.

use super::TargetSnapshot;
use crate::declaration::{
    self, DeclarationError, ErrorKind, FieldPath, Input, RawDeclaration, RawMeta, RawRange,
    SourceKind,
};
use crate::metrics::Metrics;
use crate::model::{Target, TargetId};
use serde::Deserialize;
use serde_norway::{Mapping, Value};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Largest targets file accepted; a larger one is refused before parsing.
pub const MAX_FILE_BYTES: usize = 4 * 1024 * 1024;
/// Largest number of entries one file may declare.
pub const MAX_TARGETS: usize = 20_000;

const FIELDS: &str = "service, address, ports, path, scheme, tags, meta";

/// One entry as written. Fields stay YAML values so that a wrong type is reported by name
/// beside every other problem of the entry: a struct of typed fields (or
/// `deny_unknown_fields`) would stop at the first one.
#[derive(Deserialize)]
struct Entry {
    service: Option<Value>,
    address: Option<Value>,
    ports: Option<Value>,
    path: Option<Value>,
    scheme: Option<Value>,
    tags: Option<Value>,
    meta: Option<Value>,
    #[serde(flatten)]
    unknown: Mapping,
}

fn whole(kind: ErrorKind) -> DeclarationError {
    DeclarationError::new(FieldPath::whole(), kind)
}

/// Parses and validates the whole file, returning every error found, not just the first.
pub fn parse_targets(text: &str) -> Result<Vec<Target>, Vec<DeclarationError>> {
    if text.len() > MAX_FILE_BYTES {
        return Err(vec![whole(ErrorKind::FileTooLarge {
            bytes: text.len(),
            max: MAX_FILE_BYTES,
        })]);
    }
    let root: Value =
        serde_norway::from_str(text).map_err(|e| vec![whole(ErrorKind::Yaml(Arc::new(e)))])?;
    let root = match root {
        Value::Mapping(m) => m,
        Value::Null => return Err(vec![whole(ErrorKind::EmptyFile)]),
        _ => return Err(vec![whole(ErrorKind::NoTargetsMapping)]),
    };
    let mut errors = Vec::new();
    for key in root.keys() {
        if key.as_str() != Some("targets") {
            errors.push(DeclarationError::new(
                FieldPath::new(describe_key(key)),
                ErrorKind::UnknownTopLevelKey,
            ));
        }
    }
    let list = FieldPath::new("targets");
    let entries = match root.get("targets") {
        Some(Value::Sequence(s)) => s.as_slice(),
        Some(Value::Null) | None => &[],
        Some(_) => {
            errors.push(DeclarationError::new(list, ErrorKind::WrongType("a list")));
            &[]
        }
    };
    if entries.len() > MAX_TARGETS {
        errors.push(DeclarationError::new(
            FieldPath::new("targets"),
            ErrorKind::TooManyEntries {
                entries: entries.len(),
                max: MAX_TARGETS,
            },
        ));
        return Err(errors);
    }
    let mut targets: Vec<(usize, Target)> = Vec::new();
    for (index, entry) in entries.iter().enumerate() {
        let at = FieldPath::new(format!("targets[{index}]"));
        match parse_entry(&at, entry) {
            Ok(target) => {
                if let Some((other, _)) = targets
                    .iter()
                    .find(|(_, t)| t.address == target.address && t.ports.overlaps(&target.ports))
                {
                    errors.push(DeclarationError::new(
                        at.field("ports"),
                        ErrorKind::EntriesOverlap {
                            ports: target.ports,
                            address: target.address,
                            other: *other,
                        },
                    ));
                    continue;
                }
                targets.push((index, target));
            }
            Err(entry_errors) => errors.extend(entry_errors),
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

/// One entry: its address here (only the file declares one), the rest through the declaration
/// validator.
fn parse_entry(at: &FieldPath, entry: &Value) -> Result<Target, Vec<DeclarationError>> {
    let wrong = |field: &str, expected| {
        DeclarationError::new(at.field(field), ErrorKind::WrongType(expected))
    };
    let Value::Mapping(map) = entry else {
        return Err(vec![DeclarationError::new(
            at.clone(),
            ErrorKind::WrongType("a mapping"),
        )]);
    };
    // Only string keys can name a field; the others are unknown fields (and `flatten` would
    // refuse them).
    let (fields, odd): (Mapping, Mapping) = map
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .partition(|(k, _)| matches!(k, Value::String(_)));
    let mut errors: Vec<DeclarationError> = odd
        .keys()
        .map(|key| {
            DeclarationError::new(
                at.field(&describe_key(key)),
                ErrorKind::UnknownField(FIELDS),
            )
        })
        .collect();
    let entry = match Entry::deserialize(Value::Mapping(fields)) {
        Ok(entry) => entry,
        Err(e) => {
            errors.push(DeclarationError::new(
                at.clone(),
                ErrorKind::Yaml(Arc::new(e)),
            ));
            return Err(errors);
        }
    };
    errors.extend(entry.unknown.keys().map(|key| {
        DeclarationError::new(
            at.field(&describe_key(key)),
            ErrorKind::UnknownField(FIELDS),
        )
    }));
    let mut string = |name: &str, value: Option<Value>| match value {
        None => Input::Absent(at.field(name)),
        Some(Value::String(s)) => Input::given(at.field(name), s),
        Some(_) => {
            errors.push(wrong(name, "a string"));
            Input::Refused
        }
    };
    let service = string("service", entry.service);
    let address = string("address", entry.address);
    let path = string("path", entry.path);
    let scheme = string("scheme", entry.scheme);
    let mut raw = RawDeclaration {
        service,
        path,
        scheme,
        ..RawDeclaration::empty(SourceKind::TargetsFile, |name| at.field(name))
    };
    // A port number is the range of one port.
    let ports = match entry.ports {
        None => None,
        Some(Value::Number(n)) => Some(n.to_string()),
        Some(Value::String(s)) => Some(s),
        Some(_) => {
            errors.push(wrong(
                "ports",
                "a string like \"9011-9020\" or a port number",
            ));
            raw.ranges_refused = true;
            None
        }
    };
    raw.ranges.extend(ports.map(|ports| RawRange {
        container: None,
        ports: declaration::Located::new(at.field("ports"), ports),
    }));
    raw.tags = match entry.tags {
        None => Input::Absent(at.field("tags")),
        Some(Value::Sequence(items)) => {
            let tags: Vec<String> = items
                .iter()
                .enumerate()
                .filter_map(|(i, v)| match v {
                    Value::String(s) => Some(s.clone()),
                    _ => {
                        errors.push(wrong(&format!("tags[{i}]"), "a string"));
                        None
                    }
                })
                .collect();
            if tags.len() == items.len() {
                Input::given(at.field("tags"), tags)
            } else {
                Input::Refused
            }
        }
        Some(_) => {
            errors.push(wrong("tags", "a list of strings"));
            Input::Refused
        }
    };
    match entry.meta {
        None => {}
        Some(Value::Mapping(m)) => {
            for (k, v) in m {
                let key = describe_key(&k);
                let value = match v {
                    Value::String(s) => Some(s),
                    Value::Number(n) => Some(n.to_string()),
                    Value::Bool(b) => Some(b.to_string()),
                    _ => None,
                };
                match (k.is_string(), value) {
                    (true, Some(value)) => raw.meta.push(RawMeta {
                        field: at.field("meta"),
                        key,
                        value,
                    }),
                    _ => errors.push(DeclarationError::new(
                        at.field(&format!("meta.{key}")),
                        ErrorKind::MetaNotStrings,
                    )),
                }
            }
        }
        Some(_) => errors.push(wrong("meta", "a mapping of strings")),
    }
    let address = match address {
        Input::Absent(field) => {
            errors.push(DeclarationError::new(
                field,
                ErrorKind::Required(SourceKind::TargetsFile),
            ));
            None
        }
        Input::Given(declaration::Located { field, value }) => match value.parse::<IpAddr>() {
            Ok(ip) if ip.is_unspecified() || ip.is_multicast() => {
                errors.push(DeclarationError::new(field, ErrorKind::Unprobeable(ip)));
                None
            }
            Ok(ip) => Some(ip),
            Err(_) => {
                errors.push(DeclarationError::new(field, ErrorKind::NotAnIp(value)));
                None
            }
        },
        Input::Refused => None,
    };
    let declared = declaration::validate(raw);
    let (declared, address) = match (declared, address) {
        (Ok(declared), Some(address)) if errors.is_empty() => (declared, address),
        (result, _) => {
            errors.extend(result.err().unwrap_or_default());
            return Err(errors);
        }
    };
    let ports = declared.ranges[0].ports;
    Ok(Target {
        id: TargetId::new(format!("file:{address}:{ports}")),
        service: declared.service,
        address,
        ports,
        path: declared.path,
        scheme: declared.scheme,
        tags: declared.tags,
        meta: declared.meta,
        revision: 0,
        probe_interval: None,
    })
}

/// Reads and validates a targets file.
pub fn load_targets(path: &Path) -> Result<Vec<Target>, Vec<DeclarationError>> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        vec![whole(ErrorKind::Unreadable {
            path: path.to_path_buf(),
            source: Arc::new(e),
        })]
    })?;
    parse_targets(&text)
}

/// Polls the file (content, not mtime: ConfigMap symlink swaps keep odd mtimes) and publishes
/// each new valid snapshot. Invalid edits are logged entry by entry and counted; the last good
/// snapshot stays in force.
#[tracing::instrument(name = "targets_file", skip_all, fields(file = %path.display()))]
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
                tracing::info!("SIGHUP: re-reading the targets file");
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
                tracing::warn!(error = %e, "cannot read targets file; keeping the last good configuration");
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
                tracing::info!(targets = targets.len(), "targets file reloaded");
                metrics.config_reload("ok");
                let snapshot = super::share_unchanged(targets, &tx.borrow());
                tx.send_replace(snapshot);
            }
            Err(errors) => {
                metrics.config_reload("error");
                for error in &errors {
                    tracing::error!(error = %error, "invalid targets file; keeping the last good configuration");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{PortRange, Scheme};

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
            "targets[2].ports: no port range declared",
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
