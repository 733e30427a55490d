//! Bad input never panics and always gets a clear error naming the field.
//!
//! Property tests throw arbitrary input at every parser and decoder (cargo-fuzz needs a nightly
//! toolchain this project does not use); `tests/corpus/` holds malformed inputs kept as
//! regressions, each with the error it must produce (`*.expect`).

use proptest::prelude::*;
use std::collections::BTreeMap;
use std::path::Path;
use workersd::declaration::DeclarationError;
use workersd::model::{PortRange, PortRangeError};
use workersd::probe::classify_head;
use workersd::sinks::consul::decode_node_services;
use workersd::sources::file::parse_targets;
use workersd::sources::kubernetes::annotations::parse_annotations;
use workersd::sources::kubernetes::crd::{WorkerMetricsSpec, compile};
use workersd::sources::kubernetes::pod::pod_info;

fn corpus(kind: &str) -> Vec<(String, String, String)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/corpus")
        .join(kind);
    let mut cases: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e != "expect"))
        .map(|input| {
            let expect = input.with_extension("expect");
            (
                input.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read_to_string(&input).unwrap(),
                std::fs::read_to_string(&expect)
                    .unwrap_or_else(|_| panic!("{} has no .expect", input.display()))
                    .trim_end()
                    .to_string(),
            )
        })
        .collect();
    cases.sort();
    assert!(cases.len() >= 5, "corpus {kind} is missing");
    cases
}

#[test]
fn targets_corpus_gives_the_recorded_errors() {
    for (name, input, expect) in corpus("targets") {
        let errors = parse_targets(&input).expect_err(&name);
        let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert!(
            text.iter()
                .any(|e| e.starts_with(&expect) || e.contains(&expect)),
            "{name}: want {expect:?}, got {text:#?}"
        );
    }
}

#[test]
fn annotations_corpus_gives_the_recorded_errors() {
    for (name, input, expect) in corpus("annotations") {
        let map: BTreeMap<String, String> = serde_json::from_str(&input).unwrap();
        let errors = parse_annotations(&map).expect_err(&name);
        let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert!(
            text.iter().any(|e| e.contains(&expect)),
            "{name}: want {expect:?}, got {text:#?}"
        );
    }
}

#[test]
fn oversized_inputs_are_refused_with_their_limit() {
    let thousands_of_tags: Vec<String> = (0..5000).map(|i| format!("t{i}")).collect();
    let yaml = format!(
        "targets:\n  - {{service: a, address: 127.0.0.1, ports: 1, tags: {thousands_of_tags:?}}}\n"
    );
    let errors = parse_targets(&yaml).unwrap_err();
    assert!(
        errors[0].to_string().contains("5000 tags; at most 64"),
        "{errors:?}"
    );
    let huge = BTreeMap::from([
        ("workersd.io/service".to_string(), "a".to_string()),
        ("workersd.io/tags".to_string(), "x,".repeat(10_000)),
    ]);
    assert!(
        parse_annotations(&huge).unwrap_err()[0]
            .to_string()
            .contains("at most 4096")
    );
}

fn arb_json() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        ".{0,12}".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    Just("Node".to_string()),
                    Just("Services".to_string()),
                    Just("ID".to_string()),
                    Just("Service".to_string()),
                    Just("Port".to_string()),
                    Just("Meta".to_string()),
                    Just("Tags".to_string()),
                    Just("metadata".to_string()),
                    Just("status".to_string()),
                    Just("spec".to_string()),
                    "[a-zA-Z]{1,8}"
                ],
                inner,
                0..6
            )
            .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Strings near the port-range syntax (digits, spaces, '-', '+') as well as arbitrary text.
fn port_text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[ 0-9+-]{0,12}",
        "(0|[1-9][0-9]{0,5})( ?- ?(0|[1-9][0-9]{0,5}))?",
        ".{0,24}",
    ]
}

/// README's syntax, written independently of the parser: a port 1-65535 in ASCII digits,
/// or two of them joined by '-', ascending, at most 256 ports; surrounding spaces allowed.
fn documented_range(text: &str) -> Option<(u16, u16)> {
    fn port(s: &str) -> Option<u16> {
        let s = s.trim();
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let digits = s.trim_start_matches('0');
        if digits.len() > 5 {
            return None;
        }
        let n: u32 = if digits.is_empty() {
            0
        } else {
            digits.parse().ok()?
        };
        (1..=65535).contains(&n).then_some(n as u16)
    }
    let text = text.trim();
    let (a, b) = match text.split_once('-') {
        None => (port(text)?, port(text)?),
        Some((a, b)) => (port(a)?, port(b)?),
    };
    (a <= b && u32::from(b) - u32::from(a) < 256).then_some((a, b))
}

