//! Redis (or Valkey) broker: every sidecar sharing the Redis and the prefix
//! is one relay cluster.
//!
//! - Publishing: a deadpool-redis pool feeds one publisher task, which takes
//!   every queued publish at once and sends them as one pipeline on a
//!   connection it keeps checked out (deadpool pings on each checkout, so a
//!   checkout per message would double the round trips). Messages go out in
//!   the order they were queued.
//! - Receiving: one dedicated subscriber connection per node (not from the
//!   pool), subscribed only to channels with local subscribers. A message is
//!   decoded once per node: only a small header is parsed, the client frame
//!   inside is handed to the hub as it came. redis-rs reads that connection
//!   into an unbounded channel; the loop below drains it without waiting on
//!   anything slower than a subscription round trip.
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
//! (`{"t":µs,"x":"exclude"}`), `\n`, then the message's `data` as JSON. Each
//! node frames it for its clients' protocols once.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use deadpool_redis::{Pool, Runtime};

use redis::AsyncConnectionConfig;
use redis::io::tcp::TcpSettings;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, warn};

use super::{BrokerError, History, Wiring};
use crate::channel::Channel;
use crate::config::{BrokerConfig, Namespaces, Secret};
use crate::hub::{Hub, Interest, NodeCommand};
use crate::metrics::Metrics;
use crate::protocol::{Kind, Message, Offset};

/// Publishes taken into one pipeline at most.
const MAX_BATCH: usize = 512;
/// Publish requests waiting for the publisher task at most; beyond, callers wait.
const PUBLISH_QUEUE: usize = 4096;
/// Channels per SUBSCRIBE/UNSUBSCRIBE command.
const SUBSCRIBE_CHUNK: usize = 500;

pub struct RedisBroker {
    keys: Keys,
    publisher: mpsc::Sender<Job>,
    /// For commands (rare): a checkout each, never the publish queue.
    pool: Pool,
    control_script: redis::Script,
    history_script: redis::Script,
    presence_script: redis::Script,
    presence_read_script: redis::Script,
    /// This node's presence entries, refreshed by the heartbeat task.
    local_presence: Arc<super::presence::LocalPresence>,
    namespaces: Arc<Namespaces>,
    interest: Arc<Interest>,
    timeout: Duration,
    description: String,
}

/// Redis channel names, all under the prefix.
#[derive(Clone)]
struct Keys {
    prefix: String,
    channel_prefix: String,
    control: String,
    control_log: String,
    probe: String,
}

impl Keys {
    fn new(prefix: &str, node_id: &str) -> Self {
        Keys {
            prefix: prefix.to_owned(),
            channel_prefix: format!("{prefix}ch:"),
            control: format!("{prefix}ctl"),
            control_log: format!("{prefix}ctl:log"),
            probe: format!("{prefix}probe:{node_id}"),
        }
    }
    fn channel(&self, channel: &str) -> String {
        format!("{}{channel}", self.channel_prefix)
    }
    /// A channel's history stream and meta hash. The `{channel}` hash tag
    /// keeps both in one slot, for a later Redis Cluster mode.
    fn stream(&self, channel: &str) -> String {
        format!("{}hist:{{{channel}}}:s", self.prefix)
    }
    fn meta(&self, channel: &str) -> String {
        format!("{}hist:{{{channel}}}:m", self.prefix)
    }
    /// A channel's presence: members (hash) and their expiry (sorted set).
    fn presence(&self, channel: &str) -> (String, String) {
        (format!("{}pres:{{{channel}}}:h", self.prefix), format!("{}pres:{{{channel}}}:z", self.prefix))
    }
}

/// Adds or removes a presence member and, with ARGV[4] = "1", announces it
/// on the channel (a `j`oin or `l`eave envelope), atomically.
/// KEYS: hash, zset, pubsub channel. ARGV: connection, entry, expiry (ms since
/// the epoch; "" to remove), announce, envelope header, keys' TTL (ms).
const PRESENCE_SCRIPT: &str = r"
if ARGV[3] == '' then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('ZREM', KEYS[2], ARGV[1])
else
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
  redis.call('PEXPIRE', KEYS[1], ARGV[6])
  redis.call('PEXPIRE', KEYS[2], ARGV[6])
end
if ARGV[4] == '1' then
  redis.call('PUBLISH', KEYS[3], ARGV[5] .. ARGV[2])
end
return 1
";

/// Drops expired members, then answers the count and (within ARGV[2]) the
/// members. KEYS: hash, zset. ARGV: now (ms), most listed.
const PRESENCE_READ_SCRIPT: &str = r"
local gone = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1])
for _, c in ipairs(gone) do redis.call('HDEL', KEYS[1], c) end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[1])
local n = redis.call('HLEN', KEYS[1])
if n > tonumber(ARGV[2]) then return {n, {}} end
return {n, redis.call('HVALS', KEYS[1])}
";

/// What the publisher sends for one message.
enum Out {
    /// No history: a plain PUBLISH.
    Publish { channel: String, payload: Vec<u8> },
    /// History kept: the publish script (offset, XADD, TTLs, PUBLISH).
    History {
        stream: String,
        meta: String,
        channel: String,
        header: Vec<u8>,
        data: Utf8Bytes,
        size: usize,
        ttl_ms: u64,
        /// Stored with the entry, so a publish whose answer was lost can be
        /// found again (see [`confirm`]).
        id: String,
    },
}

/// How long a channel's meta (epoch and top offset) outlives its last
/// publish: much longer than any history, so an offset is never reused
/// with the same epoch while a client could still present it.
const META_TTL_MS: u64 = 30 * 24 * 3600 * 1000;

/// Assigns the next offset, appends to the stream (trimmed), refreshes the
/// TTLs and publishes the message with its offset and epoch, atomically.
/// A missing meta (expired, flushed, new) starts a new epoch, from ARGV[6].
const PUBLISH_SCRIPT: &str = r#"
local epoch = redis.call('HGET', KEYS[2], 'e')
if not epoch then
  epoch = ARGV[6]
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[2], 'e', epoch, 's', 0)
end
local seq = redis.call('HINCRBY', KEYS[2], 's', 1)
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], seq .. '-0', 'h', ARGV[1], 'd', ARGV[2], 'i', ARGV[7])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[5])
local header = '{"o":' .. seq .. ',"e":"' .. epoch .. '",' .. string.sub(ARGV[1], 2)
redis.call('PUBLISH', KEYS[3], header .. '\n' .. ARGV[2])
return {seq, epoch}
"#;

