//! The subscriber task: one RESP3 connection per node, its bounded receive
//! buffer, resubscription, catch-up from history, gap repair, the
//! self-probe, and the replay of logged commands.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use super::conn::Pool;

use redis::AsyncConnectionConfig;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, warn};

use super::SUBSCRIBE_CHUNK;
use super::gaps::{Arrival, arrival};
use super::wire::*;
use crate::broker::BrokerError;
use crate::broker::BrokerEvents;
use crate::channel::Channel;
use crate::config::Namespaces;
use crate::interest::Interest;
use crate::metrics::Metrics;
use crate::protocol::{Kind, Message, Offset};

/// Publishes probe `seq` to this node's probe channel on a pooled connection.
pub(super) async fn probe(pool: Pool, channel: String, seq: u64, timeout: Duration) {
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
pub(super) enum Received {
    /// A message, the bytes it holds in the receive buffer, and the buffer's count.
    Msg(redis::Msg, u64, Arc<AtomicU64>),
    /// redis-rs saw the connection close.
    Closed,
}

pub(super) struct Subscriber {
    /// Where the master is (asked again at every connect).
    pub(super) source: Arc<super::conn::Source>,
    /// Bytes the receive buffer holds at most.
    pub(super) receive_buffer: u64,
    /// Set when the receive buffer dropped messages: history channels are
    /// caught up (the dropped tail would otherwise wait for a next message).
    pub(super) overflowed: Arc<AtomicBool>,
    pub(super) namespaces: Arc<Namespaces>,
    pub(super) history_script: redis::Script,
    pub(super) keys: Keys,
    pub(super) life: Arc<super::life::Life>,
    pub(super) events: Arc<dyn BrokerEvents>,
    pub(super) interest: Arc<Interest>,
    pub(super) metrics: Arc<Metrics>,
    /// For probes: a checkout per probe (one a second), never the publish
    /// queue, so a publish backlog cannot pass for a dead subscriber.
    pub(super) pool: Pool,
    /// Bumped on every lost subscriber connection: the publisher then drops
    /// the connection it holds (Redis restarted: it is dead too).
    pub(super) generation: Arc<AtomicU64>,
    pub(super) timeout: Duration,
    pub(super) probe_interval: Duration,
    pub(super) probe_timeout: Duration,
    pub(super) node_id: String,
    /// python-socketio's Redis manager channel, when bridged.
    pub(super) socketio_channel: Option<String>,
    /// Where its one-off tasks (probes, call answers) are tracked.
    pub(super) tasks: tokio_util::task::TaskTracker,
}

pub(super) enum Lost {
    Shutdown,
    Error(LostReason),
}

/// Why the subscriber's connection was given up (it then reconnects).
#[derive(Debug, thiserror::Error)]
pub(super) enum LostReason {
    #[error("{step}: {error}")]
    Failed { step: &'static str, error: BrokerError },
    #[error("connection closed by Redis")]
    Closed,
    #[error("self-probe not received back: subscriber is not delivering")]
    NotDelivering,
    #[error("the sentinels name another master (a failover)")]
    Demoted,
}

/// `Lost::Error` for a step that failed.
fn failed(step: &'static str) -> impl FnOnce(BrokerError) -> LostReason {
    move |error| LostReason::Failed { step, error }
}

/// What the subscriber keeps across reconnects.
pub(super) struct SubState {
    /// The last command applied from the control log.
    applied: StreamId,
    /// The last offset delivered on this node, per channel with history
    /// (an empty epoch: the channel had no history when subscribed).
    tracked: HashMap<Channel, Offset>,
    /// This connection already ended the dataset's life (once is enough).
    life_ended: bool,
}

impl Subscriber {
    pub(super) async fn run(self, shutdown: CancellationToken) {
        let mut attempt: u32 = 0;
        let mut ever_connected = false;
        // Commands issued since this node started may concern its sessions.
        let started_ms = crate::protocol::now_us() / 1000;
        let mut st = SubState {
            applied: StreamId(started_ms.saturating_sub(1), u64::MAX),
            tracked: HashMap::new(),
            life_ended: false,
        };
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
        let (mut sink, mut stream, address) = match self.subscriber_connection().await {
            Ok(parts) => parts,
            Err(e) => return Lost::Error(failed("connect")(e)),
        };
        let mut own = vec![self.keys.control.as_str(), self.keys.probe.as_str(), self.keys.calls.as_str()];
        own.extend(self.socketio_channel.as_deref());
        if let Err(e) = self.with_timeout(sink.subscribe(&own)).await {
            return Lost::Error(failed("subscribe")(e));
        }
        // Commands published while this node was not listening, now that
        // new ones reach it (a command in both is applied once, by id).
        if let Err(e) = self.replay_commands(&mut st.applied).await {
            return Lost::Error(failed("reading the control log")(e));
        }
        // Acknowledged writes gone (failover, older copy): a new life, before
        // any channel is read or this node publishes again.
        st.life_ended = match self.life.check(&self.pool, false, self.timeout).await {
            Ok(ended) => ended,
            Err(e) => return Lost::Error(failed("checking the dataset's life")(e)),
        };
        if st.life_ended {
            self.metrics.history_lives_ended.inc();
        }
        // Channels given up while disconnected are not tracked any more.
        st.tracked.retain(|c, _| self.interest.wants(c));
        // Everything the hub wants, resubscribed before the node says it is up.
        if let Err(e) = self.sync(&mut sink, st).await {
            return Lost::Error(e);
        }
        // What was published while this node was not listening, from the
        // streams, before any new message (those wait in the connection and
        // are de-duplicated by offset).
        if let Err(e) = self.catch_up(st).await {
            return Lost::Error(failed("catching up from history")(e));
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

        let mut sentinel = None;
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
                    None => return Lost::Error(LostReason::Closed),
                    Some(Received::Closed) => return Lost::Error(LostReason::Closed),
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
                                Ok(Received::Closed) => return Lost::Error(LostReason::Closed),
                                Ok(msg) => {
                                    last_rx = Instant::now();
                                    if self.on_message(&msg, st).await.is_some_and(|got| got >= want) {
                                        outstanding = None;
                                    }
                                }
                                Err(mpsc::error::TryRecvError::Disconnected) => {
                                    return Lost::Error(LostReason::Closed);
                                }
                                Err(mpsc::error::TryRecvError::Empty) => break,
                            }
                        }
                        // Still missing, and nothing at all arrived lately: dead.
                        if outstanding.is_some() && last_rx.elapsed() > self.probe_timeout {
                            self.metrics.broker_probe_failures.inc();
                            return Lost::Error(LostReason::NotDelivering);
                        }
                    }
                    Some(_) => last_tick = Instant::now(),
                    None => {
                        last_tick = Instant::now();
                        // Follow the master the sentinels name: a demoted
                        // one still relays what the new one publishes, and
                        // one not yet demoted takes writes that will be lost.
                        if self.source.is_sentinel() {
                            match self.with_timeout(self.source.sentinel_says(&mut sentinel)).await {
                                Ok(Some(named)) if named != address => return Lost::Error(LostReason::Demoted),
                                Ok(_) => {}
                                Err(e) => debug!(error = %e, "cannot ask a sentinel where the master is"),
                            }
                        }
                        seq += 1;
                        outstanding = Some((seq, Instant::now()));
                        let probe = probe(self.pool.clone(), self.keys.probe.clone(), seq, self.timeout);
                        self.tasks.spawn(probe.in_current_span());
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
    ) -> Result<(redis::aio::MultiplexedConnection, mpsc::UnboundedReceiver<Received>, String), BrokerError> {
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
        let connect = async {
            let info = self.source.master().await?;
            // RESP3: its pushes go to the bounded buffer above.
            let resp3 = info.redis_settings().clone().set_protocol(redis::ProtocolVersion::RESP3);
            let address = super::conn::address(&info);
            let client = redis::Client::open(info.set_redis_settings(resp3))?;
            let conn = client.get_multiplexed_async_connection_with_config(&config).await?;
            Ok::<_, redis::RedisError>((conn, address))
        };
        let (conn, address) = self.with_timeout(connect).await?;
        self.metrics.set_broker_servers([address.as_str()]);
        Ok((conn, rx, address))
    }

    async fn with_timeout<T>(
        &self,
        f: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, BrokerError> {
        match tokio::time::timeout(self.timeout, f).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err(BrokerError::Timeout(self.timeout)),
        }
    }

    /// The Redis channels that carry `chunk`'s traffic: each channel's own
    /// and, with a python-socketio channel, the room channel its
    /// room-channel manager publishes a room's emits on
    /// (`<socketio channel>#<namespace>#<room>`, Open WebUI's default):
    /// subscribed only for the rooms this node has members of.
    fn redis_names(&self, chunk: &[Channel]) -> Vec<String> {
        let mut names: Vec<String> = chunk.iter().map(|c| self.keys.channel(c)).collect();
        if let Some(sio) = &self.socketio_channel {
            for c in chunk {
                if let (ns, Some(room)) = crate::channel::split_socketio(c) {
                    names.push(format!("{sio}#{ns}#{room}"));
                }
            }
        }
        names
    }

    /// Applies the hub's wanted channels to the connection, in batches of
    /// [`SUBSCRIBE_CHUNK`]. One pass per call: changes made meanwhile wake the
    /// loop again, so a steady churn cannot keep it from reading messages.
    async fn sync(&self, sink: &mut redis::aio::MultiplexedConnection, st: &mut SubState) -> Result<(), LostReason> {
        let (add, remove) = self.interest.take_changes();
        for chunk in remove.chunks(SUBSCRIBE_CHUNK) {
            let names = self.redis_names(chunk);
            self.with_timeout(sink.unsubscribe(&names)).await.map_err(failed("unsubscribe"))?;
            for c in chunk {
                st.tracked.remove(c);
            }
        }
        for chunk in add.chunks(SUBSCRIBE_CHUNK) {
            // Where each history channel stands, read *before* subscribing:
            // what is published in between shows up as a gap and is read
            // from the stream, never lost.
            self.track(chunk, st).await.map_err(failed("reading history meta"))?;
            let names = self.redis_names(chunk);
            self.with_timeout(sink.subscribe(&names)).await.map_err(failed("subscribe"))?;
            self.interest.confirm(chunk);
        }
        self.metrics.broker_subscriptions.set(self.interest.active_count() as i64);
        Ok(())
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
            pipe.cmd("HGET").arg(&self.keys.life).arg("id");
            for ch in &todo {
                pipe.cmd("HMGET").arg(self.keys.meta(ch)).arg("e").arg("s").arg("l");
            }
            /// A channel's meta: epoch, top offset, the life it was stamped in.
            type Meta = (Option<String>, Option<u64>, Option<String>);
            let (life, metas): (Option<String>, Vec<Meta>) = pipe.query_async(&mut c).await?;
            Ok::<_, BrokerError>((life, metas))
        };
        let (life, metas) =
            tokio::time::timeout(self.timeout, read).await.unwrap_or(Err(BrokerError::Timeout(self.timeout)))?;
        for (ch, (epoch, top, stamped)) in todo.into_iter().zip(metas) {
            // Stamped in another life of the dataset: no history (as the history script says).
            let (epoch, top) = if stamped.is_some() && stamped != life { (None, None) } else { (epoch, top) };
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
        let limit = before.map_or(policy.read_limit(), |b| {
            usize::try_from(b.saturating_sub(after + 1)).unwrap_or(policy.read_limit())
        });
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
        if !last.epoch.is_empty() && same_life && last.seq > h.top && !st.life_ended {
            // This node delivered offsets the channel no longer reaches: the
            // dataset lost acknowledged writes, and would reuse them.
            st.life_ended = self.life.check(&self.pool, true, self.timeout).await?;
            self.metrics.history_lives_ended.inc();
        }
        if st.life_ended && same_life && last.seq > h.top {
            self.gap(channel, st, Offset { epoch: Arc::from(""), seq: 0 });
            return Ok(());
        }
        if !same_life || !h.covers(&start) {
            self.gap(channel, st, h.top_offset());
            return Ok(());
        }
        let mut n = 0u64;
        for m in h.messages.iter().filter(|m| before.is_none_or(|b| m.offset.as_ref().is_some_and(|o| o.seq < b))) {
            self.events.deliver(m);
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
        self.events.deliver(&Arc::new(notice));
        st.tracked.insert(channel.clone(), at);
    }

    /// A message with an offset: delivered once, in order, gaps filled first.
    async fn on_offset_message(&self, msg: Message, off: Offset, st: &mut SubState) {
        let channel = msg.channel.clone();
        match arrival(st.tracked.get(&channel), &off) {
            Arrival::Duplicate => return,
            Arrival::Next => {}
            Arrival::NewEpoch { fill } => {
                self.gap(&channel, st, Offset { epoch: off.epoch.clone(), seq: 0 });
                if let Some(from) = fill {
                    if let Err(e) = self.fill(&channel, &from, Some(off.seq), st).await {
                        warn!(%channel, error = %e, "cannot read history to fill a gap");
                    }
                }
            }
            Arrival::Missed { last } => {
                if let Err(e) = self.fill(&channel, &last, Some(off.seq), st).await {
                    warn!(%channel, error = %e, "cannot read history to fill a gap");
                    self.gap(&channel, st, off.clone());
                }
            }
        }
        if self.namespaces.rule(&channel).history.is_some() {
            st.tracked.insert(channel, off);
        }
        self.events.deliver(&Arc::new(msg));
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
                        self.events.deliver(&Arc::new(m));
                    }
                },
                Err(e) => warn!(prefix = %self.keys.prefix, error = %e, "ignoring a message"),
            }
            None
        } else if name == self.keys.probe {
            std::str::from_utf8(payload).ok()?.parse().ok()
        } else if name == self.keys.calls {
            self.on_call(payload);
            None
        } else if self
            .socketio_channel
            .as_deref()
            .is_some_and(|sio| name.strip_prefix(sio).is_some_and(|rest| rest.is_empty() || rest.starts_with('#')))
        {
            self.events.foreign(payload);
            None
        } else if name == self.keys.control {
            match decode_control(payload) {
                Some((id, cmd)) => self.apply(id, cmd, &mut st.applied, false),
                None => warn!("ignoring a malformed control message"),
            }
            None
        } else {
            None
        }
    }
}

/// Exponential backoff from 100 ms to 2 s, each delay drawn from the upper
/// half of its step (jitter): a fleet reconnecting after a Redis restart
/// spreads out instead of stampeding.
pub(super) fn backoff(attempt: u32) -> Duration {
    use rand::RngExt;
    let cap = Duration::from_millis(100u64.saturating_mul(1 << attempt.min(5))).min(Duration::from_secs(2));
    let ms = rand::rng().random_range(cap.as_millis() as u64 / 2..=cap.as_millis() as u64);
    Duration::from_millis(ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_bounded() {
        for a in 0..40 {
            assert!(backoff(a) <= Duration::from_secs(2));
        }
    }
}
