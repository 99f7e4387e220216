//! Configuration: CLI flags, `WSRELAY_*` environment variables and a TOML
//! file, merged once (flag > env > file > default) and validated into
//! [`Config`], whose sub-configs each belong to one component.
//!
//! The flags and the file share one definition ([`Options`]): clap reads it
//! from the command line and the environment, serde reads it from the file,
//! so a key cannot exist in one and be missing from the other.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use serde::Deserialize;

use crate::auth::{NamespaceRule, Policy};

/// Exit code for a refused configuration (`EX_USAGE` from sysexits.h).
pub const EXIT_BAD_CONFIG: i32 = 64;

/// A configuration problem, always naming the key it is about.
#[derive(Debug, thiserror::Error)]
#[error("{}`{key}`: {message}", source_prefix(.file.as_deref()))]
pub struct ConfigError {
    pub file: Option<PathBuf>,
    pub key: String,
    pub message: String,
}

fn source_prefix(file: Option<&Path>) -> String {
    match file {
        Some(f) => format!("config file {}: key ", f.display()),
        None => "config key ".to_owned(),
    }
}

impl ConfigError {
    fn new(key: &str, message: impl Into<String>) -> Self {
        Self { file: None, key: key.to_owned(), message: message.into() }
    }
}

/// A value that must never reach a log line: tokens, passwords, secrets.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }
    /// The secret itself; call only where it is used, never to log.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_owned()))
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret)
    }
}

