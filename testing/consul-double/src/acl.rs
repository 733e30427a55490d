//! Consul's ACL model, reduced to what the catalog endpoints check: tokens
//! with `node`/`service` rules (exact and prefix), the anonymous token and a
//! default policy.
//!
//! Sources (hashicorp/consul):
//! - `acl/policy_authorizer.go` (`getPolicy`, `enforce`): an exact rule for
//!   the full name wins, else the longest prefix rule; `write` grants read,
//!   `deny` denies, no rule falls through to the default policy.
//! - `acl/policy_merger.go` (`takesPrecedenceOver`): when a token holds two
//!   rules for the same name, `deny` beats `write` beats `read`.
//! - `acl/errors.go` (`PermissionDeniedError.Error`, `ErrNotFound`): the texts.
//! - `acl/acl.go` (`AnonymousTokenID`): requests without a token use the
//!   anonymous token.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// `acl.AnonymousTokenID`.
pub const ANONYMOUS_ACCESSOR_ID: &str = "00000000-0000-0000-0000-000000000002";
/// `acl.ErrNotFound`: Consul's answer (403) to a token it does not know.
pub const ERR_NOT_FOUND: &str = "ACL not found";

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    #[default]
    Deny,
    Read,
    Write,
}

impl Access {
    /// `acl.takesPrecedenceOver`: deny, then write, then read.
    fn precedence(self) -> u8 {
        match self {
            Access::Deny => 3,
            Access::Write => 2,
            Access::Read => 1,
        }
    }

    /// `acl.enforce`: write grants read; deny and read-for-write refuse.
    fn grants(self, wanted: Access) -> bool {
        match self {
            Access::Write => true,
            Access::Read => wanted == Access::Read,
            Access::Deny => false,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleBody {
    pub policy: Access,
}

/// Rules in the JSON form of Consul's policy language, e.g.
/// `{"node_prefix": {"": {"policy": "read"}}, "service": {"web": {"policy": "write"}}}`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rules {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node: BTreeMap<String, RuleBody>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_prefix: BTreeMap<String, RuleBody>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub service: BTreeMap<String, RuleBody>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub service_prefix: BTreeMap<String, RuleBody>,
}

impl Rules {
    /// Shorthand for tests: every node and service at `access`.
    pub fn everything(access: Access) -> Rules {
        let all = BTreeMap::from([(String::new(), RuleBody { policy: access })]);
        Rules {
            node_prefix: all.clone(),
            service_prefix: all,
            ..Rules::default()
        }
    }

    /// Adds one rule (`prefix` for `*_prefix`), merged as Consul merges policies.
    pub fn with(mut self, resource: Resource, name: &str, prefix: bool, access: Access) -> Rules {
        let map = match (resource, prefix) {
            (Resource::Node, false) => &mut self.node,
            (Resource::Node, true) => &mut self.node_prefix,
            (Resource::Service, false) => &mut self.service,
            (Resource::Service, true) => &mut self.service_prefix,
        };
        let entry = map
            .entry(name.to_string())
            .or_insert(RuleBody { policy: access });
        if access.precedence() > entry.policy.precedence() {
            entry.policy = access;
        }
        self
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resource {
    Node,
    Service,
}

impl Resource {
    fn as_str(self) -> &'static str {
        match self {
            Resource::Node => "node",
            Resource::Service => "service",
        }
    }
}

#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Token {
    /// What clients present (`X-Consul-Token`).
    pub secret_id: String,
    /// Public identifier used in error texts; generated when empty.
    #[serde(default)]
    pub accessor_id: String,
    /// `global-management`: every permission.
    #[serde(default)]
    pub management: bool,
    #[serde(default)]
    pub rules: Rules,
}

// Hand-written so the secret never reaches a log line.
impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("secret_id", &"<redacted>")
            .field("accessor_id", &self.accessor_id)
            .field("management", &self.management)
            .field("rules", &self.rules)
            .finish()
    }
}

