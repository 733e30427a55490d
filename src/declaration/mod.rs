//! How a target is declared, whatever the source: a targets file entry, a pod's
//! `workersd.io/*` annotations or a `WorkerMetrics` resource. Each source turns its input into
//! a [`RawDeclaration`] (text not yet checked, each value with the [`FieldPath`] the user wrote
//! it at); [`validate`] checks it and applies the defaults, naming every bad field with one
//! error type, [`DeclarationError`]. Pure: no I/O here.

mod error;
pub mod keyed;
pub mod rules;

pub use error::{DeclarationError, ErrorKind, FieldPath, Located};
pub use rules::owner_id;

use crate::model::{PortRange, Scheme};
use std::collections::BTreeMap;

/// Where workers expose their metrics unless declared otherwise.
pub const DEFAULT_PATH: &str = "/metrics";
pub const DEFAULT_SCHEME: Scheme = Scheme::Http;

/// Most port ranges one declaration may have, and most ports over all of them: one tenant must
/// not be able to exhaust the prober.
pub const MAX_RANGES_PER_POD: usize = 16;
pub const MAX_PORTS_PER_POD: usize = 1024;

/// Which syntax the user wrote, for messages that tell how to fix a missing value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceKind {
    TargetsFile,
    Annotations,
    WorkerMetrics,
    /// A Nomad job's, group's or task's `workersd_*` meta.
    NomadMeta,
}

impl SourceKind {
    fn required(self) -> &'static str {
        match self {
            SourceKind::Annotations => "required when other workersd.io annotations are set",
            SourceKind::NomadMeta => "required when other workersd_ meta keys are set",
            SourceKind::TargetsFile | SourceKind::WorkerMetrics => "required",
        }
    }

    fn ports_hint(self) -> &'static str {
        match self {
            SourceKind::TargetsFile => "e.g. \"9011-9020\"",
            SourceKind::Annotations => "workersd.io/ports or workersd.io/ports.<container>",
            SourceKind::WorkerMetrics => "at least one container with a port range is required",
            SourceKind::NomadMeta => "workersd_ports or workersd_ports_<task>",
        }
    }

    fn unknown_key(self) -> &'static str {
        match self {
            SourceKind::Annotations => {
                "unknown workersd.io annotation (expected service, ports, ports.<container>, path, scheme, tags, meta.<key>)"
            }
            SourceKind::NomadMeta => {
                "unknown workersd_ meta key (expected workersd_service, workersd_ports, workersd_ports_<task>, workersd_path, workersd_scheme, workersd_tags, workersd_meta_<key>)"
            }
            SourceKind::TargetsFile | SourceKind::WorkerMetrics => "unknown field",
        }
    }
}

/// A value as the source read it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Input<T> {
    /// Not written: the default applies, or "required" is reported at this path.
    Absent(FieldPath),
    Given(Located<T>),
    /// Written but unusable (e.g. the wrong YAML type); the source has reported why.
    Refused,
}

impl<T> Input<T> {
    pub fn given(field: FieldPath, value: T) -> Self {
        Input::Given(Located::new(field, value))
    }
}

/// One declared port range as written; `container: None` means the whole pod (or host).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawRange {
    pub container: Option<Located<String>>,
    pub ports: Located<String>,
}

/// One meta pair, located by the field the source reports its errors at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawMeta {
    pub field: FieldPath,
    pub key: String,
    pub value: String,
}

/// A declaration as its source wrote it, nothing checked yet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawDeclaration {
    pub source: SourceKind,
    pub service: Input<String>,
    /// Where "no port range declared" is reported.
    pub ranges_field: FieldPath,
    pub ranges: Vec<RawRange>,
    /// A range was written but unusable (the source reported it): no "no port range" error.
    pub ranges_refused: bool,
    pub path: Input<String>,
    pub scheme: Input<String>,
    pub tags: Input<Vec<String>>,
    /// Where the number of meta pairs is reported.
    pub meta_field: FieldPath,
    pub meta: Vec<RawMeta>,
}

impl RawDeclaration {
    /// Nothing given yet: every field absent at `field_of(name)`.
    pub fn empty(source: SourceKind, field_of: impl Fn(&str) -> FieldPath) -> Self {
        Self {
            source,
            service: Input::Absent(field_of("service")),
            ranges_field: field_of("ports"),
            ranges: Vec::new(),
            ranges_refused: false,
            path: Input::Absent(field_of("path")),
            scheme: Input::Absent(field_of("scheme")),
            tags: Input::Absent(field_of("tags")),
            meta_field: field_of("meta"),
            meta: Vec::new(),
        }
    }
}

/// One declared range, checked; `container: None` means the whole pod (or host).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeclaredRange {
    pub container: Option<String>,
    pub ports: PortRange,
}

/// A checked declaration with its defaults applied, ready to become targets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Declaration {
    pub service: String,
    pub ranges: Vec<DeclaredRange>,
    pub path: String,
    pub scheme: Scheme,
    pub tags: Vec<String>,
    pub meta: BTreeMap<String, String>,
}

