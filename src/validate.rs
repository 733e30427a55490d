//! Field rules shared by every source, following Consul's catalog limits so that nothing we
//! accept is later refused by Consul (which would block a whole transaction).

use crate::model::meta_keys;
use std::collections::BTreeMap;

/// Consul: at most 64 meta pairs per instance. We keep room for our own reserved keys and for
/// source meta (Kubernetes namespace, pod, container, node).
pub const MAX_USER_META: usize = 64 - meta_keys::RESERVED.len() - 4;
pub const MAX_META_KEY_LEN: usize = 128;
pub const MAX_META_VALUE_LEN: usize = 512;
pub const MAX_TAGS: usize = 64;
pub const MAX_TAG_LEN: usize = 255;
/// The path is published as the `metrics-path` meta value: Consul's value limit applies.
pub const MAX_PATH_LEN: usize = MAX_META_VALUE_LEN;
pub const MAX_SERVICE_NAME_LEN: usize = 63;

/// A DNS label: Consul warns on anything else and DNS interfaces can't resolve it.
pub fn service_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    if name.len() > MAX_SERVICE_NAME_LEN {
        return Err(format!(
            "{} characters; at most {MAX_SERVICE_NAME_LEN} allowed",
            name.len()
        ));
    }
    let valid_chars = name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if !valid_chars || name.starts_with('-') || name.ends_with('-') {
        return Err(format!(
            "{name:?} is not a DNS-compatible name (letters, digits and '-', not starting or ending with '-')"
        ));
    }
    Ok(())
}

/// Owner ids go into service IDs and meta values.
pub fn owner_id(owner: &str) -> Result<(), String> {
    let ok = !owner.is_empty()
        && owner.len() <= 128
        && owner
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{owner:?} must be 1-128 characters of letters, digits, '-', '_' or '.'"
        ))
    }
}

pub fn meta_key(key: &str) -> Result<(), String> {
    if key.is_empty() || key.len() > MAX_META_KEY_LEN {
        return Err(format!(
            "key {key:?} must be 1-{MAX_META_KEY_LEN} characters"
        ));
    }
    if !key
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(format!(
            "key {key:?} may only contain letters, digits, '_' and '-' (Consul rule)"
        ));
    }
    if key.starts_with("consul-") {
        return Err(format!(
            "key {key:?} uses the prefix \"consul-\", which Consul reserves"
        ));
    }
    if meta_keys::RESERVED.contains(&key) {
        return Err(format!("key {key:?} is reserved for workersd"));
    }
    Ok(())
}

pub fn meta_value(key: &str, value: &str) -> Result<(), String> {
    if value.len() > MAX_META_VALUE_LEN {
        return Err(format!(
            "value of {key:?} is {} bytes; at most {MAX_META_VALUE_LEN} allowed (Consul rule)",
            value.len()
        ));
    }
    Ok(())
}

pub fn meta(meta: &BTreeMap<String, String>) -> Result<(), String> {
    if meta.len() > MAX_USER_META {
        return Err(format!(
            "{} pairs; at most {MAX_USER_META} allowed",
            meta.len()
        ));
    }
    for (key, value) in meta {
        meta_key(key)?;
        meta_value(key, value)?;
    }
    Ok(())
}

pub fn tags(tags: &[String]) -> Result<(), String> {
    if tags.len() > MAX_TAGS {
        return Err(format!("{} tags; at most {MAX_TAGS} allowed", tags.len()));
    }
    for tag in tags {
        if tag.is_empty() || tag.len() > MAX_TAG_LEN {
            return Err(format!("tag {tag:?} must be 1-{MAX_TAG_LEN} characters"));
        }
        if tag.chars().any(|c| c.is_control() || c == ',') {
            return Err(format!(
                "tag {tag:?} must not contain ',' or control characters"
            ));
        }
    }
    Ok(())
}

pub fn metrics_path(path: &str) -> Result<(), String> {
    if !path.starts_with('/') {
        return Err(format!("{path:?} must start with '/'"));
    }
    if path.len() > MAX_PATH_LEN {
        return Err(format!(
            "{} bytes; at most {MAX_PATH_LEN} allowed (published as Consul meta, whose values Consul limits to {MAX_META_VALUE_LEN})",
            path.len()
        ));
    }
    if path.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "{path:?} must not contain whitespace or control characters"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_names_follow_dns_labels() {
        assert!(service_name("clever").is_ok());
        assert!(service_name("web-2").is_ok());
        for bad in [
            "",
            "-web",
            "web-",
            "web_app",
            "web.app",
            "wéb",
            &"a".repeat(64),
        ] {
            assert!(service_name(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn meta_keys_follow_consul_rules_and_reserve_ours() {
        assert!(meta_key("team").is_ok());
        assert!(meta_key("team_2-x").is_ok());
        for bad in [
            "",
            "consul-x",
            "a.b",
            "a b",
            "workersd-owner",
            "metrics-path",
            &"k".repeat(129),
        ] {
            assert!(meta_key(bad).is_err(), "{bad:?} accepted");
        }
        assert!(meta_value("k", &"v".repeat(513)).is_err());
    }

    #[test]
    fn tags_and_paths() {
        assert!(tags(&["gunicorn".into()]).is_ok());
        assert!(tags(&["".into()]).is_err());
        assert!(tags(&["a,b".into()]).is_err());
        assert!(tags(&vec!["t".to_string(); 65]).is_err());
        assert!(metrics_path("/metrics").is_ok());
        assert!(metrics_path("metrics").is_err());
        assert!(metrics_path("/a b").is_err());
        // Consul refuses a meta value over 512 bytes, and with it the whole transaction.
        assert!(metrics_path(&format!("/{}", "m".repeat(511))).is_ok());
        let too_long = metrics_path(&format!("/{}", "m".repeat(512))).unwrap_err();
        assert!(too_long.contains("at most 512"), "{too_long}");
    }

    #[test]
    fn owner_ids() {
        assert!(owner_id("prod-eu.1").is_ok());
        assert!(owner_id("").is_err());
        assert!(owner_id("a:b").is_err());
    }
}
