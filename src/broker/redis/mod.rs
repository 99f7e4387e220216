//! Redis (or Valkey) broker: every sidecar sharing the Redis and the prefix
//! is one relay cluster.
//!
//! - Publishing: a deadpool-redis pool feeds one publisher task, which takes
//!   every queued publish at once and sends them as one pipeline on a
//!   connection it keeps checked out (deadpool pings on each checkout, so a
//!   checkout per message would double the round trips). Messages go out in
//!   the order they were queued.
//! - Receiving: one dedicated RESP3 subscriber connection per node (not
//!   from the pool), subscribed only to channels with local subscribers. A
//!   message is decoded once per node: only a small header is parsed, the
//!   data inside is handed to the hub as it came. Its pushes go to a receive
//!   buffer bounded in bytes (`--redis-receive-buffer`); channels with
//!   history are caught up from their streams after a reconnect, a gap in
//!   offsets or an overflow.
//! - Health: the subscriber task publishes a probe on a node-private channel
//!   every `probe_interval` (on a pooled connection, not through the publish
//!   queue) and expects it back within `probe_timeout`. A
//!   connection Redis closed (`CLIENT KILL`, output-buffer limit) ends the
//!   message stream at once; one that silently stops delivering fails the
//!   probe. Either way the node is marked down (`/readyz` 503, publishes
//!   503), reconnects with backoff and jitter, and resubscribes everything.
//!
//! - Commands to every node (`/api/disconnect`): one Lua script appends the
//!   command to the stream `{prefix}ctl:log` and publishes it with its
//!   stream id on `{prefix}ctl`. Each node remembers the last id it applied
//!   and, after any subscriber gap, replays what it missed (to sessions
//!   older than the command), so a reconnecting node does not keep a revoked
//!   user connected.
//!
//! Wire format on Redis channel `{prefix}ch:{channel}`: one JSON header line
//! (`{"t":µs,"x":"exclude"}`, plus `"o"`/`"e"` offset and epoch where history
//! is kept, `"k"` for presence events), `\n`, then the message's `data` as
//! JSON. Each node frames it for its clients' protocols once.
//!
//! Where Redis is (`conn.rs`): one server, the master a Sentinel names
//! (followed across failovers), or a Cluster, where channel traffic goes
//! by `SPUBLISH`/`SSUBSCRIBE` on each channel's shard (redis-rs routes,
//! follows `MOVED`/`ASK` and resubscribes; the subscriber catches up from
//! history when a shard confirms a resubscription, and subscribes again
//! where a moved slot now lives).
//!
//! Files: `conn.rs` (URL forms, pool, cluster connection), `sink.rs` (the
//! subscriber's connection and receive buffer), `wire.rs` (names, scripts,
//! envelope), `life.rs` (lost writes → new epochs), `publisher.rs`,
//! `subscriber.rs`, `catchup.rs` (history catch-up and gaps),
//! `app_commands.rs`, `presence.rs` (the heartbeat).

mod app_commands;
mod catchup;
mod conn;
mod gaps;
mod life;
mod presence;
mod publisher;
mod shards;
mod sink;
mod subscriber;
mod wire;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::time::Duration;

use redis::AsyncConnectionConfig;

use self::conn::{Pool, Source};
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

use self::presence::*;
use self::publisher::*;
use self::subscriber::*;
use self::wire::*;
pub use self::wire::{EnvelopeError, StreamId, decode_command, decode_control, decode_message};
use crate::broker::{BrokerError, History, Wiring};
use crate::channel::Channel;
use crate::config::{BrokerConfig, Namespaces, Secret};
use crate::interest::Interest;
use crate::protocol::commands::NodeCommand;
use crate::protocol::{Message, Offset};

/// Publishes taken into one pipeline at most.
pub(super) const MAX_BATCH: usize = 512;
/// Publish requests waiting for the publisher task at most; beyond, callers wait.
pub(super) const PUBLISH_QUEUE: usize = 4096;
/// How often a node refreshes its advertised address.
const NODE_HEARTBEAT: Duration = Duration::from_secs(5);

/// A node not heard from for three heartbeats is gone.
fn node_expiry_ms() -> u64 {
    u64::try_from(NODE_HEARTBEAT.as_millis() * 3).unwrap_or(15_000)
}