/// Reads a channel's epoch, top offset, oldest kept offset and the entries
/// after ARGV[1] (at most ARGV[2]), atomically.
const HISTORY_SCRIPT: &str = r"
local m = redis.call('HMGET', KEYS[2], 'e', 's')
if not m[1] then return {'', 0, 1, {}} end
local top = tonumber(m[2])
local first = top + 1
local oldest = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
if oldest[1] then first = tonumber(string.match(oldest[1][1], '^(%d+)')) end
local entries = redis.call('XRANGE', KEYS[1], '(' .. ARGV[1] .. '-0', '+', 'COUNT', ARGV[2])
return {m[1], top, first, entries}
";

struct Job {
    messages: Vec<Out>,
    done: Option<oneshot::Sender<Result<Vec<Option<Offset>>, BrokerError>>>,
}

/// The envelope's header. `o`/`e` (offset, epoch) are added by the publish
/// script where history is kept.
#[derive(Serialize, Deserialize)]
struct Header<'a> {
    /// `j`oin or `l`eave (presence events); absent for a publication.
    #[serde(default, skip_serializing_if = "Option::is_none", borrow)]
    k: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    o: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none", borrow)]
    e: Option<std::borrow::Cow<'a, str>>,
    t: u64,
    #[serde(default, skip_serializing_if = "Option::is_none", borrow)]
    x: Option<std::borrow::Cow<'a, str>>,
}

/// A command to every node, as logged and published.
#[derive(Serialize, Deserialize)]
struct Command {
    /// When it was issued (µs since the Unix epoch, the issuing node's clock).
    t: u64,
    #[serde(flatten)]
    op: NodeCommand,
}

/// Commands kept in the control log (approximately).
const CONTROL_LOG_LEN: usize = 10_000;
/// How long the control log outlives its last command.
const CONTROL_LOG_TTL_MS: u64 = 24 * 3600 * 1000;

/// Appends a command to the log and publishes it with its id, atomically.
const CONTROL_SCRIPT: &str = r"
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'c', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PUBLISH', KEYS[2], id .. ' ' .. ARGV[1])
return id
";

/// A Redis stream id, `<ms>-<seq>`, ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct StreamId(u64, u64);

impl StreamId {
    fn parse(s: &str) -> Option<StreamId> {
        let (ms, seq) = s.split_once('-')?;
        Some(StreamId(ms.parse().ok()?, seq.parse().ok()?))
    }
}

impl std::fmt::Display for StreamId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.0, self.1)
    }
}

impl RedisBroker {
    pub fn start(url: &Secret, cfg: &BrokerConfig, w: Wiring, interest: Arc<Interest>) -> Result<Self, BrokerError> {
        let Wiring { node_id, hub, metrics, namespaces, shutdown } = w;
        if url.expose().starts_with("rediss://") {
            // rustls needs one process-wide crypto provider; a second install is a no-op error.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let bad = |e: redis::RedisError| BrokerError::Config(format!("invalid Redis URL: {e}"));
        let info = redis::IntoConnectionInfo::into_connection_info(url.expose())
            .map_err(bad)?
            // redis-rs leaves Nagle on; every publish would wait for the previous ACK.
            .set_tcp_settings(TcpSettings::default().set_nodelay(true));
        // The subscriber speaks RESP3: its pushes go to a bounded buffer of ours.
        let resp3 = info.redis_settings().clone().set_protocol(redis::ProtocolVersion::RESP3);
        let client = redis::Client::open(info.clone().set_redis_settings(resp3)).map_err(bad)?;
        let conn_cfg = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(cfg.timeout))
            .set_response_timeout(Some(cfg.timeout));
        let manager = deadpool_redis::Manager::new_with_config(info, conn_cfg).map_err(bad)?;
        let pool = Pool::builder(manager)
            .max_size(16)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(cfg.timeout))
            .create_timeout(Some(cfg.timeout))
            .recycle_timeout(Some(cfg.timeout))
            .build()
            .map_err(|e| BrokerError::Config(format!("cannot build the Redis pool: {e}")))?;

