//! The rules that span several options (or need more than a parser), and
//! the building of [`Config`]. Single values were range-checked where they
//! were declared ([`super::options`]).

use std::path::PathBuf;

use super::keys::{JwtKey, Secret};
use super::options::Options;
use super::policy::{self, NamespaceTables, Policy};
use super::{
    AuthConfig, BrokerConfig, Config, ConfigError, ProxyConfig, ServerConfig, SessionConfig, SocketIoConfig, random_id,
};

/// Connections the admin listener takes at most (Prometheus, probes, the
/// app's API calls): its own share of file descriptors.
const ADMIN_CONNECTIONS: usize = 256;
/// File descriptors kept for everything else: Redis, logs, the admin
/// listener, the runtime.
const FD_RESERVE: u64 = 128;

/// The process's file-descriptor limit, raised to the hard limit first (as
/// nginx and Go do): the soft default of 1024 is far below what a relay needs.
fn fd_limit() -> u64 {
    rlimit::increase_nofile_limit(u64::MAX).unwrap_or(1024)
}

/// The default public connection cap: each proxied request may hold two
/// descriptors (client and app), and WebSocket sessions hold their own
/// under --max-connections; this keeps the admin listener's share free.
fn http_connections_for_fds(fds: u64) -> usize {
    let usable = fds.saturating_sub(FD_RESERVE + ADMIN_CONNECTIONS as u64) / 2;
    usize::try_from(usable).unwrap_or(usize::MAX).clamp(16, 65_536)
}

fn nonempty_str(s: Option<String>) -> Option<String> {
    s.map(|s| s.trim().to_owned()).filter(|s| !s.is_empty())
}

/// Where other sidecars reach a public listener bound to `addr`, unless
/// `--advertise-url` says: the address, or this machine's name (a
/// container's or pod's resolves to its address) for 0.0.0.0 / ::.
pub fn default_advertise_url(addr: std::net::SocketAddr) -> String {
    if addr.ip().is_unspecified() { format!("http://{}:{}", hostname(), addr.port()) } else { format!("http://{addr}") }
}

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty() && h.bytes().all(|b| b.is_ascii_alphanumeric() || b"-.".contains(&b)))
        .unwrap_or_else(|| "localhost".to_owned())
}

