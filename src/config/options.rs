//! Every option, declared once: its flag, environment variable, default,
//! range and help text are the clap attributes below, and its config-file
//! key is the flag's long name (see [`super::file`]). `--help` prints the
//! defaults from here; nothing else restates them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::builder::RangedU64ValueParser;
use clap::{Parser, ValueEnum};

use super::keys::Secret;

/// Longest duration any option takes: beyond it a typo (`10000000s`) would
/// overflow the clock arithmetic instead of meaning anything.
const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);

/// A duration written the human way (`500ms`, `25s`, `10m`), at most 24 h.
fn duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("expected a duration like \"500ms\", \"25s\" or \"10m\" ({e})"))?;
    if d > MAX_DURATION {
        return Err("must be at most 24h".into());
    }
    Ok(d)
}

/// As [`duration`], and longer than zero.
fn nonzero_duration(s: &str) -> Result<Duration, String> {
    match duration(s)? {
        d if d.is_zero() => Err("must be longer than 0".into()),
        d => Ok(d),
    }
}

/// A count between `min` and `max`.
fn count(min: u64, max: u64) -> RangedU64ValueParser<usize> {
    RangedU64ValueParser::new().range(min..=max)
}

/// An address or a network: `10.0.0.0/8`, `192.168.1.7`, `::1`.
fn network(s: &str) -> Result<ipnet::IpNet, String> {
    if let Ok(net) = s.parse::<ipnet::IpNet>() {
        return Ok(net.trunc());
    }
    s.parse::<std::net::IpAddr>()
        .map(ipnet::IpNet::from)
        .map_err(|_| format!("{s:?} is neither an IP address nor a network like 10.0.0.0/8"))
}

