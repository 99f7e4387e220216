//! Connections to "the" Redis, wherever it is now: one server, or the
//! master a Sentinel names at each connect (so a pooled connection made
//! after a failover reaches the new master, and one to a demoted master is
//! dropped at its next checkout).
//!
//! `Pool` wraps a deadpool pool of our own manager (deadpool-redis's
//! manager knows one fixed address); its connections behave as
//! deadpool-redis's do (a checked `ConnectionLike`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use deadpool::managed::{self, Metrics, Object, RecycleError, RecycleResult};
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::io::tcp::TcpSettings;
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{AsyncConnectionConfig, ConnectionInfo, IntoConnectionInfo, RedisError, RedisResult, TlsMode};

use crate::config::redis_url::{RedisUrl, Tls};

/// Where the master is found, and where it was last found.
pub(super) struct Source {
    kind: Kind,
    /// `host:port` of the master as last resolved: pooled connections to
    /// another address are not handed out again.
    current: std::sync::Mutex<String>,
    /// The sentinels took the URL's credentials (and not none).
    sentinel_auth: AtomicBool,
}

enum Kind {
    Single(ConnectionInfo),
    /// `sentinels`, then (with the URL's user and password) `with_auth`:
    /// python-socketio asks sentinels without credentials, Open WebUI with
    /// them; whichever the sentinels take is used from then on.
    Sentinel {
        sentinels: Vec<ConnectionInfo>,
        with_auth: Option<Vec<ConnectionInfo>>,
        master: String,
        node: SentinelNodeConnectionInfo,
    },
    /// Seed nodes; redis-rs's cluster client finds the rest and follows
    /// `MOVED`/`ASK` and failovers.
    Cluster {
        nodes: Vec<ConnectionInfo>,
    },
}

/// A type-erased future: the connect paths are deep, and every pooled
/// call would otherwise carry (and the compiler re-derive) their types.
type Boxed<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = RedisResult<T>> + Send + 'a>>;

fn nodelay() -> TcpSettings {
    // redis-rs leaves Nagle on; every publish would wait for the previous ACK.
    TcpSettings::default().set_nodelay(true)
}

impl Source {
    pub(super) fn new(url: &RedisUrl) -> RedisResult<Source> {
        let kind = match url {
            RedisUrl::Single(u) => Kind::Single(u.as_str().into_connection_info()?.set_tcp_settings(nodelay())),
            RedisUrl::Sentinel(s) => {
                let sentinels =
                    s.sentinels.iter().map(|u| u.as_str().into_connection_info()).collect::<RedisResult<Vec<_>>>()?;
                let mut settings = redis::RedisConnectionInfo::default();
                if let Some(u) = &s.user {
                    settings = settings.set_username(u);
                }
                if let Some(p) = &s.password {
                    settings = settings.set_password(p);
                }
                let mut node = SentinelNodeConnectionInfo::default()
                    .set_redis_connection_info(settings.clone().set_db(s.db))
                    .set_tcp_settings(nodelay());
                match s.tls {
                    Tls::None => {}
                    Tls::Verified => node = node.set_tls_mode(TlsMode::Secure),
                    Tls::Insecure => node = node.set_tls_mode(TlsMode::Insecure),
                }
                let with_auth = (s.user.is_some() || s.password.is_some()).then(|| {
                    sentinels.iter().map(|i| i.clone().set_redis_settings(settings.clone())).collect::<Vec<_>>()
                });
                Kind::Sentinel { sentinels, with_auth, master: s.master.clone(), node }
            }
            RedisUrl::Cluster(c) => Kind::Cluster {
                nodes: c
                    .nodes
                    .iter()
                    .map(|u| u.as_str().into_connection_info().map(|i| i.set_tcp_settings(nodelay())))
                    .collect::<RedisResult<Vec<_>>>()?,
            },
        };
        Ok(Source { kind, current: std::sync::Mutex::new(String::new()), sentinel_auth: AtomicBool::new(false) })
    }