pub(super) fn validate(o: Options, namespaces: NamespaceTables) -> Result<Config, ConfigError> {
    let upstream = parse_upstream(&o.upstream)?;
    for p in &o.ws_path {
        if !p.starts_with('/') || p.contains(['?', '#', ' ']) {
            return Err(ConfigError::new("ws-path", format!("{p:?} must be a path starting with '/'")));
        }
    }
    let api_token = nonempty(o.api_token);
    if !o.admin_listen.ip().is_loopback() && api_token.is_none() {
        return Err(ConfigError::new(
            "api-token",
            format!(
                "required when admin-listen ({}) is not a loopback address: the API can publish to every client",
                o.admin_listen
            ),
        ));
    }
    if o.idle_timeout <= o.ping_interval {
        return Err(ConfigError::new(
            "idle-timeout",
            format!(
                "must be longer than ping-interval ({:?}) or idle clients answering pings would be closed",
                o.ping_interval
            ),
        ));
    }
    let sio_max_message = o.socketio_max_message_bytes.unwrap_or(o.max_message_bytes);
    let socketio = match nonempty_str(o.socketio_path) {
        None => {
            if o.socketio_redis_channel.is_some() {
                return Err(ConfigError::new("socketio-redis-channel", "needs socketio-path (the Socket.IO front)"));
            }
            if o.socketio_max_message_bytes.is_some() {
                return Err(ConfigError::new(
                    "socketio-max-message-bytes",
                    "needs socketio-path (the Socket.IO front)",
                ));
            }
            None
        }
        Some(p) => {
            let path = p.strip_suffix('/').unwrap_or(&p).to_owned();
            if !p.starts_with('/') || path.is_empty() || p.contains(['?', '#', ' ']) {
                return Err(ConfigError::new("socketio-path", format!("{p:?} must be a path like /socket.io/")));
            }
            if o.ws_path.iter().any(|w| w.strip_suffix('/').unwrap_or(w) == path) {
                return Err(ConfigError::new("socketio-path", format!("{p:?} is also a ws-path")));
            }
            let mut polling = false;
            let mut websocket = false;
            for t in &o.socketio_transports {
                match t.trim() {
                    "polling" => polling = true,
                    "websocket" => websocket = true,
                    other => {
                        let msg = format!("{other:?} is no transport: polling or websocket");
                        return Err(ConfigError::new("socketio-transports", msg));
                    }
                }
            }
            if !polling && !websocket {
                return Err(ConfigError::new("socketio-transports", "must name polling, websocket or both"));
            }
            // Only a limit raised on purpose: a small max-payload with the
            // default packet limit stays valid (packets are small then).
            if o.socketio_max_message_bytes.is_some() && o.socketio_max_payload < sio_max_message {
                let msg = format!(
                    "({}) must be at least socketio-max-message-bytes ({sio_max_message}): a polling request carries a whole packet",
                    o.socketio_max_payload
                );
                return Err(ConfigError::new("socketio-max-payload", msg));
            }
            let redis_channel = nonempty_str(o.socketio_redis_channel);
            if redis_channel.is_some() && o.redis_url.is_none() {
                return Err(ConfigError::new("socketio-redis-channel", "needs redis-url"));
            }
            if redis_channel.as_ref().is_some_and(|c| c.len() > 255 || c.contains(char::is_whitespace)) {
                return Err(ConfigError::new("socketio-redis-channel", "must be a Redis channel name without spaces"));
            }
            Some(SocketIoConfig {
                path,
                redis_channel,
                recovery_window: o.socketio_recovery_window,
                max_payload: o.socketio_max_payload,
                max_message_bytes: sio_max_message,
                polling,
                websocket,
                opening_per_address: o.socketio_opening_per_address,
            })
        }
    };
    let advertise_url = match nonempty_str(o.advertise_url) {
        Some(u) => {
            let uri = u.parse::<http::Uri>().ok().filter(|u| u.scheme_str() == Some("http") && u.host().is_some());
            if uri.is_none() {
                return Err(ConfigError::new("advertise-url", format!("{u:?} must be an http:// URL")));
            }
            Some(u.trim_end_matches('/').to_owned())
        }
        None => None,
    };
    let client_burst = o.client_burst.unwrap_or(o.client_rate.saturating_mul(2).max(1));
    if o.client_rate > 0 && client_burst == 0 {
        return Err(ConfigError::new("client-burst", "must be at least 1 when client-rate is set"));
    }
    let session = SessionConfig {
        ws_paths: if o.ws_enabled { o.ws_path } else { Vec::new() },
        max_message_bytes: o.max_message_bytes,
        largest_message: o.max_message_bytes.max(sio_max_message),
        max_connections: o.max_connections,
        max_subscriptions: o.max_subscriptions,
        client_queue: o.client_queue,
        client_rate: o.client_rate,
        client_burst,
        ping_interval: o.ping_interval,
        idle_timeout: o.idle_timeout,
        handshake_timeout: o.handshake_timeout,
        max_channels: o.max_channels,
        max_node_subscriptions: o.max_node_subscriptions,
        max_queued_bytes: o.max_queued_bytes,
        socketio,
    };
    let proxy = ProxyConfig {
        upstream,
        timeout: o.upstream_timeout,
        connect_timeout: o.upstream_connect_timeout,
        idle_timeout: o.upstream_idle_timeout,
        min_upload_rate: o.upstream_min_upload_rate,
        tunnel_idle_timeout: o.tunnel_idle_timeout,
    };
    let server = ServerConfig {
        max_http_connections: o.max_http_connections.unwrap_or_else(|| http_connections_for_fds(fd_limit())),
        max_admin_connections: ADMIN_CONNECTIONS,
        http_idle_timeout: o.http_idle_timeout,
        handshake_timeout: o.handshake_timeout,
        trusted_proxies: o.trusted_proxy,
    };

    let node_id = match o.node_id {
        Some(id) => {
            if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) {
                return Err(ConfigError::new("node-id", "must be 1-64 characters of [A-Za-z0-9._-]"));
            }
            id
        }
        None => random_id(8),
    };

    let broker = BrokerConfig {
        redis_url: nonempty(o.redis_url).map(validate_redis_url).transpose()?,
        prefix: o.redis_prefix,
        timeout: o.redis_timeout,
        probe_interval: o.redis_probe_interval,
        probe_timeout: o.redis_probe_timeout,
        receive_buffer: o.redis_receive_buffer,
        wait_replicas: o.redis_wait_replicas,
        socketio_channel: session.socketio.as_ref().and_then(|s| s.redis_channel.clone()),
        max_message_bytes: session.largest_message,
    };
    if broker.prefix.contains(char::is_whitespace) {
        return Err(ConfigError::new("redis-prefix", "must not contain whitespace"));
    }
    let cluster = broker.redis_url.as_ref().is_some_and(|u| u.expose().contains("+cluster://"));
    if cluster && (broker.prefix.is_empty() || broker.prefix.contains(['{', '}'])) {
        return Err(ConfigError::new(
            "redis-prefix",
            "must not be empty nor contain { or } on a Redis Cluster (it is the node-wide keys' hash tag)",
        ));
    }
    if cluster && broker.wait_replicas > 0 {
        return Err(ConfigError::new("redis-wait-replicas", "is not supported on a Redis Cluster"));
    }

    if o.shutdown_delay >= o.drain_timeout {
        return Err(ConfigError::new(
            "shutdown-delay",
            format!("must be shorter than drain-timeout ({:?}), which bounds the whole drain", o.drain_timeout),
        ));
    }
    if tracing_subscriber::EnvFilter::try_new(&o.log_level).is_err() {
        return Err(ConfigError::new(
            "log-level",
            format!("{:?} is not a level (error, warn, info, debug, trace) or filter directive", o.log_level),
        ));
    }

    let namespaces = std::sync::Arc::new(policy::rules(namespaces)?);
    let auth = AuthConfig {
        connect_hook: hook_path("connect-hook", o.connect_hook)?,
        subscribe_hook: hook_path("subscribe-hook", o.subscribe_hook)?,
        publish_hook: hook_path("publish-hook", o.publish_hook)?,
        message_hook: hook_path("message-hook", o.message_hook)?,
        disconnect_hook: hook_path("disconnect-hook", o.disconnect_hook)?,
        hook_secret: nonempty(o.hook_secret),
        hook_timeout: o.hook_timeout,
        hook_concurrency: o.hook_concurrency,
        disconnect_hook_queue: o.disconnect_hook_queue,
        jwt: jwt_key(nonempty(o.jwt_secret), o.jwt_public_key)?.map(|k| {
            k.with_claims(&o.jwt_audience, &o.jwt_issuer).with_leeway(o.jwt_leeway).with_user_claim(&o.jwt_user_claim)
        }),
        jwt_user_channel: jwt_user_channel(o.jwt_user_channel)?,
        max_result_bytes: o.max_message_bytes.max(sio_max_message),
        allowed_origins: validate_origins(o.allowed_origin)?,
        namespaces: namespaces.clone(),
    };
    check_hooks_for_policies(&auth)?;
    if o.jwt_user_claim.trim().is_empty() {
        return Err(ConfigError::new("jwt-user-claim", "must name a claim"));
    }

    Ok(Config {
        listen: o.listen,
        admin_listen: o.admin_listen,
        api_token,
        node_id,
        log_format: o.log_format,
        worker_threads: o.worker_threads,
        log_level: o.log_level,
        drain_timeout: o.drain_timeout,
        shutdown_delay: o.shutdown_delay,
        advertise_url,
        server,
        session,
        proxy,
        broker,
        auth,
        namespaces,
    })
}