        let keys = Keys::new(&cfg.prefix, &node_id);
        let (tx, rx) = mpsc::channel(PUBLISH_QUEUE);
        let generation = Arc::new(AtomicU64::new(0));
        metrics.broker_up.set(0);
        let publisher_task = publisher(pool.clone(), rx, generation.clone(), cfg.timeout, metrics.clone());
        tokio::spawn(publisher_task.instrument(tracing::info_span!("redis_publisher")));
        let command_pool = pool.clone();
        let local_presence = Arc::new(super::presence::LocalPresence::default());
        let beat = heartbeat(pool.clone(), keys.clone(), local_presence.clone(), cfg.timeout, shutdown.clone());
        tokio::spawn(beat.instrument(tracing::info_span!("redis_presence")));
        let sub = Subscriber {
            client,
            receive_buffer: cfg.receive_buffer as u64,
            overflowed: Arc::new(AtomicBool::new(false)),
            namespaces: namespaces.clone(),
            history_script: redis::Script::new(HISTORY_SCRIPT),
            keys: keys.clone(),
            hub,
            interest: interest.clone(),
            metrics,
            pool,
            generation,
            timeout: cfg.timeout,
            probe_interval: cfg.probe_interval,
            probe_timeout: cfg.probe_timeout,
        };
        tokio::spawn(sub.run(shutdown).instrument(tracing::info_span!("redis_subscriber")));
        Ok(RedisBroker {
            description: format!("using redis broker at {} (prefix {})", redact(url.expose()), cfg.prefix),
            keys,
            publisher: tx,
            pool: command_pool,
            control_script: redis::Script::new(CONTROL_SCRIPT),
            history_script: redis::Script::new(HISTORY_SCRIPT),
            presence_script: redis::Script::new(PRESENCE_SCRIPT),
            presence_read_script: redis::Script::new(PRESENCE_READ_SCRIPT),
            local_presence,
            namespaces,
            interest,
            timeout: cfg.timeout,
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
                let header =
                    Header { k: None, o: None, e: None, t: m.published_us, x: m.exclude.as_deref().map(Into::into) };
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
        if !self.is_up() {
            return Err(BrokerError::NotConnected);
        }
        if join {
            self.local_presence.add(channel, connection, entry.clone());
        } else {
            self.local_presence.remove(channel, connection);
        }
        let header = Header {
            k: Some(if join { "j" } else { "l" }.into()),
            o: None,
            e: None,
            t: 0,
            x: Some((&**connection).into()),
        };
        let mut header = serde_json::to_vec(&header).unwrap_or_default();
        header.push(b'\n');
        let (hash, zset) = self.keys.presence(channel);
        let expiry = if join { (crate::hub::now_us() / 1000 + expiry_ms()).to_string() } else { String::new() };
        let run = async {
            let mut c = self.pool.get().await?;
            let mut inv = self.presence_script.key(hash);
            inv.key(zset).key(self.keys.channel(channel));
            inv.arg(&**connection).arg(&entry).arg(expiry).arg(if announce { "1" } else { "0" });
            inv.arg(header).arg(expiry_ms() * 4);
            inv.invoke_async::<i64>(&mut c).await.map_err(BrokerError::from)
        };
        tokio::time::timeout(self.timeout, run).await.unwrap_or(Err(BrokerError::Timeout(self.timeout))).map(|_| ())
    }

    pub async fn presence(&self, channel: &Channel) -> Result<super::PresenceList, BrokerError> {
        let (hash, zset) = self.keys.presence(channel);
        let run = async {
            let mut c = self.pool.get().await?;
            let mut inv = self.presence_read_script.key(hash);
            inv.key(zset).arg(crate::hub::now_us() / 1000).arg(super::presence::MAX_LISTED);
            let (count, entries): (usize, Vec<String>) = inv.invoke_async(&mut c).await?;
            Ok::<_, BrokerError>(super::PresenceList::from_entries(entries, count))
        };
        tokio::time::timeout(self.timeout, run).await.unwrap_or(Err(BrokerError::Timeout(self.timeout)))
    }

    /// A channel's history after `after` (at most `limit` messages).
    pub async fn history(&self, channel: &Channel, after: u64, limit: usize) -> Result<History, BrokerError> {
        read_history(&self.pool, &self.history_script, &self.keys, channel, after, limit, self.timeout).await
    }

    pub async fn ensure_subscribed(&self, channel: &str) -> Result<(), BrokerError> {
        self.interest.wait_active(channel, self.timeout).await
    }

    /// A command for every node: logged, then published.
    pub async fn command(&self, op: &NodeCommand) -> Result<(), BrokerError> {
        if !self.is_up() {
            return Err(BrokerError::NotConnected);
        }
        let cmd = Command { t: crate::hub::now_us(), op: op.clone() };
        // A struct of strings always serializes.
        let payload = serde_json::to_string(&cmd).unwrap_or_default();
        let run = async {
            let mut c = self.pool.get().await?;
            let mut inv = self.control_script.key(&self.keys.control_log);
            inv.key(&self.keys.control).arg(&payload).arg(CONTROL_LOG_LEN).arg(CONTROL_LOG_TTL_MS);
            inv.invoke_async::<String>(&mut c).await.map_err(BrokerError::from)
        };
        match tokio::time::timeout(self.timeout, run).await {
            Ok(r) => r.map(|_| ()),
            Err(_) => Err(BrokerError::Timeout(self.timeout)),
        }
    }

    async fn send(&self, messages: Vec<Out>) -> Result<Vec<Option<Offset>>, BrokerError> {
        // Fail fast while down: readyz already says so, and a caller waiting
        // for a connect timeout helps nobody.
        if !self.is_up() {
            return Err(BrokerError::NotConnected);
        }
        let (done, rx) = oneshot::channel();
        let job = Job { messages, done: Some(done) };
        let sent = tokio::time::timeout(self.timeout, self.publisher.send(job)).await;
        if !matches!(sent, Ok(Ok(()))) {
            return Err(BrokerError::QueueFull);
        }
        rx.await.unwrap_or(Err(BrokerError::Stopped))
    }
}

fn envelope(header: &Header<'_>, frame: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(frame.len() + 48);
    // A struct of an integer and a string always serializes.
    let _ = serde_json::to_writer(&mut out, header);
    out.push(b'\n');
    out.extend_from_slice(frame);
    out
}

/// `redis://user:secret@host/0` → `redis://user:***@host/0`
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or("", |(u, _)| u);
            format!("{scheme}://{user}:***@{host}{path}")
        }
        None => url.to_owned(),
    }
}

/// The publisher task: drains the queue into pipelines on one held connection.
///
/// A failed pipeline is never retried: Redis may have run part of it before
/// the connection broke, and a retry would deliver those messages twice.
/// The callers get `unavailable` and decide. The held connection is replaced
/// after an error and whenever the subscriber lost its connection (a Redis
/// restart kills both; this avoids one spurious 503 afterwards).
async fn publisher(
    pool: Pool,
    mut rx: mpsc::Receiver<Job>,
    generation: Arc<AtomicU64>,
    timeout: Duration,
    metrics: Arc<Metrics>,
) {
    let mut held: Option<Held> = None;
    let mut batch: Vec<Job> = Vec::with_capacity(64);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let now = generation.load(Ordering::Acquire);
        if held.as_ref().is_some_and(|(_, g, _)| *g != now) {
            discard(&mut held);
        }
        let timer = metrics.broker_publish_seconds.start_timer();
        let result = run_batch(&pool, &mut held, now, &batch, timeout).await;
        timer.observe_duration();
        match result {
            Ok(mut offsets) => {
                for mut job in batch.drain(..) {
                    let rest = offsets.split_off(job.messages.len().min(offsets.len()));
                    let mine = std::mem::replace(&mut offsets, rest);
                    if let Some(done) = job.done.take() {
                        let _ = done.send(Ok(mine));
                    }
                }
            }
            Err(e) => {
                debug!(error = %e, "publish failed");
                for mut job in batch.drain(..) {
                    let Some(done) = job.done.take() else { continue };
                    // Where every message keeps history, the connection may
                    // have broken after Redis applied them: look, rather than
                    // call them failed and have them delivered anyway.
                    if job.messages.iter().all(|m| matches!(m, Out::History { .. })) {
                        let (pool, err) = (pool.clone(), e.clone());
                        tokio::spawn(
                            async move {
                                let r = confirm(&pool, &job.messages, timeout).await.ok_or(err);
                                let _ = done.send(r);
                            }
                            .in_current_span(),
                        );
                    } else {
                        let _ = done.send(Err(e.clone()));
                    }
                }
            }
        }
    }
}