    fn set_current(&self, address: &str) {
        if let Ok(mut c) = self.current.lock() {
            address.clone_into(&mut c);
        }
    }

    fn is_current(&self, address: &str) -> bool {
        self.current.lock().is_ok_and(|c| *c == address)
    }

    /// The master's address as a sentinel names it now (`None` for a
    /// single server). `cache` keeps a connection to a sentinel across calls.
    pub(super) async fn sentinel_says(&self, cache: &mut Option<MultiplexedConnection>) -> RedisResult<Option<String>> {
        let Kind::Sentinel { sentinels, with_auth, master, .. } = &self.kind else { return Ok(None) };
        let sentinels = match with_auth {
            Some(auth) if self.sentinel_auth.load(Ordering::Relaxed) => auth,
            _ => sentinels,
        };
        let mut last = None;
        for info in sentinels {
            if cache.is_none() {
                match redis::Client::open(info.clone())?.get_multiplexed_async_connection().await {
                    Ok(c) => *cache = Some(c),
                    Err(e) => {
                        last = Some(e);
                        continue;
                    }
                }
            }
            let Some(c) = cache.as_mut() else { continue };
            let asked: RedisResult<Option<(String, u16)>> =
                redis::cmd("SENTINEL").arg("GET-MASTER-ADDR-BY-NAME").arg(master).query_async(c).await;
            match asked {
                Ok(Some((host, port))) => return Ok(Some(format!("{host}:{port}"))),
                Ok(None) => return Ok(None),
                Err(e) => {
                    *cache = None;
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| RedisError::from((redis::ErrorKind::Io, "no sentinel reachable"))))
    }

    /// The master's address and settings now (asks a sentinel, which
    /// checks that the node it names says it is a master).
    pub(super) async fn master(&self) -> RedisResult<ConnectionInfo> {
        let info = match &self.kind {
            Kind::Single(info) => info.clone(),
            Kind::Cluster { nodes } => nodes.first().cloned().ok_or_else(no_nodes)?,
            Kind::Sentinel { sentinels, with_auth, master, node } => {
                // Without credentials or with them, the way that worked last first.
                let mut ways: Vec<(&Vec<ConnectionInfo>, bool)> = vec![(sentinels, false)];
                if let Some(auth) = with_auth {
                    ways.push((auth, true));
                    if self.sentinel_auth.load(Ordering::Relaxed) {
                        ways.reverse();
                    }
                }
                let mut last = None;
                let mut found = None;
                for (infos, auth) in ways {
                    // A fresh client per lookup: lookups are rare (a connect),
                    // and nothing is shared or locked across them.
                    let mut client =
                        SentinelClient::build(infos.clone(), master, Some(node.clone()), SentinelServerType::Master)?;
                    // Boxed: the lookup's future is deep, and every pooled call nests it.
                    let lookup: Boxed<'_, redis::Client> = Box::pin(client.async_get_client());
                    match lookup.await {
                        Ok(c) => {
                            self.sentinel_auth.store(auth, Ordering::Relaxed);
                            found = Some(c);
                            break;
                        }
                        Err(e) => last = Some(e),
                    }
                }
                let Some(found) = found else { return Err(last.unwrap_or_else(no_nodes)) };
                found.get_connection_info().clone().set_tcp_settings(nodelay())
            }
        };
        self.set_current(&address(&info));
        Ok(info)
    }

    pub(super) fn is_sentinel(&self) -> bool {
        matches!(self.kind, Kind::Sentinel { .. })
    }

    /// A cluster node's connection settings: a seed's (credentials, TLS)
    /// at another address.
    pub(super) fn node(&self, host: &str, port: u16) -> RedisResult<ConnectionInfo> {
        let Kind::Cluster { nodes } = &self.kind else { return Err(no_nodes()) };
        let seed = nodes.first().ok_or_else(no_nodes)?;
        let addr = match seed.addr() {
            redis::ConnectionAddr::TcpTls { insecure, tls_params, .. } => redis::ConnectionAddr::TcpTls {
                host: host.to_owned(),
                port,
                insecure: *insecure,
                tls_params: tls_params.clone(),
            },
            _ => redis::ConnectionAddr::Tcp(host.to_owned(), port),
        };
        Ok(seed.clone().set_addr(addr))
    }

    pub(super) fn is_cluster(&self) -> bool {
        matches!(self.kind, Kind::Cluster { .. })
    }

    /// A cluster client (RESP3 with `push` for the subscriber).
    pub(super) fn cluster_client(
        &self,
        timeout: std::time::Duration,
        push: Option<impl redis::aio::AsyncPushSender>,
    ) -> RedisResult<redis::cluster::ClusterClient> {
        let Kind::Cluster { nodes } = &self.kind else { return Err(no_nodes()) };
        let mut b = redis::cluster::ClusterClientBuilder::new(nodes.clone())
            .connection_timeout(timeout)
            .response_timeout(timeout)
            .tcp_settings(nodelay())
            // A request waits at most this long across redirects and retries.
            .overall_response_timeout(Some(timeout));
        if let Some(push) = push {
            b = b.use_protocol(redis::ProtocolVersion::RESP3).push_sender(push);
        }
        b.build()
    }
}

fn no_nodes() -> RedisError {
    RedisError::from((redis::ErrorKind::InvalidClientConfig, "no cluster nodes"))
}

/// `host:port` of a connection's address, for logs and metrics.
pub(super) fn address(info: &ConnectionInfo) -> String {
    match info.addr() {
        redis::ConnectionAddr::Tcp(h, p) | redis::ConnectionAddr::TcpTls { host: h, port: p, .. } => {
            format!("{h}:{p}")
        }
        other => other.to_string(),
    }
}

/// Whether the server on `conn` says it is a master (`ROLE`).
pub(super) async fn is_master(conn: &mut MultiplexedConnection) -> RedisResult<bool> {
    let role: redis::Value = redis::cmd("ROLE").query_async(conn).await?;
    Ok(match &role {
        redis::Value::Array(parts) => {
            matches!(parts.first(), Some(redis::Value::BulkString(b)) if b.as_slice() == b"master")
        }
        _ => false,
    })
}

pub(super) struct Manager {
    source: Arc<Source>,
    config: AsyncConnectionConfig,
}

/// A pooled connection and the address it reaches.
pub(super) struct Conn {
    conn: MultiplexedConnection,
    address: String,
}

impl managed::Manager for Manager {
    type Type = Conn;
    type Error = RedisError;