impl Token {
    pub fn management(secret: &str) -> Token {
        Token {
            secret_id: secret.into(),
            accessor_id: String::new(),
            management: true,
            rules: Rules::default(),
        }
    }

    pub fn with_rules(secret: &str, rules: Rules) -> Token {
        Token {
            secret_id: secret.into(),
            accessor_id: String::new(),
            management: false,
            rules,
        }
    }
}

/// The whole ACL setup: what `acl { enabled = true, default_policy = … }`
/// plus the tokens created in it would give.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AclConfig {
    /// `acl.default_policy`; Consul's production recommendation is `deny`.
    #[serde(default)]
    pub default_policy: DefaultPolicy,
    #[serde(default)]
    pub tokens: Vec<Token>,
    /// Rules of the anonymous token, used when a request has no token.
    #[serde(default)]
    pub anonymous: Rules,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DefaultPolicy {
    Allow,
    #[default]
    Deny,
}

impl AclConfig {
    /// One management token, default deny: the common production setup.
    pub fn single_management_token(secret: &str) -> AclConfig {
        AclConfig {
            default_policy: DefaultPolicy::Deny,
            tokens: vec![Token::management(secret)],
            anonymous: Rules::default(),
        }
        .normalized()
    }

    /// Fills in accessor IDs that were left empty (UUID-shaped, derived from
    /// the position so they are stable across runs and never the secret).
    pub fn normalized(mut self) -> AclConfig {
        for (i, token) in self.tokens.iter_mut().enumerate() {
            if token.accessor_id.is_empty() {
                token.accessor_id = format!("00000000-0000-4000-8000-{:012x}", i + 100);
            }
        }
        self
    }

    /// Resolves a presented secret (Consul's `ResolveToken`): no secret is
    /// the anonymous token, an unknown one is `ACL not found`.
    pub fn resolve(&self, secret: Option<&str>) -> Result<Authorizer, &'static str> {
        let default = self.default_policy;
        match secret {
            None => Ok(Authorizer {
                accessor_id: ANONYMOUS_ACCESSOR_ID.into(),
                anonymous: true,
                management: false,
                rules: self.anonymous.clone(),
                default,
            }),
            Some(secret) => self
                .tokens
                .iter()
                .find(|t| t.secret_id == secret)
                .map(|t| Authorizer {
                    accessor_id: t.accessor_id.clone(),
                    anonymous: false,
                    management: t.management,
                    rules: t.rules.clone(),
                    default,
                })
                .ok_or(ERR_NOT_FOUND),
        }
    }
}

/// The permissions of one resolved token.
#[derive(Clone, Debug)]
pub struct Authorizer {
    pub accessor_id: String,
    /// Whether the request carried no token (masks the filtered-results header).
    pub anonymous: bool,
    management: bool,
    rules: Rules,
    default: DefaultPolicy,
}

impl Authorizer {
    /// An authorizer that allows everything (ACLs disabled).
    pub fn allow_all() -> Authorizer {
        Authorizer {
            accessor_id: String::new(),
            anonymous: false,
            management: true,
            rules: Rules::default(),
            default: DefaultPolicy::Allow,
        }
    }

    /// `getPolicy`: the exact rule for `name`, else the longest matching prefix.
    fn rule(&self, resource: Resource, name: &str) -> Option<Access> {
        let (exact, prefixes) = match resource {
            Resource::Node => (&self.rules.node, &self.rules.node_prefix),
            Resource::Service => (&self.rules.service, &self.rules.service_prefix),
        };
        if let Some(rule) = exact.get(name) {
            return Some(rule.policy);
        }
        prefixes
            .iter()
            .filter(|(prefix, _)| name.starts_with(prefix.as_str()))
            .max_by_key(|(prefix, _)| prefix.len())
            .map(|(_, rule)| rule.policy)
    }

    pub fn allows(&self, resource: Resource, name: &str, wanted: Access) -> bool {
        if self.management {
            return true;
        }
        match self.rule(resource, name) {
            Some(access) => access.grants(wanted),
            None => self.default == DefaultPolicy::Allow,
        }
    }

