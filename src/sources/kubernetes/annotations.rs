//! A pod's `workersd.io/*` annotations, read into a declaration. Pure: no API calls here.

use crate::declaration::{Declaration, DeclarationError, FieldPath, SourceKind, keyed};
use std::collections::BTreeMap;

pub const PREFIX: &str = "workersd.io/";
pub const SERVICE: &str = "workersd.io/service";
pub const PORTS: &str = "workersd.io/ports";
pub const PORTS_PREFIX: &str = "workersd.io/ports.";
pub const PATH: &str = "workersd.io/path";
pub const SCHEME: &str = "workersd.io/scheme";
pub const TAGS: &str = "workersd.io/tags";
pub const META_PREFIX: &str = "workersd.io/meta.";

/// Longest annotation value read; anything longer is an error, not parsed.
pub const MAX_ANNOTATION_VALUE: usize = 4096;

/// How annotations spell the keys of a declaration.
const KEYS: keyed::Keys = keyed::Keys {
    source: SourceKind::Annotations,
    prefix: PREFIX,
    ports_scoped: "ports.",
    meta: "meta.",
    max_value: MAX_ANNOTATION_VALUE,
};

/// Parses a pod's `workersd.io/*` annotations. `Ok(None)`: the pod did not opt in.
pub fn parse_annotations(
    annotations: &BTreeMap<String, String>,
) -> Result<Option<Declaration>, Vec<DeclarationError>> {
    keyed::parse(&KEYS, annotations, annotation)
}

fn annotation(key: &str) -> FieldPath {
    FieldPath::new(format!("metadata.annotations[{key}]"))
}

/// The annotation that declares a container's ports, for error locations.
pub fn ports_annotation(container: &str) -> FieldPath {
    annotation(&format!("{PORTS_PREFIX}{container}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Scheme;

    fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn fields(errors: Vec<DeclarationError>) -> Vec<String> {
        errors.into_iter().map(|e| e.to_string()).collect()
    }

    #[test]
    fn pods_without_our_annotations_are_ignored() {
        assert!(matches!(
            parse_annotations(&annotations(&[("app", "x")])),
            Ok(None)
        ));
    }

    #[test]
    fn parses_a_full_declaration() {
        let spec = parse_annotations(&annotations(&[
            (SERVICE, "clever"),
            ("workersd.io/ports.web", "9011-9020"),
            ("workersd.io/ports.sidecar", "9100"),
            (PATH, "/m"),
            (SCHEME, "https"),
            (TAGS, "gunicorn, python,"),
            ("workersd.io/meta.team", "web"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(spec.service, "clever");
        assert_eq!(spec.ranges.len(), 2);
        assert_eq!(spec.tags, vec!["gunicorn", "python"]);
        assert_eq!(spec.scheme, Scheme::Https);
        assert_eq!(spec.meta["team"], "web");
    }

    #[test]
    fn names_every_bad_annotation() {
        let errors = fields(
            parse_annotations(&annotations(&[
                (SERVICE, "Bad_Name"),
                (PORTS, "9020-9011"),
                ("workersd.io/ports.web", "1-65535"),
                ("workersd.io/ports.", "1"),
                (SCHEME, "ftp"),
                (PATH, "metrics"),
                ("workersd.io/meta.consul-x", "y"),
                ("workersd.io/prots", "1"),
            ]))
            .unwrap_err(),
        );
        for want in [
            "metadata.annotations[workersd.io/service]:",
            "metadata.annotations[workersd.io/ports]: range 9020-9011 is reversed",
            "metadata.annotations[workersd.io/ports.web]: range 1-65535 spans",
            "metadata.annotations[workersd.io/ports.]:",
            "metadata.annotations[workersd.io/scheme]:",
            "metadata.annotations[workersd.io/path]:",
            "metadata.annotations[workersd.io/meta.consul-x]:",
            "metadata.annotations[workersd.io/prots]: unknown",
        ] {
            assert!(
                errors.iter().any(|e| e.starts_with(want)),
                "missing {want:?} in {errors:#?}"
            );
        }
    }

    #[test]
    fn overlapping_ranges_and_missing_fields_are_errors() {
        let errors = fields(
            parse_annotations(&annotations(&[
                (SERVICE, "a"),
                (PORTS, "9011-9020"),
                ("workersd.io/ports.web", "9020-9030"),
            ]))
            .unwrap_err(),
        );
        assert_eq!(errors.len(), 1);
        assert!(errors[0].contains("overlaps"), "{errors:?}");
        let errors = fields(parse_annotations(&annotations(&[(PORTS, "9011")])).unwrap_err());
        assert!(errors[0].contains("workersd.io/service]: required"));
        let errors = fields(parse_annotations(&annotations(&[(SERVICE, "a")])).unwrap_err());
        assert!(errors[0].contains("no port range"));
    }

    #[test]
    fn oversized_declarations_are_rejected() {
        let mut many: Vec<(String, String)> = (0..20)
            .map(|i| (format!("workersd.io/ports.c{i}"), format!("{}", 9000 + i)))
            .collect();
        many.push((SERVICE.into(), "a".into()));
        let map: BTreeMap<String, String> = many.into_iter().collect();
        assert!(
            fields(parse_annotations(&map).unwrap_err())
                .iter()
                .any(|e| e.contains("at most 16"))
        );
        let huge = "1".repeat(MAX_ANNOTATION_VALUE + 1);
        assert!(parse_annotations(&annotations(&[(SERVICE, "a"), (PORTS, &huge)])).is_err());
    }
}