/// A duration written the human way: `500ms`, `25s`, `10m`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl FromStr for Dur {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        humantime::parse_duration(s)
            .map(Dur)
            .map_err(|e| format!("expected a duration like \"500ms\", \"25s\" or \"10m\" ({e})"))
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Every option, as a flag, an environment variable and a config-file key.
///
/// Each field is optional so that the merge can tell "not given" from
/// "given the default"; defaults live in [`Options::resolve`] and in the help
/// text.
#[derive(Debug, Default, Parser, Deserialize)]
#[command(name = "wsrelay", version, about, long_about = None)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Options {
    /// TOML config file with the same keys as the flags (plus namespaces).
    #[arg(long, env = "WSRELAY_CONFIG", value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,

    /// Validate the configuration and exit (0 when valid, 64 when not).
    #[arg(long)]
    #[serde(skip)]
    pub check_config: bool,

    /// Public listener: WebSocket upgrades and the proxied app [default: 0.0.0.0:8080]
    #[arg(long, env = "WSRELAY_LISTEN", value_name = "ADDR")]
    pub listen: Option<SocketAddr>,

    /// The app every non-relay request is forwarded to [default: http://127.0.0.1:3000]
    #[arg(long, env = "WSRELAY_UPSTREAM", value_name = "URL")]
    pub upstream: Option<String>,

    /// Path whose WebSocket upgrades wsrelay terminates; repeatable [default: /ws]
    #[arg(long, env = "WSRELAY_WS_PATH", value_name = "PATH", value_delimiter = ',')]
    #[serde(default)]
    pub ws_path: Vec<String>,

    /// Admin listener: /api/*, /metrics, /healthz, /readyz [default: 127.0.0.1:8081]
    #[arg(long, env = "WSRELAY_ADMIN_LISTEN", value_name = "ADDR")]
    pub admin_listen: Option<SocketAddr>,

    /// Bearer token required on /api/* (required when the admin listener is not loopback)
    #[arg(long, env = "WSRELAY_API_TOKEN", value_name = "TOKEN", hide_env_values = true)]
    pub api_token: Option<Secret>,

    /// Redis or Valkey URL (redis:// or rediss://); unset: in-memory broker, single instance
    #[arg(long, env = "WSRELAY_REDIS_URL", value_name = "URL", hide_env_values = true)]
    pub redis_url: Option<Secret>,

    /// Prefix of every Redis key and channel, so several apps can share a Redis [default: wsrelay:]
    #[arg(long, env = "WSRELAY_REDIS_PREFIX", value_name = "PREFIX")]
    pub redis_prefix: Option<String>,

    /// Timeout for connecting to Redis and for each Redis command [default: 2s]
    #[arg(long, env = "WSRELAY_REDIS_TIMEOUT", value_name = "DURATION")]
    pub redis_timeout: Option<Dur>,

    /// How often the node checks its Redis subscriber end to end [default: 1s]
    #[arg(long, env = "WSRELAY_REDIS_PROBE_INTERVAL", value_name = "DURATION")]
    pub redis_probe_interval: Option<Dur>,

    /// A probe not received back within this is a dead subscriber: reconnect [default: 3s]
    #[arg(long, env = "WSRELAY_REDIS_PROBE_TIMEOUT", value_name = "DURATION")]
    pub redis_probe_timeout: Option<Dur>,

    /// Name of this node in logs and metrics [default: random]
    #[arg(long, env = "WSRELAY_NODE_ID", value_name = "ID")]
    pub node_id: Option<String>,

    /// Log format [default: text]
    #[arg(long, env = "WSRELAY_LOG_FORMAT", value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,

    /// Log level or tracing filter directives, e.g. `info` or `wsrelay=debug` [default: info]
    #[arg(long, env = "WSRELAY_LOG_LEVEL", value_name = "FILTER")]
    pub log_level: Option<String>,

    /// Largest frame a client may send, in bytes; larger closes with 1009 [default: 65536]
    #[arg(long, env = "WSRELAY_MAX_MESSAGE_BYTES", value_name = "BYTES")]
    pub max_message_bytes: Option<usize>,

    /// Most concurrent WebSocket sessions; more are refused with 503 [default: 10000]
    #[arg(long, env = "WSRELAY_MAX_CONNECTIONS", value_name = "N")]
    pub max_connections: Option<usize>,

    /// Most channels one connection may subscribe to [default: 128]
    #[arg(long, env = "WSRELAY_MAX_SUBSCRIPTIONS", value_name = "N")]
    pub max_subscriptions: Option<usize>,

    /// Outbound messages queued per connection; a full queue closes it with 1013 [default: 1024]
    #[arg(long, env = "WSRELAY_CLIENT_QUEUE", value_name = "N")]
    pub client_queue: Option<usize>,

    /// Frames per second a client may send, 0 for no limit [default: 100]
    #[arg(long, env = "WSRELAY_CLIENT_RATE", value_name = "PER_SECOND")]
    pub client_rate: Option<u32>,

    /// Frames a client may send in a burst above --client-rate [default: 2 × client-rate]
    #[arg(long, env = "WSRELAY_CLIENT_BURST", value_name = "N")]
    pub client_burst: Option<u32>,

    /// WebSocket ping sent to each client this often; keep below proxies' idle timeouts [default: 25s]
    #[arg(long, env = "WSRELAY_PING_INTERVAL", value_name = "DURATION")]
    pub ping_interval: Option<Dur>,

    /// A client silent (no frame, no pong) for this long is closed [default: 60s]
    #[arg(long, env = "WSRELAY_IDLE_TIMEOUT", value_name = "DURATION")]
    pub idle_timeout: Option<Dur>,

    /// Time allowed for a client to send its request headers and finish the upgrade [default: 10s]
    #[arg(long, env = "WSRELAY_HANDSHAKE_TIMEOUT", value_name = "DURATION")]
    pub handshake_timeout: Option<Dur>,

    /// Longest wait for the app's response headers before 504 [default: 60s]
    #[arg(long, env = "WSRELAY_UPSTREAM_TIMEOUT", value_name = "DURATION")]
    pub upstream_timeout: Option<Dur>,

    /// Longest wait to connect to the app before 502 [default: 5s]
    #[arg(long, env = "WSRELAY_UPSTREAM_CONNECT_TIMEOUT", value_name = "DURATION")]
    pub upstream_connect_timeout: Option<Dur>,

    /// Idle pooled connections to the app are closed after this; keep it below the app's keep-alive [default: 30s]
    #[arg(long, env = "WSRELAY_UPSTREAM_IDLE_TIMEOUT", value_name = "DURATION")]
    pub upstream_idle_timeout: Option<Dur>,

    /// On SIGTERM, keep serving this long (readyz 503, upgrades refused) before closing clients,
    /// while load balancers take the replica out [default: 0s]
    #[arg(long, env = "WSRELAY_SHUTDOWN_DELAY", value_name = "DURATION")]
    pub shutdown_delay: Option<Dur>,

    /// On SIGTERM, the window over which clients are closed and requests finish [default: 30s]
    #[arg(long, env = "WSRELAY_DRAIN_TIMEOUT", value_name = "DURATION")]
    pub drain_timeout: Option<Dur>,

    /// App path called (POST) to authorize each WebSocket connection
    #[arg(long, env = "WSRELAY_CONNECT_HOOK", value_name = "PATH")]
    pub connect_hook: Option<String>,

    /// App path asked (POST) about subscriptions in namespaces with `subscribe = "hook"`
    #[arg(long, env = "WSRELAY_SUBSCRIBE_HOOK", value_name = "PATH")]
    pub subscribe_hook: Option<String>,

    /// App path asked (POST) about client publishes in namespaces with `publish = "hook"`
    #[arg(long, env = "WSRELAY_PUBLISH_HOOK", value_name = "PATH")]
    pub publish_hook: Option<String>,

    /// App path that receives clients' `send` frames (POST); its JSON answer is the reply
    #[arg(long, env = "WSRELAY_MESSAGE_HOOK", value_name = "PATH")]
    pub message_hook: Option<String>,

    /// App path told (POST, best effort) when a client disconnects
    #[arg(long, env = "WSRELAY_DISCONNECT_HOOK", value_name = "PATH")]
    pub disconnect_hook: Option<String>,

    /// Sent to every hook as `X-Wsrelay-Hook-Secret`, for apps reachable other than through wsrelay
    #[arg(long, env = "WSRELAY_HOOK_SECRET", value_name = "SECRET", hide_env_values = true)]
    pub hook_secret: Option<Secret>,

    /// Longest wait for any hook's answer; a late hook fails closed [default: 5s]
    #[arg(long, env = "WSRELAY_HOOK_TIMEOUT", value_name = "DURATION")]
    pub hook_timeout: Option<Dur>,

    /// Most hook requests in flight at once; more wait their turn within --hook-timeout [default: 64]
    #[arg(long, env = "WSRELAY_HOOK_CONCURRENCY", value_name = "N")]
    pub hook_concurrency: Option<usize>,

    /// Disconnect notifications queued for the disconnect hook; overflow is dropped and counted [default: 1024]
    #[arg(long, env = "WSRELAY_DISCONNECT_HOOK_QUEUE", value_name = "N")]
    pub disconnect_hook_queue: Option<usize>,

    /// HS256 secret that signs client JWTs
    #[arg(long, env = "WSRELAY_JWT_SECRET", value_name = "SECRET", hide_env_values = true)]
    pub jwt_secret: Option<Secret>,

    /// PEM file with the RSA or EC public key that verifies client JWTs (RS256 / ES256)
    #[arg(long, env = "WSRELAY_JWT_PUBLIC_KEY", value_name = "FILE")]
    pub jwt_public_key: Option<PathBuf>,

    /// Accepted JWT `aud` values; repeatable. Unset: `aud` is not checked
    #[arg(long, env = "WSRELAY_JWT_AUDIENCE", value_name = "AUD", value_delimiter = ',')]
    #[serde(default)]
    pub jwt_audience: Vec<String>,

    /// Accepted JWT `iss` values; repeatable. Unset: `iss` is not checked
    #[arg(long, env = "WSRELAY_JWT_ISSUER", value_name = "ISS", value_delimiter = ',')]
    #[serde(default)]
    pub jwt_issuer: Vec<String>,

    /// Origin allowed to open WebSockets (scheme://host[:port]); repeatable; `*` allows all
    /// [default: same host as the request]
    #[arg(long, env = "WSRELAY_ALLOWED_ORIGIN", value_name = "ORIGIN", value_delimiter = ',')]
    #[serde(default)]
    pub allowed_origin: Vec<String>,

    /// Namespaces (config file only): `[[namespace]]` tables.
    #[arg(skip)]
    #[serde(default)]
    pub namespace: Vec<NamespaceFile>,

    /// Policy of channels outside every namespace (config file only).
    #[arg(skip)]
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

