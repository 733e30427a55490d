//! Consul's replies as the sink reads them: the node-services reply decoded entry by entry
//! (strictly for our own entries, leniently for anyone else's) and the txn replies.

use super::error::ConsulError;
use crate::model::{Catalog, EXTERNAL_SOURCE, ServiceInstance, meta_keys};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::sync::Arc;

/// The node and everything registered under it, as Consul reports it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NodeRead {
    pub node_meta: Option<BTreeMap<String, String>>,
    pub services: Catalog,
    /// `X-Consul-Index` of the reply (0 when absent): where a change watch starts.
    pub index: u64,
    /// Each entry's `ModifyIndex`, read or learnt from our txn results: owned entries are
    /// deleted with `delete-cas` at it, so one re-registered by someone else since is kept.
    pub modify_index: ModifyIndexes,
}

/// `ModifyIndex` by service ID.
pub type ModifyIndexes = std::collections::HashMap<Arc<str>, u64>;

/// Decodes a node-services reply entry by entry into a catalog as it is read: a
/// resync re-reads every entry, and entries equal to the desired
/// ones are shared, never materialised or collected in between.
/// The second field is our owner id: only entries carrying it must decode strictly.
struct NodeServicesSeed<'c>(&'c Catalog, &'c str, &'c mut ModifyIndexes);

impl<'de> serde::de::DeserializeSeed<'de> for NodeServicesSeed<'_> {
    type Value = (Option<NodeReply>, Catalog);
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> serde::de::Visitor<'de> for NodeServicesSeed<'_> {
    type Value = (Option<NodeReply>, Catalog);
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a node-services object")
    }
    fn visit_map<M: serde::de::MapAccess<'de>>(self, mut map: M) -> Result<Self::Value, M::Error> {
        let (mut node, mut services) = (None, Catalog::new());
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                "Node" => node = map.next_value()?,
                "Services" => {
                    services = map.next_value_seed(ServicesSeed(self.0, self.1, self.2))?
                }
                _ => {
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
            }
        }
        Ok((node, services))
    }
}

/// The `Services` array (or null) of a node-services reply; the second field is our owner.
struct ServicesSeed<'c>(&'c Catalog, &'c str, &'c mut ModifyIndexes);

impl<'de> serde::de::DeserializeSeed<'de> for ServicesSeed<'_> {
    type Value = Catalog;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_option(self)
    }
}

impl<'de> serde::de::Visitor<'de> for ServicesSeed<'_> {
    type Value = Catalog;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an array of services or null")
    }
    fn visit_none<E>(self) -> Result<Catalog, E> {
        Ok(Catalog::new())
    }
    fn visit_unit<E>(self) -> Result<Catalog, E> {
        Ok(Catalog::new())
    }
    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Catalog, D::Error> {
        d.deserialize_seq(self)
    }
    fn visit_seq<S: serde::de::SeqAccess<'de>>(self, mut seq: S) -> Result<Catalog, S::Error> {
        let mut services = Catalog::new();
        while let Some(mut s) = seq.next_element::<ServiceReply>()? {
            s.check_port(self.1).map_err(serde::de::Error::custom)?;
            let modify_index = s.modify_index;
            let (id, instance) = match self.0.get(s.id.as_str()) {
                // Shares the desired instance instead of a decoded copy.
                Some(want) if s.is(want) => (want.id.clone(), want.clone()),
                _ => {
                    let instance = s.into_instance();
                    (instance.id.clone(), Arc::new(instance))
                }
            };
            self.2.insert(id.clone(), modify_index);
            services.insert(id, instance);
        }
        Ok(services)
    }
}

#[derive(Deserialize)]
struct NodeReply {
    #[serde(rename = "Meta", alias = "NodeMeta", default)]
    meta: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize)]
struct ServiceReply {
    #[serde(rename = "ID")]
    id: String,
    #[serde(rename = "Service")]
    service: String,
    #[serde(rename = "Address", default)]
    address: Option<String>,
    /// Absent when 0 (`json:",omitempty"` in agent/structs NodeService).
    #[serde(rename = "Port", default)]
    port: Port,
    #[serde(rename = "Tags", default)]
    tags: Option<Vec<String>>,
    #[serde(rename = "Meta", default)]
    meta: Option<Pairs>,
    #[serde(rename = "ModifyIndex", default)]
    modify_index: u64,
}

