//! One task per client connection: reads frames, answers requests, writes
//! the outbound queue, pings, and closes with the right code.
//!
//! The loop knows no wire format: a [`Codec`] (wsrelay.v1, Socket.IO) turns
//! frames into [`Request`]s and replies, welcome and messages into frames;
//! a protocol's own requests go to its `ProtocolFront`, its per-socket
//! state is a `SocketState`, and it reads and writes through a
//! `transport::Transport` (a WebSocket, or the Engine.IO transport).
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

mod front;
mod membership;
mod requests;
mod state;
pub(crate) mod transport;
pub mod upgrade;

use self::requests::Outcome;
pub(crate) use self::state::SocketState;
use self::transport::Transport;

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::value::RawValue;
use tokio::sync::mpsc;
use tokio::time::{Instant, Sleep};
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
use crate::protocol::{Decoded, Frame, Message, Offset, Request};

pub(crate) type Pending<Id> = Pin<Box<dyn Future<Output = Outcome<Id>> + Send>>;

pub(crate) use self::front::ProtocolFront;
pub(crate) use self::membership::{OnFailure, confirm_join};
pub(crate) use self::requests::Done;

/// Frames written per flush at most, so reads and pings get their turn.
const WRITE_BATCH: usize = 256;
/// Rate-limited frames in a row before the connection is closed (1008).
const RATE_STRIKES: u32 = 20;