fn label_text(valid: bool) -> BoxedStrategy<String> {
    if valid {
        "[a-z][a-z0-9]{0,6}".boxed()
    } else {
        prop_oneof!["[a-z][a-z0-9]{0,6}", ".{0,10}"].boxed()
    }
}

/// A WorkerMetrics spec in the CRD's shape; `valid` draws only values compile() accepts.
fn worker_metrics_spec(valid: bool) -> impl Strategy<Value = serde_json::Value> {
    let ports: BoxedStrategy<String> = if valid {
        (1u16..60000, 0u16..16)
            .prop_map(|(p, w)| {
                if w == 0 {
                    p.to_string()
                } else {
                    format!("{p}-{}", p + w)
                }
            })
            .boxed()
    } else {
        port_text().boxed()
    };
    let container_names: BoxedStrategy<String> = if valid {
        "[a-z]{1,6}".boxed()
    } else {
        prop_oneof!["[a-z]{1,6}", Just(String::new())].boxed()
    };
    let operator: BoxedStrategy<String> = if valid {
        Just("Exists".to_string()).boxed()
    } else {
        prop_oneof![Just("In"), Just("NotIn"), Just("Exists"), Just("Bogus")]
            .prop_map(String::from)
            .boxed()
    };
    // Each container's range in its own thousand, so valid specs never overlap.
    let containers = prop::collection::vec((container_names, ports), usize::from(valid)..4)
        .prop_map(move |v| {
            v.into_iter()
                .enumerate()
                .map(|(i, (name, ports))| {
                    let ports = if valid {
                        let (first, last) = ports.split_once('-').unwrap_or((&ports, &ports));
                        let (first, last): (u16, u16) =
                            (first.parse().unwrap(), last.parse().unwrap());
                        let start = 10_000 + 1000 * i as u16 + first % 500;
                        format!("{start}-{}", start + (last - first))
                    } else {
                        ports
                    };
                    serde_json::json!({"name": name, "ports": ports})
                })
                .collect::<Vec<_>>()
        });
    let selector = (
        prop::collection::btree_map(label_text(valid), label_text(valid), 0..3),
        prop::collection::vec((label_text(valid), operator), 0..2),
    )
        .prop_map(|(labels, exprs)| {
            let exprs: Vec<_> = exprs
                .into_iter()
                .map(|(key, operator)| serde_json::json!({"key": key, "operator": operator}))
                .collect();
            serde_json::json!({"matchLabels": labels, "matchExpressions": exprs})
        });
    let service = if valid {
        "[a-z][a-z0-9-]{0,10}[a-z]".boxed()
    } else {
        prop_oneof!["[a-z][a-z0-9-]{0,10}", ".{0,12}"].boxed()
    };
    let path = if valid {
        "/[a-z/]{0,10}".boxed()
    } else {
        prop_oneof!["/[a-z/]{0,10}", ".{0,10}"].boxed()
    };
    let scheme = if valid {
        prop_oneof![Just("http".to_string()), Just("https".to_string())].boxed()
    } else {
        prop_oneof![Just("http".to_string()), ".{0,5}"].boxed()
    };
    let interval = if valid {
        "[1-9][0-9]{0,2}s".boxed()
    } else {
        prop_oneof!["[0-9]{1,4}(ms|s|m|h)", ".{0,6}"].boxed()
    };
    let meta = prop::collection::btree_map(label_text(valid), label_text(valid), 0..3);
    let tags = prop::collection::vec(label_text(valid), 0..3);
    (
        selector,
        service,
        containers,
        prop::option::of(path),
        prop::option::of(scheme),
        prop::option::of(interval),
        meta,
        tags,
    )
        .prop_map(
            |(selector, service, containers, path, scheme, interval, meta, tags)| {
                let mut spec = serde_json::json!({
                    "selector": selector, "service": service, "containers": containers,
                    "meta": meta, "tags": tags,
                });
                for (key, value) in [
                    ("path", path),
                    ("scheme", scheme),
                    ("probeInterval", interval),
                ] {
                    if let Some(value) = value {
                        spec[key] = value.into();
                    }
                }
                spec
            },
        )
}

