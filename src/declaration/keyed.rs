//! Declarations written as flat key/value pairs: a pod's `workersd.io/*` annotations and a
//! Nomad job's `workersd_*` meta. Each source names its keys ([`Keys`]); the reading and the
//! validation are the same.

use super::{
    Declaration, DeclarationError, ErrorKind, FieldPath, Input, Located, RawDeclaration, RawMeta,
    RawRange, SourceKind, validate,
};

/// How a source spells its keys.
pub struct Keys {
    pub source: SourceKind,
    /// Every key of ours starts with it (`workersd.io/`, `workersd_`).
    pub prefix: &'static str,
    /// Between the prefix and a container or task name in a per-container range
    /// (`ports.`, `ports_`), and before a meta key (`meta.`, `meta_`).
    pub ports_scoped: &'static str,
    pub meta: &'static str,
    /// Longest value read; a longer one is an error, not parsed.
    pub max_value: usize,
}

impl Keys {
    fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }
}

/// Reads the pairs of `keys.prefix`; `field` says where a key was written, for errors.
/// `Ok(None)`: nothing of ours is set (not opted in).
pub fn parse<'a>(
    keys: &Keys,
    pairs: impl IntoIterator<Item = (&'a String, &'a String)>,
    field: impl Fn(&str) -> FieldPath,
) -> Result<Option<Declaration>, Vec<DeclarationError>> {
    let ours: Vec<(&String, &String)> = pairs
        .into_iter()
        .filter(|(k, _)| k.starts_with(keys.prefix))
        .collect();
    if ours.is_empty() {
        return Ok(None);
    }
    let (service, ports, path, scheme, tags) = (
        keys.key("service"),
        keys.key("ports"),
        keys.key("path"),
        keys.key("scheme"),
        keys.key("tags"),
    );
    let ports_scoped = keys.key(keys.ports_scoped);
    let meta_prefix = keys.key(keys.meta);
    let mut errors = Vec::new();
    let mut raw = RawDeclaration {
        meta_field: field(&format!("{meta_prefix}*")),
        ..RawDeclaration::empty(keys.source, |name| field(&keys.key(name)))
    };
    for (key, value) in ours {
        let field = field(key);
        let too_long = value.len() > keys.max_value;
        if too_long {
            errors.push(DeclarationError::new(
                field.clone(),
                ErrorKind::ValueTooLong {
                    bytes: value.len(),
                    max: keys.max_value,
                },
            ));
        }
        let given = |value: &String| {
            if too_long {
                Input::Refused
            } else {
                Input::given(field.clone(), value.clone())
            }
        };
        match key.as_str() {
            k if k == service => raw.service = given(value),
            k if k == path => raw.path = given(value),
            k if k == scheme => raw.scheme = given(value),
            k if k == tags => {
                raw.tags = match given(value) {
                    Input::Given(Located { field, value }) => {
                        let tags = value
                            .split(',')
                            .map(str::trim)
                            .filter(|t| !t.is_empty())
                            .map(str::to_string)
                            .collect();
                        Input::given(field, tags)
                    }
                    _ => Input::Refused,
                }
            }
            k if k == ports || k.starts_with(&ports_scoped) => {
                if too_long {
                    raw.ranges_refused = true;
                    continue;
                }
                let container = k
                    .strip_prefix(&ports_scoped)
                    .map(|name| Located::new(field.clone(), name.to_string()));
                raw.ranges.push(RawRange {
                    container,
                    ports: Located::new(field, value.clone()),
                });
            }
            k => match k.strip_prefix(&meta_prefix) {
                Some(_) if too_long => {}
                Some(meta_key) => raw.meta.push(RawMeta {
                    field,
                    key: meta_key.to_string(),
                    value: value.clone(),
                }),
                None => errors.push(DeclarationError::new(
                    field,
                    ErrorKind::UnknownKey(keys.source),
                )),
            },
        }
    }
    match validate(raw) {
        Ok(declared) if errors.is_empty() => Ok(Some(declared)),
        result => {
            errors.extend(result.err().unwrap_or_default());
            Err(errors)
        }
    }
}
