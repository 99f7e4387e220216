//! Configuration: CLI flags, `WSRELAY_*` environment variables and a TOML
//! file, merged once (flag > env > file > default) and validated into
//! [`Config`], whose sub-configs each belong to one component.
//!
//! - [`options`]: every option declared once (flag, env, default, range, help);
//! - [`file`]: layering the config file under the flags and environment;
//! - [`validate`]: the rules that span several options, and building [`Config`];
//! - [`keys`]: secrets and the JWT key; [`policy`]: namespaces.

pub mod file;
pub mod keys;
pub mod options;
pub mod policy;
pub mod redis_url;
mod validate;

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub use self::file::LoadError;
pub use self::keys::{JwtKey, Secret};
pub use self::options::{LogFormat, Options};
pub use self::policy::{HistoryPolicy, NamespaceRule, Namespaces, Policy};
pub use self::redis_url::RedisUrl;
pub use self::validate::default_advertise_url;

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
    pub fn new(key: &str, message: impl Into<String>) -> Self {
        Self { file: None, key: key.to_owned(), message: message.into() }
    }
}

/// The configuration and whether only `--check-config` was asked.
pub struct Loaded {
    pub config: Config,
    pub check_only: bool,
}

/// Reads flags, environment and the config file, and validates the result.
pub fn load<I, T>(args: I) -> Result<Loaded, LoadError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString>,
{
    let layered = file::layered(args.into_iter().map(Into::into).collect())?;
    let check_only = layered.options.check_config;
    let file = layered.file.clone();
    let config = validate::validate(layered.options, layered.namespaces).map_err(|mut e| {
        // What cannot be told apart (a cross-field rule) is reported against the file too.
        e.file = e.file.or(file);
        e
    })?;
    Ok(Loaded { config, check_only })
}

/// Validates a config file's text as `wsrelay --config FILE` would (no
/// flags or environment): for the config fuzz target and tools.
pub fn from_toml_text(text: &str) -> Result<Config, LoadError> {
    use clap::CommandFactory;
    let args: Vec<OsString> = vec!["wsrelay".into()];
    let matches = Options::command().try_get_matches_from(&args).map_err(LoadError::Cli)?;
    let layered = file::with_file_text(args, &matches, text, PathBuf::from("(text)"))?;
    Ok(validate::validate(layered.options, layered.namespaces)?)
}

/// A random identifier of `len` characters from [0-9a-z].
pub use crate::channel::random_id;

/// The validated configuration, one sub-config per component.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub api_token: Option<Secret>,
    pub node_id: String,
    pub log_format: LogFormat,
    /// Runtime worker threads (None: one per core).
    pub worker_threads: Option<usize>,
    pub log_level: String,
    pub drain_timeout: Duration,
    pub shutdown_delay: Duration,
    /// Where other sidecars reach this one's public listener (None: from
    /// the bound address, [`default_advertise_url`]).
    pub advertise_url: Option<String>,
    pub server: ServerConfig,
    pub session: SessionConfig,
    pub proxy: ProxyConfig,
    pub broker: BrokerConfig,
    pub auth: AuthConfig,
    /// Shared by the broker (history), the hub (presence) and auth (policies).
    pub namespaces: Arc<Namespaces>,
}

impl Config {
    /// Parses flags, environment and config file (as the binary does) from
    /// an argument list.
    pub fn from_args<I, T>(args: I) -> Result<Config, ConfigError>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString>,
    {
        match load(args) {
            Ok(l) => Ok(l.config),
            Err(LoadError::Config(e)) => Err(e),
            Err(LoadError::Cli(e)) => Err(ConfigError::new("(command line)", e.to_string())),
        }
    }
}

#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Empty when wsrelay.v1 is switched off (`--ws-enabled false`).
    pub ws_paths: Vec<String>,
    /// Largest frame a wsrelay.v1 client may send.
    pub max_message_bytes: usize,
    /// Largest message the app may publish or answer with: the largest that
    /// any front's clients may send (a Socket.IO app may allow more).
    pub largest_message: usize,
    pub max_connections: usize,
    pub max_subscriptions: usize,
    pub client_queue: usize,
    /// Frames per second; 0 disables the limit.
    pub client_rate: u32,
    pub client_burst: u32,
    pub ping_interval: Duration,
    pub idle_timeout: Duration,
    pub handshake_timeout: Duration,
    pub max_channels: usize,
    pub max_node_subscriptions: usize,
    pub max_queued_bytes: usize,
    pub socketio: Option<SocketIoConfig>,
}