/// An empty secret (e.g. `WSRELAY_API_TOKEN=`) is no secret.
fn nonempty(s: Option<Secret>) -> Option<Secret> {
    s.filter(|s| !s.expose().is_empty())
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
    super::RedisUrl::parse(url.expose()).map_err(|e| ConfigError::new("redis-url", e))?;
    Ok(url)
}

/// `--jwt-user-channel`: names a channel once `{user}` is filled in.
fn jwt_user_channel(v: Option<String>) -> Result<Option<String>, ConfigError> {
    let key = "jwt-user-channel";
    match v {
        None => Ok(None),
        Some(t) if t.is_empty() => Ok(None),
        Some(t) if !t.contains("{user}") => Err(ConfigError::new(key, format!("{t:?} must contain {{user}}"))),
        Some(t) => match crate::channel::Channel::parse(&t.replace("{user}", "42")) {
            Ok(_) => Ok(Some(t)),
            Err(e) => Err(ConfigError::new(key, format!("{t:?} does not make a valid channel name: {e}"))),
        },
    }
}

fn hook_path(key: &str, v: Option<String>) -> Result<Option<String>, ConfigError> {
    match v {
        None => Ok(None),
        Some(p) if p.is_empty() => Ok(None),
        Some(p) if p.starts_with('/') && p.parse::<http::uri::PathAndQuery>().is_ok() => Ok(Some(p)),
        Some(p) => Err(ConfigError::new(key, format!("{p:?} must be a path on the upstream starting with '/'"))),
    }
}

