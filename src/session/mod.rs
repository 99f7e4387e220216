//! One task per client WebSocket: reads frames, answers requests, writes the
//! outbound queue, pings, and closes with the right code.
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

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

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
use tokio_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes};

use crate::Shared;
use crate::auth::{Action, DisconnectEvent, Identity};
use crate::broker::Publication;
use crate::error::{ApiError, CloseReason, ErrorCode};
use crate::hub::{Outbound, SessionHandle, now_us};
use crate::protocol::{self, ClientFrame, Request};

type Ws = WebSocketStream<TokioIo<Upgraded>>;
type Pending = Pin<Box<dyn Future<Output = Outcome> + Send>>;

/// Frames written per flush at most, so reads and pings get their turn.
const WRITE_BATCH: usize = 256;
/// Rate-limited frames in a row before the connection is closed (1008).
const RATE_STRIKES: u32 = 20;
/// How long a close frame may take to go out before the socket is dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);

/// What a pending request ends with.
enum Outcome {
    Reply(Option<Utf8Bytes>),
    /// A subscribe that failed after its channel was reserved.
    SubscribeFailed(Arc<str>, Utf8Bytes),
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
pub(crate) struct Session {
    shared: Arc<Shared>,
    handle: Arc<SessionHandle>,
    ident: Arc<Identity>,
    /// Channels subscribed, or reserved by a pending subscribe.
    subs: HashSet<Arc<str>>,
    bucket: Bucket,
    strikes: u32,
    last_seen: Instant,
    /// Set once the upgrade completed: only then is the end a disconnect.
    started: bool,
    /// Set once the disconnect was counted and reported.
    reported: bool,
}

impl Drop for Session {
    fn drop(&mut self) {
        let hub = &self.shared.hub;
        for ch in self.subs.drain() {
            hub.unsubscribe(&ch, self.handle.key);
        }
        hub.unregister(&self.handle);
        self.shared.release_slot();
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

impl Session {
    pub(crate) fn new(shared: Arc<Shared>, handle: Arc<SessionHandle>, ident: Arc<Identity>) -> Self {
        let cfg = &shared.cfg.session;
        let bucket = Bucket::new(cfg.client_rate, cfg.client_burst);
        Session {
            shared,
            handle,
            ident,
            subs: HashSet::new(),
            bucket,
            strikes: 0,
            last_seen: Instant::now(),
            started: false,
            reported: false,
        }
    }

    /// Subscribes before the upgrade (URL, hook and token channels).
    pub(crate) async fn subscribe_initial(&mut self, channels: &[String]) -> Result<(), ApiError> {
        for ch in channels {
            let name: Arc<str> = Arc::from(ch.as_str());
            if !self.subs.insert(name.clone()) {
                continue;
            }
            self.shared.hub.subscribe(&name, &self.handle);
            self.shared.broker.ensure_subscribed(&name).await?;
        }
        Ok(())
    }

    /// Runs the session until it ends, then closes the socket.
    pub(crate) async fn run(mut self, mut ws: Ws, mut rx: mpsc::Receiver<Outbound>, welcome: Utf8Bytes) {
        self.started = true;
        let reason = self.serve(&mut ws, &mut rx, welcome).await;
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
        self.shared.metrics.disconnect(reason);
        self.shared.auth.disconnected(DisconnectEvent {
            user: self.ident.user.as_deref().map(str::to_owned),
            connection: self.handle.id.to_string(),
            reason: reason.label(),
        });
        tracing::debug!(reason = reason.label(), "session closed");
    }

    async fn serve(&mut self, ws: &mut Ws, rx: &mut mpsc::Receiver<Outbound>, welcome: Utf8Bytes) -> CloseReason {
        let handle = self.handle.clone();
        let shared = self.shared.clone();
        // The welcome is written before anything queued, so it is always first.
        tokio::select! {
            r = ws.send(Message::Text(welcome)) => if r.is_err() { return CloseReason::Error },
            r = handle.killed() => return r,
        }
        let ping_every = shared.cfg.session.ping_interval;
        let idle_timeout = shared.cfg.session.idle_timeout;
        let mut ping = tokio::time::interval_at(Instant::now() + ping_every, ping_every);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut pending: Option<Pending> = None;
        let mut drain_at: Option<Pin<Box<Sleep>>> = None;
        loop {
            tokio::select! {
                r = handle.killed() => return r,
                _ = shared.drain.cancelled(), if drain_at.is_none() => {
                    drain_at = Some(Box::pin(tokio::time::sleep(shared.drain_delay())));
                }
                _ = maybe(&mut drain_at) => return CloseReason::Shutdown,
                Some(first) = rx.recv() => {
                    tokio::select! {
                        r = tokio::time::timeout(idle_timeout, self.write_batch(ws, rx, first)) => match r {
                            Ok(Ok(())) => {}
                            Ok(Err(r)) => return r,
                            // Not a byte accepted for a whole idle timeout: it stopped reading.
                            Err(_) => return CloseReason::SlowConsumer,
                        },
                        r = handle.killed() => return r,
                    }
                }
                outcome = maybe(&mut pending) => {
                    pending = None;
                    self.apply(outcome);
                }
                frame = ws.next(), if pending.is_none() => match frame {
                    None => return CloseReason::Client,
                    Some(Err(e)) => return read_error(&e),
                    Some(Ok(msg)) => match self.on_message(msg) {
                        Ok(p) => pending = p,
                        Err(r) => return r,
                    },
                },
                _ = ping.tick() => {
                    if self.last_seen.elapsed() > idle_timeout {
                        return CloseReason::IdleTimeout;
                    }
                    tokio::select! {
                        r = tokio::time::timeout(idle_timeout, ws.send(Message::Ping(Default::default()))) => match r {
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

    /// Writes `first` and whatever else is queued, then flushes once.
    async fn write_batch(
        &mut self,
        ws: &mut Ws,
        rx: &mut mpsc::Receiver<Outbound>,
        first: Outbound,
    ) -> Result<(), CloseReason> {
        // One clock read per batch: "publish to socket write" to within a batch.
        let now = now_us();
        let metrics = &self.shared.metrics;
        let mut messages: u64 = 0;
        let mut next = Some(first);
        let mut n = 0;
        while let Some(out) = next.take() {
            if out.published_us != 0 {
                messages += 1;
                metrics.delivery_seconds.observe(now.saturating_sub(out.published_us) as f64 / 1e6);
            }
            ws.feed(Message::Text(out.frame)).await.map_err(|_| CloseReason::Error)?;
            n += 1;
            if n < WRITE_BATCH {
                next = rx.try_recv().ok();
            }
        }
        ws.flush().await.map_err(|_| CloseReason::Error)?;
        metrics.delivered.inc_by(messages);
        Ok(())
    }

    fn reply(&self, frame: Utf8Bytes) {
        self.handle.enqueue(Outbound { frame, published_us: 0 });
    }

    fn apply(&mut self, outcome: Outcome) {
        match outcome {
            Outcome::Reply(Some(frame)) => self.reply(frame),
            Outcome::Reply(None) => {}
            Outcome::SubscribeFailed(channel, frame) => {
                self.subs.remove(&channel);
                self.reply(frame);
            }
        }
    }

    fn on_message(&mut self, msg: Message) -> Result<Option<Pending>, CloseReason> {
        self.last_seen = Instant::now();
        if matches!(msg, Message::Text(_) | Message::Binary(_)) {
            self.shared.metrics.messages_received.inc();
            if !self.bucket.take() {
                self.strikes += 1;
                if self.strikes >= RATE_STRIKES {
                    return Err(CloseReason::RateLimited);
                }
                let id = match &msg {
                    Message::Text(t) => protocol::parse_frame(t).id,
                    _ => None,
                };
                let err = ApiError::new(ErrorCode::RateLimited, "too many frames: slow down");
                self.reply(protocol::reply_err(id.as_deref(), &err));
                return Ok(None);
            }
            self.strikes = 0;
        }
        match msg {
            Message::Text(text) => Ok(self.dispatch(protocol::parse_frame(&text))),
            Message::Binary(_) => {
                let err = ApiError::bad_request("binary frames are not supported: send JSON text frames");
                self.reply(protocol::reply_err(None, &err));
                Ok(None)
            }
            Message::Close(_) => Err(CloseReason::Client),
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => Ok(None),
        }
    }

    /// Answers a request at once, or returns the future that will.
    fn dispatch(&mut self, frame: ClientFrame) -> Option<Pending> {
        let ClientFrame { id, request } = frame;
        let request = match request {
            Ok(r) => r,
            Err(e) => {
                self.reply(protocol::reply_err(id.as_deref(), &e));
                return None;
            }
        };
        let result = match request {
            Request::Ping => {
                self.reply(protocol::reply_ok(id.as_deref(), None));
                return None;
            }
            Request::Subscribe { channel, since } => self.subscribe(id.clone(), channel, since.is_some()),
            Request::Unsubscribe { channel } => {
                if let Some(ch) = self.subs.take(channel.as_str()) {
                    self.shared.hub.unsubscribe(&ch, self.handle.key);
                }
                Ok(None)
            }
            Request::Publish { channel, data } => self.publish(id.clone(), channel, data),
            Request::Send { data } => Ok(Some(self.send(id.clone(), data))),
            Request::Presence { .. } => {
                Err(ApiError::new(ErrorCode::NotSupported, "presence is not available in this version"))
            }
        };
        match result {
            Ok(Some(p)) => Some(p),
            Ok(None) => {
                if id.is_some() {
                    self.reply(protocol::reply_ok(id.as_deref(), None));
                }
                None
            }
            Err(e) => {
                self.reply(protocol::reply_err(id.as_deref(), &e));
                None
            }
        }
    }

    fn subscribe(
        &mut self,
        id: Option<Box<RawValue>>,
        channel: String,
        since: bool,
    ) -> Result<Option<Pending>, ApiError> {
        protocol::validate_channel(&channel)?;
        if self.subs.contains(channel.as_str()) {
            return Ok(None);
        }
        let max = self.shared.cfg.session.max_subscriptions;
        if self.subs.len() >= max {
            return Err(ApiError::new(
                ErrorCode::LimitExceeded,
                format!("subscription limit reached ({max} channels per connection)"),
            ));
        }
        let channel: Arc<str> = Arc::from(channel);
        // Reserved now, so a session dropped mid-way cleans it up.
        self.subs.insert(channel.clone());
        let shared = self.shared.clone();
        let handle = self.handle.clone();
        let ident = self.ident.clone();
        Ok(Some(Box::pin(async move {
            let fail = |e: ApiError| Outcome::SubscribeFailed(channel.clone(), protocol::reply_err(id.as_deref(), &e));
            if let Err(e) = shared.auth.authorize(Action::Subscribe, &ident, &handle.id, &channel, None).await {
                return fail(e);
            }
            shared.hub.subscribe(&channel, &handle);
            if let Err(e) = shared.broker.ensure_subscribed(&channel).await {
                shared.hub.unsubscribe(&channel, handle.key);
                return fail(e.into());
            }
            // Without history there is nothing to recover from: say so, so
            // the client reloads instead of trusting a gap-free stream.
            let result = since.then(|| RawValue::from_string(r#"{"recovered":false}"#.to_owned()).ok()).flatten();
            match (&id, &result) {
                (None, None) => Outcome::Reply(None),
                _ => Outcome::Reply(Some(protocol::reply_ok(id.as_deref(), result.as_deref()))),
            }
        })))
    }

    fn publish(
        &mut self,
        id: Option<Box<RawValue>>,
        channel: String,
        data: Box<RawValue>,
    ) -> Result<Option<Pending>, ApiError> {
        protocol::validate_channel(&channel)?;
        let shared = self.shared.clone();
        let handle = self.handle.clone();
        let ident = self.ident.clone();
        Ok(Some(Box::pin(async move {
            let result = async {
                shared.auth.authorize(Action::Publish, &ident, &handle.id, &channel, Some(&data)).await?;
                let frame = protocol::message(&channel, &data, None);
                shared
                    .broker
                    .publish(vec![Publication { channel, frame, exclude: None, published_us: now_us() }])
                    .await?;
                shared.metrics.published_client.inc();
                Ok::<_, ApiError>(())
            }
            .await;
            match result {
                Ok(()) => Outcome::Reply(id.as_deref().map(|id| protocol::reply_ok(Some(id), None))),
                Err(e) => Outcome::Reply(Some(protocol::reply_err(id.as_deref(), &e))),
            }
        })))
    }

    fn send(&mut self, id: Option<Box<RawValue>>, data: Box<RawValue>) -> Pending {
        let shared = self.shared.clone();
        let handle = self.handle.clone();
        let ident = self.ident.clone();
        Box::pin(async move {
            match shared.auth.send(&ident, &handle.id, &data).await {
                Ok(result) => Outcome::Reply(Some(protocol::reply_ok(id.as_deref(), result.as_deref()))),
                Err(e) => Outcome::Reply(Some(protocol::reply_err(id.as_deref(), &e))),
            }
        })
    }
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
