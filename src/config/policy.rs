//! Namespaces: which channels they cover (by prefix) and who may subscribe
//! to or publish on them. Read from the config file's `[[namespace]]` and
//! `[default-namespace]` tables; the authorization code applies them.

use std::collections::HashSet;
use std::time::Duration;

use serde::Deserialize;

use super::ConfigError;

/// Messages kept per channel at most, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryPolicy {
    pub size: usize,
    pub ttl: Duration,
}

impl HistoryPolicy {
    /// Messages a full read of the history may return: `XADD MAXLEN ~`
    /// trims whole stream nodes, so a stream can hold somewhat more than
    /// `size`; reading twice that is reading it all.
    pub fn read_limit(&self) -> usize {
        self.size.saturating_mul(2)
    }
}

/// The namespaces, resolved once: which rule covers a channel.
#[derive(Debug, Clone)]
pub struct Namespaces {
    /// Longest prefix first.
    pub rules: Vec<NamespaceRule>,
    pub default: NamespaceRule,
}

impl Namespaces {
    /// The rule that covers `channel`: the longest matching prefix, or the default.
    pub fn rule(&self, channel: &str) -> &NamespaceRule {
        self.resolve(channel).0
    }

    /// The rule that covers `channel`, and the name it covers it by (what
    /// `owner` compares): a Socket.IO room `/chat#user:42` is covered as
    /// `user:42`, as in the main namespace, unless a longer rule names the
    /// channel itself (`prefix = "/chat#"`).
    pub fn resolve<'a>(&self, channel: &'a str) -> (&NamespaceRule, &'a str) {
        let room = match crate::channel::split_socketio(channel) {
            (ns, Some(room)) if ns != "/" => Some(room),
            _ => None,
        };
        for r in &self.rules {
            if channel.starts_with(&r.prefix) {
                return (r, channel);
            }
            if let Some(room) = room.filter(|room| room.starts_with(&r.prefix)) {
                return (r, room);
            }
        }
        (&self.default, room.unwrap_or(channel))
    }

    /// Whether a `[[namespace]]` rule names `channel` itself (not by its
    /// room name, and not the default).
    pub fn names(&self, channel: &str) -> bool {
        self.rules.iter().any(|r| channel.starts_with(&r.prefix))
    }

    /// Every rule, the default included.
    pub fn all(&self) -> impl Iterator<Item = &NamespaceRule> {
        self.rules.iter().chain(std::iter::once(&self.default))
    }
}

impl Default for Namespaces {
    fn default() -> Self {
        Namespaces { rules: Vec::new(), default: NamespaceRule::default_rule() }
    }
}

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
    /// Kept history (offsets, recovery), if any.
    pub history: Option<HistoryPolicy>,
    /// Who is subscribed is tracked across nodes.
    pub presence: bool,
    /// Subscribers are told of joins and leaves (needs presence).
    pub join_leave: bool,
}

impl NamespaceRule {
    fn default_rule() -> Self {
        NamespaceRule {
            prefix: String::new(),
            subscribe: Policy::Anyone,
            publish: Policy::None,
            history: None,
            presence: false,
            join_leave: false,
        }
    }
}

/// The file's namespace tables.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct NamespaceTables {
    #[serde(default)]
    pub namespace: Vec<NamespaceFile>,
    #[serde(default)]
    pub default_namespace: Option<NamespaceFile>,
}

/// A `[[namespace]]` table as written in the file; `[default-namespace]`
/// is the same without a prefix.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct NamespaceFile {
    #[serde(default)]
    pub prefix: Option<String>,
    #[serde(default)]
    pub subscribe: Option<Policy>,
    #[serde(default)]
    pub publish: Option<Policy>,
    /// `history = { size = 100, ttl = "10m" }`
    #[serde(default)]
    pub history: Option<HistoryFile>,
    #[serde(default)]
    pub presence: Option<bool>,
    #[serde(default)]
    pub join_leave: Option<bool>,
}

/// A namespace's `history` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistoryFile {
    pub size: usize,
    pub ttl: String,
}

/// The rule a table describes (`key` names it in errors).
fn rule(key: &str, prefix: String, ns: NamespaceFile) -> Result<NamespaceRule, ConfigError> {
    let presence = ns.presence.unwrap_or(false);
    Ok(NamespaceRule {
        prefix,
        subscribe: ns.subscribe.unwrap_or(Policy::Anyone),
        publish: ns.publish.unwrap_or(Policy::None),
        history: history(&format!("{key}.history"), ns.history)?,
        presence,
        join_leave: join_leave(&format!("{key}.join-leave"), presence, ns.join_leave)?,
    })
}

/// Most messages a namespace may keep per channel.
const MAX_HISTORY_SIZE: usize = 100_000;
/// Longest a namespace may keep them.
const MAX_HISTORY_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

fn history(key: &str, h: Option<HistoryFile>) -> Result<Option<HistoryPolicy>, ConfigError> {
    let Some(h) = h else { return Ok(None) };
    if h.size == 0 || h.size > MAX_HISTORY_SIZE {
        return Err(ConfigError::new(&format!("{key}.size"), format!("must be 1 to {MAX_HISTORY_SIZE}")));
    }
    let ttl = humantime::parse_duration(&h.ttl)
        .map_err(|e| ConfigError::new(&format!("{key}.ttl"), format!("expected a duration like \"10m\" ({e})")))?;
    if ttl < Duration::from_secs(1) || ttl > MAX_HISTORY_TTL {
        return Err(ConfigError::new(&format!("{key}.ttl"), "must be 1s to 7 days"));
    }
    Ok(Some(HistoryPolicy { size: h.size, ttl }))
}

fn join_leave(key: &str, presence: bool, join_leave: Option<bool>) -> Result<bool, ConfigError> {
    match join_leave {
        Some(true) if !presence => Err(ConfigError::new(key, "needs presence = true")),
        j => Ok(j.unwrap_or(false)),
    }
}

/// The namespace rules, longest prefix first, and the default rule.
pub fn rules(tables: NamespaceTables) -> Result<Namespaces, ConfigError> {
    let mut seen = HashSet::new();
    let mut rules = Vec::with_capacity(tables.namespace.len());
    for (i, ns) in tables.namespace.into_iter().enumerate() {
        let key = format!("namespace[{i}]");
        let prefix = ns.prefix.clone().unwrap_or_default();
        if crate::channel::check(&prefix).is_err() {
            return Err(ConfigError::new(
                &format!("{key}.prefix"),
                format!("{prefix:?} must be a non-empty channel-name prefix"),
            ));
        }
        if !seen.insert(prefix.clone()) {
            return Err(ConfigError::new(&format!("{key}.prefix"), format!("{prefix:?} is listed twice")));
        }
        rules.push(rule(&key, prefix, ns)?);
    }
    // Longest prefix first, so the most specific namespace wins.
    rules.sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));
    let default = match tables.default_namespace {
        Some(d) if d.prefix.is_some() => {
            return Err(ConfigError::new("default-namespace.prefix", "the default namespace has no prefix"));
        }
        Some(d) => rule("default-namespace", String::new(), d)?,
        None => NamespaceRule::default_rule(),
    };
    Ok(Namespaces { rules, default })
}