/// The publisher's connection: its generation, and the publish script's
/// SHA as loaded on it (a Redis restart forgets scripts; a new connection
/// loads it again).
type Held = (deadpool_redis::Connection, u64, String);

/// Takes a connection out of the pool for good: it may be half-broken.
fn discard(held: &mut Option<Held>) {
    if let Some((c, _, _)) = held.take() {
        drop(deadpool_redis::Connection::take(c));
    }
}

async fn run_batch(
    pool: &Pool,
    held: &mut Option<Held>,
    generation: u64,
    batch: &[Job],
    timeout: Duration,
) -> Result<Vec<Option<Offset>>, BrokerError> {
    let r = tokio::time::timeout(timeout, async {
        if held.is_none() {
            let mut c = pool.get().await?;
            let sha: String = redis::cmd("SCRIPT").arg("LOAD").arg(PUBLISH_SCRIPT).query_async(&mut c).await?;
            *held = Some((c, generation, sha));
        }
        let Some((c, _, sha)) = held.as_mut() else {
            return Err(BrokerError::NotConnected);
        };
        let mut pipe = redis::pipe();
        for job in batch {
            for out in &job.messages {
                match out {
                    Out::Publish { channel, payload } => {
                        pipe.publish(channel, payload);
                    }
                    Out::History { stream, meta, channel, header, data, size, ttl_ms, id } => {
                        pipe.cmd("EVALSHA")
                            .arg(&*sha)
                            .arg(3)
                            .arg(stream)
                            .arg(meta)
                            .arg(channel)
                            .arg(header)
                            .arg(data.as_bytes())
                            .arg(*size)
                            .arg(*ttl_ms)
                            .arg(META_TTL_MS)
                            .arg(crate::config::random_id(8))
                            .arg(id);
                    }
                }
            }
        }
        let replies: Vec<redis::Value> = pipe.query_async(c).await?;
        Ok(replies.iter().map(offset_of).collect())
    })
    .await
    .unwrap_or(Err(BrokerError::Timeout(timeout)));
    if r.is_err() {
        discard(held);
    }
    r
}

/// After a failed pipeline: whether Redis applied these history publishes
/// after all (each entry carries its publish id), retried until `timeout`
/// (a restarted Redis is back within it). Their offsets when every one is
/// found; None while Redis is unreachable or one is missing (then it was not
/// applied, or Redis is still away: the publish stays unconfirmed, 503).
async fn confirm(pool: &Pool, outs: &[Out], timeout: Duration) -> Option<Vec<Option<Offset>>> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        let found = async {
            let mut c = pool.get().await.ok()?;
            let mut offsets = Vec::with_capacity(outs.len());
            for out in outs {
                let Out::History { stream, meta, id, .. } = out else { return None };
                type Entry = (String, Vec<(String, String)>);
                let tail: Vec<Entry> = redis::cmd("XREVRANGE")
                    .arg(stream)
                    .arg("+")
                    .arg("-")
                    .arg("COUNT")
                    .arg(MAX_BATCH * 4)
                    .query_async(&mut c)
                    .await
                    .ok()?;
                let entry = tail.iter().find(|(_, f)| f.iter().any(|(k, v)| k == "i" && v == id));
                let Some((entry_id, _)) = entry else { return Some(None) };
                let seq: u64 = entry_id.split_once('-')?.0.parse().ok()?;
                let epoch: String = redis::cmd("HGET").arg(meta).arg("e").query_async(&mut c).await.ok()?;
                offsets.push(Some(Offset { epoch: Arc::from(epoch), seq }));
            }
            Some(Some(offsets))
        };
        match tokio::time::timeout(timeout, found).await {
            Ok(Some(Some(offsets))) => {
                debug!("publish confirmed after a failed answer");
                return Some(offsets);
            }
            // Reachable, and not there: it was not applied.
            Ok(Some(None)) => return None,
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    None
}

/// The offset a publish script answered (`[seq, epoch]`); None for a PUBLISH.
fn offset_of(v: &redis::Value) -> Option<Offset> {
    let redis::Value::Array(parts) = v else { return None };
    let seq = match parts.first()? {
        redis::Value::Int(n) => u64::try_from(*n).ok()?,
        _ => return None,
    };
    let epoch: String = redis::from_redis_value_ref(parts.get(1)?).ok()?;
    Some(Offset { epoch: Arc::from(epoch), seq })
}

/// Reads a channel's history with the history script.
async fn read_history(
    pool: &Pool,
    script: &redis::Script,
    keys: &Keys,
    channel: &Channel,
    after: u64,
    limit: usize,
    timeout: Duration,
) -> Result<History, BrokerError> {
    type Entry = (String, Vec<(String, Vec<u8>)>);
    let read = async {
        let mut c = pool.get().await?;
        let mut inv = script.key(keys.stream(channel));
        inv.key(keys.meta(channel)).arg(after).arg(limit);
        let (epoch, top, first, entries): (String, u64, u64, Vec<Entry>) = inv.invoke_async(&mut c).await?;
        Ok::<_, BrokerError>((epoch, top, first, entries))
    };
    let (epoch, top, first, entries) =
        tokio::time::timeout(timeout, read).await.unwrap_or(Err(BrokerError::Timeout(timeout)))?;
    let epoch: Arc<str> = Arc::from(epoch);
    let mut messages = Vec::with_capacity(entries.len());
    for (id, fields) in entries {
        let Some(seq) = id.split_once('-').and_then(|(s, _)| s.parse::<u64>().ok()) else { continue };
        let field = |name: &str| fields.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_slice());
        let (Some(h), Some(d)) = (field("h"), field("d")) else { continue };
        let Ok(header) = serde_json::from_slice::<Header<'_>>(h) else { continue };
        let Ok(data) = Utf8Bytes::try_from(Bytes::copy_from_slice(d)) else { continue };
        let msg = Message::new(channel.clone(), data, header.x.map(|x| x.into_owned().into_boxed_str()), header.t);
        messages.push(Arc::new(msg.with_offset(Offset { epoch: epoch.clone(), seq })));
    }
    Ok(History { epoch, top, first, messages })
}

fn expiry_ms() -> u64 {
    u64::try_from(super::presence::EXPIRY.as_millis()).unwrap_or(u64::MAX)
}

