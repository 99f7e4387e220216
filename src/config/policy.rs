//! Namespaces: which channels they cover (by prefix) and who may subscribe
//! to or publish on them. Read from the config file's `[[namespace]]` and
//! `[default-namespace]` tables; the authorization code applies them.

use std::collections::HashSet;

use serde::Deserialize;

use super::ConfigError;

/// Who may subscribe to, or publish on, a namespace's channels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// Every connection, anonymous ones too.
    Anyone,
    /// Connections with a user.
    Authenticated,
    /// Only the user named by the rest of the channel (`user:42` → user 42).
    Owner,
    /// Ask the app's subscribe/publish hook.
    Hook,
    /// Nobody (server-side subscriptions and the API still work).
    None,
}

/// A namespace: the channels starting with `prefix` and their policies.
#[derive(Debug, Clone)]
pub struct NamespaceRule {
    pub prefix: String,
    pub subscribe: Policy,
    pub publish: Policy,
}

/// The file's namespace tables.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct NamespaceTables {
    #[serde(default)]
    pub namespace: Vec<NamespaceFile>,
    #[serde(default)]
    pub default_namespace: Option<DefaultNamespaceFile>,
}

/// A `[[namespace]]` table as written in the file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct NamespaceFile {
    pub prefix: String,
    #[serde(default)]
    pub subscribe: Option<Policy>,
    #[serde(default)]
    pub publish: Option<Policy>,
    /// Reserved by the contract; refused until history is implemented.
    #[serde(default)]
    pub history: Option<toml::Value>,
    /// Reserved by the contract; refused until presence is implemented.
    #[serde(default)]
    pub presence: Option<bool>,
}

/// The `[default-namespace]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct DefaultNamespaceFile {
    #[serde(default)]
    pub subscribe: Option<Policy>,
    #[serde(default)]
    pub publish: Option<Policy>,
}

/// The namespace rules, longest prefix first, and the default rule.
pub fn rules(tables: NamespaceTables) -> Result<(Vec<NamespaceRule>, NamespaceRule), ConfigError> {
    let mut seen = HashSet::new();
    let mut rules = Vec::with_capacity(tables.namespace.len());
    for (i, ns) in tables.namespace.into_iter().enumerate() {
        let key = |k: &str| format!("namespace[{i}].{k}");
        if crate::channel::check(&ns.prefix).is_err() {
            return Err(ConfigError::new(
                &key("prefix"),
                format!("{:?} must be a non-empty channel-name prefix", ns.prefix),
            ));
        }
        if !seen.insert(ns.prefix.clone()) {
            return Err(ConfigError::new(&key("prefix"), format!("{:?} is listed twice", ns.prefix)));
        }
        if ns.history.is_some() {
            return Err(ConfigError::new(
                &key("history"),
                "history and recovery are not available in this version yet",
            ));
        }
        if ns.presence == Some(true) {
            return Err(ConfigError::new(&key("presence"), "presence is not available in this version yet"));
        }
        rules.push(NamespaceRule {
            prefix: ns.prefix,
            subscribe: ns.subscribe.unwrap_or(Policy::Anyone),
            publish: ns.publish.unwrap_or(Policy::None),
        });
    }
    // Longest prefix first, so the most specific namespace wins.
    rules.sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));
    let d = tables.default_namespace;
    let default = NamespaceRule {
        prefix: String::new(),
        subscribe: d.as_ref().and_then(|d| d.subscribe).unwrap_or(Policy::Anyone),
        publish: d.as_ref().and_then(|d| d.publish).unwrap_or(Policy::None),
    };
    Ok((rules, default))
}