impl Options {
    /// Reads a TOML file, refusing unknown keys and bad values by name.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: Some(path.to_owned()),
            key: "config".into(),
            message: format!("cannot read the file: {e}"),
        })?;
        Self::from_toml(&text).map_err(|mut e| {
            e.file = Some(path.to_owned());
            e
        })
    }

    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let de = toml::Deserializer::parse(text).map_err(|e| ConfigError::new("(syntax)", e.message()))?;
        serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            let message = inner.message().to_owned();
            // serde_path_to_error names the unknown key itself, except at the top.
            let key = match message.strip_prefix("unknown field `") {
                Some(rest) if path == "." => rest.split('`').next().unwrap_or(rest).to_owned(),
                _ => path,
            };
            ConfigError::new(&key, message)
        })
    }

    /// Flag/env values win over the file's; lists are taken whole.
    fn merge(self, file: Options) -> Options {
        fn list<T>(a: Vec<T>, b: Vec<T>) -> Vec<T> {
            if a.is_empty() { b } else { a }
        }
        Options {
            config: self.config,
            check_config: self.check_config,
            listen: self.listen.or(file.listen),
            upstream: self.upstream.or(file.upstream),
            ws_path: list(self.ws_path, file.ws_path),
            admin_listen: self.admin_listen.or(file.admin_listen),
            api_token: self.api_token.or(file.api_token),
            redis_url: self.redis_url.or(file.redis_url),
            redis_prefix: self.redis_prefix.or(file.redis_prefix),
            redis_timeout: self.redis_timeout.or(file.redis_timeout),
            redis_probe_interval: self.redis_probe_interval.or(file.redis_probe_interval),
            redis_probe_timeout: self.redis_probe_timeout.or(file.redis_probe_timeout),
            node_id: self.node_id.or(file.node_id),
            log_format: self.log_format.or(file.log_format),
            log_level: self.log_level.or(file.log_level),
            max_message_bytes: self.max_message_bytes.or(file.max_message_bytes),
            max_connections: self.max_connections.or(file.max_connections),
            max_subscriptions: self.max_subscriptions.or(file.max_subscriptions),
            client_queue: self.client_queue.or(file.client_queue),
            client_rate: self.client_rate.or(file.client_rate),
            client_burst: self.client_burst.or(file.client_burst),
            ping_interval: self.ping_interval.or(file.ping_interval),
            idle_timeout: self.idle_timeout.or(file.idle_timeout),
            handshake_timeout: self.handshake_timeout.or(file.handshake_timeout),
            upstream_timeout: self.upstream_timeout.or(file.upstream_timeout),
            upstream_connect_timeout: self.upstream_connect_timeout.or(file.upstream_connect_timeout),
            upstream_idle_timeout: self.upstream_idle_timeout.or(file.upstream_idle_timeout),
            shutdown_delay: self.shutdown_delay.or(file.shutdown_delay),
            drain_timeout: self.drain_timeout.or(file.drain_timeout),
            connect_hook: self.connect_hook.or(file.connect_hook),
            subscribe_hook: self.subscribe_hook.or(file.subscribe_hook),
            publish_hook: self.publish_hook.or(file.publish_hook),
            message_hook: self.message_hook.or(file.message_hook),
            disconnect_hook: self.disconnect_hook.or(file.disconnect_hook),
            hook_secret: self.hook_secret.or(file.hook_secret),
            hook_timeout: self.hook_timeout.or(file.hook_timeout),
            hook_concurrency: self.hook_concurrency.or(file.hook_concurrency),
            disconnect_hook_queue: self.disconnect_hook_queue.or(file.disconnect_hook_queue),
            jwt_secret: self.jwt_secret.or(file.jwt_secret),
            jwt_public_key: self.jwt_public_key.or(file.jwt_public_key),
            jwt_audience: list(self.jwt_audience, file.jwt_audience),
            jwt_issuer: list(self.jwt_issuer, file.jwt_issuer),
            allowed_origin: list(self.allowed_origin, file.allowed_origin),
            namespace: file.namespace,
            default_namespace: file.default_namespace,
        }
    }

    /// Merges in the config file (if any), applies defaults and validates.
    pub fn resolve(self) -> Result<Config, ConfigError> {
        let file = match &self.config {
            Some(path) => Some((path.clone(), Options::from_file(path)?)),
            None => None,
        };
        let (file_path, merged) = match file {
            Some((p, f)) => (Some(p), self.merge(f)),
            None => (None, self),
        };
        merged.validate().map_err(|mut e| {
            // Values that came from the file are reported against it.
            e.file = e.file.or(file_path);
            e
        })
    }

    fn validate(self) -> Result<Config, ConfigError> {
        let secs = |d: Option<Dur>, default: u64| d.map_or(Duration::from_secs(default), |d| d.0);

        let upstream = parse_upstream(self.upstream.as_deref().unwrap_or("http://127.0.0.1:3000"))?;
        let ws_paths = if self.ws_path.is_empty() { vec!["/ws".to_owned()] } else { self.ws_path };
        for p in &ws_paths {
            if !p.starts_with('/') || p.contains(['?', '#', ' ']) {
                return Err(ConfigError::new("ws-path", format!("{p:?} must be a path starting with '/'")));
            }
        }
        let admin_listen = self.admin_listen.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8081)));
        let api_token = self.api_token.filter(|t| !t.expose().is_empty());
        if !admin_listen.ip().is_loopback() && api_token.is_none() {
            return Err(ConfigError::new(
                "api-token",
                format!(
                    "required when admin-listen ({admin_listen}) is not a loopback address: the API can publish to every client"
                ),
            ));
        }

        let max_message_bytes = positive("max-message-bytes", self.max_message_bytes, 65_536)?;
        if max_message_bytes > 16 * 1024 * 1024 {
            return Err(ConfigError::new("max-message-bytes", "must be at most 16777216 (16 MiB)"));
        }
        let ping_interval = secs(self.ping_interval, 25);
        let idle_timeout = secs(self.idle_timeout, 60);
        nonzero_duration("ping-interval", ping_interval)?;
        if idle_timeout <= ping_interval {
            return Err(ConfigError::new(
                "idle-timeout",
                format!(
                    "must be longer than ping-interval ({ping_interval:?}) or idle clients answering pings would be closed"
                ),
            ));
        }
        let client_rate = self.client_rate.unwrap_or(100);
        let client_burst = self.client_burst.unwrap_or(client_rate.saturating_mul(2).max(1));
        if client_rate > 0 && client_burst == 0 {
            return Err(ConfigError::new("client-burst", "must be at least 1 when client-rate is set"));
        }

        let session = SessionConfig {
            ws_paths,
            max_message_bytes,
            max_connections: positive("max-connections", self.max_connections, 10_000)?,
            max_subscriptions: positive("max-subscriptions", self.max_subscriptions, 128)?,
            client_queue: positive("client-queue", self.client_queue, 1024)?,
            client_rate,
            client_burst,
            ping_interval,
            idle_timeout,
            handshake_timeout: nonzero_duration("handshake-timeout", secs(self.handshake_timeout, 10))?,
        };

        let proxy = ProxyConfig {
            upstream,
            timeout: nonzero_duration("upstream-timeout", secs(self.upstream_timeout, 60))?,
            connect_timeout: nonzero_duration("upstream-connect-timeout", secs(self.upstream_connect_timeout, 5))?,
            idle_timeout: nonzero_duration("upstream-idle-timeout", secs(self.upstream_idle_timeout, 30))?,
        };

        let node_id = match self.node_id {
            Some(id) => {
                if id.is_empty()
                    || id.len() > 64
                    || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
                {
                    return Err(ConfigError::new("node-id", "must be 1-64 characters of [A-Za-z0-9._-]"));
                }
                id
            }
            None => random_id(8),
        };

        let broker = BrokerConfig {
            redis_url: match self.redis_url {
                Some(url) if !url.expose().is_empty() => Some(validate_redis_url(url)?),
                _ => None,
            },
            prefix: self.redis_prefix.unwrap_or_else(|| "wsrelay:".to_owned()),
            timeout: nonzero_duration("redis-timeout", secs(self.redis_timeout, 2))?,
            probe_interval: nonzero_duration("redis-probe-interval", secs(self.redis_probe_interval, 1))?,
            probe_timeout: nonzero_duration("redis-probe-timeout", secs(self.redis_probe_timeout, 3))?,
        };
        if broker.prefix.contains(char::is_whitespace) {
            return Err(ConfigError::new("redis-prefix", "must not contain whitespace"));
        }

        let drain_timeout = secs(self.drain_timeout, 30);
        let shutdown_delay = secs(self.shutdown_delay, 0);
        if shutdown_delay >= drain_timeout {
            return Err(ConfigError::new(
                "shutdown-delay",
                format!("must be shorter than drain-timeout ({drain_timeout:?}), which bounds the whole drain"),
            ));
        }

        let log_level = self.log_level.unwrap_or_else(|| "info".to_owned());
        if tracing_subscriber::EnvFilter::try_new(&log_level).is_err() {
            return Err(ConfigError::new(
                "log-level",
                format!("{log_level:?} is not a level (error, warn, info, debug, trace) or filter directive"),
            ));
        }

        let auth = AuthConfig {
            connect_hook: hook_path("connect-hook", self.connect_hook)?,
            subscribe_hook: hook_path("subscribe-hook", self.subscribe_hook)?,
            publish_hook: hook_path("publish-hook", self.publish_hook)?,
            message_hook: hook_path("message-hook", self.message_hook)?,
            disconnect_hook: hook_path("disconnect-hook", self.disconnect_hook)?,
            hook_secret: self.hook_secret.filter(|s| !s.expose().is_empty()),
            hook_timeout: nonzero_duration("hook-timeout", secs(self.hook_timeout, 5))?,
            hook_concurrency: positive("hook-concurrency", self.hook_concurrency, 64)?,
            disconnect_hook_queue: positive("disconnect-hook-queue", self.disconnect_hook_queue, 1024)?,
            jwt: jwt_key(self.jwt_secret, self.jwt_public_key)?
                .map(|k| k.with_claims(&self.jwt_audience, &self.jwt_issuer)),
            allowed_origins: validate_origins(self.allowed_origin)?,
            namespaces: validate_namespaces(self.namespace)?,
            default_namespace: NamespaceRule {
                prefix: String::new(),
                subscribe: self.default_namespace.as_ref().and_then(|d| d.subscribe).unwrap_or(Policy::Anyone),
                publish: self.default_namespace.as_ref().and_then(|d| d.publish).unwrap_or(Policy::None),
            },
        };
        auth.check_hooks_for_policies()?;

        Ok(Config {
            listen: self.listen.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 8080))),
            admin_listen,
            api_token,
            node_id,
            log_format: self.log_format.unwrap_or_default(),
            log_level,
            drain_timeout,
            shutdown_delay,
            session,
            proxy,
            broker,
            auth,
        })
    }
}