/// Checks every field and applies the defaults. On error, every problem found is returned;
/// the list is empty when the only problems are the `Refused` values the source reported.
pub fn validate(raw: RawDeclaration) -> Result<Declaration, Vec<DeclarationError>> {
    let mut errors = Vec::new();
    let mut refused = false;
    let service = match given(raw.service, &mut refused) {
        Ok(Located { field, value }) => match rules::service_name(&value) {
            Ok(()) => Some(value),
            Err(e) => {
                errors.push(DeclarationError::new(field, e));
                None
            }
        },
        Err(Some(field)) => {
            errors.push(DeclarationError::new(
                field,
                ErrorKind::Required(raw.source),
            ));
            None
        }
        Err(None) => None,
    };
    refused |= raw.ranges_refused;
    let ranges = if raw.ranges.is_empty() && raw.ranges_refused {
        Vec::new()
    } else {
        ranges(raw.source, raw.ranges_field, raw.ranges, &mut errors)
    };
    let path = match given(raw.path, &mut refused) {
        Ok(Located { field, value }) => match rules::metrics_path(&value) {
            Ok(()) => Some(value),
            Err(e) => {
                errors.push(DeclarationError::new(field, e));
                None
            }
        },
        Err(Some(_)) => Some(DEFAULT_PATH.to_string()),
        Err(None) => None,
    };
    let scheme = match given(raw.scheme, &mut refused) {
        Ok(Located { field, value }) => match value.parse::<Scheme>() {
            Ok(scheme) => Some(scheme),
            Err(e) => {
                errors.push(DeclarationError::new(field, e));
                None
            }
        },
        Err(Some(_)) => Some(DEFAULT_SCHEME),
        Err(None) => None,
    };
    let tags = match given(raw.tags, &mut refused) {
        Err(Some(_)) => Some(Vec::new()),
        Ok(Located { field, value }) => {
            let bad = rules::tags(&value);
            let ok = bad.is_empty();
            errors.extend(
                bad.into_iter()
                    .map(|e| DeclarationError::new(field.clone(), e)),
            );
            ok.then_some(value)
        }
        Err(None) => None,
    };
    let meta = meta(raw.meta_field, raw.meta, &mut errors);
    if !errors.is_empty() || refused {
        return Err(errors);
    }
    match (service, path, scheme, tags) {
        (Some(service), Some(path), Some(scheme), Some(tags)) => Ok(Declaration {
            service,
            ranges,
            path,
            scheme,
            tags,
            meta,
        }),
        _ => Err(errors),
    }
}

/// The value, or where it is absent (`Some`), or nothing when the source refused it.
fn given<T>(input: Input<T>, refused: &mut bool) -> Result<Located<T>, Option<FieldPath>> {
    match input {
        Input::Absent(field) => Err(Some(field)),
        Input::Given(located) => Ok(located),
        Input::Refused => {
            *refused = true;
            Err(None)
        }
    }
}

/// Parses each range, then checks the limits and overlaps of all of them together.
fn ranges(
    source: SourceKind,
    field: FieldPath,
    raw: Vec<RawRange>,
    errors: &mut Vec<DeclarationError>,
) -> Vec<DeclaredRange> {
    if raw.is_empty() {
        errors.push(DeclarationError::new(field, ErrorKind::NoPortRange(source)));
        return Vec::new();
    }
    let before = errors.len();
    let mut parsed: Vec<(DeclaredRange, FieldPath)> = Vec::new();
    for range in raw {
        if let Some(container) = &range.container
            && container.value.is_empty()
        {
            errors.push(DeclarationError::new(
                container.field.clone(),
                ErrorKind::EmptyContainerName,
            ));
        }
        match range.ports.value.parse::<PortRange>() {
            Ok(ports) => parsed.push((
                DeclaredRange {
                    container: range.container.map(|c| c.value),
                    ports,
                },
                range.ports.field,
            )),
            Err(e) => errors.push(DeclarationError::new(range.ports.field, e)),
        }
    }
    if let Some((_, first)) = parsed.first() {
        if parsed.len() > MAX_RANGES_PER_POD {
            errors.push(DeclarationError::new(
                first.clone(),
                ErrorKind::TooManyRanges(parsed.len()),
            ));
        }
        let total: usize = parsed.iter().map(|(r, _)| r.ports.len()).sum();
        if total > MAX_PORTS_PER_POD {
            errors.push(DeclarationError::new(
                first.clone(),
                ErrorKind::TooManyPorts(total),
            ));
        }
    }
    for (i, (a, a_field)) in parsed.iter().enumerate() {
        for (b, b_field) in &parsed[..i] {
            if a.ports.overlaps(&b.ports) {
                errors.push(DeclarationError::new(
                    a_field.clone(),
                    ErrorKind::RangesOverlap {
                        ports: a.ports,
                        other: b.ports,
                        other_field: b_field.clone(),
                    },
                ));
            }
        }
    }
    if errors.len() != before {
        return Vec::new();
    }
    parsed.into_iter().map(|(r, _)| r).collect()
}

fn meta(
    field: FieldPath,
    raw: Vec<RawMeta>,
    errors: &mut Vec<DeclarationError>,
) -> BTreeMap<String, String> {
    if raw.len() > rules::MAX_USER_META {
        errors.push(DeclarationError::new(
            field,
            rules::MetaError::TooMany(raw.len()),
        ));
    }
    let mut meta = BTreeMap::new();
    for pair in raw {
        match rules::meta_key(&pair.key).and_then(|()| rules::meta_value(&pair.key, &pair.value)) {
            Ok(()) => {
                meta.insert(pair.key, pair.value);
            }
            Err(e) => errors.push(DeclarationError::new(pair.field, e)),
        }
    }
    meta
}

#[cfg(test)]
mod tests;
