//! The subscriber task: one RESP3 connection per node, its bounded receive
//! buffer, resubscription, catch-up from history, gap repair, the
//! self-probe, and the replay of logged commands.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use super::conn::Pool;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, warn};

use super::SUBSCRIBE_CHUNK;
use super::sink::{Buffer, Received, Sink};
use super::wire::*;
use crate::broker::BrokerError;
use crate::broker::BrokerEvents;
use crate::channel::Channel;
use crate::config::Namespaces;
use crate::interest::Interest;
use crate::metrics::Metrics;
use crate::protocol::Offset;

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

pub(super) struct Subscriber {
    /// Where the master is (asked again at every connect).
    pub(super) source: Arc<super::conn::Source>,
    /// Bytes the receive buffer holds at most.
    pub(super) receive_buffer: u64,
    /// Set when the receive buffer dropped messages: history channels are
    /// caught up (the dropped tail would otherwise wait for a next message).
    pub(super) overflowed: Arc<AtomicBool>,
    pub(super) namespaces: Arc<Namespaces>,
    pub(super) scripts: Arc<Scripts>,
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
    pub(super) tracked: HashMap<Channel, Offset>,
    /// This connection already ended the dataset's life (once is enough).
    pub(super) life_ended: bool,
    /// On a Cluster, after a shard's connection was lost: when to
    /// subscribe everything again, in case redis-rs's own resubscription
    /// (which reports no failure) did not take.
    resubscribe_due: Option<Instant>,
    /// On a Cluster, channels `sync` just subscribed: their first
    /// confirmation needs no catch-up (`track` read where they stood).
    fresh: HashSet<Channel>,
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
            resubscribe_due: None,
            fresh: HashSet::new(),
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
        st.fresh.clear();
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
                    Some(Received::Shard(kind, name)) => {
                        if let Err(e) = self.on_shard(kind, &name, &mut sink, st).await {
                            return Lost::Error(e);
                        }
                    }
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
                                Ok(Received::Shard(kind, name)) => {
                                    if let Err(e) = self.on_shard(kind, &name, &mut sink, st).await {
                                        return Lost::Error(e);
                                    }
                                }
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
                        if st.resubscribe_due.is_some_and(|due| Instant::now() >= due) {
                            st.resubscribe_due = None;
                            if let Err(e) = self.resubscribe_all(&mut sink).await {
                                return Lost::Error(e);
                            }
                        }
                        // A Cluster's masters change with failovers: say which now.
                        if let Ok(Ok(Some(servers))) = tokio::time::timeout(self.timeout, sink.servers()).await {
                            self.metrics.set_broker_servers(servers.split(','));
                        }
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