    async fn create(&self) -> Result<Conn, RedisError> {
        // Boxed: connecting is rare, and its future would otherwise make
        // every checkout's (and every caller's) future many KiB large.
        let connect: Boxed<'_, Conn> = Box::pin(async {
            let info = self.source.master().await?;
            let address = address(&info);
            let conn = redis::Client::open(info)?.get_multiplexed_async_connection_with_config(&self.config).await?;
            Ok(Conn { conn, address })
        });
        connect.await
    }

    async fn recycle(&self, c: &mut Conn, _: &Metrics) -> RecycleResult<RedisError> {
        if self.source.is_sentinel() {
            // The master moved since (a lookup named another), or this one
            // was demoted (it answers reads, refuses writes): not again.
            if !self.source.is_current(&c.address) {
                return Err(RecycleError::message("the master moved"));
            }
            return if is_master(&mut c.conn).await? {
                Ok(())
            } else {
                Err(RecycleError::message("no longer the master"))
            };
        }
        let pong: String = redis::cmd("PING").query_async(&mut c.conn).await?;
        if pong == "PONG" { Ok(()) } else { Err(RecycleError::message("unexpected PING answer")) }
    }
}

pub(super) type PoolError = managed::PoolError<RedisError>;

/// The command connections (not the subscriber's): a pool of connections
/// to the master, or one multiplexed cluster connection (redis-rs routes
/// each command to its slot's master).
#[derive(Clone)]
pub(super) enum Pool {
    Single(managed::Pool<Manager>),
    Cluster(Arc<ClusterSlot>),
}

