//! Bad input never panics and always gets a clear error naming the field.
//!
//! Property tests throw arbitrary input at every parser and decoder (cargo-fuzz needs a nightly
//! toolchain this project does not use); `tests/corpus/` holds malformed inputs kept as
//! regressions, each with the error it must produce (`*.expect`).

use proptest::prelude::*;
use std::collections::BTreeMap;
use std::path::Path;
use workersd::model::PortRange;
use workersd::probe::classify_head;
use workersd::sinks::consul::decode_node_services;
use workersd::sources::file::parse_targets;
use workersd::sources::kubernetes::crd::{WorkerMetricsSpec, compile};
use workersd::sources::kubernetes::spec::parse_annotations;
use workersd::sources::kubernetes::watch::pod_info;

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

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn port_ranges_parse_or_explain(text in ".{0,24}") {
        if let Err(e) = text.parse::<PortRange>() {
            prop_assert!(!e.to_string().is_empty());
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
            prop_assert!(errors.iter().all(|e| !e.message.is_empty()));
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
            prop_assert!(errors.iter().all(|e| e.field.starts_with("metadata.annotations[")));
        }
    }

    #[test]
    fn consul_replies_never_panic(value in arb_json(), raw in ".{0,64}") {
        let _ = decode_node_services(value.to_string().as_bytes(), &Default::default());
        let _ = decode_node_services(raw.as_bytes(), &Default::default());
    }

    #[test]
    fn kubernetes_objects_never_panic(value in arb_json()) {
        if let Ok(pod) = serde_json::from_value::<k8s_openapi::api::core::v1::Pod>(value.clone()) {
            let _ = pod_info(&pod);
        }
        if let Ok(spec) = serde_json::from_value::<WorkerMetricsSpec>(value) {
            let _ = compile(&spec);
        }
    }

    #[test]
    fn response_heads_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = classify_head(&bytes);
    }
}