fn positive(key: &str, v: Option<usize>, default: usize) -> Result<usize, ConfigError> {
    match v {
        Some(0) => Err(ConfigError::new(key, "must be at least 1")),
        Some(v) => Ok(v),
        None => Ok(default),
    }
}

fn nonzero_duration(key: &str, d: Duration) -> Result<Duration, ConfigError> {
    if d.is_zero() { Err(ConfigError::new(key, "must be longer than 0")) } else { Ok(d) }
}

fn parse_upstream(s: &str) -> Result<http::Uri, ConfigError> {
    let uri: http::Uri = s.parse().map_err(|e| ConfigError::new("upstream", format!("{s:?} is not a URL: {e}")))?;
    if uri.scheme_str() != Some("http") || uri.authority().is_none() {
        return Err(ConfigError::new(
            "upstream",
            format!("{s:?} must be an http:// URL with a host (the app beside the sidecar)"),
        ));
    }
    if uri.path() != "/" && !uri.path().is_empty() {
        return Err(ConfigError::new("upstream", format!("{s:?} must not have a path")));
    }
    Ok(uri)
}

fn validate_redis_url(url: Secret) -> Result<Secret, ConfigError> {
    let s = url.expose();
    if !(s.starts_with("redis://") || s.starts_with("rediss://")) {
        return Err(ConfigError::new("redis-url", "must start with redis:// or rediss://"));
    }
    redis::Client::open(s).map_err(|e| ConfigError::new("redis-url", format!("not a valid Redis URL: {e}")))?;
    Ok(url)
}