/// Fields that per-field rules alone make invalid; compile() must report each of them.
fn fields_known_bad(spec: &WorkerMetricsSpec) -> Vec<String> {
    let mut bad = Vec::new();
    if workersd::declaration::rules::service_name(&spec.service).is_err() {
        bad.push("spec.service".to_string());
    }
    if spec.containers.is_empty() {
        bad.push("spec.containers".to_string());
    }
    for (i, c) in spec.containers.iter().enumerate() {
        if c.name.is_empty() {
            bad.push(format!("spec.containers[{i}].name"));
        }
        if documented_range(&c.ports).is_none() {
            bad.push(format!("spec.containers[{i}].ports"));
        }
    }
    if spec
        .scheme
        .as_deref()
        .is_some_and(|s| s != "http" && s != "https")
    {
        bad.push("spec.scheme".to_string());
    }
    bad
}

/// The same ports, path and meta key written in each of the three ways; the errors of each
/// (none when valid).
fn declare_everywhere(
    ports: &str,
    path: &str,
    key: &str,
) -> (
    Vec<DeclarationError>,
    Vec<DeclarationError>,
    Vec<DeclarationError>,
) {
    let yaml = serde_norway::to_string(&serde_json::json!({"targets": [{
        "service": "web", "address": "127.0.0.1", "ports": ports, "path": path, "meta": {key: "v"},
    }]}))
    .unwrap();
    let file = parse_targets(&yaml).err().unwrap_or_default();
    let annotations = parse_annotations(&BTreeMap::from([
        ("workersd.io/service".to_string(), "web".to_string()),
        ("workersd.io/ports.web".to_string(), ports.to_string()),
        ("workersd.io/path".to_string(), path.to_string()),
        (format!("workersd.io/meta.{key}"), "v".to_string()),
    ]))
    .err()
    .unwrap_or_default();
    let spec: WorkerMetricsSpec = serde_json::from_value(serde_json::json!({
        "selector": {}, "service": "web", "containers": [{"name": "web", "ports": ports}],
        "path": path, "meta": {key: "v"},
    }))
    .unwrap();
    let resource = compile(&spec).err().unwrap_or_default();
    (file, annotations, resource)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn port_ranges_parse_exactly_the_documented_syntax(text in port_text()) {
        let parsed = text.parse::<PortRange>();
        prop_assert_eq!(
            parsed.as_ref().ok().map(|r| (r.start(), r.end())),
            documented_range(&text),
            "{:?} -> {:?}", text, parsed
        );
        match parsed {
            Ok(range) => prop_assert_eq!(range.to_string().parse::<PortRange>().unwrap(), range),
            // The message quotes what was wrong, so a user can find it in a long file.
            Err(e) => match &e {
                PortRangeError::Syntax(part) | PortRangeError::Port(part) => {
                    prop_assert!(e.to_string().contains(&format!("{part:?}")), "{e}");
                    prop_assert!(text.contains(part.as_str()), "{text:?}: {e}");
                }
                PortRangeError::Reversed(a, b) => prop_assert!(a > b),
                PortRangeError::TooWide { start, end, len } => {
                    prop_assert!(*len > 256 && u32::from(*end) - u32::from(*start) + 1 == *len)
                }
            },
        }
    }

    #[test]
    fn valid_ranges_round_trip(start in 1u16..=65535, width in 0u16..256) {
        let end = start.saturating_add(width);
        let range: PortRange = format!("{start}-{end}").parse().unwrap();
        prop_assert_eq!((range.start(), range.end()), (start, end));
        prop_assert_eq!(range.to_string().parse::<PortRange>().unwrap(), range);
    }

    #[test]
    fn targets_files_never_panic(text in "(targets:\n)?( *- ?\\{?[a-z]{0,8}: ?[a-z0-9.:\\-\\[\\], {}]{0,20}\\}?\n){0,6}") {
        let _ = parse_targets(&text);
    }

    #[test]
    fn arbitrary_yaml_structures_never_panic(value in arb_json()) {
        let yaml = serde_norway::to_string(&serde_json::json!({"targets": [value]})).unwrap();
        if let Err(errors) = parse_targets(&yaml) {
            prop_assert!(errors.iter().all(|e| !e.to_string().is_empty()));
        }
    }

    #[test]
    fn annotations_never_panic(
        pairs in prop::collection::btree_map(
            prop_oneof![
                Just("workersd.io/service".to_string()),
                Just("workersd.io/ports".to_string()),
                Just("workersd.io/path".to_string()),
                Just("workersd.io/scheme".to_string()),
                Just("workersd.io/tags".to_string()),
                "workersd\\.io/(ports|meta)\\.[a-z_ .-]{0,6}",
                "workersd\\.io/[a-z]{0,6}",
            ],
            ".{0,30}",
            0..8,
        )
    ) {
        if let Err(errors) = parse_annotations(&pairs) {
            prop_assert!(errors.iter().all(|e| e.field.as_str().starts_with("metadata.annotations[")));
        }
    }

    #[test]
    fn consul_replies_never_panic(value in arb_json(), raw in ".{0,64}") {
        let _ = decode_node_services(value.to_string().as_bytes(), &Default::default());
        let _ = decode_node_services(raw.as_bytes(), &Default::default());
    }

    #[test]
    fn kubernetes_objects_never_panic(value in arb_json()) {
        if let Ok(pod) = serde_json::from_value::<k8s_openapi::api::core::v1::Pod>(value) {
            let _ = pod_info(&pod);
        }
    }

    #[test]
    fn worker_metrics_compile_or_name_every_bad_field(value in worker_metrics_spec(false)) {
        // The generator builds the CRD's shape, so every case reaches compile().
        let spec: WorkerMetricsSpec = serde_json::from_value(value.clone())
            .map_err(|e| TestCaseError::fail(format!("{e}: {value}")))?;
        let expected = fields_known_bad(&spec);
        match compile(&spec) {
            Ok(compiled) => {
                prop_assert!(expected.is_empty(), "compiled although {expected:?} are bad");
                prop_assert_eq!(&compiled.spec.service, &spec.service);
                prop_assert_eq!(compiled.spec.ranges.len(), spec.containers.len());
                for (range, c) in compiled.spec.ranges.iter().zip(&spec.containers) {
                    prop_assert_eq!(range.container.as_deref(), Some(c.name.as_str()));
                    prop_assert_eq!(range.ports, c.ports.parse::<PortRange>().unwrap());
                }
                let path = spec.path.as_deref().unwrap_or("/metrics");
                prop_assert_eq!(compiled.spec.path.as_str(), path);
            }
            Err(errors) => {
                prop_assert!(!errors.is_empty());
                for e in &errors {
                    prop_assert!(e.field.as_str().starts_with("spec.") && !e.kind.to_string().is_empty(), "{e}");
                }
                for field in &expected {
                    prop_assert!(errors.iter().any(|e| e.field.as_str() == field), "{field} not reported: {errors:?}");
                }
            }
        }
    }

    #[test]
    fn valid_worker_metrics_always_compile(value in worker_metrics_spec(true)) {
        let spec: WorkerMetricsSpec = serde_json::from_value(value.clone())
            .map_err(|e| TestCaseError::fail(format!("{e}: {value}")))?;
        let compiled = compile(&spec);
        prop_assert!(compiled.is_ok(), "{value}: {compiled:?}");
    }

    /// The targets file, annotations and a WorkerMetrics go through one validator: the same
    /// value is accepted by all three or refused by all three with the same error, each at
    /// its own field.
    #[test]
    fn the_three_sources_judge_a_value_alike(
        ports in port_text(),
        path in prop_oneof!["/[a-z/ ]{0,8}", ".{0,8}"],
        key in prop_oneof!["[a-z_-]{0,10}", Just("workersd-owner".to_string()), ".{0,6}"],
    ) {
        let (file, annotations, resource) = declare_everywhere(&ports, &path, &key);
        let fields = [
            ["targets[0].ports", "targets[0].path", "targets[0].meta"],
            [
                "metadata.annotations[workersd.io/ports.web]",
                "metadata.annotations[workersd.io/path]",
                &format!("metadata.annotations[workersd.io/meta.{key}]"),
            ],
            ["spec.containers[0].ports", "spec.path", "spec.meta"],
        ];
        let kinds = |errors: &[DeclarationError], fields: &[&str; 3]| -> Vec<Vec<String>> {
            fields
                .iter()
                .map(|field| {
                    errors
                        .iter()
                        .filter(|e| e.field.as_str() == *field)
                        .map(|e| format!("{:?}", e.kind))
                        .collect()
                })
                .collect()
        };
        let file = kinds(&file, &fields[0]);
        prop_assert_eq!(file[0].is_empty(), documented_range(&ports).is_some(), "{:?}", file);
        prop_assert_eq!(&file, &kinds(&annotations, &fields[1]), "file vs annotations");
        prop_assert_eq!(&file, &kinds(&resource, &fields[2]), "file vs WorkerMetrics");
    }

    #[test]
    fn response_heads_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = classify_head(&bytes);
    }
}
