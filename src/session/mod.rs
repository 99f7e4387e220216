//! One task per client WebSocket: reads frames, answers requests, writes the
//! outbound queue, pings, and closes with the right code.
//!
//! The loop knows no wire format: a [`Codec`] (wsrelay.v1 today) turns
//! frames into [`Request`]s and replies, welcome and messages into frames.
//!
//! The task never blocks its writes on a slow operation: a request that
//! waits (a hook, the broker) becomes the session's single *pending* future,
//! polled alongside the queue; while it is pending no further frame is read,
//! so requests are answered in order and a busy client is back-pressured by
//! TCP instead of growing memory. Writes drain the queue with `feed` and
//! flush once per batch.
//!
//! Hyper forgets upgraded connections, so the session watches the drain
//! token itself and closes with 1001 at a spread-out moment.

pub mod upgrade;

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use serde_json::value::RawValue;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::{Instant, Sleep};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::error::ProtocolError;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message as WsMessage, Utf8Bytes};

use crate::auth::{Action, DisconnectEvent, Identity};
use crate::broker::History;
use crate::channel::Channel;
use crate::error::{ApiError, CloseReason, ErrorCode};
use crate::hub::{Outbound, SessionCommand, SessionHandle, now_us};
use crate::node::{Node, Slot, Source};
use crate::protocol::{Codec, Decoded, Frame, Message, Offset, Request};

type Ws = WebSocketStream<TokioIo<Upgraded>>;
type Pending<Id> = Pin<Box<dyn Future<Output = Outcome<Id>> + Send>>;

/// Frames written per flush at most, so reads and pings get their turn.
const WRITE_BATCH: usize = 256;
/// Rate-limited frames in a row before the connection is closed (1008).
const RATE_STRIKES: u32 = 20;
/// How long a close frame may take to go out before the socket is dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);

/// What a pending request ends with: the reply's address and content.
struct Outcome<Id> {
    id: Option<Id>,
    result: Result<Option<Box<RawValue>>, ApiError>,
    /// A subscribe with `since`: what history holds after it.
    recovery: Option<Recovery>,
    /// A subscribe that failed after its channel was reserved.
    release: Option<Channel>,
}

/// An item to write before the queue.
struct Front {
    out: Outbound,
    /// It came from the queue: it counts against the node's queue budget.
    counted: bool,
    /// Already de-duplicated (a recovery's output): written as it is.
    checked: bool,
}

/// What a request's future ends with.
struct Done {
    result: Result<Option<Box<RawValue>>, ApiError>,
    recovery: Option<Recovery>,
    release: Option<Channel>,
}

/// A subscribe with `since`, after reading the channel's history.
struct Recovery {
    channel: Channel,
    since: Option<Offset>,
    history: History,
    /// Everything after `since` is in `history`: no gap.
    recovered: bool,
}

impl Recovery {
    fn new(channel: Channel, since: Option<Offset>, history: History) -> Self {
        let recovered = since.as_ref().is_some_and(|s| history.covers(s));
        Recovery { channel, since, history, recovered }
    }

    /// The subscribe reply's result: `{"recovered":…,"offset":…}`.
    fn answer(&self) -> Box<RawValue> {
        let v = serde_json::json!({ "recovered": self.recovered, "offset": self.history.top_offset().to_string() });
        // A JSON value printed as JSON is valid raw JSON.
        RawValue::from_string(v.to_string()).unwrap_or_else(|_| Box::<RawValue>::default())
    }
}