fn hook_path(key: &str, v: Option<String>) -> Result<Option<String>, ConfigError> {
    match v {
        None => Ok(None),
        Some(p) if p.is_empty() => Ok(None),
        Some(p) if p.starts_with('/') && p.parse::<http::uri::PathAndQuery>().is_ok() => Ok(Some(p)),
        Some(p) => Err(ConfigError::new(key, format!("{p:?} must be a path on the upstream starting with '/'"))),
    }
}

fn jwt_key(secret: Option<Secret>, public_key: Option<PathBuf>) -> Result<Option<crate::auth::JwtKey>, ConfigError> {
    match (secret.filter(|s| !s.expose().is_empty()), public_key) {
        (Some(_), Some(_)) => Err(ConfigError::new(
            "jwt-public-key",
            "set either jwt-secret (HS256) or jwt-public-key (RS256/ES256), not both",
        )),
        (Some(s), None) => Ok(Some(crate::auth::JwtKey::hs256(&s))),
        (None, Some(path)) => {
            let pem = std::fs::read(&path)
                .map_err(|e| ConfigError::new("jwt-public-key", format!("cannot read {}: {e}", path.display())))?;
            crate::auth::JwtKey::from_public_pem(&pem)
                .map(Some)
                .map_err(|e| ConfigError::new("jwt-public-key", format!("{}: {e}", path.display())))
        }
        (None, None) => Ok(None),
    }
}