/// A service's `Port` as Consul may hold it: any JSON value is accepted, so that one foreign
/// entry with an odd port cannot make the whole reply undecodable.
#[derive(Debug, PartialEq)]
enum Port {
    Valid(u16),
    /// What was there instead, for the error message.
    Odd(String),
}

impl Default for Port {
    fn default() -> Self {
        Port::Valid(0)
    }
}

impl Port {
    fn get(&self) -> u16 {
        match self {
            Port::Valid(port) => *port,
            Port::Odd(_) => 0,
        }
    }
}

impl<'de> Deserialize<'de> for Port {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Port;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a port")
            }
            fn visit_u64<E>(self, v: u64) -> Result<Port, E> {
                Ok(u16::try_from(v).map_or_else(|_| Port::Odd(v.to_string()), Port::Valid))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Port, E> {
                Ok(u16::try_from(v).map_or_else(|_| Port::Odd(v.to_string()), Port::Valid))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Port, E> {
                Ok(Port::Odd(v.to_string()))
            }
            fn visit_str<E>(self, v: &str) -> Result<Port, E> {
                Ok(Port::Odd(format!("{v:?}")))
            }
            fn visit_bool<E>(self, v: bool) -> Result<Port, E> {
                Ok(Port::Odd(v.to_string()))
            }
            fn visit_unit<E>(self) -> Result<Port, E> {
                Ok(Port::Valid(0))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Port, A::Error> {
                while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(Port::Odd("an array".into()))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Port, A::Error> {
                while map
                    .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
                    .is_some()
                {}
                Ok(Port::Odd("an object".into()))
            }
        }
        deserializer.deserialize_any(Visit)
    }
}

/// A JSON object of strings as its pairs, in one allocation (a map costs a node per key, per
/// entry read).
#[derive(Debug, Default)]
struct Pairs(Vec<(String, String)>);

impl<'de> Deserialize<'de> for Pairs {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Pairs;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object of strings")
            }
            fn visit_map<M: serde::de::MapAccess<'de>>(
                self,
                mut map: M,
            ) -> Result<Self::Value, M::Error> {
                let mut pairs = Vec::with_capacity(map.size_hint().unwrap_or(0).min(64));
                while let Some(pair) = map.next_entry()? {
                    pairs.push(pair);
                }
                Ok(Pairs(pairs))
            }
        }
        deserializer.deserialize_map(Visit)
    }
}

impl Pairs {
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

impl ServiceReply {
    /// Consul stores any int as a port (agent/structs NodeService.Port is an `int`, never
    /// range-checked), so someone else's entry may hold -1 or 70000. It is never ours to
    /// touch; only its ID matters (conflicts), and its port reads as 0. Our own must be exact.
    fn check_port(&mut self, owner: &str) -> Result<(), String> {
        if let Port::Odd(odd) = &self.port {
            if self.is_owned_by(owner) {
                return Err(format!(
                    "service {:?}, which workersd owns, has Port {odd}, not a port number",
                    self.id
                ));
            }
            self.port = Port::Valid(0);
        }
        Ok(())
    }

    /// Our marker and our owner id, as [`reconcile::is_owned_by`] decides it.
    fn is_owned_by(&self, owner: &str) -> bool {
        let meta = self.meta.as_ref();
        let get = |key| meta.and_then(|m| m.get(key));
        get(meta_keys::EXTERNAL_SOURCE) == Some(EXTERNAL_SOURCE)
            && get(meta_keys::OWNER) == Some(owner)
    }

    /// Whether this entry is exactly `want` as workersd publishes it.
    fn is(&self, want: &ServiceInstance) -> bool {
        let tags = self.tags.as_deref().unwrap_or_default();
        let empty = Pairs::default();
        let meta = self.meta.as_ref().unwrap_or(&empty);
        self.service == want.service
            && self.address.as_deref().unwrap_or_default() == want.address
            && self.port == Port::Valid(want.port)
            && tags == want.tags.as_slice()
            // Keys are unique in Consul's replies; a duplicate makes the lengths differ.
            && meta.0.len() == want.meta.len() + 1
            && meta.get(meta_keys::WORKER_PORT) == Some(want.port.to_string().as_str())
            && want
                .meta
                .iter()
                .all(|(k, v)| meta.get(k) == Some(v.as_str()))
    }