/// Refreshes the expiry of this node's presence entries every heartbeat, so
/// that a node that dies without removing them loses them within the expiry.
async fn heartbeat(
    pool: Pool,
    keys: Keys,
    local: Arc<super::presence::LocalPresence>,
    timeout: Duration,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(super::presence::HEARTBEAT);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let entries = local.all();
        if entries.is_empty() {
            continue;
        }
        let until = crate::hub::now_us() / 1000 + expiry_ms();
        let refresh = async {
            let mut c = pool.get().await?;
            let mut pipe = redis::pipe();
            for (channel, connection, entry) in &entries {
                let (hash, zset) = keys.presence(channel);
                pipe.cmd("HSET").arg(&hash).arg(&**connection).arg(entry).ignore();
                pipe.cmd("ZADD").arg(&zset).arg(until).arg(&**connection).ignore();
                pipe.cmd("PEXPIRE").arg(&hash).arg(expiry_ms() * 4).ignore();
                pipe.cmd("PEXPIRE").arg(&zset).arg(expiry_ms() * 4).ignore();
            }
            pipe.query_async::<()>(&mut c).await.map_err(BrokerError::from)
        };
        if let Err(e) = tokio::time::timeout(timeout, refresh).await.unwrap_or(Err(BrokerError::Timeout(timeout))) {
            debug!(error = %e, "presence heartbeat failed; retrying at the next");
        }
    }
}

/// Publishes probe `seq` to this node's probe channel on a pooled connection.
async fn probe(pool: Pool, channel: String, seq: u64, timeout: Duration) {
    let sent = tokio::time::timeout(timeout, async {
        let mut c = pool.get().await.map_err(|e| e.to_string())?;
        redis::cmd("PUBLISH").arg(&channel).arg(seq).query_async::<i64>(&mut c).await.map_err(|e| e.to_string())
    })
    .await;
    if !matches!(sent, Ok(Ok(_))) {
        debug!(?sent, "probe not sent; it will count as lost");
    }
}

/// What the subscriber connection hands over.
enum Received {
    /// A message, the bytes it holds in the receive buffer, and the buffer's count.
    Msg(redis::Msg, u64, Arc<AtomicU64>),
    /// redis-rs saw the connection close.
    Closed,
}

struct Subscriber {
    client: redis::Client,
    /// Bytes the receive buffer holds at most.
    receive_buffer: u64,
    /// Set when the receive buffer dropped messages: history channels are
    /// caught up (the dropped tail would otherwise wait for a next message).
    overflowed: Arc<AtomicBool>,
    namespaces: Arc<Namespaces>,
    history_script: redis::Script,
    keys: Keys,
    hub: Arc<Hub>,
    interest: Arc<Interest>,
    metrics: Arc<Metrics>,
    /// For probes: a checkout per probe (one a second), never the publish
    /// queue, so a publish backlog cannot pass for a dead subscriber.
    pool: Pool,
    /// Bumped on every lost subscriber connection: the publisher then drops
    /// the connection it holds (Redis restarted: it is dead too).
    generation: Arc<AtomicU64>,
    timeout: Duration,
    probe_interval: Duration,
    probe_timeout: Duration,
}

enum Lost {
    Shutdown,
    Error(String),
}

/// What the subscriber keeps across reconnects.
struct SubState {
    /// The last command applied from the control log.
    applied: StreamId,
    /// The last offset delivered on this node, per channel with history
    /// (an empty epoch: the channel had no history when subscribed).
    tracked: HashMap<Channel, Offset>,
}

