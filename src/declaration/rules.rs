//! Field rules, following Consul's catalog limits so that nothing accepted is later refused by
//! Consul (which would block a whole transaction).

use crate::model::meta_keys;

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
pub const MAX_OWNER_ID_LEN: usize = 128;

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ServiceNameError {
    #[error("must not be empty")]
    Empty,
    #[error("{0} characters; at most {MAX_SERVICE_NAME_LEN} allowed")]
    TooLong(usize),
    #[error(
        "{0:?} is not a DNS-compatible name (letters, digits and '-', not starting or ending with '-')"
    )]
    NotDnsLabel(String),
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} must be 1-{MAX_OWNER_ID_LEN} characters of letters, digits, '-', '_' or '.'")]
pub struct OwnerIdError(pub String);

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MetaError {
    #[error("{0} pairs; at most {MAX_USER_META} allowed")]
    TooMany(usize),
    #[error("key {0:?} must be 1-{MAX_META_KEY_LEN} characters")]
    KeyLength(String),
    #[error("key {0:?} may only contain letters, digits, '_' and '-' (Consul rule)")]
    KeyCharacters(String),
    #[error("key {0:?} uses the prefix \"consul-\", which Consul reserves")]
    ConsulPrefix(String),
    #[error("key {0:?} is reserved for workersd")]
    Reserved(String),
    #[error(
        "value of {key:?} is {bytes} bytes; at most {MAX_META_VALUE_LEN} allowed (Consul rule)"
    )]
    ValueTooLong { key: String, bytes: usize },
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TagsError {
    #[error("{0} tags; at most {MAX_TAGS} allowed")]
    TooMany(usize),
    #[error("tag {0:?} must be 1-{MAX_TAG_LEN} characters")]
    Length(String),
    #[error("tag {0:?} must not contain ',' or control characters")]
    Characters(String),
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("{0:?} must start with '/'")]
    Relative(String),
    #[error(
        "{0} bytes; at most {MAX_PATH_LEN} allowed (published as Consul meta, whose values Consul limits to {MAX_META_VALUE_LEN})"
    )]
    TooLong(usize),
    #[error("{0:?} must not contain whitespace or control characters")]
    Whitespace(String),
}

/// A DNS label: Consul warns on anything else and DNS interfaces can't resolve it.
pub fn service_name(name: &str) -> Result<(), ServiceNameError> {
    if name.is_empty() {
        return Err(ServiceNameError::Empty);
    }
    if name.len() > MAX_SERVICE_NAME_LEN {
        return Err(ServiceNameError::TooLong(name.len()));
    }
    let valid_chars = name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if !valid_chars || name.starts_with('-') || name.ends_with('-') {
        return Err(ServiceNameError::NotDnsLabel(name.to_string()));
    }
    Ok(())
}

/// Owner ids go into service IDs and meta values.
pub fn owner_id(owner: &str) -> Result<(), OwnerIdError> {
    let ok = !owner.is_empty()
        && owner.len() <= MAX_OWNER_ID_LEN
        && owner
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(OwnerIdError(owner.to_string()))
    }
}

pub fn meta_key(key: &str) -> Result<(), MetaError> {
    if key.is_empty() || key.len() > MAX_META_KEY_LEN {
        return Err(MetaError::KeyLength(key.to_string()));
    }
    if !key
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(MetaError::KeyCharacters(key.to_string()));
    }
    if key.starts_with("consul-") {
        return Err(MetaError::ConsulPrefix(key.to_string()));
    }
    if meta_keys::RESERVED.contains(&key) {
        return Err(MetaError::Reserved(key.to_string()));
    }
    Ok(())
}

pub fn meta_value(key: &str, value: &str) -> Result<(), MetaError> {
    if value.len() > MAX_META_VALUE_LEN {
        return Err(MetaError::ValueTooLong {
            key: key.to_string(),
            bytes: value.len(),
        });
    }
    Ok(())
}