    fn into_instance(self) -> ServiceInstance {
        let mut meta: BTreeMap<String, String> =
            self.meta.unwrap_or_default().0.into_iter().collect();
        // Stored without `worker-port` when it is the port (see ServiceInstance::meta); a
        // missing or wrong one is kept visible so the entry differs and gets rewritten.
        let port = self.port.get();
        match meta.get(meta_keys::WORKER_PORT) {
            Some(v) if *v == port.to_string() => {
                meta.remove(meta_keys::WORKER_PORT);
            }
            Some(_) => {}
            None => {
                meta.insert(meta_keys::WORKER_PORT.into(), String::new());
            }
        }
        ServiceInstance {
            id: self.id.into(),
            service: self.service,
            address: self.address.unwrap_or_default(),
            port,
            tags: self.tags.unwrap_or_default(),
            meta: Arc::new(meta),
        }
    }
}

/// A `/v1/agent/services` reply: the local agent's services by ID (agent/agent_endpoint.go
/// `AgentServices`, an object of `api.AgentService`), foreign ones included, as a catalog.
pub fn decode_agent_services(body: &[u8], owner: &str) -> Result<Catalog, ConsulError> {
    let decode_error = |e: String| ConsulError::Decode {
        what: "agent services",
        source: e.into(),
    };
    let reply: BTreeMap<String, Option<ServiceReply>> =
        serde_json::from_slice(body).map_err(|e| decode_error(e.to_string()))?;
    let mut services = Catalog::new();
    for mut s in reply.into_values().flatten() {
        s.check_port(owner).map_err(decode_error)?;
        let instance = s.into_instance();
        services.insert(instance.id.clone(), Arc::new(instance));
    }
    Ok(services)
}

/// The ModifyIndex of each service a committed txn wrote, by ID, from its reply; an
/// undecodable reply yields none (deletes then learn the index from a re-read).
pub(super) fn txn_written(body: &str) -> BTreeMap<String, u64> {
    serde_json::from_str::<TxnReply>(body)
        .ok()
        .and_then(|r| r.results)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|r| r.service)
        .map(|s| (s.id, s.modify_index))
        .collect()
}

/// Consul's per-op errors of a refused txn (`OpIndex`, `What`); none when the reply has none.
pub(super) fn txn_errors(body: &str) -> Vec<(usize, String)> {
    serde_json::from_str::<TxnErrors>(body)
        .ok()
        .and_then(|e| e.errors)
        .unwrap_or_default()
        .into_iter()
        .map(|e| (e.op_index, e.what))
        .collect()
}

/// A committed txn's reply: only what the sink keeps of it.
#[derive(Deserialize)]
struct TxnReply {
    #[serde(rename = "Results", default)]
    results: Option<Vec<TxnResultReply>>,
}

#[derive(Deserialize)]
struct TxnResultReply {
    #[serde(rename = "Service", default)]
    service: Option<ServiceIndexReply>,
}

#[derive(Deserialize)]
struct ServiceIndexReply {
    #[serde(rename = "ID")]
    id: String,
    #[serde(rename = "ModifyIndex", default)]
    modify_index: u64,
}

#[derive(Deserialize)]
struct TxnErrors {
    #[serde(rename = "Errors", default)]
    errors: Option<Vec<TxnError>>,
}

#[derive(Deserialize)]
struct TxnError {
    #[serde(rename = "OpIndex", default)]
    op_index: usize,
    #[serde(rename = "What", default)]
    what: String,
}

/// Decodes a `/v1/catalog/node-services/:node` reply. Real Consul answers `{"Node": null}` for
/// an unknown node; `null` lists are empty lists. No entry is taken for ours, so an odd port
/// is tolerated on every one (see [`decode_owned_node_services`]).
pub fn decode_node_services(
    body: impl std::io::Read,
    desired: &Catalog,
) -> Result<NodeRead, ConsulError> {
    decode_owned_node_services(body, desired, "")
}