impl Subscriber {
    async fn run(self, shutdown: CancellationToken) {
        let mut attempt: u32 = 0;
        let mut ever_connected = false;
        // Commands issued since this node started may concern its sessions.
        let started_ms = crate::hub::now_us() / 1000;
        let mut st = SubState { applied: StreamId(started_ms.saturating_sub(1), u64::MAX), tracked: HashMap::new() };
        loop {
            let result = self.connection(&shutdown, &mut attempt, &mut ever_connected, &mut st).await;
            self.generation.fetch_add(1, Ordering::AcqRel);
            self.interest.set_up(false);
            self.metrics.broker_up.set(0);
            self.metrics.broker_subscriptions.set(0);
            match result {
                Lost::Shutdown => return,
                Lost::Error(e) => {
                    self.metrics.broker_connection_errors.inc();
                    warn!(error = %e, "Redis subscriber connection lost; reconnecting");
                }
            }
            let delay = backoff(attempt);
            attempt = attempt.saturating_add(1);
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// One subscriber connection, from connect to loss.
    async fn connection(
        &self,
        shutdown: &CancellationToken,
        attempt: &mut u32,
        ever: &mut bool,
        st: &mut SubState,
    ) -> Lost {
        let (mut sink, mut stream) = match self.subscriber_connection().await {
            Ok(pair) => pair,
            Err(e) => return Lost::Error(format!("connect: {e}")),
        };
        let own = [self.keys.control.as_str(), self.keys.probe.as_str()];
        if let Err(e) = self.with_timeout(sink.subscribe(&own)).await {
            return Lost::Error(format!("subscribe: {e}"));
        }
        // Commands published while this node was not listening, now that
        // new ones reach it (a command in both is applied once, by id).
        if let Err(e) = self.replay_commands(&mut st.applied).await {
            return Lost::Error(format!("reading the control log: {e}"));
        }
        // Everything the hub wants, resubscribed before the node says it is up.
        if let Err(e) = self.sync(&mut sink, st).await {
            return Lost::Error(e);
        }
        // What was published while this node was not listening, from the
        // streams, before any new message (those wait in the connection and
        // are de-duplicated by offset).
        if let Err(e) = self.catch_up(st).await {
            return Lost::Error(format!("catching up from history: {e}"));
        }
        self.interest.set_up(true);
        // Channels wanted while the first pass ran.
        if let Err(e) = self.sync(&mut sink, st).await {
            return Lost::Error(e);
        }
        self.metrics.broker_up.set(1);
        if *ever {
            self.metrics.broker_reconnects.inc();
            info!("Redis subscriber reconnected; every local channel resubscribed");
        } else {
            info!("Redis subscriber connected");
        }
        *ever = true;
        *attempt = 0;

        let mut probe_tick = tokio::time::interval(self.probe_interval);
        probe_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut seq: u64 = 0;
        let mut outstanding: Option<(u64, Instant)> = None;
        let mut last_rx = Instant::now();
        let mut last_tick = Instant::now();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Lost::Shutdown,
                msg = stream.recv() => match msg {
                    None => return Lost::Error("connection closed by Redis".into()),
                    Some(Received::Closed) => return Lost::Error("connection closed by Redis".into()),
                    Some(msg) => {
                        last_rx = Instant::now();
                        if let Some(got) = self.on_message(&msg, st).await {
                            if outstanding.is_some_and(|(want, _)| got >= want) {
                                outstanding = None;
                            }
                        }
                        // Messages were dropped: once the buffer is drained,
                        // read what history has past what was delivered.
                        if stream.is_empty() && self.overflowed.swap(false, Ordering::AcqRel) {
                            if let Err(e) = self.catch_up(st).await {
                                warn!(error = %e, "cannot catch up from history after an overflow");
                            }
                        }
                    }
                },
                _ = self.interest.changed.notified() => {
                    if let Err(e) = self.sync(&mut sink, st).await {
                        return Lost::Error(e);
                    }
                }
                _ = probe_tick.tick() => match outstanding {
                    // This task itself was not scheduled for longer than a
                    // probe may take (a CPU-starved or stopped process):
                    // that says nothing about Redis. Probe afresh.
                    Some(_) if last_tick.elapsed() > self.probe_interval + self.probe_timeout => {
                        debug!(stalled = ?last_tick.elapsed(), "the node was stalled; probing afresh");
                        outstanding = None;
                        last_tick = Instant::now();
                    }
                    Some((want, sent)) if sent.elapsed() > self.probe_timeout => {
                        last_tick = Instant::now();
                        // The probe measures Redis, not this node: a node that
                        // was starved of CPU, or is working through a backlog,
                        // first reads what has already arrived.
                        for _ in 0..100_000 {
                            match stream.try_recv() {
                                Ok(Received::Closed) => return Lost::Error("connection closed by Redis".into()),
                                Ok(msg) => {
                                    last_rx = Instant::now();
                                    if self.on_message(&msg, st).await.is_some_and(|got| got >= want) {
                                        outstanding = None;
                                    }
                                }
                                Err(mpsc::error::TryRecvError::Disconnected) => {
                                    return Lost::Error("connection closed by Redis".into());
                                }
                                Err(mpsc::error::TryRecvError::Empty) => break,
                            }
                        }
                        // Still missing, and nothing at all arrived lately: dead.
                        if outstanding.is_some() && last_rx.elapsed() > self.probe_timeout {
                            self.metrics.broker_probe_failures.inc();
                            return Lost::Error("self-probe not received back: subscriber is not delivering".into());
                        }
                    }
                    Some(_) => last_tick = Instant::now(),
                    None => {
                        last_tick = Instant::now();
                        seq += 1;
                        outstanding = Some((seq, Instant::now()));
                        let probe = probe(self.pool.clone(), self.keys.probe.clone(), seq, self.timeout);
                        tokio::spawn(probe.in_current_span());
                    }
                },
            }
        }
    }