fn validate_origins(origins: Vec<String>) -> Result<Vec<String>, ConfigError> {
    for o in &origins {
        if o == "*" {
            continue;
        }
        let ok = o
            .parse::<http::Uri>()
            .ok()
            .is_some_and(|u| u.scheme().is_some() && u.authority().is_some() && matches!(u.path(), "" | "/"));
        if !ok {
            return Err(ConfigError::new(
                "allowed-origin",
                format!("{o:?} must be `*` or an origin like https://app.example.com"),
            ));
        }
    }
    Ok(origins.into_iter().map(|o| o.trim_end_matches('/').to_ascii_lowercase()).collect())
}

fn validate_namespaces(list: Vec<NamespaceFile>) -> Result<Vec<NamespaceRule>, ConfigError> {
    let mut seen = HashSet::new();
    let mut rules = Vec::with_capacity(list.len());
    for (i, ns) in list.into_iter().enumerate() {
        let key = |k: &str| format!("namespace[{i}].{k}");
        if ns.prefix.is_empty() || crate::protocol::validate_channel(&ns.prefix).is_err() {
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
    Ok(rules)
}

/// A random identifier of `len` characters from [0-9a-z].
pub fn random_id(len: usize) -> String {
    use rand::RngExt;
    const ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut rng = rand::rng();
    (0..len).map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char).collect()
}

/// The validated configuration, one sub-config per component.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub api_token: Option<Secret>,
    pub node_id: String,
    pub log_format: LogFormat,
    pub log_level: String,
    pub drain_timeout: Duration,
    pub shutdown_delay: Duration,
    pub session: SessionConfig,
    pub proxy: ProxyConfig,
    pub broker: BrokerConfig,
    pub auth: AuthConfig,
}