/// The cluster connection, made at first use (and again after a failed
/// first connect).
pub(super) struct ClusterSlot {
    client: redis::cluster::ClusterClient,
    conn: tokio::sync::OnceCell<ClusterConnection>,
}

impl Pool {
    pub(super) fn new(
        source: Arc<Source>,
        config: AsyncConnectionConfig,
        size: usize,
        timeout: std::time::Duration,
    ) -> Result<Pool, String> {
        if source.is_cluster() {
            let client = source.cluster_client(timeout, None::<fn(redis::PushInfo) -> Result<(), ()>>);
            let client = client.map_err(|e| e.to_string())?;
            return Ok(Pool::Cluster(Arc::new(ClusterSlot { client, conn: tokio::sync::OnceCell::new() })));
        }
        let pool = managed::Pool::builder(Manager { source, config })
            .max_size(size)
            .runtime(deadpool::Runtime::Tokio1)
            .wait_timeout(Some(timeout))
            .create_timeout(Some(timeout))
            .recycle_timeout(Some(timeout))
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Pool::Single(pool))
    }

    pub(super) async fn get(&self) -> Result<Connection, PoolError> {
        match self {
            Pool::Single(p) => p.get().await.map(Connection::Pooled),
            Pool::Cluster(slot) => {
                let connect: Boxed<'_, ClusterConnection> = Box::pin(slot.client.get_async_connection());
                let c = slot.conn.get_or_try_init(|| connect).await.map_err(managed::PoolError::Backend)?;
                Ok(Connection::Cluster(c.clone()))
            }
        }
    }
}

/// A connection for commands: pooled (back in the pool when dropped), or
/// a handle on the cluster connection.
pub(super) enum Connection {
    Pooled(Object<Manager>),
    Cluster(ClusterConnection),
}

impl Connection {
    /// Runs `pipes` (each on one slot): one after the other on a single
    /// server, concurrently on a cluster (each to its slot's master).
    pub(super) async fn run_each(self, pipes: Vec<redis::Pipeline>) -> Result<(), crate::broker::BrokerError> {
        match self {
            Connection::Pooled(mut o) => {
                for p in pipes {
                    p.query_async::<()>(&mut o.conn).await?;
                }
            }
            Connection::Cluster(c) => {
                let runs = pipes.into_iter().map(|p| {
                    let mut c = c.clone();
                    async move { p.query_async::<()>(&mut c).await }
                });
                for r in futures_util::future::join_all(runs).await {
                    r?;
                }
            }
        }
        Ok(())
    }

    /// A handle for one of several concurrent commands: the cluster
    /// connection again, or (single server) a clone of the pooled
    /// multiplexed connection.
    pub(super) fn shared(&self) -> Shared {
        match self {
            Connection::Pooled(o) => Shared::Single(o.conn.clone()),
            Connection::Cluster(c) => Shared::Cluster(c.clone()),
        }
    }

    /// Takes it out of the pool for good (it may be half-broken).
    pub(super) fn discard(this: Self) {
        if let Connection::Pooled(o) = this {
            drop(Object::take(o));
        }
    }
}

/// See [`Connection::shared`].
pub(super) enum Shared {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Shared {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Shared::Single(c) => c.req_packed_command(cmd),
            Shared::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Shared::Single(c) => c.req_packed_commands(cmd, offset, count),
            Shared::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Shared::Single(c) => c.get_db(),
            Shared::Cluster(c) => c.get_db(),
        }
    }
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Connection::Pooled(o) => o.conn.req_packed_command(cmd),
            Connection::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Connection::Pooled(o) => o.conn.req_packed_commands(cmd, offset, count),
            Connection::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Pooled(o) => o.conn.get_db(),
            Connection::Cluster(c) => c.get_db(),
        }
    }
}