    pub fn node_read(&self, name: &str) -> bool {
        self.allows(Resource::Node, name, Access::Read)
    }

    pub fn service_read(&self, name: &str) -> bool {
        // aclFilter.allowService: a nameless service is always visible.
        name.is_empty() || self.allows(Resource::Service, name, Access::Read)
    }

    /// `NodeWriteAllowed` / `ServiceWriteAllowed`: `Ok` or Consul's
    /// `PermissionDeniedError` text.
    pub fn require(&self, resource: Resource, name: &str, wanted: Access) -> Result<(), String> {
        if self.allows(resource, name, wanted) {
            return Ok(());
        }
        let level = match wanted {
            Access::Write => "write",
            _ => "read",
        };
        let who = if self.anonymous {
            "anonymous token".to_string()
        } else {
            format!("token with AccessorID '{}'", self.accessor_id)
        };
        let mut text = format!(
            "Permission denied: {who} lacks permission '{}:{level}' on {:?}",
            resource.as_str(),
            name
        );
        if self.anonymous {
            text.push_str(
                ". The anonymous token is used implicitly when a request does not specify a token.",
            );
        }
        Err(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn authz(rules: Rules) -> Authorizer {
        AclConfig {
            default_policy: DefaultPolicy::Deny,
            tokens: vec![Token::with_rules("s", rules)],
            anonymous: Rules::default(),
        }
        .normalized()
        .resolve(Some("s"))
        .unwrap()
    }

    #[test]
    fn exact_beats_prefix_and_the_longest_prefix_wins() {
        let a = authz(
            Rules::default()
                .with(Resource::Service, "", true, Access::Read)
                .with(Resource::Service, "web", true, Access::Write)
                .with(Resource::Service, "web-admin", false, Access::Deny),
        );
        assert!(a.allows(Resource::Service, "db", Access::Read));
        assert!(!a.allows(Resource::Service, "db", Access::Write));
        assert!(a.allows(Resource::Service, "web-1", Access::Write));
        assert!(!a.allows(Resource::Service, "web-admin", Access::Read));
        assert!(a.allows(Resource::Service, "web-admin2", Access::Write));
        // No rule at all: the default policy (deny).
        assert!(!a.allows(Resource::Node, "n", Access::Read));
    }

    #[test]
    fn deny_takes_precedence_when_merging() {
        let rules = Rules::default()
            .with(Resource::Node, "n", false, Access::Write)
            .with(Resource::Node, "n", false, Access::Deny)
            .with(Resource::Node, "n", false, Access::Read);
        assert_eq!(rules.node["n"].policy, Access::Deny);
    }

    #[test]
    fn errors_use_consuls_wording() {
        let a = authz(Rules::everything(Access::Read));
        assert_eq!(
            a.require(Resource::Service, "web", Access::Write)
                .unwrap_err(),
            "Permission denied: token with AccessorID '00000000-0000-4000-8000-000000000064' lacks permission 'service:write' on \"web\""
        );
        let config = AclConfig::single_management_token("m");
        assert_eq!(config.resolve(Some("x")).unwrap_err(), "ACL not found");
        let anonymous = config.resolve(None).unwrap();
        let text = anonymous
            .require(Resource::Node, "n", Access::Write)
            .unwrap_err();
        assert!(text.starts_with(
            "Permission denied: anonymous token lacks permission 'node:write' on \"n\". The anonymous token"
        ));
        assert!(config.resolve(Some("m")).unwrap().node_read("anything"));
    }

    #[test]
    fn rules_parse_from_consuls_json_policy_form() {
        let rules: Rules = serde_json::from_str(
            r#"{"node_prefix": {"": {"policy": "read"}}, "service": {"web": {"policy": "write"}}}"#,
        )
        .unwrap();
        assert_eq!(rules.node_prefix[""].policy, Access::Read);
        assert_eq!(rules.service["web"].policy, Access::Write);
        assert!(serde_json::from_str::<Rules>(r#"{"nodes": {}}"#).is_err());
    }
}
