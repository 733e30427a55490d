use super::rules::{MetaError, TagsError};
use super::*;
use crate::model::PortRangeError;
use crate::sources::file::parse_targets;
use crate::sources::kubernetes::annotations::parse_annotations;
use crate::sources::kubernetes::crd::{WorkerMetricsSpec, compile};

fn raw(ports: &[&str]) -> RawDeclaration {
    let mut raw = RawDeclaration::empty(SourceKind::Annotations, |name| {
        FieldPath::new(format!("x.{name}"))
    });
    raw.service = Input::given(FieldPath::new("x.service"), "web".to_string());
    raw.ranges = ports
        .iter()
        .enumerate()
        .map(|(i, p)| RawRange {
            container: Some(Located::new(
                FieldPath::new(format!("x.c{i}")),
                format!("c{i}"),
            )),
            ports: Located::new(FieldPath::new(format!("x.ports{i}")), p.to_string()),
        })
        .collect();
    raw
}

#[test]
fn defaults_apply_to_absent_fields() {
    let declared = validate(raw(&["9011-9020"])).unwrap();
    assert_eq!(declared.path, DEFAULT_PATH);
    assert_eq!(declared.scheme, DEFAULT_SCHEME);
    assert!(declared.tags.is_empty() && declared.meta.is_empty());
    assert_eq!(declared.ranges[0].container.as_deref(), Some("c0"));
}

#[test]
fn refused_values_fail_without_a_second_error() {
    let mut refused = raw(&["9011"]);
    refused.path = Input::Refused;
    assert!(validate(refused).unwrap_err().is_empty());
    let mut no_ranges = raw(&[]);
    no_ranges.ranges_refused = true;
    assert!(validate(no_ranges).unwrap_err().is_empty());
}

#[test]
fn every_problem_is_named_with_its_field() {
    let mut bad = raw(&["9011-9020", "9015", "x", "9100"]);
    bad.ranges[3].container.as_mut().unwrap().value.clear();
    bad.service = Input::Absent(FieldPath::new("x.service"));
    bad.scheme = Input::given(FieldPath::new("x.scheme"), "ftp".into());
    bad.tags = Input::given(FieldPath::new("x.tags"), vec!["a,b".into(), String::new()]);
    bad.meta = vec![RawMeta {
        field: FieldPath::new("x.meta.k"),
        key: "consul-k".into(),
        value: "v".into(),
    }];
    let errors: Vec<String> = validate(bad)
        .unwrap_err()
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        errors,
        [
            "x.service: required when other workersd.io annotations are set",
            "x.ports2: port \"x\" is not a number from 1 to 65535",
            "x.c3: container name must not be empty",
            "x.ports1: 9015 overlaps 9011-9020 declared by x.ports0; one port belongs to one range",
            "x.scheme: scheme must be \"http\" or \"https\", got \"ftp\"",
            "x.tags: tag \"a,b\" must not contain ',' or control characters",
            "x.tags: tag \"\" must be 1-255 characters",
            "x.meta.k: key \"consul-k\" uses the prefix \"consul-\", which Consul reserves",
        ]
    );
}

#[test]
fn per_pod_limits() {
    // At the limits: accepted.
    let sixteen: Vec<String> = (0..16).map(|i| (9000 + i).to_string()).collect();
    let sixteen: Vec<&str> = sixteen.iter().map(String::as_str).collect();
    assert!(validate(raw(&sixteen)).is_ok());
    let full: Vec<String> = (0..4)
        .map(|i| format!("{0}-{1}", 1 + i * 256, 256 + i * 256))
        .collect();
    let full: Vec<&str> = full.iter().map(String::as_str).collect();
    assert!(validate(raw(&full)).is_ok(), "1024 ports");
    // One more: refused.
    let many: Vec<String> = (0..17).map(|i| (9000 + i).to_string()).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    let errors = validate(raw(&many)).unwrap_err();
    assert!(matches!(errors[0].kind, ErrorKind::TooManyRanges(17)));
    let wide: Vec<String> = (0..5)
        .map(|i| format!("{0}-{1}", 1 + i * 256, 256 + i * 256))
        .collect();
    let wide: Vec<&str> = wide.iter().map(String::as_str).collect();
    let errors = validate(raw(&wide)).unwrap_err();
    assert!(matches!(errors[0].kind, ErrorKind::TooManyPorts(1280)));
    assert_eq!(errors[0].field.as_str(), "x.ports0");
}