/// An item to write before the queue.
struct Front {
    out: Outbound,
    /// It came from the queue: it counts against the node's queue budget.
    counted: bool,
    /// Already de-duplicated (a recovery's output): written as it is.
    checked: bool,
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
pub(crate) struct Session<C: ProtocolFront> {
    pub(crate) node: Arc<Node>,
    codec: C,
    pub(crate) handle: Arc<SessionHandle>,
    pub(crate) ident: Arc<Identity>,
    /// Held for the session's life; given back on drop.
    _slot: Slot,
    /// Its outbound queue, owned here so that whatever is left in it is
    /// given back to the node's queue budget however the session ends.
    rx: Option<mpsc::Receiver<Outbound>>,
    /// Channels subscribed, or reserved by a pending subscribe.
    pub(crate) subs: HashSet<Channel>,
    /// Channels being recovered (`since`): their live messages wait here
    /// until history has been read, then follow it.
    recovering: HashMap<Channel, Vec<Arc<Message>>>,
    /// Frames to write before the queue: a recovery's reply and messages.
    front: VecDeque<Front>,
    /// Recovered channels: the last offset written, so a live message that
    /// history already delivered is not written twice.
    seen: HashMap<Channel, Offset>,
    bucket: Bucket,
    strikes: u32,
    last_seen: Instant,
    /// Set once the upgrade completed: only then is the end a disconnect.
    started: bool,
    /// Set once the disconnect was counted and reported.
    reported: bool,
    /// Bytes of channel messages taken out of the queue and not yet written
    /// or dropped (in a batch, a recovery's wait list, `front`): still
    /// counted against the node's queue budget, given back on drop.
    held: usize,
    /// Events sent with `/api/call`, by the ack id they were sent with.
    pub(crate) calls: HashMap<u64, String>,
    pub(crate) next_ack: u64,
    /// What a front keeps of this socket beside the loop (Socket.IO: its
    /// recovery trail), told what the loop writes and joins.
    pub(crate) state: Option<Box<dyn SocketState>>,
    /// What the protocol's front keeps of this socket ([`ProtocolFront::Socket`]).
    pub(crate) own: C::Socket,
    /// When the session ends for its token's expiry (the earliest of its
    /// namespaces' tokens), Unix seconds.
    pub(crate) expires: Option<u64>,
    /// `expires` moved since the loop set its timer.
    pub(crate) expiry_moved: bool,
}

impl<C: ProtocolFront> Drop for Session<C> {
    fn drop(&mut self) {
        let hub = self.node.hub.clone();
        for ch in self.subs.drain().collect::<Vec<_>>() {
            hub.unsubscribe(&ch, self.handle.key);
            self.leave_presence(&ch);
        }
        hub.unregister(&self.handle);
        // Nothing more can be queued (unsubscribed above): release the rest,
        // and what this session held (a batch cut short, wait lists).
        let mut left = std::mem::take(&mut self.held);
        if let Some(mut rx) = self.rx.take() {
            rx.close();
            while let Ok(out) = rx.try_recv() {
                left += out.weight();
            }
        }
        hub.budget().release(left);
        // Calls it will never answer: their callers learn it now.
        for (_, call) in self.calls.drain() {
            self.node.answer_call(call, crate::hub::CallAnswer::Gone);
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

impl<C: ProtocolFront> Session<C> {
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
        let expires = ident.expires;
        Session {
            expires,
            expiry_moved: false,
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
            held: 0,
            calls: HashMap::new(),
            next_ack: 0,
            state: None,
            own: C::Socket::default(),
            bucket,
            strikes: 0,
            last_seen: Instant::now(),
            started: false,
            reported: false,
        }
    }

    /// Runs the session until it ends, then closes the socket.
    pub(crate) async fn run<T: Transport>(mut self, mut ws: T, welcome: Utf8Bytes) {
        self.started = true;
        let Some(mut rx) = self.rx.take() else {
            return;
        };
        let reason = self.serve(&mut ws, &mut rx, welcome).await;
        self.rx = Some(rx);
        // Counted when decided, not when the close handshake ends: a client
        // that does not read can hold the socket for CLOSE_TIMEOUT.
        self.report(reason);
        self.end_state(reason);
        // A protocol may say goodbye first (Socket.IO: "the server
        // disconnected you", so the client does not reconnect).
        let bye = self.codec.goodbye(reason, &self.subs);
        if !bye.is_empty() {
            let _ = tokio::time::timeout(transport::CLOSE_TIMEOUT, async {
                for frame in bye {
                    if ws.feed(WsMessage::Text(frame)).await.is_err() {
                        return;
                    }
                }
                let _ = ws.flush().await;
            })
            .await;
        }
        let frame = reason
            .close_frame()
            .map(|(code, text)| CloseFrame { code: CloseCode::from(code), reason: Utf8Bytes::from_static(text) });
        ws.close(frame).await;
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

    async fn serve<T: Transport>(
        &mut self,
        ws: &mut T,
        rx: &mut mpsc::Receiver<Outbound>,
        welcome: Utf8Bytes,
    ) -> CloseReason {
        let handle = self.handle.clone();
        let node = self.node.clone();
        // The welcome is written before anything queued, so it is always first.
        tokio::select! {
            r = async { ws.feed(WsMessage::Text(welcome)).await?; ws.flush().await } => if r.is_err() { return CloseReason::Error },
            r = handle.killed() => return r,
        }
        let ping_every = node.cfg.session.ping_interval;
        let idle_timeout = node.cfg.session.idle_timeout;
        // A JWT's expiry ends the session, as it would refuse a new one.
        let mut expiry = self.expires.map(|exp| Box::pin(tokio::time::sleep(until_unix(exp))));
        let mut ping = tokio::time::interval_at(Instant::now() + ping_every, ping_every);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut pending: Option<Pending<C::Id>> = None;
        let mut deferred: Option<WsMessage> = None;
        let mut drain_at: Option<Pin<Box<Sleep>>> = None;
        // C::PONG_DEADLINE: when the last ping went, and when its pong is due.
        let mut pinged = Instant::now();
        let mut pong_due: Option<Pin<Box<Sleep>>> = None;
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
                    if std::mem::take(&mut self.expiry_moved) {
                        expiry = self.expires.map(|exp| Box::pin(tokio::time::sleep(until_unix(exp))));
                    }
                    // The request read meanwhile, now.
                    if let Some(msg) = deferred.take() {
                        match self.on_message(&msg) {
                            Ok(p) => pending = p,
                            Err(r) => return r,
                        }
                    }
                }
                // No new request while one is pending, nor while a recovery's
                // output still waits to be written: a client cannot pile them
                // up. A codec may keep reading while one is pending, for
                // answers (taken at once, never requests) and pongs; the first
                // other frame waits in `deferred`, and reading stops there.
                frame = ws.recv(), if self.front.is_empty() && deferred.is_none()
                    && (pending.is_none() || C::READS_WHILE_PENDING) => match frame {
                    None => return CloseReason::Client,
                    Some(Err(e)) => return read_error(&e),
                    Some(Ok(msg)) if pending.is_some() && !self.answers(&msg) => deferred = Some(msg),
                    Some(Ok(msg)) => match self.on_message(&msg) {
                        // An answer never starts a request: `pending` stays.
                        Ok(p) => pending = p.or(pending.take()),
                        Err(r) => return r,
                    },
                },
                _ = maybe(&mut pong_due) => {
                    if self.last_seen <= pinged {
                        return CloseReason::IdleTimeout;
                    }
                    pong_due = None;
                }
                _ = ping.tick() => {
                    if self.last_seen.elapsed() > idle_timeout {
                        return CloseReason::IdleTimeout;
                    }
                    if C::PONG_DEADLINE {
                        pinged = Instant::now();
                        pong_due = Some(Box::pin(tokio::time::sleep(node.cfg.session.ping_timeout())));
                    }
                    tokio::select! {
                        r = tokio::time::timeout(idle_timeout, async {
                            ws.feed(WsMessage::Ping(Default::default())).await?;
                            ws.flush().await
                        }) => match r {
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
    async fn write<T: Transport>(
        &mut self,
        ws: &mut T,
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
    async fn write_batch<T: Transport>(
        &mut self,
        ws: &mut T,
        rx: &mut mpsc::Receiver<Outbound>,
        first: Option<Outbound>,
    ) -> Result<(), CloseReason> {
        // One clock read per batch: "publish to socket write" to within a batch.
        let now = now_us();
        let node = self.node.clone();
        let metrics = &node.metrics;
        let mut messages: u64 = 0;
        let mut bytes = 0;
        // Held from here on: if this batch is cut short (timeout, kill,
        // error), the session's drop gives it back.
        if let Some(f) = &first {
            self.held += f.weight();
        }
        let mut first = first;
        let mut n = 0;
        while n < WRITE_BATCH {
            let (out, counted, checked) = match self.front.pop_front() {
                Some(f) => (f.out, f.counted, f.checked),
                None => match first.take().or_else(|| rx.try_recv().ok().inspect(|o| self.held += o.weight())) {
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
                    if let (Some(s), Some(_)) = (&mut self.state, &m.offset) {
                        s.wrote(&m);
                    }
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
            // The batch filled up before `first` was taken: it goes after
            // what is in front (front always precedes the queue), still to
            // be checked like anything from the queue.
            self.front.push_back(Front { out, counted: true, checked: false });
        }
        ws.flush().await.map_err(|_| CloseReason::Error)?;
        self.release(bytes);
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
            // Only within one epoch: a new history starts again at 1.
            if last.epoch == off.epoch && off.seq <= last.seq {
                self.release(m.weight());
                return Ok(false);
            }
            *last = off.clone();
        }
        Ok(true)
    }

    /// Gives back held bytes to the node's queue budget.
    fn release(&mut self, bytes: usize) {
        self.held = self.held.saturating_sub(bytes);
        self.node.hub.budget().release(bytes);
    }

    /// Forgets a channel's recovery state (its wait list given back).
    pub(crate) fn forget(&mut self, channel: &Channel) {
        if let Some(waiting) = self.recovering.remove(channel) {
            let bytes = waiting.iter().map(|m| m.weight()).sum();
            self.release(bytes);
        }
        self.seen.remove(channel);
    }

    pub(crate) fn send_frame(&self, frame: Utf8Bytes) {
        self.handle.enqueue(Outbound::Frame(Box::new(frame)));
    }

    /// Answers a request: always for an error or a result, and for a bare
    /// success only when the client asked (gave an id).
    pub(crate) fn reply(&self, id: Option<&C::Id>, result: Result<Option<&RawValue>, &ApiError>) {
        match result {
            Ok(None) if id.is_none() => {}
            Ok(r) => {
                if let Some(f) = self.codec.reply_ok(id, r) {
                    self.send_frame(f);
                }
            }
            Err(e) => {
                self.node.metrics.error(e.fault);
                e.log("request refused");
                if let Some(f) = self.codec.reply_err(id, e) {
                    self.send_frame(f);
                }
            }
        }
    }

    /// A frame that answers the server (or a ping/pong): read even while a
    /// request is pending.
    fn answers(&self, msg: &WsMessage) -> bool {
        match msg {
            WsMessage::Text(t) => self.codec.is_answer(Frame::Text(t.as_str())),
            WsMessage::Ping(_) | WsMessage::Pong(_) | WsMessage::Frame(_) => true,
            WsMessage::Binary(_) | WsMessage::Close(_) => false,
        }
    }

    fn on_message(&mut self, msg: &WsMessage) -> Result<Option<Pending<C::Id>>, CloseReason> {
        self.last_seen = Instant::now();
        let frame = match msg {
            WsMessage::Text(t) => Frame::Text(t.as_str()),
            WsMessage::Binary(b) => Frame::Binary(b),
            WsMessage::Close(_) => return Err(CloseReason::Client),
            // Pings, pongs and (Socket.IO) noops cost no reply, but they are
            // frames like any other: a flood of them is rate limited too.
            WsMessage::Ping(_) | WsMessage::Pong(_) | WsMessage::Frame(_) => {
                self.rate_limited()?;
                return Ok(None);
            }
        };
        self.node.metrics.messages_received.inc();
        if self.rate_limited()? {
            let id = self.codec.decode(frame).id;
            let err = ApiError::new(ErrorCode::RateLimited, "too many frames: slow down");
            self.reply(id.as_ref(), Err(&err));
            return Ok(None);
        }
        let decoded = self.codec.decode(frame);
        if let Ok(Request::Refuse(why)) = &decoded.request {
            tracing::info!(reason = why, "closing: the client sent what this server does not do");
            self.node.metrics.error(crate::error::Fault::Client);
            return Err(CloseReason::Protocol);
        }
        Ok(self.dispatch(decoded))
    }
}

impl<C: ProtocolFront> Session<C> {
    /// Takes a frame from the client's rate: true when over it (the frame is
    /// refused); too many refusals in a row close the session.
    fn rate_limited(&mut self) -> Result<bool, CloseReason> {
        if self.bucket.take() {
            self.strikes = 0;
            return Ok(false);
        }
        self.strikes += 1;
        if self.strikes >= RATE_STRIKES {
            return Err(CloseReason::RateLimited);
        }
        Ok(true)
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