    /// A RESP3 connection whose pushes (the subscribed messages) go into a
    /// receive buffer bounded by `--redis-receive-buffer` bytes: a node that
    /// falls behind (CPU-starved, or a burst) drops what does not fit,
    /// counts it in `wsrelay_broker_receive_overflow_total`, and repairs
    /// the channels that keep history from their streams when it sees the
    /// gap in offsets. redis-rs's own pub/sub connection buffers without
    /// bound.
    async fn subscriber_connection(
        &self,
    ) -> Result<(redis::aio::MultiplexedConnection, mpsc::UnboundedReceiver<Received>), String> {
        let (tx, rx) = mpsc::unbounded_channel::<Received>();
        let queued = Arc::new(AtomicU64::new(0));
        let (budget, metrics, overflowed) = (self.receive_buffer, self.metrics.clone(), self.overflowed.clone());
        let sender = move |push: redis::PushInfo| -> Result<(), ()> {
            if push.kind == redis::PushKind::Disconnection {
                return tx.send(Received::Closed).map_err(|_| ());
            }
            let Some(msg) = redis::Msg::from_push_info(push) else { return Ok(()) };
            let size = msg.get_payload_bytes().len() as u64 + 64;
            if queued.fetch_add(size, Ordering::AcqRel) + size > budget {
                queued.fetch_sub(size, Ordering::AcqRel);
                metrics.broker_receive_overflow.inc();
                overflowed.store(true, Ordering::Release);
                return Ok(());
            }
            tx.send(Received::Msg(msg, size, queued.clone())).map_err(|_| ())
        };
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout))
            .set_push_sender(sender);
        let conn = self.with_timeout(self.client.get_multiplexed_async_connection_with_config(&config)).await?;
        Ok((conn, rx))
    }

    async fn with_timeout<T>(&self, f: impl std::future::Future<Output = redis::RedisResult<T>>) -> Result<T, String> {
        match tokio::time::timeout(self.timeout, f).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("Redis did not answer in time".into()),
        }
    }

    /// Applies the hub's wanted channels to the connection, in batches of
    /// [`SUBSCRIBE_CHUNK`]. One pass per call: changes made meanwhile wake the
    /// loop again, so a steady churn cannot keep it from reading messages.
    async fn sync(&self, sink: &mut redis::aio::MultiplexedConnection, st: &mut SubState) -> Result<(), String> {
        let (add, remove) = self.interest.take_changes();
        for chunk in remove.chunks(SUBSCRIBE_CHUNK) {
            let names: Vec<String> = chunk.iter().map(|c| self.keys.channel(c)).collect();
            self.with_timeout(sink.unsubscribe(&names)).await.map_err(|e| format!("unsubscribe: {e}"))?;
            for c in chunk {
                st.tracked.remove(c);
            }
        }
        for chunk in add.chunks(SUBSCRIBE_CHUNK) {
            // Where each history channel stands, read *before* subscribing:
            // what is published in between shows up as a gap and is read
            // from the stream, never lost.
            self.track(chunk, st).await.map_err(|e| format!("reading history meta: {e}"))?;
            let names: Vec<String> = chunk.iter().map(|c| self.keys.channel(c)).collect();
            self.with_timeout(sink.subscribe(&names)).await.map_err(|e| format!("subscribe: {e}"))?;
            self.interest.confirm(chunk);
        }
        self.metrics.broker_subscriptions.set(self.interest.active_count() as i64);
        Ok(())
    }

    /// Applies the logged commands after `applied` to the sessions older
    /// than each command, and moves `applied` past them.
    async fn replay_commands(&self, applied: &mut StreamId) -> Result<(), BrokerError> {
        let read = async {
            let mut c = self.pool.get().await?;
            let start = format!("({applied}");
            let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
                .arg(&self.keys.control_log)
                .arg(start)
                .arg("+")
                .arg("COUNT")
                .arg(CONTROL_LOG_LEN)
                .query_async(&mut c)
                .await?;
            Ok::<_, BrokerError>(entries)
        };
        let entries = match tokio::time::timeout(self.timeout, read).await {
            Ok(r) => r?,
            Err(_) => return Err(BrokerError::Timeout(self.timeout)),
        };
        for (id, fields) in entries {
            let Some(id) = StreamId::parse(&id) else { continue };
            if let Some((_, payload)) = fields.iter().find(|(k, _)| k == "c") {
                self.apply(id, payload, applied, true);
            }
        }
        Ok(())
    }

    /// Applies one command once (by id). A replayed one spares the sessions
    /// that connected after it was issued.
    fn apply(&self, id: StreamId, payload: &str, applied: &mut StreamId, replayed: bool) {
        if id <= *applied {
            return;
        }
        *applied = id;
        match serde_json::from_str::<Command>(payload) {
            Ok(Command { t, op }) => {
                let n = self.hub.apply(&op, replayed.then_some(t));
                debug!(?op, sessions = n, replayed, "command applied");
            }
            Err(e) => warn!(error = %e, "ignoring a malformed command"),
        }
    }

    /// Records the current top offset of the history channels in `chunk`
    /// that are not tracked yet.
    async fn track(&self, chunk: &[Channel], st: &mut SubState) -> Result<(), BrokerError> {
        let todo: Vec<&Channel> = chunk
            .iter()
            .filter(|c| self.namespaces.rule(c).history.is_some() && !st.tracked.contains_key(*c))
            .collect();
        if todo.is_empty() {
            return Ok(());
        }
        let read = async {
            let mut c = self.pool.get().await?;
            let mut pipe = redis::pipe();
            for ch in &todo {
                pipe.cmd("HMGET").arg(self.keys.meta(ch)).arg("e").arg("s");
            }
            let metas: Vec<(Option<String>, Option<u64>)> = pipe.query_async(&mut c).await?;
            Ok::<_, BrokerError>(metas)
        };
        let metas =
            tokio::time::timeout(self.timeout, read).await.unwrap_or(Err(BrokerError::Timeout(self.timeout)))?;
        for (ch, (epoch, top)) in todo.into_iter().zip(metas) {
            let offset = Offset { epoch: Arc::from(epoch.unwrap_or_default()), seq: top.unwrap_or(0) };
            st.tracked.insert(ch.clone(), offset);
        }
        Ok(())
    }

    /// After a gap in this node's subscription (a reconnect): every tracked
    /// channel gets what was published since its last delivered offset.
    async fn catch_up(&self, st: &mut SubState) -> Result<(), BrokerError> {
        let channels: Vec<(Channel, Offset)> = st.tracked.iter().map(|(c, o)| (c.clone(), o.clone())).collect();
        for (channel, last) in channels {
            self.fill(&channel, &last, None, st).await?;
        }
        Ok(())
    }

    /// Delivers what history holds after `last` (up to, not including,
    /// sequence `before` when given) and moves the channel's tracked offset.
    /// Where history no longer covers it, the channel's subscribers are told
    /// (a gap notice) and tracking restarts at the top.
    async fn fill(
        &self,
        channel: &Channel,
        last: &Offset,
        before: Option<u64>,
        st: &mut SubState,
    ) -> Result<(), BrokerError> {
        let Some(policy) = self.namespaces.rule(channel).history else { return Ok(()) };
        // Nothing was ever published when it was tracked: everything in the
        // (new) epoch is missed, from the start.
        let after = if last.epoch.is_empty() { 0 } else { last.seq };
        let limit = before.map_or(policy.size, |b| usize::try_from(b.saturating_sub(after + 1)).unwrap_or(policy.size));
        if before.is_some() && limit == 0 {
            return Ok(());
        }
        self.metrics.history_reads.inc();
        let h = read_history(&self.pool, &self.history_script, &self.keys, channel, after, limit.max(1), self.timeout)
            .await?;
        if h.epoch.is_empty() {
            // No history at all (never published, or lost with nothing since).
            if !last.epoch.is_empty() && last.seq > 0 {
                self.gap(channel, st, Offset { epoch: h.epoch.clone(), seq: 0 });
            }
            return Ok(());
        }
        let start = Offset { epoch: h.epoch.clone(), seq: after };
        let same_life = last.epoch.is_empty() || *last.epoch == *h.epoch;
        if !same_life || !h.covers(&start) {
            self.gap(channel, st, h.top_offset());
            return Ok(());
        }
        let mut n = 0u64;
        for m in h.messages.iter().filter(|m| before.is_none_or(|b| m.offset.as_ref().is_some_and(|o| o.seq < b))) {
            self.hub.deliver(m);
            n += 1;
            if let Some(o) = &m.offset {
                st.tracked.insert(channel.clone(), o.clone());
            }
        }
        if n > 0 {
            self.metrics.history_recovered.inc_by(n);
            debug!(%channel, messages = n, "caught up from history");
        }
        Ok(())
    }

    /// Tells the channel's local subscribers that messages were lost beyond
    /// history, and tracks it from `at` on.
    fn gap(&self, channel: &Channel, st: &mut SubState, at: Offset) {
        self.metrics.history_gaps.inc();
        warn!(%channel, "messages lost beyond history: subscribers told to reload");
        let notice = Message::event(Kind::Gap, channel.clone(), Utf8Bytes::from_static("null"), None);
        self.hub.deliver(&Arc::new(notice));
        st.tracked.insert(channel.clone(), at);
    }

    /// A message with an offset: delivered once, in order, gaps filled first.
    async fn on_offset_message(&self, msg: Message, off: Offset, st: &mut SubState) {
        let channel = msg.channel.clone();
        match st.tracked.get(&channel).cloned() {
            Some(last) if !last.epoch.is_empty() && *last.epoch == *off.epoch && off.seq <= last.seq => {
                // Already delivered (caught up from history, or a duplicate).
                return;
            }
            Some(last) if !last.epoch.is_empty() && *last.epoch != *off.epoch => {
                // The history was lost and started again: what the old epoch
                // did not deliver is gone; the new one is read from its start.
                self.gap(&channel, st, Offset { epoch: off.epoch.clone(), seq: 0 });
                if off.seq > 1 {
                    let from = Offset { epoch: off.epoch.clone(), seq: 0 };
                    if let Err(e) = self.fill(&channel, &from, Some(off.seq), st).await {
                        warn!(%channel, error = %e, "cannot read history to fill a gap");
                    }
                }
            }
            Some(last) => {
                let expected = if last.epoch.is_empty() { 1 } else { last.seq + 1 };
                if off.seq > expected {
                    if let Err(e) = self.fill(&channel, &last, Some(off.seq), st).await {
                        warn!(%channel, error = %e, "cannot read history to fill a gap");
                        self.gap(&channel, st, off.clone());
                    }
                }
            }
            None => {}
        }
        if self.namespaces.rule(&channel).history.is_some() {
            st.tracked.insert(channel, off);
        }
        self.hub.deliver(&Arc::new(msg));
    }

    /// Handles one item of the receive buffer; returns the probe number if
    /// it was one.
    async fn on_message(&self, item: &Received, st: &mut SubState) -> Option<u64> {
        let msg = match item {
            Received::Msg(msg, size, queued) => {
                queued.fetch_sub(*size, Ordering::AcqRel);
                msg
            }
            Received::Closed => return None,
        };
        let name = msg.get_channel_name();
        let payload = msg.get_payload_bytes();
        if let Some(channel) = name.strip_prefix(&self.keys.channel_prefix) {
            match decode_message(channel, payload) {
                Ok(m) => match m.offset.clone() {
                    Some(off) => self.on_offset_message(m, off, st).await,
                    None => {
                        self.hub.deliver(&Arc::new(m));
                    }
                },
                Err(e) => warn!(prefix = %self.keys.prefix, error = %e, "ignoring a message"),
            }
            None
        } else if name == self.keys.probe {
            std::str::from_utf8(payload).ok()?.parse().ok()
        } else if name == self.keys.control {
            let parsed = std::str::from_utf8(payload)
                .ok()
                .and_then(|p| p.split_once(' '))
                .and_then(|(id, cmd)| Some((StreamId::parse(id)?, cmd)));
            match parsed {
                Some((id, cmd)) => self.apply(id, cmd, &mut st.applied, false),
                None => warn!("ignoring a malformed control message"),
            }
            None
        } else {
            None
        }
    }
}