/// Token bucket for `--client-rate` / `--client-burst`.
struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn new(rate: u32, burst: u32) -> Self {
        Bucket { rate: f64::from(rate), burst: f64::from(burst), tokens: f64::from(burst), last: Instant::now() }
    }

    fn take(&mut self) -> bool {
        if self.rate == 0.0 {
            return true;
        }
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate).min(self.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// A session's state. Dropping it removes every trace of the session from
/// the hub, whichever way it ends (close, error, failed upgrade, panic).
pub(crate) struct Session<C: Codec> {
    node: Arc<Node>,
    codec: C,
    handle: Arc<SessionHandle>,
    ident: Arc<Identity>,
    /// Held for the session's life; given back on drop.
    _slot: Slot,
    /// Its outbound queue, owned here so that whatever is left in it is
    /// given back to the node's queue budget however the session ends.
    rx: Option<mpsc::Receiver<Outbound>>,
    /// Channels subscribed, or reserved by a pending subscribe.
    subs: HashSet<Channel>,
    /// Channels being recovered (`since`): their live messages wait here
    /// until history has been read, then follow it.
    recovering: HashMap<Channel, Vec<Arc<Message>>>,
    /// Frames to write before the queue: a recovery's reply and messages.
    front: VecDeque<Front>,
    /// Recovered channels: the last sequence written, so a live message
    /// that history already delivered is not written twice.
    seen: HashMap<Channel, u64>,
    bucket: Bucket,
    strikes: u32,
    last_seen: Instant,
    /// Set once the upgrade completed: only then is the end a disconnect.
    started: bool,
    /// Set once the disconnect was counted and reported.
    reported: bool,
}

impl<C: Codec> Drop for Session<C> {
    fn drop(&mut self) {
        let hub = self.node.hub.clone();
        for ch in self.subs.drain().collect::<Vec<_>>() {
            hub.unsubscribe(&ch, self.handle.key);
            self.leave(&ch);
        }
        hub.unregister(&self.handle);
        // Nothing more can be queued (unsubscribed above): release the rest.
        if let Some(mut rx) = self.rx.take() {
            rx.close();
            let mut left = 0;
            while let Ok(out) = rx.try_recv() {
                left += out.weight();
            }
            hub.budget().release(left);
        }
        // A session that ended without run() finishing (a panic) still counts.
        self.report(CloseReason::Error);
    }
}

async fn maybe<F: Future + Unpin>(f: &mut Option<F>) -> F::Output {
    match f {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

impl<C: Codec> Session<C> {
    pub(crate) fn new(
        node: Arc<Node>,
        codec: C,
        handle: Arc<SessionHandle>,
        ident: Arc<Identity>,
        slot: Slot,
        rx: mpsc::Receiver<Outbound>,
    ) -> Self {
        let cfg = &node.cfg.session;
        let bucket = Bucket::new(cfg.client_rate, cfg.client_burst);
        Session {
            node,
            codec,
            handle,
            ident,
            _slot: slot,
            rx: Some(rx),
            subs: HashSet::new(),
            recovering: HashMap::new(),
            front: VecDeque::new(),
            seen: HashMap::new(),
            bucket,
            strikes: 0,
            last_seen: Instant::now(),
            started: false,
            reported: false,
        }
    }

    /// This session as its channels' presence lists it.
    fn presence_entry(&self) -> String {
        let v = serde_json::json!({
            "connection": &*self.handle.id,
            "user": self.ident.user.as_deref(),
            "info": self.ident.info,
        });
        v.to_string()
    }

    /// Leaves `channel`'s presence, in the background (from Drop too).
    fn leave(&self, channel: &Channel) {
        let rule = self.node.cfg.namespaces.rule(channel);
        if !rule.presence {
            return;
        }
        let (node, channel, id, entry, announce) =
            (self.node.clone(), channel.clone(), self.handle.id.clone(), self.presence_entry(), rule.join_leave);
        // From Drop too: only where a runtime still runs (else the entry expires).
        let Ok(rt) = tokio::runtime::Handle::try_current() else { return };
        rt.spawn(async move {
            if let Err(e) = node.broker.presence_change(&channel, &id, entry, false, announce).await {
                tracing::debug!(error = %e, "presence leave not recorded (the entry expires)");
            }
        });
    }

    /// Subscribes before the upgrade (URL, hook and token channels); a URL
    /// channel with `since` is recovered: its history after that offset is
    /// written right after the welcome. Returns each recovery's outcome.
    pub(crate) async fn subscribe_initial(
        &mut self,
        channels: &[Channel],
        since: &HashMap<Channel, String>,
    ) -> Result<Vec<(Channel, bool)>, ApiError> {
        let mut recovered = Vec::new();
        for ch in channels {
            if !self.subs.insert(ch.clone()) {
                continue;
            }
            self.node.hub.subscribe(ch, &self.handle)?;
            self.node.broker.ensure_subscribed(ch).await?;
            let rule = self.node.cfg.namespaces.rule(ch);
            if rule.presence {
                self.node
                    .broker
                    .presence_change(ch, &self.handle.id, self.presence_entry(), true, rule.join_leave)
                    .await?;
            }
            let Some(offset) = since.get(ch) else { continue };
            let Some(policy) = self.node.cfg.namespaces.rule(ch).history else {
                recovered.push((ch.clone(), false));
                continue;
            };
            let offset = Offset::parse(offset);
            let after = offset.as_ref().map_or(0, |o| o.seq);
            self.node.metrics.history_reads.inc();
            let h = self.node.broker.history(ch, policy, after, policy.size).await?;
            let r = Recovery::new(ch.clone(), offset, h);
            recovered.push((ch.clone(), r.recovered));
            // Live messages already queued are newer or duplicates: `seen`
            // drops the latter when they are written, after these.
            self.recover(r);
        }
        Ok(recovered)
    }

    /// Runs the session until it ends, then closes the socket.
    pub(crate) async fn run(mut self, mut ws: Ws, welcome: Utf8Bytes) {
        self.started = true;
        let Some(mut rx) = self.rx.take() else {
            return;
        };
        let reason = self.serve(&mut ws, &mut rx, welcome).await;
        self.rx = Some(rx);
        // Counted when decided, not when the close handshake ends: a client
        // that does not read can hold the socket for CLOSE_TIMEOUT.
        self.report(reason);
        close(&mut ws, reason).await;
    }

    /// Counts the disconnect and tells the disconnect hook, once.
    fn report(&mut self, reason: CloseReason) {
        if !self.started || self.reported {
            return;
        }
        self.reported = true;
        self.node.metrics.disconnect(reason);
        self.node.auth.disconnected(DisconnectEvent {
            user: self.ident.user.as_deref().map(str::to_owned),
            connection: self.handle.id.to_string(),
            reason: reason.label(),
        });
        tracing::debug!(reason = reason.label(), "session closed");
    }

    async fn serve(&mut self, ws: &mut Ws, rx: &mut mpsc::Receiver<Outbound>, welcome: Utf8Bytes) -> CloseReason {
        let handle = self.handle.clone();
        let node = self.node.clone();
        // The welcome is written before anything queued, so it is always first.
        tokio::select! {
            r = ws.send(WsMessage::Text(welcome)) => if r.is_err() { return CloseReason::Error },
            r = handle.killed() => return r,
        }
        let ping_every = node.cfg.session.ping_interval;
        let idle_timeout = node.cfg.session.idle_timeout;
        // A JWT's expiry ends the session, as it would refuse a new one.
        let mut expiry = self.ident.expires.map(|exp| Box::pin(tokio::time::sleep(until_unix(exp))));
        let mut ping = tokio::time::interval_at(Instant::now() + ping_every, ping_every);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut pending: Option<Pending<C::Id>> = None;
        let mut drain_at: Option<Pin<Box<Sleep>>> = None;
        loop {
            tokio::select! {
                r = handle.killed() => return r,
                _ = node.drain.cancelled(), if drain_at.is_none() => {
                    drain_at = Some(Box::pin(tokio::time::sleep(node.drain_delay())));
                }
                _ = maybe(&mut drain_at) => return CloseReason::Shutdown,
                _ = maybe(&mut expiry) => return CloseReason::TokenExpired,
                () = std::future::ready(()), if !self.front.is_empty() => {
                    if let Err(r) = self.write(ws, rx, None, &handle, idle_timeout).await {
                        return r;
                    }
                }
                Some(first) = rx.recv() => {
                    if let Err(r) = self.write(ws, rx, Some(first), &handle, idle_timeout).await {
                        return r;
                    }
                }
                outcome = maybe(&mut pending) => {
                    pending = None;
                    self.apply(outcome);
                }
                frame = ws.next(), if pending.is_none() => match frame {
                    None => return CloseReason::Client,
                    Some(Err(e)) => return read_error(&e),
                    Some(Ok(msg)) => match self.on_message(&msg) {
                        Ok(p) => pending = p,
                        Err(r) => return r,
                    },
                },
                _ = ping.tick() => {
                    if self.last_seen.elapsed() > idle_timeout {
                        return CloseReason::IdleTimeout;
                    }
                    tokio::select! {
                        r = tokio::time::timeout(idle_timeout, ws.send(WsMessage::Ping(Default::default()))) => match r {
                            Ok(Ok(())) => {}
                            Ok(Err(_)) => return CloseReason::Error,
                            Err(_) => return CloseReason::SlowConsumer,
                        },
                        r = handle.killed() => return r,
                    }
                }
            }
        }
    }

    /// Writes a batch. Most complete at once (the socket has room), so the
    /// timer that closes a client which accepts no byte for `idle` is only
    /// armed when the write has to wait.
    async fn write(
        &mut self,
        ws: &mut Ws,
        rx: &mut mpsc::Receiver<Outbound>,
        first: Option<Outbound>,
        handle: &SessionHandle,
        idle: Duration,
    ) -> Result<(), CloseReason> {
        let batch = self.write_batch(ws, rx, first);
        tokio::pin!(batch);
        if let std::task::Poll::Ready(r) = futures_util::poll!(batch.as_mut()) {
            return r;
        }
        tokio::select! {
            r = tokio::time::timeout(idle, batch) => r.unwrap_or(Err(CloseReason::SlowConsumer)),
            r = handle.killed() => Err(r),
        }
    }

    /// Writes what waits in front, `first` and whatever else is queued,
    /// then flushes once.
    async fn write_batch(
        &mut self,
        ws: &mut Ws,
        rx: &mut mpsc::Receiver<Outbound>,
        first: Option<Outbound>,
    ) -> Result<(), CloseReason> {
        // One clock read per batch: "publish to socket write" to within a batch.
        let now = now_us();
        let node = self.node.clone();
        let metrics = &node.metrics;
        let mut messages: u64 = 0;
        let mut bytes = 0;
        let mut first = first;
        let mut n = 0;
        while n < WRITE_BATCH {
            let (out, counted, checked) = match self.front.pop_front() {
                Some(f) => (f.out, f.counted, f.checked),
                None => match first.take().or_else(|| rx.try_recv().ok()) {
                    Some(out) => (out, true, false),
                    None => break,
                },
            };
            n += 1;
            let weight = if counted { out.weight() } else { 0 };
            let frame = match out {
                Outbound::Message(m) => {
                    if !checked && !self.admit(&m)? {
                        // Held for a recovery (still queued), or already written.
                        continue;
                    }
                    messages += 1;
                    if m.published_us != 0 {
                        metrics.delivery_seconds.observe(now.saturating_sub(m.published_us) as f64 / 1e6);
                    }
                    m.encoded(&self.codec)
                }
                Outbound::Frame(f) => *f,
                Outbound::Command(cmd) => {
                    self.server_command(*cmd);
                    continue;
                }
            };
            bytes += weight;
            ws.feed(WsMessage::Text(frame)).await.map_err(|_| CloseReason::Error)?;
        }
        if let Some(out) = first {
            // The batch filled up before `first` was taken: it goes next,
            // still to be checked like anything from the queue.
            self.front.push_front(Front { out, counted: true, checked: false });
        }
        ws.flush().await.map_err(|_| CloseReason::Error)?;
        node.hub.budget().release(bytes);
        metrics.delivered.inc_by(messages);
        Ok(())
    }

    /// Whether a channel message is written now: not while its channel is
    /// being recovered (it waits for the history), and not when history
    /// already delivered it (by offset). Errs when a recovery's wait list
    /// outgrows the client queue.
    fn admit(&mut self, m: &Arc<Message>) -> Result<bool, CloseReason> {
        if self.recovering.is_empty() && self.seen.is_empty() {
            return Ok(true);
        }
        if let Some(waiting) = self.recovering.get_mut(&m.channel) {
            if waiting.len() >= self.node.cfg.session.client_queue {
                return Err(CloseReason::SlowConsumer);
            }
            waiting.push(m.clone());
            return Ok(false);
        }
        if let (Some(last), Some(off)) = (self.seen.get_mut(&m.channel), &m.offset) {
            if off.seq <= *last {
                self.node.hub.budget().release(m.weight());
                return Ok(false);
            }
            *last = off.seq;
        }
        Ok(true)
    }

    fn send_frame(&self, frame: Utf8Bytes) {
        self.handle.enqueue(Outbound::Frame(Box::new(frame)));
    }

    /// Answers a request: always for an error or a result, and for a bare
    /// success only when the client asked (gave an id).
    fn reply(&self, id: Option<&C::Id>, result: Result<Option<&RawValue>, &ApiError>) {
        match result {
            Ok(None) if id.is_none() => {}
            Ok(r) => self.send_frame(self.codec.reply_ok(id, r)),
            Err(e) => {
                self.node.metrics.error(e.fault);
                e.log("request refused");
                self.send_frame(self.codec.reply_err(id, e));
            }
        }
    }

    fn apply(&mut self, outcome: Outcome<C::Id>) {
        if let Some(channel) = &outcome.release {
            self.subs.remove(channel);
            self.recovering.remove(channel);
        }
        match outcome.recovery {
            Some(r) if outcome.result.is_ok() => {
                // The reply first, then history, then what arrived meanwhile.
                let reply = self.codec.reply_ok(outcome.id.as_ref(), Some(&r.answer()));
                self.front.push_back(Front { out: Outbound::Frame(Box::new(reply)), counted: false, checked: true });
                self.recover(r);
            }
            _ => self.reply(outcome.id.as_ref(), outcome.result.as_ref().map(Option::as_deref)),
        }
    }

    /// Queues (in front) what history holds after the client's offset, then
    /// the live messages that waited, each once and in order.
    fn recover(&mut self, r: Recovery) {
        let waiting = self.recovering.remove(&r.channel).unwrap_or_default();
        let mut last = r.since.as_ref().filter(|_| r.recovered).map_or(0, |o| o.seq);
        let mut n = 0u64;
        if r.recovered {
            for m in &r.history.messages {
                if let Some(off) = m.offset.as_ref().filter(|o| o.seq > last) {
                    last = off.seq;
                    self.front.push_back(Front { out: Outbound::Message(m.clone()), counted: false, checked: true });
                    n += 1;
                }
            }
        }
        for m in waiting {
            match &m.offset {
                Some(off) if *off.epoch == *r.history.epoch && off.seq <= last => {
                    self.node.hub.budget().release(m.weight());
                }
                off => {
                    last = last.max(off.as_ref().map_or(0, |o| o.seq));
                    self.front.push_back(Front { out: Outbound::Message(m), counted: true, checked: true });
                }
            }
        }
        self.node.metrics.history_recovered.inc_by(n);
        self.seen.insert(r.channel, last);
    }

    fn on_message(&mut self, msg: &WsMessage) -> Result<Option<Pending<C::Id>>, CloseReason> {
        self.last_seen = Instant::now();
        let frame = match msg {
            WsMessage::Text(t) => Frame::Text(t.as_str()),
            WsMessage::Binary(b) => Frame::Binary(b),
            WsMessage::Close(_) => return Err(CloseReason::Client),
            WsMessage::Ping(_) | WsMessage::Pong(_) | WsMessage::Frame(_) => return Ok(None),
        };
        self.node.metrics.messages_received.inc();
        if !self.bucket.take() {
            self.strikes += 1;
            if self.strikes >= RATE_STRIKES {
                return Err(CloseReason::RateLimited);
            }
            let id = self.codec.decode(frame).id;
            let err = ApiError::new(ErrorCode::RateLimited, "too many frames: slow down");
            self.reply(id.as_ref(), Err(&err));
            return Ok(None);
        }
        self.strikes = 0;
        Ok(self.dispatch(self.codec.decode(frame)))
    }

    /// Answers a request at once, or returns the future that will.
    fn dispatch(&mut self, decoded: Decoded<C::Id>) -> Option<Pending<C::Id>> {
        let Decoded { id, request } = decoded;
        let request = match request {
            Ok(r) => r,
            Err(e) => {
                self.reply(id.as_ref(), Err(&e));
                return None;
            }
        };
        let result = match request {
            Request::Ping => {
                // Always answered, id or not: it is how a client checks the link.
                self.send_frame(self.codec.reply_ok(id.as_ref(), None));
                return None;
            }
            Request::Subscribe { channel, since } => match self.subscribe(channel, since) {
                Ok(Some(fut)) => return Some(Self::pending(id, fut)),
                Ok(None) => Ok(()),
                Err(e) => Err(e),
            },
            Request::Unsubscribe { channel } => {
                if let Some(ch) = self.subs.take(&channel) {
                    self.node.hub.unsubscribe(&ch, self.handle.key);
                    self.leave(&ch);
                }
                Ok(())
            }
            Request::Publish { channel, data } => return Some(Self::pending(id, self.publish(channel, data))),
            Request::Send { data } => return Some(Self::pending(id, self.send(data))),
            Request::Presence { channel } => match self.presence(channel) {
                Ok(fut) => return Some(Self::pending(id, fut)),
                Err(e) => Err(e),
            },
        };
        self.reply(id.as_ref(), result.as_ref().map(|()| None));
        None
    }

    /// Wraps a request's future with its reply address.
    fn pending(id: Option<C::Id>, fut: impl Future<Output = Done> + Send + 'static) -> Pending<C::Id> {
        Box::pin(async move {
            let done = fut.await;
            Outcome { id, result: done.result, recovery: done.recovery, release: done.release }
        })
    }

    /// Reserves the channel and returns the future that authorizes and
    /// subscribes (and, with `since`, reads the history to recover), or None
    /// when already subscribed.
    fn subscribe(
        &mut self,
        channel: Channel,
        since: Option<String>,
    ) -> Result<Option<impl Future<Output = Done> + Send + 'static>, ApiError> {
        if self.subs.contains(&channel) {
            return Ok(None);
        }
        let max = self.node.cfg.session.max_subscriptions;
        if self.subs.len() >= max {
            return Err(ApiError::new(
                ErrorCode::LimitExceeded,
                format!("subscription limit reached ({max} channels per connection)"),
            ));
        }
        // Reserved now, so a session dropped mid-way cleans it up.
        self.subs.insert(channel.clone());
        let rule = self.node.cfg.namespaces.rule(&channel);
        let history = rule.history;
        let presence = rule.presence.then(|| (self.presence_entry(), rule.join_leave));
        if since.is_some() && history.is_some() {
            // Live messages wait from the moment the hub has us.
            self.recovering.insert(channel.clone(), Vec::new());
        }
        let node = self.node.clone();
        let handle = self.handle.clone();
        let ident = self.ident.clone();
        Ok(Some(async move {
            let asked = since.is_some();
            let result = async {
                node.auth.authorize(Action::Subscribe, &ident, &handle.id, &channel, None).await?;
                node.hub.subscribe(&channel, &handle)?;
                if let Err(e) = node.broker.ensure_subscribed(&channel).await {
                    node.hub.unsubscribe(&channel, handle.key);
                    return Err(ApiError::from(e));
                }
                if let Some((entry, announce)) = presence {
                    if let Err(e) = node.broker.presence_change(&channel, &handle.id, entry, true, announce).await {
                        node.hub.unsubscribe(&channel, handle.key);
                        return Err(ApiError::from(e));
                    }
                }
                match (since, history) {
                    (Some(since), Some(policy)) => {
                        let since = Offset::parse(&since);
                        let after = since.as_ref().map_or(0, |o| o.seq);
                        node.metrics.history_reads.inc();
                        let h = node.broker.history(&channel, policy, after, policy.size).await?;
                        Ok(Some(Recovery::new(channel.clone(), since, h)))
                    }
                    // Without history there is nothing to recover from: say
                    // so, so the client reloads instead of trusting a
                    // gap-free stream.
                    (Some(_), None) => Ok(None),
                    (None, _) => Ok(None),
                }
            }
            .await;
            match result {
                Ok(Some(recovery)) => Done { result: Ok(None), recovery: Some(recovery), release: None },
                Ok(None) if asked => Done {
                    result: Ok(RawValue::from_string(r#"{"recovered":false}"#.to_owned()).ok()),
                    recovery: None,
                    release: None,
                },
                Ok(None) => Done { result: Ok(None), recovery: None, release: None },
                Err(e) => Done { result: Err(e), recovery: None, release: Some(channel) },
            }
        }))
    }

    /// Applies what the app asked (`/api/subscribe`, `/api/unsubscribe`): no
    /// policy check, the app decides; the per-connection and node limits
    /// still hold. The client is told with a `subscribed`/`unsubscribed`
    /// frame (once the broker delivers the channel, for a subscribe).
    fn server_command(&mut self, cmd: SessionCommand) {
        match cmd {
            SessionCommand::Subscribe(channel) => {
                if self.subs.contains(&channel) {
                    return;
                }
                if self.subs.len() >= self.node.cfg.session.max_subscriptions {
                    tracing::warn!(%channel, "server-side subscribe over max-subscriptions: ignored");
                    return;
                }
                if let Err(e) = self.node.hub.subscribe(&channel, &self.handle) {
                    tracing::warn!(%channel, error = %e, "server-side subscribe refused");
                    return;
                }
                self.subs.insert(channel.clone());
                let frame = self.codec.server_subscription(&channel, true);
                let rule = self.node.cfg.namespaces.rule(&channel);
                let presence = rule.presence.then(|| (self.presence_entry(), rule.join_leave));
                let (node, handle) = (self.node.clone(), self.handle.clone());
                tokio::spawn(async move {
                    if let Err(e) = node.broker.ensure_subscribed(&channel).await {
                        tracing::warn!(%channel, error = %e, "server-side subscribe not confirmed by the broker");
                    }
                    if let Some((entry, announce)) = presence {
                        let _ = node.broker.presence_change(&channel, &handle.id, entry, true, announce).await;
                    }
                    handle.enqueue(Outbound::Frame(Box::new(frame)));
                });
            }
            SessionCommand::Unsubscribe(channel) => {
                if let Some(ch) = self.subs.take(&channel) {
                    self.node.hub.unsubscribe(&ch, self.handle.key);
                    self.recovering.remove(&ch);
                    self.leave(&ch);
                    self.send_frame(self.codec.server_subscription(&ch, false));
                }
            }
        }
    }

    /// Who is subscribed to `channel` (a channel this session is subscribed
    /// to, in a namespace with presence).
    fn presence(&self, channel: Channel) -> Result<impl Future<Output = Done> + Send + 'static, ApiError> {
        if !self.node.cfg.namespaces.rule(&channel).presence {
            return Err(ApiError::new(ErrorCode::NotFound, format!("no presence is kept for {channel:?}")));
        }
        if !self.subs.contains(&channel) {
            return Err(ApiError::forbidden(format!("subscribe to {channel:?} to see who else is")));
        }
        let node = self.node.clone();
        Ok(async move {
            let result = match node.broker.presence(&channel).await {
                Ok(list) => Ok(RawValue::from_string(list.to_json().to_string()).ok()),
                Err(e) => Err(ApiError::from(e)),
            };
            Done { result, recovery: None, release: None }
        })
    }

    fn publish(&self, channel: Channel, data: Box<RawValue>) -> impl Future<Output = Done> + Send + 'static {
        let node = self.node.clone();
        let handle = self.handle.clone();
        let ident = self.ident.clone();
        async move {
            let result = async {
                node.auth.authorize(Action::Publish, &ident, &handle.id, &channel, Some(&data)).await?;
                let offsets = node.publish(vec![channel], &data, None, Source::Client).await?;
                // Where history is kept, the reply says where the message went.
                Ok(offsets.into_iter().flatten().next().and_then(|o| {
                    RawValue::from_string(serde_json::json!({ "offset": o.to_string() }).to_string()).ok()
                }))
            }
            .await;
            Done { result, recovery: None, release: None }
        }
    }

    fn send(&self, data: Box<RawValue>) -> impl Future<Output = Done> + Send + 'static {
        let node = self.node.clone();
        let handle = self.handle.clone();
        let ident = self.ident.clone();
        async move { Done { result: node.auth.send(&ident, &handle.id, &data).await, recovery: None, release: None } }
    }
}

/// How long until a Unix time in seconds (zero if past).
fn until_unix(secs: u64) -> Duration {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    Duration::from_secs(secs).saturating_sub(now)
}

fn read_error(e: &WsError) -> CloseReason {
    match e {
        WsError::Capacity(_) => CloseReason::TooLarge,
        // The client hung up without a close frame: it left, nothing broke.
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => CloseReason::Client,
        WsError::Protocol(_) | WsError::Utf8(_) => CloseReason::Protocol,
        WsError::ConnectionClosed | WsError::AlreadyClosed => CloseReason::Client,
        _ => CloseReason::Error,
    }
}

/// Sends the close frame for `reason` (if any), then lets the client answer
/// before the socket goes: dropping a socket with unread input resets it,
/// and the client would never see the close code.
async fn close(ws: &mut Ws, reason: CloseReason) {
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
        match reason.close_frame() {
            Some((code, text)) => {
                let frame = CloseFrame { code: CloseCode::from(code), reason: Utf8Bytes::from_static(text) };
                if ws.close(Some(frame)).await.is_err() {
                    return;
                }
            }
            // The client's close was answered by tungstenite; push it out.
            None => {
                let _ = ws.flush().await;
            }
        }
        // Read the client's close reply, or (after a read error) drain raw
        // input, until the client hangs up.
        while let Some(Ok(_)) = ws.next().await {}
        let _ = ws.get_mut().shutdown().await;
        // On the heap: a 4 KiB array here would sit in every session's future.
        let mut sink = vec![0u8; 4096];
        while matches!(ws.get_mut().read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
}
