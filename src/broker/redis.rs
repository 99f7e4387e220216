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

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use deadpool_redis::{Pool, Runtime};
use futures_util::{FutureExt, StreamExt};
use redis::AsyncConnectionConfig;
use redis::io::tcp::TcpSettings;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, warn};

use super::BrokerError;
use crate::channel::Channel;
use crate::config::{BrokerConfig, Secret};
use crate::hub::{DisconnectTarget, Hub, Interest};
use crate::metrics::Metrics;
use crate::protocol::Message;

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
}

struct Job {
    messages: Vec<(String, Vec<u8>)>,
    done: Option<oneshot::Sender<Result<(), BrokerError>>>,
}

#[derive(Serialize, Deserialize)]
struct Header<'a> {
    t: u64,
    #[serde(default, skip_serializing_if = "Option::is_none", borrow)]
    x: Option<std::borrow::Cow<'a, str>>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Control {
    Disconnect(DisconnectTarget),
}

/// A command to every node, as logged and published.
#[derive(Serialize, Deserialize)]
struct Command {
    /// When it was issued (µs since the Unix epoch, the issuing node's clock).
    t: u64,
    #[serde(flatten)]
    op: Control,
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
    pub fn start(
        url: &Secret,
        cfg: &BrokerConfig,
        node_id: &str,
        hub: Arc<Hub>,
        interest: Arc<Interest>,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> Result<Self, BrokerError> {
        if url.expose().starts_with("rediss://") {
            // rustls needs one process-wide crypto provider; a second install is a no-op error.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let bad = |e: redis::RedisError| BrokerError::Config(format!("invalid Redis URL: {e}"));
        let info = redis::IntoConnectionInfo::into_connection_info(url.expose())
            .map_err(bad)?
            // redis-rs leaves Nagle on; every publish would wait for the previous ACK.
            .set_tcp_settings(TcpSettings::default().set_nodelay(true));
        let client = redis::Client::open(info.clone()).map_err(bad)?;
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

        let keys = Keys::new(&cfg.prefix, node_id);
        let (tx, rx) = mpsc::channel(PUBLISH_QUEUE);
        let generation = Arc::new(AtomicU64::new(0));
        metrics.broker_up.set(0);
        let publisher_task = publisher(pool.clone(), rx, generation.clone(), cfg.timeout, metrics.clone());
        tokio::spawn(publisher_task.instrument(tracing::info_span!("redis_publisher")));
        let command_pool = pool.clone();
        let sub = Subscriber {
            client,
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

    pub async fn publish(&self, pubs: Vec<Arc<Message>>) -> Result<(), BrokerError> {
        let messages = pubs
            .iter()
            .map(|m| {
                let header = Header { t: m.published_us, x: m.exclude.as_deref().map(Into::into) };
                (self.keys.channel(&m.channel), envelope(&header, m.data.as_bytes()))
            })
            .collect();
        self.send(messages).await
    }

    pub async fn ensure_subscribed(&self, channel: &str) -> Result<(), BrokerError> {
        self.interest.wait_active(channel, self.timeout).await
    }

    /// Closes the targeted sessions on every node: logged, then published.
    pub async fn disconnect(&self, target: &DisconnectTarget) -> Result<(), BrokerError> {
        if !self.is_up() {
            return Err(BrokerError::NotConnected);
        }
        let cmd = Command { t: crate::hub::now_us(), op: Control::Disconnect(target.clone()) };
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

    async fn send(&self, messages: Vec<(String, Vec<u8>)>) -> Result<(), BrokerError> {
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
    let mut held: Option<(deadpool_redis::Connection, u64)> = None;
    let mut batch: Vec<Job> = Vec::with_capacity(64);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let now = generation.load(Ordering::Acquire);
        if held.as_ref().is_some_and(|(_, g)| *g != now) {
            discard(&mut held);
        }
        let timer = metrics.broker_publish_seconds.start_timer();
        let result = run_batch(&pool, &mut held, now, &batch, timeout).await;
        timer.observe_duration();
        if let Err(e) = &result {
            debug!(error = %e, "publish failed");
        }
        for mut job in batch.drain(..) {
            if let Some(done) = job.done.take() {
                let _ = done.send(result.clone());
            }
        }
    }
}

/// Takes a connection out of the pool for good: it may be half-broken.
fn discard(held: &mut Option<(deadpool_redis::Connection, u64)>) {
    if let Some((c, _)) = held.take() {
        drop(deadpool_redis::Connection::take(c));
    }
}

async fn run_batch(
    pool: &Pool,
    held: &mut Option<(deadpool_redis::Connection, u64)>,
    generation: u64,
    batch: &[Job],
    timeout: Duration,
) -> Result<(), BrokerError> {
    let (c, _) = match held {
        Some(h) => h,
        None => {
            let c = pool.get().await?;
            held.insert((c, generation))
        }
    };
    let mut pipe = redis::pipe();
    for job in batch {
        for (channel, payload) in &job.messages {
            pipe.publish(channel, payload).ignore();
        }
    }
    let r = match tokio::time::timeout(timeout, pipe.query_async::<()>(c)).await {
        Ok(r) => r.map_err(BrokerError::from),
        Err(_) => Err(BrokerError::Timeout(timeout)),
    };
    if r.is_err() {
        discard(held);
    }
    r
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

struct Subscriber {
    client: redis::Client,
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

impl Subscriber {
    async fn run(self, shutdown: CancellationToken) {
        let mut attempt: u32 = 0;
        let mut ever_connected = false;
        // Commands issued since this node started may concern its sessions.
        let started_ms = crate::hub::now_us() / 1000;
        let mut applied = StreamId(started_ms.saturating_sub(1), u64::MAX);
        loop {
            let result = self.connection(&shutdown, &mut attempt, &mut ever_connected, &mut applied).await;
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
        applied: &mut StreamId,
    ) -> Lost {
        let pubsub = match tokio::time::timeout(self.timeout, self.client.get_async_pubsub()).await {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => return Lost::Error(format!("connect: {e}")),
            Err(_) => return Lost::Error("connect: timed out".into()),
        };
        let (mut sink, mut stream) = pubsub.split();
        let own = [self.keys.control.as_str(), self.keys.probe.as_str()];
        if let Err(e) = self.with_timeout(sink.subscribe(&own)).await {
            return Lost::Error(format!("subscribe: {e}"));
        }
        // Commands published while this node was not listening, now that
        // new ones reach it (a command in both is applied once, by id).
        if let Err(e) = self.replay_commands(applied).await {
            return Lost::Error(format!("reading the control log: {e}"));
        }
        // Everything the hub wants, resubscribed before the node says it is up.
        if let Err(e) = self.sync(&mut sink).await {
            return Lost::Error(e);
        }
        self.interest.set_up(true);
        // Channels wanted while the first pass ran.
        if let Err(e) = self.sync(&mut sink).await {
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
                msg = stream.next() => match msg {
                    None => return Lost::Error("connection closed by Redis".into()),
                    Some(msg) => {
                        last_rx = Instant::now();
                        if let Some(got) = self.on_message(&msg, applied) {
                            if outstanding.is_some_and(|(want, _)| got >= want) {
                                outstanding = None;
                            }
                        }
                    }
                },
                _ = self.interest.changed.notified() => {
                    if let Err(e) = self.sync(&mut sink).await {
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
                            match stream.next().now_or_never() {
                                Some(Some(msg)) => {
                                    last_rx = Instant::now();
                                    if self.on_message(&msg, applied).is_some_and(|got| got >= want) {
                                        outstanding = None;
                                    }
                                }
                                Some(None) => return Lost::Error("connection closed by Redis".into()),
                                None => break,
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
    async fn sync(&self, sink: &mut redis::aio::PubSubSink) -> Result<(), String> {
        let (add, remove) = self.interest.take_changes();
        for chunk in remove.chunks(SUBSCRIBE_CHUNK) {
            let names: Vec<String> = chunk.iter().map(|c| self.keys.channel(c)).collect();
            self.with_timeout(sink.unsubscribe(&names)).await.map_err(|e| format!("unsubscribe: {e}"))?;
        }
        for chunk in add.chunks(SUBSCRIBE_CHUNK) {
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
            Ok(Command { t, op: Control::Disconnect(target) }) => {
                let n = self.hub.disconnect(&target, replayed.then_some(t));
                debug!(?target, closed = n, replayed, "disconnect command");
            }
            Err(e) => warn!(error = %e, "ignoring a malformed command"),
        }
    }

    /// Handles one message from Redis; returns the probe number if it was one.
    fn on_message(&self, msg: &redis::Msg, applied: &mut StreamId) -> Option<u64> {
        let name = msg.get_channel_name();
        let payload = msg.get_payload_bytes();
        if let Some(channel) = name.strip_prefix(&self.keys.channel_prefix) {
            self.deliver(channel, payload);
            None
        } else if name == self.keys.probe {
            std::str::from_utf8(payload).ok()?.parse().ok()
        } else if name == self.keys.control {
            let parsed = std::str::from_utf8(payload)
                .ok()
                .and_then(|p| p.split_once(' '))
                .and_then(|(id, cmd)| Some((StreamId::parse(id)?, cmd)));
            match parsed {
                Some((id, cmd)) => self.apply(id, cmd, applied, false),
                None => warn!("ignoring a malformed control message"),
            }
            None
        } else {
            None
        }
    }

    fn deliver(&self, name: &str, payload: &[u8]) {
        match decode_message(name, payload) {
            Ok(msg) => {
                self.hub.deliver(&Arc::new(msg));
            }
            Err(e) => warn!(prefix = %self.keys.prefix, error = %e, "ignoring a message"),
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
    Ok(Message::new(channel, data, header.x.map(|x| x.into_owned().into_boxed_str()), header.t))
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
        let h = Header { t: 42, x: Some("c1".into()) };
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