/// Why a message read from a Redis channel is not one of ours.
#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    #[error("no wsrelay header (published by something else?)")]
    NoHeader,
    #[error("malformed header: {0}")]
    Header(#[from] serde_json::Error),
    #[error("invalid channel name: {0}")]
    Channel(#[from] crate::channel::ChannelError),
    #[error("data is not UTF-8")]
    NotUtf8,
}

/// Decodes a message published on `{prefix}ch:{channel}` (`channel` without
/// the prefix): only the small header is parsed; the data is taken as it
/// came (it was validated by the node that published it).
pub fn decode_message(channel: &str, payload: &[u8]) -> Result<Message, EnvelopeError> {
    let nl = payload.iter().position(|b| *b == b'\n').ok_or(EnvelopeError::NoHeader)?;
    let header: Header<'_> = serde_json::from_slice(&payload[..nl])?;
    let channel = Channel::parse(channel)?;
    let data = Utf8Bytes::try_from(Bytes::copy_from_slice(&payload[nl + 1..])).map_err(|_| EnvelopeError::NotUtf8)?;
    let kind = match header.k.as_deref() {
        Some("j") => Some(Kind::Join),
        Some("l") => Some(Kind::Leave),
        _ => None,
    };
    if let Some(kind) = kind {
        return Ok(Message::event(kind, channel, data, header.x.map(|x| x.into_owned().into_boxed_str())));
    }
    let msg = Message::new(channel, data, header.x.map(|x| x.into_owned().into_boxed_str()), header.t);
    Ok(match (header.o, header.e) {
        (Some(seq), Some(epoch)) => msg.with_offset(Offset { epoch: Arc::from(&*epoch), seq }),
        _ => msg,
    })
}

/// Decodes a control message (`<stream id> <command JSON>`); None if malformed.
pub fn decode_command(payload: &[u8]) -> Option<(String, String)> {
    let (id, cmd) = std::str::from_utf8(payload).ok()?.split_once(' ')?;
    let id = StreamId::parse(id)?;
    serde_json::from_str::<Command>(cmd).ok()?;
    Some((id.to_string(), cmd.to_owned()))
}

/// Exponential backoff from 100 ms to 2 s, each delay drawn from the upper
/// half of its step (jitter): a fleet reconnecting after a Redis restart
/// spreads out instead of stampeding.
fn backoff(attempt: u32) -> Duration {
    use rand::RngExt;
    let cap = Duration::from_millis(100u64.saturating_mul(1 << attempt.min(5))).min(Duration::from_secs(2));
    let ms = rand::rng().random_range(cap.as_millis() as u64 / 2..=cap.as_millis() as u64);
    Duration::from_millis(ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_password() {
        assert_eq!(redact("redis://:pw@host:6379/1"), "redis://:***@host:6379/1");
        assert_eq!(redact("rediss://user:pw@host/0"), "rediss://user:***@host/0");
        assert_eq!(redact("redis://host:6379"), "redis://host:6379");
    }

    #[test]
    fn envelope_roundtrip() {
        let h = Header { k: None, o: None, e: None, t: 42, x: Some("c1".into()) };
        let e = envelope(&h, br#"{"op":"message"}"#);
        let nl = e.iter().position(|b| *b == b'\n').unwrap();
        let back: Header<'_> = serde_json::from_slice(&e[..nl]).unwrap();
        assert_eq!(back.t, 42);
        assert_eq!(back.x.as_deref(), Some("c1"));
        assert_eq!(&e[nl + 1..], br#"{"op":"message"}"#);
    }

    #[test]
    fn backoff_is_bounded() {
        for a in 0..40 {
            assert!(backoff(a) <= Duration::from_secs(2));
        }
    }
}