    /// The subscriber connection (see `sink.rs`), its receive buffer, and
    /// the server(s) it talks to.
    async fn subscriber_connection(&self) -> Result<(Sink, mpsc::UnboundedReceiver<Received>, String), BrokerError> {
        let buffer =
            Buffer { budget: self.receive_buffer, metrics: self.metrics.clone(), overflowed: self.overflowed.clone() };
        let open = Sink::open(&self.source, self.timeout, buffer);
        let (sink, rx, address) = self.with_timeout(open).await?;
        self.metrics.set_broker_servers(address.split(','));
        Ok((sink, rx, address))
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
    /// Returns the channels' own names (sharded on a Cluster) and the
    /// room channels (classic).
    fn redis_names(&self, chunk: &[Channel]) -> (Vec<String>, Vec<String>) {
        let names: Vec<String> = chunk.iter().map(|c| self.keys.channel(c)).collect();
        let mut rooms = Vec::new();
        if let Some(sio) = &self.socketio_channel {
            for c in chunk {
                if let (ns, Some(room)) = crate::channel::split_socketio(c) {
                    rooms.push(format!("{sio}#{ns}#{room}"));
                }
            }
        }
        (names, rooms)
    }

    /// Applies the hub's wanted channels to the connection, in batches of
    /// [`SUBSCRIBE_CHUNK`]. One pass per call: changes made meanwhile wake the
    /// loop again, so a steady churn cannot keep it from reading messages.
    async fn sync(&self, sink: &mut Sink, st: &mut SubState) -> Result<(), LostReason> {
        let (add, remove) = self.interest.take_changes();
        for chunk in remove.chunks(SUBSCRIBE_CHUNK) {
            let (names, rooms) = self.redis_names(chunk);
            self.with_timeout(sink.unsubscribe_channels(&names)).await.map_err(failed("unsubscribe"))?;
            if !rooms.is_empty() {
                let rooms: Vec<&str> = rooms.iter().map(String::as_str).collect();
                self.with_timeout(sink.unsubscribe(&rooms)).await.map_err(failed("unsubscribe"))?;
            }
            for c in chunk {
                st.tracked.remove(c);
                st.fresh.remove(c);
            }
        }
        for chunk in add.chunks(SUBSCRIBE_CHUNK) {
            // Where each history channel stands, read *before* subscribing:
            // what is published in between shows up as a gap and is read
            // from the stream, never lost.
            self.track(chunk, st).await.map_err(failed("reading history meta"))?;
            let (names, rooms) = self.redis_names(chunk);
            if self.keys.sharded {
                st.fresh.extend(chunk.iter().cloned());
            }
            self.with_timeout(sink.subscribe_channels(&names)).await.map_err(failed("subscribe"))?;
            if !rooms.is_empty() {
                let rooms: Vec<&str> = rooms.iter().map(String::as_str).collect();
                self.with_timeout(sink.subscribe(&rooms)).await.map_err(failed("subscribe"))?;
            }
            self.interest.confirm(chunk);
        }
        self.metrics.broker_subscriptions.set(self.interest.active_count() as i64);
        Ok(())
    }

    /// Every active channel subscribed again (idempotent); each shard's
    /// confirmation catches its channels up from history.
    async fn resubscribe_all(&self, sink: &mut Sink) -> Result<(), LostReason> {
        let active = self.interest.active();
        debug!(channels = active.len(), "a shard's connection was lost: subscribing everything again");
        for chunk in active.chunks(SUBSCRIBE_CHUNK) {
            let (names, _) = self.redis_names(chunk);
            self.with_timeout(sink.subscribe_channels(&names)).await.map_err(failed("resubscribe"))?;
        }
        Ok(())
    }

    /// On a Cluster, a shard (re)confirmed or dropped a subscription.
    /// redis-rs resubscribes by itself after a shard's reconnect or a
    /// failover: what was published meanwhile is read from history once
    /// the shard confirms. A shard whose slot moved away drops the channel
    /// (`SUNSUBSCRIBE` push): subscribe where it lives now.
    async fn on_shard(
        &self,
        kind: redis::PushKind,
        name: &str,
        sink: &mut Sink,
        st: &mut SubState,
    ) -> Result<(), LostReason> {
        if kind == redis::PushKind::Disconnection {
            st.resubscribe_due.get_or_insert(Instant::now() + self.probe_timeout);
            return Ok(());
        }
        if kind == redis::PushKind::Subscribe && name == self.keys.control {
            // Node-wide channels resubscribed: commands issued meanwhile.
            return self.replay_commands(&mut st.applied).await.map_err(failed("reading the control log"));
        }
        let Some(channel) = self.keys.channel_of(name).and_then(|c| Channel::parse(c).ok()) else { return Ok(()) };
        if !self.interest.wants(&channel) {
            return Ok(());
        }
        match kind {
            // A new subscription's own confirmation: nothing to catch up.
            redis::PushKind::SSubscribe if st.fresh.remove(&channel) => {}
            redis::PushKind::SSubscribe => {
                if let Some(last) = st.tracked.get(&channel).cloned() {
                    if let Err(e) = self.fill(&channel, &last, None, st).await {
                        warn!(%channel, error = %e, "cannot read history after a resubscription");
                    }
                }
            }
            redis::PushKind::SUnsubscribe => {
                debug!(%channel, "a shard dropped the subscription (slot moved); subscribing again");
                let names = [name.to_owned()];
                self.with_timeout(sink.subscribe_channels(&names)).await.map_err(failed("resubscribe"))?;
            }
            _ => {}
        }
        Ok(())
    }

    /// Handles one item of the receive buffer; returns the probe number if
    /// it was one.
    async fn on_message(&self, item: &Received, st: &mut SubState) -> Option<u64> {
        let msg = match item {
            Received::Msg(msg, size, queued) => {
                queued.fetch_sub(*size, Ordering::AcqRel);
                msg
            }
            Received::Closed | Received::Shard(..) => return None,
        };
        let name = msg.get_channel_name();
        let payload = msg.get_payload_bytes();
        if let Some(channel) = self.keys.channel_of(name) {
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