impl SessionConfig {
    /// How long after a ping its pong may come (Engine.IO's `pingTimeout`):
    /// `--idle-timeout` − `--ping-interval`, at most 20 s.
    pub fn ping_timeout(&self) -> Duration {
        self.idle_timeout.saturating_sub(self.ping_interval).min(Duration::from_secs(20))
    }
}

/// The Socket.IO front (`--socketio-path`).
#[derive(Debug, Clone)]
pub struct SocketIoConfig {
    /// The path, with and without its trailing `/`.
    pub path: String,
    pub redis_channel: Option<String>,
    pub recovery_window: Duration,
    pub max_payload: usize,
    /// Largest packet a Socket.IO client may send (`--socketio-max-message-bytes`).
    pub max_message_bytes: usize,
    /// Whether clients may use HTTP long-polling (`--socketio-transports`).
    pub polling: bool,
    /// Whether clients may use (or upgrade to) WebSocket.
    pub websocket: bool,
    /// Sessions one client address may have waiting for their CONNECT.
    pub opening_per_address: usize,
}

impl SocketIoConfig {
    /// Whether a request path is the Socket.IO path (`/socket.io` or `/socket.io/`).
    pub fn matches(&self, path: &str) -> bool {
        path.strip_suffix('/').unwrap_or(path) == self.path
    }
}

/// The listeners' limits.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Connections on the public listener at most.
    pub max_http_connections: usize,
    /// Connections on the admin listener at most: its own budget, so
    /// `/healthz` and `/metrics` answer while the public side is full.
    pub max_admin_connections: usize,
    pub http_idle_timeout: Duration,
    pub handshake_timeout: Duration,
    /// Peers whose `X-Forwarded-*` headers are believed.
    pub trusted_proxies: Vec<ipnet::IpNet>,
}

impl ServerConfig {
    pub fn is_trusted(&self, ip: std::net::IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.trusted_proxies.iter().any(|n| n.contains(&ip))
    }
}

#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub upstream: http::Uri,
    pub timeout: Duration,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    /// Bytes per second an upload must average (0: any progress will do).
    pub min_upload_rate: usize,
    pub tunnel_idle_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct BrokerConfig {
    pub redis_url: Option<Secret>,
    pub prefix: String,
    pub timeout: Duration,
    pub probe_interval: Duration,
    pub probe_timeout: Duration,
    /// Bytes the subscriber's receive buffer holds at most.
    pub receive_buffer: usize,
    /// Replicas a history publish waits for (`WAIT`), 0: none.
    pub wait_replicas: usize,
    /// python-socketio's Redis manager channel, bridged to Socket.IO clients.
    pub socketio_channel: Option<String>,
    /// The longest emit the bridge relays (`--max-message-bytes`).
    pub max_message_bytes: usize,
}

#[derive(Debug, Clone)]
pub struct AuthConfig {
    /// `--jwt-user-channel`: a channel name with `{user}` in it.
    pub jwt_user_channel: Option<String>,
    pub connect_hook: Option<String>,
    pub subscribe_hook: Option<String>,
    pub publish_hook: Option<String>,
    pub message_hook: Option<String>,
    pub disconnect_hook: Option<String>,
    pub hook_secret: Option<Secret>,
    pub hook_timeout: Duration,
    pub hook_concurrency: usize,
    pub disconnect_hook_queue: usize,
    pub jwt: Option<JwtKey>,
    /// Largest message-hook answer relayed to a client (max-message-bytes).
    pub max_result_bytes: usize,
    /// Lower-cased origins without a trailing slash, or `*`.
    pub allowed_origins: Vec<String>,
    pub namespaces: Arc<Namespaces>,
}

impl AuthConfig {
    /// The configured hook paths.
    pub fn hook_paths(&self) -> impl Iterator<Item = &str> {
        [&self.connect_hook, &self.subscribe_hook, &self.publish_hook, &self.message_hook, &self.disconnect_hook]
            .into_iter()
            .flatten()
            .map(|p| p.split('?').next().unwrap_or(p))
    }

    /// The namespace rule that covers `channel`, and the name it covers it by.
    pub fn resolve<'a>(&self, channel: &'a str) -> (&NamespaceRule, &'a str) {
        self.namespaces.resolve(channel)
    }
}
