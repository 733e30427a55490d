use super::*;
use crate::fixtures::CapturedLogs;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

/// A JSON value parsed so that a repeated key at any depth is an error (serde_json alone
/// keeps the last one silently, as most collectors do).
struct Strict(Value);

impl<'de> de::Deserialize<'de> for Strict {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(StrictVisitor).map(Strict)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("JSON")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(v.into())
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(v.into())
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(v.into())
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(v.into())
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(v.into())
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(Strict(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut object = Map::new();
        while let Some((key, Strict(value))) = map.next_entry::<String, Strict>()? {
            if object.insert(key.clone(), value).is_some() {
                return Err(de::Error::custom(format!("duplicate key {key:?}")));
            }
        }
        Ok(Value::Object(object))
    }
}

fn parse(line: &str) -> Value {
    match serde_json::from_str::<Strict>(line) {
        Ok(Strict(value)) => value,
        Err(e) => panic!("not JSON with unique keys ({e}): {line}"),
    }
}

/// Runs `emit` under a JSON subscriber; returns every line, parsed strictly.
fn json_lines(emit: impl FnOnce()) -> Vec<Value> {
    let captured = CapturedLogs::default();
    let subscriber =
        tracing_subscriber::registry().with(layer(LogFormat::Json, captured.clone(), false));
    tracing::subscriber::with_default(subscriber, emit);
    captured.lines().iter().map(|l| parse(l)).collect()
}

#[test]
fn the_strict_parser_rejects_a_repeated_key() {
    assert!(serde_json::from_str::<Strict>(r#"{"a": {"b": 1, "c": 2}}"#).is_ok());
    assert!(serde_json::from_str::<Strict>(r#"{"a": 1, "a": 2}"#).is_err());
    assert!(serde_json::from_str::<Strict>(r#"[{"a": {"b": 1, "b": 1}}]"#).is_err());
}

/// Whatever an event or span calls its fields, no key repeats, and neither tracing's own
/// metadata nor the event's fields are lost.
#[test]
fn json_lines_keep_every_key_once_whatever_the_field_names() {
    let lines = json_lines(|| {
        let outer = tracing::info_span!("lease", name = "workersd", level = 3, message = "m");
        let _outer = outer.enter();
        let inner = tracing::info_span!("renewal", fields = "f", span = "s", spans = 2);
        let _inner = inner.enter();
        tracing::warn!(
            target = "web/1",
            level = "custom",
            timestamp = 5,
            fields = "f",
            span = "s",
            spans = true,
            "lease renewal failed"
        );
    });
    assert_eq!(lines.len(), 1, "{lines:?}");
    let line = &lines[0];
    assert_eq!(line["level"], "WARN");
    assert_eq!(line["target"], "workersd::telemetry::tests");
    assert_eq!(line["message"], "lease renewal failed");
    assert!(line["timestamp"].is_string(), "{line}");
    let fields = &line["fields"];
    assert_eq!(fields["target"], "web/1");
    assert_eq!(fields["level"], "custom");
    assert_eq!(fields["timestamp"], 5);
    assert_eq!(fields["spans"], true);
    // The current span, with its fields, and every span it is in, outermost first.
    assert_eq!(line["span"]["name"], "renewal");
    assert_eq!(line["span"]["fields"]["fields"], "f");
    assert_eq!(line["spans"][0]["name"], "lease");
    assert_eq!(line["spans"][0]["fields"]["name"], "workersd");
    assert_eq!(line["spans"][0]["fields"]["message"], "m");
    assert_eq!(line["spans"][1]["name"], "renewal");
}

/// A field recorded on a span after it was created shows on later events.
#[test]
fn json_lines_carry_fields_recorded_later() {
    let lines = json_lines(|| {
        let span = tracing::info_span!(
            "watch",
            kind = "Pod",
            resource_version = tracing::field::Empty
        );
        let _entered = span.enter();
        tracing::info!("before");
        span.record("resource_version", "42");
        tracing::info!(count = 2u64, "after");
    });
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(lines[0]["span"]["fields"].get("resource_version").is_none());
    assert_eq!(lines[1]["span"]["fields"]["resource_version"], "42");
    assert_eq!(lines[1]["span"]["fields"]["kind"], "Pod");
    assert_eq!(lines[1]["fields"]["count"], 2);
}

/// Outside any span there is no span key, and an event without fields has no `fields`.
#[test]
fn json_lines_outside_spans_are_plain() {
    let lines = json_lines(|| tracing::error!("fatal"));
    let line = lines[0].as_object().unwrap();
    let mut keys: Vec<_> = line.keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(keys, ["level", "message", "target", "timestamp"]);
}