impl Config {
    /// Parses flags and environment (as the binary does) from an argument list.
    pub fn from_args<I, T>(args: I) -> Result<Config, ConfigError>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let opts = Options::try_parse_from(args).map_err(|e| ConfigError::new("(command line)", e.to_string()))?;
        opts.resolve()
    }
}

#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub ws_paths: Vec<String>,
    pub max_message_bytes: usize,
    pub max_connections: usize,
    pub max_subscriptions: usize,
    pub client_queue: usize,
    /// Frames per second; 0 disables the limit.
    pub client_rate: u32,
    pub client_burst: u32,
    pub ping_interval: Duration,
    pub idle_timeout: Duration,
    pub handshake_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub upstream: http::Uri,
    pub timeout: Duration,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct BrokerConfig {
    pub redis_url: Option<Secret>,
    pub prefix: String,
    pub timeout: Duration,
    pub probe_interval: Duration,
    pub probe_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct AuthConfig {
    pub connect_hook: Option<String>,
    pub subscribe_hook: Option<String>,
    pub publish_hook: Option<String>,
    pub message_hook: Option<String>,
    pub disconnect_hook: Option<String>,
    pub hook_secret: Option<Secret>,
    pub hook_timeout: Duration,
    pub hook_concurrency: usize,
    pub disconnect_hook_queue: usize,
    pub jwt: Option<crate::auth::JwtKey>,
    /// Lower-cased origins without a trailing slash, or `*`.
    pub allowed_origins: Vec<String>,
    /// Longest prefix first.
    pub namespaces: Vec<NamespaceRule>,
    pub default_namespace: NamespaceRule,
}

impl AuthConfig {
    /// The configured hook paths.
    pub fn hook_paths(&self) -> impl Iterator<Item = &str> {
        [&self.connect_hook, &self.subscribe_hook, &self.publish_hook, &self.message_hook, &self.disconnect_hook]
            .into_iter()
            .flatten()
            .map(|p| p.split('?').next().unwrap_or(p))
    }

    /// A `hook` policy without its hook path would deny everything: refuse it.
    fn check_hooks_for_policies(&self) -> Result<(), ConfigError> {
        let rules = self.namespaces.iter().chain(std::iter::once(&self.default_namespace));
        for r in rules {
            if r.subscribe == Policy::Hook && self.subscribe_hook.is_none() {
                return Err(ConfigError::new(
                    "subscribe-hook",
                    format!("required: namespace {:?} has subscribe = \"hook\"", r.prefix),
                ));
            }
            if r.publish == Policy::Hook && self.publish_hook.is_none() {
                return Err(ConfigError::new(
                    "publish-hook",
                    format!("required: namespace {:?} has publish = \"hook\"", r.prefix),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_key_is_named() {
        let err = Options::from_toml("listen = \"127.0.0.1:1\"\nmax-mesage-bytes = 3\n").unwrap_err();
        assert_eq!(err.key, "max-mesage-bytes");
    }

    #[test]
    fn bad_value_is_named() {
        let err = Options::from_toml("ping-interval = \"soon\"\n").unwrap_err();
        assert_eq!(err.key, "ping-interval");
        let err = Options::from_toml("max-connections = \"lots\"\n").unwrap_err();
        assert_eq!(err.key, "max-connections");
        let err = Options::from_toml("[[namespace]]\nprefix = \"a:\"\nsubscribe = \"maybe\"\n").unwrap_err();
        assert_eq!(err.key, "namespace[0].subscribe");
    }

    #[test]
    fn flag_beats_file_beats_default() {
        let file = Options::from_toml("client-queue = 7\nmax-subscriptions = 9\n").unwrap();
        let cli = Options::try_parse_from(["wsrelay", "--client-queue", "5"]).unwrap();
        let cfg = cli.merge(file).validate().unwrap();
        assert_eq!(cfg.session.client_queue, 5);
        assert_eq!(cfg.session.max_subscriptions, 9);
        assert_eq!(cfg.session.max_message_bytes, 65_536);
    }

    #[test]
    fn admin_on_public_address_needs_token() {
        let err = Config::from_args(["wsrelay", "--admin-listen", "0.0.0.0:9000"]).unwrap_err();
        assert_eq!(err.key, "api-token");
        assert!(Config::from_args(["wsrelay", "--admin-listen", "0.0.0.0:9000", "--api-token", "t"]).is_ok());
    }

    #[test]
    fn secrets_do_not_print() {
        let cfg =
            Config::from_args(["wsrelay", "--api-token", "hunter2", "--redis-url", "redis://:pw@localhost/"]).unwrap();
        let dbg = format!("{cfg:?}");
        assert!(!dbg.contains("hunter2") && !dbg.contains("pw@"), "{dbg}");
    }
}