/// Wall-clock milliseconds (node liveness is compared across nodes).
fn now_ms() -> u64 {
    crate::protocol::now_us() / 1000
}

/// Channels per SUBSCRIBE/UNSUBSCRIBE command.
pub(super) const SUBSCRIBE_CHUNK: usize = 500;

pub struct RedisBroker {
    keys: Keys,
    publisher: mpsc::Sender<Job>,
    /// For commands (rare): a checkout each, never the publish queue.
    pool: Pool,
    scripts: Arc<Scripts>,
    /// This node's presence entries, refreshed by the heartbeat task.
    local_presence: Arc<super::presence::LocalPresence>,
    namespaces: Arc<Namespaces>,
    interest: Arc<Interest>,
    /// Its background tasks.
    tasks: tokio_util::task::TaskTracker,
    timeout: Duration,
    description: String,
    /// The other nodes' addresses as last read, for a Redis outage: a
    /// Socket.IO polling request for a session on another node is still
    /// forwarded while the address is younger than a node's expiry.
    peers: std::sync::Mutex<std::collections::HashMap<String, (String, std::time::Instant)>>,
}

/// Peer addresses remembered at most (nodes of one deployment: a handful).
const PEERS_REMEMBERED: usize = 1024;

impl RedisBroker {
    pub fn start(url: &Secret, cfg: &BrokerConfig, w: Wiring, interest: Arc<Interest>) -> Result<Self, BrokerError> {
        let Wiring { node_id, events, metrics, namespaces, shutdown, tasks } = w;
        let parsed = crate::config::RedisUrl::parse(url.expose())
            .map_err(|e| BrokerError::Config(format!("--redis-url: {e}")))?;
        if parsed.uses_tls() {
            // rustls needs one process-wide crypto provider; a second install is a no-op error.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let bad = |e: redis::RedisError| BrokerError::Config(format!("invalid Redis URL: {e}"));
        let source = Arc::new(Source::new(&parsed).map_err(bad)?);
        let conn_cfg = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(cfg.timeout))
            .set_response_timeout(Some(cfg.timeout));
        let pool = Pool::new(source.clone(), conn_cfg, 16, cfg.timeout)
            .map_err(|e| BrokerError::Config(format!("cannot build the Redis connections: {e}")))?;

        let keys = Keys::new(&cfg.prefix, &node_id, source.is_cluster());
        let scripts = Arc::new(Scripts::new(source.is_cluster()));
        let (tx, rx) = mpsc::channel(PUBLISH_QUEUE);
        let generation = Arc::new(AtomicU64::new(0));
        let life = Arc::new(life::Life::new(keys.life.clone(), keys.watermark.clone(), keys.sharded));
        metrics.broker_up.set(0);
        let publisher_task = publisher(
            (pool.clone(), source.clone()),
            (life.clone(), scripts.clone(), keys.sharded, cfg.wait_replicas),
            rx,
            generation.clone(),
            cfg.timeout,
            metrics.clone(),
            (shutdown.clone(), tasks.clone()),
        );
        tasks.spawn(publisher_task.instrument(tracing::info_span!("redis_publisher")));
        let command_pool = pool.clone();
        let local_presence = Arc::new(super::presence::LocalPresence::default());
        let beat = heartbeat(pool.clone(), keys.clone(), local_presence.clone(), cfg.timeout, shutdown.clone());
        tasks.spawn(beat.instrument(tracing::info_span!("redis_presence")));
        let sub = Subscriber {
            source,
            receive_buffer: cfg.receive_buffer as u64,
            overflowed: Arc::new(AtomicBool::new(false)),
            namespaces: namespaces.clone(),
            scripts: scripts.clone(),
            keys: keys.clone(),
            life,
            events,
            interest: interest.clone(),
            metrics,
            pool,
            generation,
            timeout: cfg.timeout,
            probe_interval: cfg.probe_interval,
            probe_timeout: cfg.probe_timeout,
            node_id: node_id.clone(),
            socketio_channel: cfg.socketio_channel.clone(),
            tasks: tasks.clone(),
        };
        tasks.spawn(sub.run(shutdown).instrument(tracing::info_span!("redis_subscriber")));
        Ok(RedisBroker {
            description: format!("using redis broker at {} (prefix {})", parsed.describe(), cfg.prefix),
            keys,
            publisher: tx,
            pool: command_pool,
            scripts,
            local_presence,
            namespaces,
            interest,
            tasks,
            timeout: cfg.timeout,
            peers: std::sync::Mutex::default(),
        })
    }