fn jwt_key(secret: Option<Secret>, public_key: Option<PathBuf>) -> Result<Option<JwtKey>, ConfigError> {
    match (secret, public_key) {
        (Some(_), Some(_)) => Err(ConfigError::new(
            "jwt-public-key",
            "set either jwt-secret (HS256) or jwt-public-key (RS256/ES256), not both",
        )),
        (Some(s), None) => Ok(Some(JwtKey::hs256(&s))),
        (None, Some(path)) => {
            let pem = std::fs::read(&path)
                .map_err(|e| ConfigError::new("jwt-public-key", format!("cannot read {}: {e}", path.display())))?;
            JwtKey::from_public_pem(&pem)
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

/// A `hook` policy without its hook path would deny everything: refuse it.
fn check_hooks_for_policies(auth: &AuthConfig) -> Result<(), ConfigError> {
    let rules = auth.namespaces.all();
    for r in rules {
        if r.subscribe == Policy::Hook && auth.subscribe_hook.is_none() {
            return Err(ConfigError::new(
                "subscribe-hook",
                format!("required: namespace {:?} has subscribe = \"hook\"", r.prefix),
            ));
        }
        if r.publish == Policy::Hook && auth.publish_hook.is_none() {
            return Err(ConfigError::new(
                "publish-hook",
                format!("required: namespace {:?} has publish = \"hook\"", r.prefix),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::super::{Config, LoadError, load};

    fn file(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f
    }

    fn file_error(text: &str) -> super::ConfigError {
        let f = file(text);
        match load(["wsrelay", "--config", f.path().to_str().unwrap()]) {
            Err(LoadError::Config(e)) => e,
            Err(LoadError::Cli(e)) => panic!("expected a config error, got {e}"),
            Ok(_) => panic!("expected {text:?} to be refused"),
        }
    }

    #[test]
    fn unknown_key_is_named() {
        assert_eq!(file_error("listen = \"127.0.0.1:1\"\nmax-mesage-bytes = 3\n").key, "max-mesage-bytes");
        assert_eq!(file_error("check-config = true\n").key, "check-config");
    }

    #[test]
    fn bad_value_is_named() {
        assert_eq!(file_error("ping-interval = \"soon\"\n").key, "ping-interval");
        assert_eq!(file_error("max-connections = \"lots\"\n").key, "max-connections");
        assert_eq!(file_error("hook-concurrency = 100000000\n").key, "hook-concurrency");
        assert_eq!(file_error("[[namespace]]\nprefix = \"a:\"\nsubscribe = \"maybe\"\n").key, "namespace[0].subscribe");
        let e = file_error("drain-timeout = \"100000000s\"\n");
        assert_eq!(e.key, "drain-timeout");
        assert!(e.message.contains("24h"), "{}", e.message);
    }

    #[test]
    fn flag_beats_env_beats_file_beats_default() {
        let f = file("client-queue = 7\nmax-subscriptions = 9\nws-path = [\"/a\", \"/b\"]\n");
        let path = f.path().to_str().unwrap();
        let cfg = Config::from_args(["wsrelay", "--config", path, "--client-queue", "5"]).unwrap();
        assert_eq!(cfg.session.client_queue, 5);
        assert_eq!(cfg.session.max_subscriptions, 9);
        assert_eq!(cfg.session.max_message_bytes, 65_536);
        assert_eq!(cfg.session.ws_paths, ["/a", "/b"]);
    }

    #[test]
    fn admin_on_public_address_needs_token() {
        let err = Config::from_args(["wsrelay", "--admin-listen", "0.0.0.0:9000"]).unwrap_err();
        assert_eq!(err.key, "api-token");
        assert!(Config::from_args(["wsrelay", "--admin-listen", "0.0.0.0:9000", "--api-token", "t"]).is_ok());
    }

    #[test]
    fn numbers_are_range_checked() {
        for args in [
            ["--hook-concurrency", "18446744073709551615"],
            ["--max-connections", "0"],
            ["--max-message-bytes", "999999999"],
            ["--ping-interval", "0s"],
        ] {
            let err = Config::from_args(["wsrelay", args[0], args[1]]).unwrap_err();
            assert!(err.message.contains(args[0]), "{args:?}: {err}");
        }
    }

    #[test]
    fn socketio_options_are_checked() {
        let key = |args: &[&str]| {
            let argv = ["wsrelay"].iter().chain(args).copied().collect::<Vec<_>>();
            Config::from_args(argv).unwrap_err().key
        };
        assert_eq!(key(&["--socketio-path", "socket.io"]), "socketio-path");
        assert_eq!(key(&["--socketio-path", "/ws"]), "socketio-path", "the ws-path");
        assert_eq!(key(&["--socketio-redis-channel", "socketio"]), "socketio-redis-channel", "without the front");
        assert_eq!(
            key(&["--socketio-path", "/socket.io/", "--socketio-redis-channel", "socketio"]),
            "socketio-redis-channel"
        );
        assert_eq!(key(&["--advertise-url", "https://10.0.0.1:8080"]), "advertise-url");
        let err = Config::from_args(["wsrelay", "--socketio-max-payload", "10"]).unwrap_err();
        assert!(err.message.contains("--socketio-max-payload"), "{err}");
        // A larger Socket.IO limit needs the front, and polling bodies that can carry it.
        assert_eq!(key(&["--socketio-max-message-bytes", "1048576"]), "socketio-max-message-bytes");
        assert_eq!(
            key(&["--socketio-path", "/ws/socket.io/", "--socketio-max-message-bytes", "16777216"]),
            "socketio-max-payload"
        );
        let cfg = Config::from_args([
            "wsrelay",
            "--socketio-path",
            "/s/",
            "--socketio-max-message-bytes",
            "16777216",
            "--socketio-max-payload",
            "16777216",
        ])
        .unwrap();
        assert_eq!(cfg.session.max_message_bytes, 65_536, "wsrelay.v1 clients keep theirs");
        assert_eq!(cfg.session.socketio.as_ref().unwrap().max_message_bytes, 16 << 20);
        assert_eq!(cfg.session.largest_message, 16 << 20, "the app may publish what Socket.IO clients may send");
        assert_eq!(cfg.broker.max_message_bytes, 16 << 20);
        // Transports, as python-socketio's `transports`.
        let sio = |t: &str| Config::from_args(["wsrelay", "--socketio-path", "/s/", "--socketio-transports", t]);
        let polling = sio("polling").unwrap().session.socketio.unwrap();
        assert!(polling.polling && !polling.websocket);
        let both = sio("websocket,polling").unwrap().session.socketio.unwrap();
        assert!(both.polling && both.websocket);
        assert_eq!(sio("flash").unwrap_err().key, "socketio-transports");
        let cfg = Config::from_args(["wsrelay", "--socketio-path", "/ws/socket.io/"]).unwrap();
        let sio = cfg.session.socketio.unwrap();
        assert!(sio.matches("/ws/socket.io") && sio.matches("/ws/socket.io/") && !sio.matches("/ws"));
    }

    #[test]
    fn redis_url_forms_and_what_a_cluster_refuses() {
        let url = |u: &str| Config::from_args(["wsrelay", "--redis-url", u]);
        assert!(url("redis+sentinel://s1:26379,s2/mymaster/0").is_ok());
        assert!(url("rediss+cluster://h1:7000,h2:7001#insecure").is_ok());
        let e = url("redis+sentinel://s1:port/m").unwrap_err();
        assert_eq!(e.key, "redis-url");
        assert!(e.to_string().contains("port"), "{e}");
        assert_eq!(url("memcached://h").unwrap_err().key, "redis-url");
        let cluster = |extra: [&str; 2]| {
            Config::from_args(["wsrelay", "--redis-url", "redis+cluster://h1:7000", extra[0], extra[1]])
        };
        assert_eq!(cluster(["--redis-prefix", "{app}:"]).unwrap_err().key, "redis-prefix");
        assert_eq!(cluster(["--redis-prefix", ""]).unwrap_err().key, "redis-prefix");
        assert_eq!(cluster(["--redis-wait-replicas", "1"]).unwrap_err().key, "redis-wait-replicas");
        assert!(cluster(["--redis-prefix", "app:"]).is_ok());
    }

    #[test]
    fn secrets_do_not_print() {
        let cfg =
            Config::from_args(["wsrelay", "--api-token", "hunter2", "--redis-url", "redis://:pw@localhost/"]).unwrap();
        let dbg = format!("{cfg:?}");
        assert!(!dbg.contains("hunter2") && !dbg.contains("pw@"), "{dbg}");
    }
}