/// Every bad tag, not just the first.
pub fn tags(tags: &[String]) -> Vec<TagsError> {
    if tags.len() > MAX_TAGS {
        return vec![TagsError::TooMany(tags.len())];
    }
    tags.iter()
        .filter_map(|tag| {
            if tag.is_empty() || tag.len() > MAX_TAG_LEN {
                Some(TagsError::Length(tag.clone()))
            } else if tag.chars().any(|c| c.is_control() || c == ',') {
                Some(TagsError::Characters(tag.clone()))
            } else {
                None
            }
        })
        .collect()
}

pub fn metrics_path(path: &str) -> Result<(), PathError> {
    if !path.starts_with('/') {
        return Err(PathError::Relative(path.to_string()));
    }
    if path.len() > MAX_PATH_LEN {
        return Err(PathError::TooLong(path.len()));
    }
    if path.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(PathError::Whitespace(path.to_string()));
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
        assert_eq!(
            meta_key("metrics-path"),
            Err(MetaError::Reserved("metrics-path".into()))
        );
        assert!(meta_value("k", &"v".repeat(513)).is_err());
    }

    #[test]
    fn tags_and_paths() {
        assert!(tags(&["gunicorn".into()]).is_empty());
        assert_eq!(tags(&["".into()]), vec![TagsError::Length(String::new())]);
        assert_eq!(
            tags(&["a,b".into(), "ok".into(), "".into()]).len(),
            2,
            "every bad tag is named"
        );
        assert_eq!(
            tags(&vec!["t".to_string(); 65]),
            vec![TagsError::TooMany(65)]
        );
        assert!(metrics_path("/metrics").is_ok());
        assert!(metrics_path("metrics").is_err());
        assert!(metrics_path("/a b").is_err());
        // Consul refuses a meta value over 512 bytes, and with it the whole transaction.
        assert!(metrics_path(&format!("/{}", "m".repeat(511))).is_ok());
        let too_long = metrics_path(&format!("/{}", "m".repeat(512)))
            .unwrap_err()
            .to_string();
        assert!(too_long.contains("at most 512"), "{too_long}");
    }

    #[test]
    fn owner_ids() {
        assert!(owner_id("prod-eu.1").is_ok());
        assert!(owner_id("").is_err());
        assert!(owner_id("a:b").is_err());
    }

    /// Every limit accepts its maximum and refuses one more.
    #[test]
    fn every_limit_is_inclusive() {
        let text = |n: usize| "a".repeat(n);
        assert!(service_name(&text(MAX_SERVICE_NAME_LEN)).is_ok());
        assert_eq!(
            service_name(&text(MAX_SERVICE_NAME_LEN + 1)),
            Err(ServiceNameError::TooLong(64))
        );
        assert!(owner_id(&text(MAX_OWNER_ID_LEN)).is_ok());
        assert!(owner_id(&text(MAX_OWNER_ID_LEN + 1)).is_err());
        assert!(meta_key(&text(MAX_META_KEY_LEN)).is_ok());
        assert!(meta_key(&text(MAX_META_KEY_LEN + 1)).is_err());
        assert!(meta_value("k", &text(MAX_META_VALUE_LEN)).is_ok());
        assert!(meta_value("k", &text(MAX_META_VALUE_LEN + 1)).is_err());
        assert!(tags(&vec!["t".to_string(); MAX_TAGS]).is_empty());
        assert_eq!(
            tags(&vec!["t".to_string(); MAX_TAGS + 1]),
            [TagsError::TooMany(65)]
        );
        assert!(tags(&[text(MAX_TAG_LEN)]).is_empty());
        assert_eq!(tags(&[text(MAX_TAG_LEN + 1)]).len(), 1);
        let path = |n: usize| format!("/{}", text(n - 1));
        assert!(metrics_path(&path(MAX_PATH_LEN)).is_ok());
        assert!(metrics_path(&path(MAX_PATH_LEN + 1)).is_err());
    }

    /// Consul allows 64 meta pairs: the user's, ours and the source's must fit together.
    #[test]
    fn user_meta_leaves_room_for_ours_and_the_sources() {
        assert_eq!(MAX_USER_META, 55);
        assert_eq!(MAX_USER_META + meta_keys::RESERVED.len() + 4, 64);
    }
}