/// The same bad value written in each of the three ways: the same error kind, each naming the
/// field where its user wrote it.
#[test]
fn the_three_sources_report_the_same_problem_at_their_own_field() {
    fn by_source(
        ports: &str,
        tag: &str,
        meta_key: &str,
    ) -> [(&'static str, Vec<DeclarationError>); 3] {
        let file = parse_targets(&format!(
            "targets:\n  - {{service: web, address: 127.0.0.1, ports: \"{ports}\", tags: [\"{tag}\"], meta: {{{meta_key}: v}}}}\n"
        ))
        .unwrap_err();
        let annotations = parse_annotations(&BTreeMap::from([
            ("workersd.io/service".to_string(), "web".to_string()),
            ("workersd.io/ports.web".to_string(), ports.to_string()),
            ("workersd.io/tags".to_string(), tag.to_string()),
            (format!("workersd.io/meta.{meta_key}"), "v".to_string()),
        ]))
        .unwrap_err();
        let spec: WorkerMetricsSpec = serde_json::from_value(serde_json::json!({
            "selector": {}, "service": "web",
            "containers": [{"name": "web", "ports": ports}],
            "tags": [tag], "meta": {meta_key: "v"},
        }))
        .unwrap();
        let resource = compile(&spec).unwrap_err();
        [
            ("file", file),
            ("annotations", annotations),
            ("resource", resource),
        ]
    }
    let long_tag = "t".repeat(256);
    let cases = by_source("9020-9011", &long_tag, "workersd-owner");
    let expected_fields = [
        ("targets[0].ports", "targets[0].tags", "targets[0].meta"),
        (
            "metadata.annotations[workersd.io/ports.web]",
            "metadata.annotations[workersd.io/tags]",
            "metadata.annotations[workersd.io/meta.workersd-owner]",
        ),
        ("spec.containers[0].ports", "spec.tags", "spec.meta"),
    ];
    for ((source, errors), (ports, tags, meta)) in cases.iter().zip(expected_fields) {
        let at = |field: &str| -> Vec<&ErrorKind> {
            errors
                .iter()
                .filter(|e| e.field.as_str() == field)
                .map(|e| &e.kind)
                .collect()
        };
        assert_eq!(errors.len(), 3, "{source}: {errors:#?}");
        assert!(
            matches!(
                at(ports)[..],
                [ErrorKind::Ports(PortRangeError::Reversed(9020, 9011))]
            ),
            "{source}: {errors:#?}"
        );
        assert!(
            matches!(&at(tags)[..], [ErrorKind::Tags(TagsError::Length(t))] if *t == long_tag),
            "{source}: {errors:#?}"
        );
        assert!(
            matches!(&at(meta)[..], [ErrorKind::Meta(MetaError::Reserved(k))] if k == "workersd-owner"),
            "{source}: {errors:#?}"
        );
    }
}

/// Without any range, each source says how its users declare one.
#[test]
fn a_missing_range_is_reported_with_the_way_each_source_declares_one() {
    for (source, hint) in [
        (SourceKind::TargetsFile, "e.g. \"9011-9020\""),
        (
            SourceKind::Annotations,
            "workersd.io/ports or workersd.io/ports.<container>",
        ),
        (
            SourceKind::WorkerMetrics,
            "at least one container with a port range is required",
        ),
    ] {
        let mut none = RawDeclaration::empty(source, |name| FieldPath::new(format!("x.{name}")));
        none.service = Input::given(FieldPath::new("x.service"), "web".to_string());
        let errors: Vec<String> = validate(none)
            .unwrap_err()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            errors,
            [format!("x.ports: no port range declared ({hint})")],
            "{source:?}"
        );
    }
}

/// Up to `MAX_USER_META` pairs are accepted; one more is refused, naming the count.
#[test]
fn user_meta_is_accepted_up_to_its_limit() {
    let with_meta = |n: usize| {
        let mut r = raw(&["9011"]);
        r.meta = (0..n)
            .map(|i| RawMeta {
                field: FieldPath::new(format!("x.meta.k{i}")),
                key: format!("k{i}"),
                value: "v".into(),
            })
            .collect();
        validate(r)
    };
    assert_eq!(with_meta(rules::MAX_USER_META).unwrap().meta.len(), 55);
    let errors = with_meta(rules::MAX_USER_META + 1).unwrap_err();
    assert!(
        matches!(
            errors[..],
            [DeclarationError {
                kind: ErrorKind::Meta(MetaError::TooMany(56)),
                ..
            }]
        ),
        "{errors:?}"
    );
}