    pub fn describe(&self) -> String {
        self.description.clone()
    }

    pub fn is_up(&self) -> bool {
        self.interest.is_up()
    }

    pub async fn publish(&self, pubs: Vec<Arc<Message>>) -> Result<Vec<Option<Offset>>, BrokerError> {
        let messages = pubs
            .iter()
            .map(|m| {
                let header = Header {
                    k: None,
                    o: None,
                    e: None,
                    t: m.published_us,
                    x: m.exclude.as_deref().map(Into::into),
                    v: m.event.as_deref().map(Into::into),
                    b: wire::attachments_of(m),
                };
                match self.namespaces.rule(&m.channel).history {
                    None => Out::Publish {
                        channel: self.keys.channel(&m.channel),
                        payload: envelope(&header, m.data.as_bytes()),
                    },
                    Some(h) => Out::History {
                        stream: self.keys.stream(&m.channel),
                        meta: self.keys.meta(&m.channel),
                        channel: self.keys.channel(&m.channel),
                        // A struct of an integer and a string always serializes.
                        header: serde_json::to_vec(&header).unwrap_or_default(),
                        data: m.data.clone(),
                        size: h.size,
                        ttl_ms: u64::try_from(h.ttl.as_millis()).unwrap_or(u64::MAX),
                        id: crate::config::random_id(16),
                    },
                }
            })
            .collect();
        self.send(messages).await
    }

    pub async fn presence_change(
        &self,
        channel: &Channel,
        connection: &Arc<str>,
        entry: String,
        join: bool,
        announce: bool,
    ) -> Result<(), BrokerError> {
        // The local record first, whatever Redis says: a leave must not be
        // refreshed by the heartbeat forever; a failed join is undone below.
        if join {
            self.local_presence.add(channel, connection, entry.clone());
        } else {
            self.local_presence.remove(channel, connection);
        }
        if let Err(e) = self.interest.wait_up(self.timeout).await {
            if join {
                self.local_presence.remove(channel, connection);
            }
            return Err(e);
        }
        let header = Header {
            k: Some(if join { "j" } else { "l" }.into()),
            o: None,
            e: None,
            t: 0,
            x: Some((&**connection).into()),
            v: None,
            b: None,
        };
        let mut header = serde_json::to_vec(&header).unwrap_or_default();
        header.push(b'\n');
        let (hash, zset) = self.keys.presence(channel);
        let expiry = if join { (crate::protocol::now_us() / 1000 + expiry_ms()).to_string() } else { String::new() };
        let run = async {
            let mut c = self.pool.get().await?;
            let mut inv = self.scripts.presence.key(hash);
            inv.key(zset).key(self.keys.channel(channel));
            inv.arg(&**connection).arg(&entry).arg(expiry).arg(if announce { "1" } else { "0" });
            inv.arg(header).arg(expiry_ms() * 4);
            inv.invoke_async::<i64>(&mut c).await.map_err(BrokerError::from)
        };
        let r = tokio::time::timeout(self.timeout, run).await.unwrap_or(Err(BrokerError::Timeout(self.timeout)));
        if r.is_err() && join {
            self.local_presence.remove(channel, connection);
        }
        r.map(|_| ())
    }

    pub async fn presence(&self, channel: &Channel) -> Result<super::PresenceList, BrokerError> {
        let (hash, zset) = self.keys.presence(channel);
        let run = async {
            let mut c = self.pool.get().await?;
            let mut inv = self.scripts.presence_read.key(hash);
            inv.key(zset).arg(crate::protocol::now_us() / 1000).arg(super::presence::MAX_LISTED);
            let (count, entries): (usize, Vec<String>) = inv.invoke_async(&mut c).await?;
            Ok::<_, BrokerError>(super::PresenceList::from_entries(entries, count))
        };
        tokio::time::timeout(self.timeout, run).await.unwrap_or(Err(BrokerError::Timeout(self.timeout)))
    }

    /// A channel's history after `after` (at most `limit` messages).
    pub async fn history(&self, channel: &Channel, after: u64, limit: usize) -> Result<History, BrokerError> {
        read_history(&self.pool, &self.scripts.history, &self.keys, channel, after, limit, self.timeout).await
    }