/// A rate between 0 and `max`.
fn rate(max: u64) -> RangedU64ValueParser<u32> {
    RangedU64ValueParser::new().range(0..=max)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// wsrelay: a WebSocket relay sidecar. Terminates client WebSockets, fans
/// messages out through Redis, and proxies every other request to the app.
#[derive(Debug, Clone, Parser)]
#[command(name = "wsrelay", version, about, long_about = None)]
pub struct Options {
    /// TOML config file with the same keys as the flags (plus namespaces)
    #[arg(long, env = "WSRELAY_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Validate the configuration and exit (0 when valid, 64 when not)
    #[arg(long)]
    pub check_config: bool,

    /// Public listener: WebSocket upgrades and the proxied app
    #[arg(long, env = "WSRELAY_LISTEN", value_name = "ADDR", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,

    /// The app every non-relay request is forwarded to
    #[arg(long, env = "WSRELAY_UPSTREAM", value_name = "URL", default_value = "http://127.0.0.1:3000")]
    pub upstream: String,

    /// Path whose WebSocket upgrades wsrelay terminates; repeatable
    #[arg(long, env = "WSRELAY_WS_PATH", value_name = "PATH", value_delimiter = ',', default_value = "/ws")]
    pub ws_path: Vec<String>,

    /// Serve wsrelay.v1 clients on --ws-path; false for a Socket.IO-only app (upgrades on
    /// --ws-path then go to the app like any other request)
    #[arg(long, env = "WSRELAY_WS_ENABLED", value_name = "BOOL", default_value = "true", action = clap::ArgAction::Set, value_parser = clap::value_parser!(bool))]
    pub ws_enabled: bool,

    /// Serve Socket.IO (Engine.IO v4 polling and WebSocket) clients on this path, e.g. /socket.io/
    /// [default: off]
    #[arg(long, env = "WSRELAY_SOCKETIO_PATH", value_name = "PATH")]
    pub socketio_path: Option<String>,

    /// Redis channel where python-socketio's Redis manager publishes (e.g. socketio): its emits,
    /// room changes and disconnects reach this node's Socket.IO clients [default: off]
    #[arg(long, env = "WSRELAY_SOCKETIO_REDIS_CHANNEL", value_name = "CHANNEL")]
    pub socketio_redis_channel: Option<String>,

    /// How long a disconnected Socket.IO client's rooms and position are kept for its
    /// connection-state recovery (`0s`: no recovery, and no `pid` in CONNECT answers)
    #[arg(long, env = "WSRELAY_SOCKETIO_RECOVERY_WINDOW", value_name = "DURATION", default_value = "2m", value_parser = duration)]
    pub socketio_recovery_window: Duration,

    /// Largest Socket.IO polling request body and response (Engine.IO maxPayload)
    #[arg(long, env = "WSRELAY_SOCKETIO_MAX_PAYLOAD", value_name = "BYTES", default_value = "1000000", value_parser = count(1024, 64 << 20))]
    pub socketio_max_payload: usize,

    /// Largest packet a Socket.IO client may send, in bytes (at most 16 MiB): an app that takes
    /// large documents over Socket.IO raises it without raising --max-message-bytes for
    /// wsrelay.v1 clients [default: --max-message-bytes]
    #[arg(long, env = "WSRELAY_SOCKETIO_MAX_MESSAGE_BYTES", value_name = "BYTES", value_parser = count(1, 16 << 20))]
    pub socketio_max_message_bytes: Option<usize>,

    /// Engine.IO transports Socket.IO clients may use: `polling`, `websocket`, or both
    /// (python-socketio's `transports`; polling alone offers no upgrade, as Open WebUI
    /// with ENABLE_WEBSOCKET_SUPPORT=false); repeatable
    #[arg(
        long,
        env = "WSRELAY_SOCKETIO_TRANSPORTS",
        value_name = "TRANSPORT",
        value_delimiter = ',',
        default_value = "polling,websocket"
    )]
    pub socketio_transports: Vec<String>,

    /// Socket.IO sessions one client address may have waiting for their CONNECT at once
    /// (behind a reverse proxy, list it in --trusted-proxy so clients are told apart)
    #[arg(long, env = "WSRELAY_SOCKETIO_OPENING_PER_ADDRESS", value_name = "N", default_value = "16", value_parser = count(1, 1 << 20))]
    pub socketio_opening_per_address: usize,

    /// URL at which the other sidecars reach this one's public listener (Socket.IO polling
    /// requests that land on another replica are forwarded here) [default: http://<listen
    /// address>, or http://<hostname>:<port> when listening on all interfaces]
    #[arg(long, env = "WSRELAY_ADVERTISE_URL", value_name = "URL")]
    pub advertise_url: Option<String>,

    /// Admin listener: /api/*, /metrics, /healthz, /readyz
    #[arg(long, env = "WSRELAY_ADMIN_LISTEN", value_name = "ADDR", default_value = "127.0.0.1:8081")]
    pub admin_listen: SocketAddr,

    /// Bearer token required on /api/* (required when the admin listener is not loopback)
    #[arg(long, env = "WSRELAY_API_TOKEN", value_name = "TOKEN", hide_env_values = true)]
    pub api_token: Option<Secret>,

    /// Redis or Valkey URL: redis://, rediss:// (TLS), redis+sentinel://h1:26379,h2/<master>/<db> (or /<db>/<master>), redis+cluster://h1:7000,h2:7001; unset: in-memory broker, single instance
    #[arg(long, env = "WSRELAY_REDIS_URL", value_name = "URL", hide_env_values = true)]
    pub redis_url: Option<Secret>,

    /// Prefix of every Redis key and channel, so several apps can share a Redis
    #[arg(long, env = "WSRELAY_REDIS_PREFIX", value_name = "PREFIX", default_value = "wsrelay:")]
    pub redis_prefix: String,

    /// Timeout for connecting to Redis and for each Redis command
    #[arg(long, env = "WSRELAY_REDIS_TIMEOUT", value_name = "DURATION", default_value = "2s", value_parser = nonzero_duration)]
    pub redis_timeout: Duration,

    /// How often the node checks its Redis subscriber end to end
    #[arg(long, env = "WSRELAY_REDIS_PROBE_INTERVAL", value_name = "DURATION", default_value = "1s", value_parser = nonzero_duration)]
    pub redis_probe_interval: Duration,

    /// A probe not received back within this is a dead subscriber: reconnect
    #[arg(long, env = "WSRELAY_REDIS_PROBE_TIMEOUT", value_name = "DURATION", default_value = "3s", value_parser = nonzero_duration)]
    pub redis_probe_timeout: Duration,

    /// Bytes of messages from Redis buffered for this node at most; beyond, they are dropped and
    /// counted (channels with history are repaired from it)
    #[arg(long, env = "WSRELAY_REDIS_RECEIVE_BUFFER", value_name = "BYTES", default_value = "16777216", value_parser = count(65_536, 1 << 34))]
    pub redis_receive_buffer: usize,

    /// Before answering a publish that keeps history, wait (WAIT, up to --redis-timeout) until
    /// this many replicas have it; fewer in time is counted and logged, still a 200 (the message
    /// was delivered). 0: do not wait. One Redis or Sentinel, not Cluster
    #[arg(long, env = "WSRELAY_REDIS_WAIT_REPLICAS", value_name = "N", default_value = "0", value_parser = count(0, 64))]
    pub redis_wait_replicas: usize,

    /// Name of this node in logs and metrics [default: random]
    #[arg(long, env = "WSRELAY_NODE_ID", value_name = "ID")]
    pub node_id: Option<String>,

    /// Runtime worker threads [default: one per core]. On a small box shared with the app, 1 can
    /// cut cross-thread wake-ups (see docs/BENCHMARKS.md)
    #[arg(long, env = "WSRELAY_WORKER_THREADS", value_name = "N", value_parser = count(1, 1024))]
    pub worker_threads: Option<usize>,

    /// Log format
    #[arg(long, env = "WSRELAY_LOG_FORMAT", value_name = "FORMAT", default_value = "text")]
    pub log_format: LogFormat,

    /// Log level or tracing filter directives, e.g. `info` or `wsrelay=debug`
    #[arg(long, env = "WSRELAY_LOG_LEVEL", value_name = "FILTER", default_value = "info")]
    pub log_level: String,

    /// Largest frame a client may send, in bytes (at most 16 MiB); larger closes with 1009
    #[arg(long, env = "WSRELAY_MAX_MESSAGE_BYTES", value_name = "BYTES", default_value = "65536", value_parser = count(1, 16 << 20))]
    pub max_message_bytes: usize,

    /// Most concurrent WebSocket sessions; more are refused with 503
    #[arg(long, env = "WSRELAY_MAX_CONNECTIONS", value_name = "N", default_value = "10000", value_parser = count(1, 10_000_000))]
    pub max_connections: usize,

    /// Most channels one connection may subscribe to
    #[arg(long, env = "WSRELAY_MAX_SUBSCRIPTIONS", value_name = "N", default_value = "128", value_parser = count(1, 100_000))]
    pub max_subscriptions: usize,

    /// Outbound messages queued per connection; a full queue closes it with 1013
    #[arg(long, env = "WSRELAY_CLIENT_QUEUE", value_name = "N", default_value = "1024", value_parser = count(1, 1_000_000))]
    pub client_queue: usize,

    /// Frames per second a client may send, 0 for no limit
    #[arg(long, env = "WSRELAY_CLIENT_RATE", value_name = "PER_SECOND", default_value = "100", value_parser = rate(1_000_000))]
    pub client_rate: u32,

    /// Frames a client may send in a burst above --client-rate [default: 2 × client-rate]
    #[arg(long, env = "WSRELAY_CLIENT_BURST", value_name = "N", value_parser = rate(1_000_000))]
    pub client_burst: Option<u32>,

    /// WebSocket ping sent to each client this often; keep below proxies' idle timeouts
    #[arg(long, env = "WSRELAY_PING_INTERVAL", value_name = "DURATION", default_value = "25s", value_parser = nonzero_duration)]
    pub ping_interval: Duration,

    /// A client silent (no frame, no pong) for this long is closed
    #[arg(long, env = "WSRELAY_IDLE_TIMEOUT", value_name = "DURATION", default_value = "60s", value_parser = nonzero_duration)]
    pub idle_timeout: Duration,

    /// Connections on the public listener at most (plain HTTP and upgrades in progress); more wait
    /// in the kernel's backlog. [default: derived from the file-descriptor limit]
    #[arg(long, env = "WSRELAY_MAX_HTTP_CONNECTIONS", value_name = "N", value_parser = count(1, 1_000_000))]
    pub max_http_connections: Option<usize>,

    /// An HTTP connection (HTTP/1 keep-alive or HTTP/2) with no request in flight for this long is closed
    #[arg(long, env = "WSRELAY_HTTP_IDLE_TIMEOUT", value_name = "DURATION", default_value = "75s", value_parser = nonzero_duration)]
    pub http_idle_timeout: Duration,

    /// Channels with local subscribers on this node at most; more subscribe with limit_exceeded
    #[arg(long, env = "WSRELAY_MAX_CHANNELS", value_name = "N", default_value = "100000", value_parser = count(1, 10_000_000))]
    pub max_channels: usize,

    /// Subscriptions of all sessions on this node at most; more subscribe with limit_exceeded
    #[arg(long, env = "WSRELAY_MAX_NODE_SUBSCRIPTIONS", value_name = "N", default_value = "200000", value_parser = count(1, 100_000_000))]
    pub max_node_subscriptions: usize,

    /// Bytes of messages queued for clients on this node at most; past it, clients already behind
    /// are closed with 1013
    #[arg(long, env = "WSRELAY_MAX_QUEUED_BYTES", value_name = "BYTES", default_value = "67108864", value_parser = count(65_536, 1 << 40))]
    pub max_queued_bytes: usize,

    /// Peer (IP or CIDR; repeatable) whose X-Forwarded-* headers are believed; from any other peer
    /// they are replaced [default: none]
    #[arg(long, env = "WSRELAY_TRUSTED_PROXY", value_name = "CIDR", value_delimiter = ',', value_parser = network)]
    pub trusted_proxy: Vec<ipnet::IpNet>,

    /// Time allowed for a client to send its request headers and finish the upgrade
    #[arg(long, env = "WSRELAY_HANDSHAKE_TIMEOUT", value_name = "DURATION", default_value = "10s", value_parser = nonzero_duration)]
    pub handshake_timeout: Duration,

    /// Longest wait for the app's response headers before 504
    #[arg(long, env = "WSRELAY_UPSTREAM_TIMEOUT", value_name = "DURATION", default_value = "60s", value_parser = nonzero_duration)]
    pub upstream_timeout: Duration,

    /// Longest wait to connect to the app before 502
    #[arg(long, env = "WSRELAY_UPSTREAM_CONNECT_TIMEOUT", value_name = "DURATION", default_value = "5s", value_parser = nonzero_duration)]
    pub upstream_connect_timeout: Duration,

    /// A request body must move toward the app at this many bytes/s on average, or the request is
    /// cut with 504 after --upstream-timeout (0: any progress resets the clock)
    #[arg(long, env = "WSRELAY_UPSTREAM_MIN_UPLOAD_RATE", value_name = "BYTES_PER_SECOND", default_value = "1024", value_parser = count(0, 1 << 30))]
    pub upstream_min_upload_rate: usize,

    /// A WebSocket tunnelled to the app (not on a ws-path) that moves no byte for this long is closed
    #[arg(long, env = "WSRELAY_TUNNEL_IDLE_TIMEOUT", value_name = "DURATION", default_value = "10m", value_parser = nonzero_duration)]
    pub tunnel_idle_timeout: Duration,

    /// Idle pooled connections to the app are closed after this; keep it below the app's keep-alive
    #[arg(long, env = "WSRELAY_UPSTREAM_IDLE_TIMEOUT", value_name = "DURATION", default_value = "30s", value_parser = nonzero_duration)]
    pub upstream_idle_timeout: Duration,

    /// On SIGTERM, keep serving this long (readyz 503, upgrades refused) before closing clients,
    /// while load balancers take the replica out
    #[arg(long, env = "WSRELAY_SHUTDOWN_DELAY", value_name = "DURATION", default_value = "0s", value_parser = duration)]
    pub shutdown_delay: Duration,

    /// On SIGTERM, the window over which clients are closed and requests finish
    #[arg(long, env = "WSRELAY_DRAIN_TIMEOUT", value_name = "DURATION", default_value = "30s", value_parser = nonzero_duration)]
    pub drain_timeout: Duration,

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

    /// Longest wait for any hook's answer; a late hook fails closed
    #[arg(long, env = "WSRELAY_HOOK_TIMEOUT", value_name = "DURATION", default_value = "5s", value_parser = nonzero_duration)]
    pub hook_timeout: Duration,

    /// Most hook requests in flight at once; more wait their turn within --hook-timeout
    #[arg(long, env = "WSRELAY_HOOK_CONCURRENCY", value_name = "N", default_value = "64", value_parser = count(1, 10_000))]
    pub hook_concurrency: usize,

    /// Disconnect notifications queued for the disconnect hook; overflow is dropped and counted
    #[arg(long, env = "WSRELAY_DISCONNECT_HOOK_QUEUE", value_name = "N", default_value = "1024", value_parser = count(1, 1_000_000))]
    pub disconnect_hook_queue: usize,

    /// HS256 secret that signs client JWTs
    #[arg(long, env = "WSRELAY_JWT_SECRET", value_name = "SECRET", hide_env_values = true)]
    pub jwt_secret: Option<Secret>,

    /// PEM file with the RSA or EC public key that verifies client JWTs (RS256 / ES256)
    #[arg(long, env = "WSRELAY_JWT_PUBLIC_KEY", value_name = "FILE")]
    pub jwt_public_key: Option<PathBuf>,

    /// Accepted JWT `aud` values; repeatable. Unset: `aud` is not checked
    #[arg(long, env = "WSRELAY_JWT_AUDIENCE", value_name = "AUD", value_delimiter = ',')]
    pub jwt_audience: Vec<String>,

    /// Accepted JWT `iss` values; repeatable. Unset: `iss` is not checked
    #[arg(long, env = "WSRELAY_JWT_ISSUER", value_name = "ISS", value_delimiter = ',')]
    pub jwt_issuer: Vec<String>,

    /// The JWT claim that names the user (a string or a number); Open WebUI's tokens use `id`
    #[arg(long, env = "WSRELAY_JWT_USER_CLAIM", value_name = "CLAIM", default_value = "sub")]
    pub jwt_user_claim: String,

    /// A channel every JWT connection joins, `{user}` standing for its user (e.g. `user:{user}`)
    #[arg(long, env = "WSRELAY_JWT_USER_CHANNEL", value_name = "TEMPLATE")]
    pub jwt_user_channel: Option<String>,

    /// Clock skew allowed on JWT `exp` and `nbf`; a session is closed this long after its token's `exp`
    #[arg(long, env = "WSRELAY_JWT_LEEWAY", value_name = "DURATION", default_value = "5s", value_parser = duration)]
    pub jwt_leeway: Duration,

    /// Origin allowed to open WebSockets (scheme://host[:port]); repeatable; `*` allows all
    /// [default: same host as the request]
    #[arg(long, env = "WSRELAY_ALLOWED_ORIGIN", value_name = "ORIGIN", value_delimiter = ',')]
    pub allowed_origin: Vec<String>,
}