/// As [`decode_node_services`], for the workersd instance `owner`: entries of anyone else are
/// decoded leniently (a port Consul holds but no port number is read as 0; they are never
/// written), entries of `owner` strictly.
pub fn decode_owned_node_services(
    body: impl std::io::Read,
    desired: &Catalog,
    owner: &str,
) -> Result<NodeRead, ConsulError> {
    use serde::de::DeserializeSeed;
    let mut decoder = serde_json::Deserializer::from_reader(body);
    let mut modify_index = ModifyIndexes::new();
    let (node, services) = NodeServicesSeed(desired, owner, &mut modify_index)
        .deserialize(&mut decoder)
        .and_then(|reply| decoder.end().map(|()| reply))
        .map_err(|e| ConsulError::Decode {
            what: "node-services",
            source: e.into(),
        })?;
    let Some(node) = node else {
        return Ok(NodeRead::default());
    };
    Ok(NodeRead {
        node_meta: Some(node.meta.unwrap_or_default()),
        services,
        index: 0,
        modify_index,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_port_meta_is_stored_as_the_port_and_drift_stays_visible() {
        let body = |meta: &str| {
            format!(
                r#"{{"Node":{{"Node":"n","Meta":{{}}}},"Services":[{{"ID":"a","Service":"s","Port":9011,"Address":"x","Meta":{meta}}}]}}"#
            )
        };
        let decoded = |meta: &str| {
            decode_node_services(body(meta).as_bytes(), &Catalog::new())
                .unwrap()
                .services["a"]
                .clone()
        };
        let right = decoded(r#"{"worker-port":"9011","team":"web"}"#);
        assert_eq!(*right.meta, BTreeMap::from([("team".into(), "web".into())]));
        assert_eq!(right.published_meta()["worker-port"], "9011");
        // A wrong or missing worker-port must not compare equal to what workersd wants.
        let wanted = ServiceInstance {
            meta: Arc::new(BTreeMap::from([("team".into(), "web".into())])),
            ..(*right).clone()
        };
        assert_eq!(*right, wanted);
        assert_ne!(*decoded(r#"{"worker-port":"9999","team":"web"}"#), wanted);
        assert_ne!(*decoded(r#"{"team":"web"}"#), wanted);
    }

    #[test]
    fn a_reread_entry_equal_to_the_desired_one_is_shared_not_copied() {
        // Go escapes <, > and & in JSON: such strings still compare equal.
        let want = Arc::new(ServiceInstance {
            id: "o:s:x:9011".into(),
            service: "s".into(),
            address: "x".into(),
            port: 9011,
            tags: vec!["a<b".into()],
            meta: Arc::new(BTreeMap::from([("team".into(), "r&d".into())])),
        });
        let desired = Catalog::from([(want.id.clone(), want.clone())]);
        let body = r#"{"Node":{"Node":"n","Meta":{}},"Services":[
            {"ID":"o:s:x:9011","Service":"s","Port":9011,"Address":"x","Tags":["a\u003cb"],"Meta":{"team":"r\u0026d","worker-port":"9011"}},
            {"ID":"other","Service":"s","Port":1,"Address":"x","Tags":null,"Meta":null}]}"#;
        let read = decode_node_services(body.as_bytes(), &desired).unwrap();
        assert!(Arc::ptr_eq(&read.services["o:s:x:9011"], &want));
        assert_eq!(read.services["other"].port, 1);
        // Any difference (here the tag) gives a decoded copy that compares unequal.
        let changed = body.replace("a\\u003cb", "c");
        let read = decode_node_services(changed.as_bytes(), &desired).unwrap();
        assert!(!Arc::ptr_eq(&read.services["o:s:x:9011"], &want));
        assert_ne!(read.services["o:s:x:9011"], want);
        assert_eq!(read.services["o:s:x:9011"].tags, vec!["c".to_string()]);
    }
    #[test]
    fn an_odd_port_is_tolerated_on_foreign_entries_only() {
        let entry = |id: &str, port: &str, owner: &str| {
            format!(
                r#"{{"ID":"{id}","Service":"s","Address":"x","Port":{port},"Meta":{{"external-source":"workersd","workersd-owner":"{owner}"}}}}"#
            )
        };
        let reply = |entries: &[String]| {
            format!(
                r#"{{"Node":{{"Node":"n","Meta":{{}}}},"Services":[{}]}}"#,
                entries.join(",")
            )
        };
        let foreign = reply(&[
            entry("a", "-1", "other"),
            entry("b", "70000", "other"),
            entry("c", r#""9000""#, "other"),
            entry("d", "1.5", "other"),
            entry("e", "[1]", "other"),
            entry("mine", "9011", "me"),
        ]);
        let read = decode_owned_node_services(foreign.as_bytes(), &Catalog::new(), "me").unwrap();
        assert_eq!(read.services.len(), 6);
        assert_eq!(read.services["a"].port, 0);
        assert_eq!(read.services["mine"].port, 9011);
        // Ours must be exact: an odd port on our own entry names the entry and the field.
        let ours = reply(&[entry("mine", "70000", "me")]);
        let err = decode_owned_node_services(ours.as_bytes(), &Catalog::new(), "me").unwrap_err();
        assert!(err.to_string().contains(r#"service "mine""#), "{err}");
        assert!(err.to_string().contains("Port 70000"), "{err}");
        // A missing port is 0 (Consul omits a zero port).
        let missing = r#"{"Node":{"Node":"n"},"Services":[{"ID":"z","Service":"s"}]}"#;
        let read = decode_node_services(missing.as_bytes(), &Catalog::new()).unwrap();
        assert_eq!(read.services["z"].port, 0);
    }
    #[test]
    fn decodes_node_services_with_nulls() {
        let none = Catalog::new();
        let read = decode_node_services(
            r#"{"Node":{"Node":"n","Meta":null},"Services":[{"ID":"a","Service":"s","Tags":null,"Meta":null,"Port":1,"Address":"x","Weights":{"Passing":1}}]}"#
                .as_bytes(),
            &none,
        )
        .unwrap();
        assert_eq!(read.node_meta, Some(BTreeMap::new()));
        assert!(read.services["a"].tags.is_empty());
        // Services may come first, be null, or be missing; a missing node is an empty read.
        let read =
            decode_node_services(r#"{"Services":null,"Node":{"Node":"n"}}"#.as_bytes(), &none)
                .unwrap();
        assert!(read.node_meta.is_some() && read.services.is_empty());
        let read =
            decode_node_services(r#"{"Node":null,"Services":[]}"#.as_bytes(), &none).unwrap();
        assert_eq!(read, NodeRead::default());
        for bad in [
            "null",
            "[]",
            r#"{"Node":{},"Services":{}}"#,
            r#"{"Node":{}} x"#,
        ] {
            assert!(
                decode_node_services(bad.as_bytes(), &none).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn agent_services_decode_ours_like_the_catalog_and_keep_foreign_ones() {
        let body = br#"{
            "a": {"ID": "a", "Service": "s", "Address": "10.0.0.1", "Port": 9011, "Tags": ["t"],
                  "Meta": {"external-source": "workersd", "workersd-owner": "me", "worker-port": "9011"},
                  "Weights": {"Passing": 1, "Warning": 1}, "Datacenter": "dc1"},
            "nomad-x": {"ID": "nomad-x", "Service": "api", "Port": -1, "Meta": null, "Tags": null}
        }"#;
        let services = decode_agent_services(body, "me").unwrap();
        let a = &services["a"];
        assert_eq!(
            (a.port, a.address.as_str(), a.tags.as_slice()),
            (9011, "10.0.0.1", &["t".to_string()][..])
        );
        assert!(
            !a.meta.contains_key("worker-port"),
            "stored as the port, like a catalog read"
        );
        assert_eq!(services["nomad-x"].port, 0);
        // Ours with a port that is none is an error, not an entry to overwrite blindly.
        let ours_odd = br#"{"a": {"ID": "a", "Service": "s", "Port": 70000,
            "Meta": {"external-source": "workersd", "workersd-owner": "me"}}}"#;
        assert!(decode_agent_services(ours_odd, "me").is_err());
        assert!(decode_agent_services(b"[]", "me").is_err());
    }
}