    pub async fn ensure_subscribed(&self, channel: &str) -> Result<(), BrokerError> {
        self.interest.wait_active(channel, self.timeout).await
    }

    /// Runs `f` on a pooled connection within the Redis timeout.
    async fn with_conn<T, F, Fut>(&self, f: F) -> Result<T, BrokerError>
    where
        F: FnOnce(conn::Connection) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let run = async {
            let c = self.pool.get().await?;
            f(c).await.map_err(BrokerError::from)
        };
        tokio::time::timeout(self.timeout, run).await.unwrap_or(Err(BrokerError::Timeout(self.timeout)))
    }

    /// Keeps `{prefix}node:{id}` = `url` alive (refreshed every 5 s, gone
    /// 15 s after the node is), so other nodes can forward to it.
    pub fn advertise(&self, node_id: &str, url: String, shutdown: tokio_util::sync::CancellationToken) {
        let key = self.keys.global(&format!("node:{node_id}"));
        let nodes = self.keys.global("nodes");
        let id = node_id.to_owned();
        let (pool, timeout) = (self.pool.clone(), self.timeout);
        let task = async move {
            let mut tick = tokio::time::interval(NODE_HEARTBEAT);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tick.tick() => {}
                }
                let set = async {
                    let mut c = pool.get().await?;
                    let now = now_ms();
                    redis::pipe()
                        .cmd("SET")
                        .arg(&key)
                        .arg(&url)
                        .arg("PX")
                        .arg(node_expiry_ms())
                        .ignore()
                        // The list of live nodes, for queries every node answers.
                        .cmd("ZADD")
                        .arg(&nodes)
                        .arg(now)
                        .arg(&id)
                        .ignore()
                        .cmd("ZREMRANGEBYSCORE")
                        .arg(&nodes)
                        .arg("-inf")
                        .arg(now.saturating_sub(node_expiry_ms()))
                        .ignore()
                        .query_async::<()>(&mut c)
                        .await?;
                    Ok::<_, BrokerError>(())
                };
                if let Err(e) = tokio::time::timeout(timeout, set).await.unwrap_or(Err(BrokerError::Timeout(timeout))) {
                    tracing::debug!(error = %e, "node address not refreshed; retrying");
                }
            }
            // Gone at once when this node stops cleanly.
            if let Ok(mut c) = pool.get().await {
                let gone =
                    redis::pipe().cmd("DEL").arg(&key).ignore().cmd("ZREM").arg(&nodes).arg(&id).ignore().to_owned();
                let _ = tokio::time::timeout(timeout, gone.query_async::<()>(&mut c)).await;
            }
        };
        self.tasks.spawn(task.instrument(tracing::info_span!("redis_advertise")));
    }

    /// Where node `node_id` is reached, if it is alive.
    pub async fn peer_url(&self, node_id: &str) -> Result<Option<String>, BrokerError> {
        let key = self.keys.global(&format!("node:{node_id}"));
        let read: Result<Option<String>, BrokerError> =
            self.with_conn(|mut c| async move { redis::cmd("GET").arg(key).query_async(&mut c).await }).await;
        let expiry = Duration::from_millis(node_expiry_ms());
        // A poisoned lock only means a panic elsewhere mid-update of a cache.
        let mut peers = self.peers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match &read {
            Ok(Some(url)) => {
                if peers.len() >= PEERS_REMEMBERED {
                    peers.retain(|_, (_, at)| at.elapsed() < expiry);
                }
                if peers.len() < PEERS_REMEMBERED || peers.contains_key(node_id) {
                    peers.insert(node_id.to_owned(), (url.clone(), std::time::Instant::now()));
                }
            }
            Ok(None) => {
                peers.remove(node_id);
            }
            Err(e) => {
                if let Some((url, at)) = peers.get(node_id).filter(|(_, at)| at.elapsed() < expiry) {
                    tracing::debug!(node = node_id, error = %e, age = ?at.elapsed(), "Redis unavailable: the node's last known address");
                    return Ok(Some(url.clone()));
                }
            }
        }
        read
    }

    /// Keeps `value` under `key` for `ttl`.
    pub async fn stash(&self, key: &str, value: String, ttl: std::time::Duration) -> Result<(), BrokerError> {
        let key = self.keys.global(&format!("stash:{key}"));
        let ttl = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        self.with_conn(|mut c| async move {
            redis::cmd("SET").arg(key).arg(value).arg("PX").arg(ttl).query_async(&mut c).await
        })
        .await
    }

    /// Reads what was stashed under `key`.
    pub async fn read_stash(&self, key: &str) -> Result<Option<String>, BrokerError> {
        let key = self.keys.global(&format!("stash:{key}"));
        self.with_conn(|mut c| async move { redis::cmd("GET").arg(key).query_async(&mut c).await }).await
    }

    /// The nodes that refreshed their address within its expiry.
    pub async fn live_nodes(&self) -> Result<Vec<String>, BrokerError> {
        let key = self.keys.global("nodes");
        let since = now_ms().saturating_sub(node_expiry_ms());
        self.with_conn(|mut c| async move {
            redis::cmd("ZRANGE").arg(key).arg(since).arg("+inf").arg("BYSCORE").query_async(&mut c).await
        })
        .await
    }

    /// Takes (reads and deletes) what was stashed under `key`.
    pub async fn take_stash(&self, key: &str) -> Result<Option<String>, BrokerError> {
        let key = self.keys.global(&format!("stash:{key}"));
        self.with_conn(|mut c| async move { redis::cmd("GETDEL").arg(key).query_async(&mut c).await }).await
    }

    /// The logged commands issued after `t_us` (µs since the Unix epoch),
    /// oldest first; None when the log no longer reaches back that far.
    pub async fn commands_after(&self, t_us: u64) -> Result<Option<Vec<(u64, NodeCommand)>>, BrokerError> {
        let key = self.keys.control_log.clone();
        // Stream ids are Redis's clock, `t` the issuer's: read from a second
        // before, and filter by `t`.
        let start_ms = (t_us / 1000).saturating_sub(1000);
        type Entries = Vec<(String, Vec<(String, String)>)>;
        let (first, len, entries): (Entries, usize, Entries) = self
            .with_conn(|mut c| async move {
                redis::pipe()
                    .cmd("XRANGE")
                    .arg(&key)
                    .arg("-")
                    .arg("+")
                    .arg("COUNT")
                    .arg(1)
                    .cmd("XLEN")
                    .arg(&key)
                    .cmd("XRANGE")
                    .arg(&key)
                    .arg(format!("{start_ms}-0"))
                    .arg("+")
                    .arg("COUNT")
                    .arg(CONTROL_LOG_LEN)
                    .query_async(&mut c)
                    .await
            })
            .await?;
        // Trimmed (the log is full) past where we start reading: some
        // commands may be gone.
        let oldest_ms = first.first().and_then(|(id, _)| StreamId::parse(id)).map(|id| id.0);
        if len >= CONTROL_LOG_LEN && oldest_ms.is_some_and(|ms| ms > start_ms) {
            return Ok(None);
        }
        let mut out = Vec::new();
        for (_, fields) in entries {
            let Some((_, payload)) = fields.iter().find(|(k, _)| k == "c") else { continue };
            if let Ok(Command { t, op }) = serde_json::from_str::<Command>(payload) {
                if t > t_us {
                    out.push((t, op));
                }
            }
        }
        Ok(Some(out))
    }

    /// A command for every node: logged, then published.
    pub async fn command(&self, op: &NodeCommand) -> Result<(), BrokerError> {
        self.interest.wait_up(self.timeout).await?;
        match op {
            NodeCommand::Call { .. } | NodeCommand::Answer { .. } | NodeCommand::Query { .. } => {
                send_call(&self.pool, &self.keys, op, self.timeout).await
            }
            _ => send_command(&self.pool, &self.scripts.control, &self.keys, op, self.timeout).await,
        }
    }

    async fn send(&self, messages: Vec<Out>) -> Result<Vec<Option<Offset>>, BrokerError> {
        // Fail fast while down: `wsrelay_broker_up` and `/readyz?broker`
        // already say so, and a caller waiting for a connect timeout helps
        // nobody. Only a node that is still starting waits for Redis.
        self.interest.wait_up(self.timeout).await?;
        let (done, rx) = oneshot::channel();
        let job = Job { messages, done: Some(done) };
        let sent = tokio::time::timeout(self.timeout, self.publisher.send(job)).await;
        if !matches!(sent, Ok(Ok(()))) {
            return Err(BrokerError::QueueFull);
        }
        rx.await.unwrap_or(Err(BrokerError::Stopped))
    }
}
