//! The Socket.IO front (`--socketio-path`): Engine.IO v4 over HTTP
//! long-polling and WebSocket, carrying Socket.IO v5 packets
//! ([`crate::protocol::socketio`]) into the same session loop as wsrelay.v1.
//!
//! - A new Engine.IO session is opened by a GET (polling) or a WebSocket
//!   upgrade without `sid`. Its sid is `<node-id>.<random>`, and is also the
//!   connection id the app sees everywhere (hooks, `/api/*`, `socket.id`).
//! - The client's first CONNECT authenticates it (JWT in `auth.token`, or
//!   the connect hook with the `auth` payload); only then is a session made.
//! - **No sticky sessions:** a polling request (or the WebSocket upgrade of a
//!   polling session) that reaches another sidecar is forwarded by that
//!   sidecar to the one named in the sid, at the address that node keeps in
//!   Redis (`--advertise-url`). If that node is gone, the request gets
//!   Engine.IO's `400 {"code":1,"message":"Session ID unknown"}` and the
//!   client opens a new session (anywhere).
//! - Connection-state recovery: a socket's rooms and the offsets written
//!   to it are kept (a [`Trail`]) for `--socketio-recovery-window` after it
//!   ends; a client reconnecting with that `pid` (and the last offset it
//!   saw) rejoins the rooms and gets what it missed where history is kept.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::error::ProtocolError;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use tokio_tungstenite::tungstenite::{Error as WsError, Message as WsMessage, Utf8Bytes};
use tracing::Instrument;

use super::transport::{CLOSE_TIMEOUT, Transport, close_ws};
use super::{Codec, Session};
use crate::auth::SioConnect;
use crate::body::{Body, ReadError, full, full_holding, read_paced};
use crate::channel::Channel;
use crate::engineio::{Busy, Closed, Opening, Payload, Poll, PollEnd, PollError, Taken, Ws};
use crate::error::{ConnResult, Reject};
use crate::hub::Held;
use crate::hub::{NodeCommand, Outbound, SessionCommand, Target, now_us};
use crate::node::Node;
use crate::protocol::socketio::{ROOT, SocketIo, parse_packet, valid_namespace};
pub use crate::protocol::socketio::{in_namespace, namespace_channel, room_channel, split_channel};
use crate::protocol::{Message, Offset};

/// Marks a request one sidecar forwarded to another (never forwarded again).
const FORWARDED: &str = "x-wsrelay-forwarded";
/// Bytes of packets a polling session holds for the client's next GET.
const POLL_BUFFER: usize = 64 * 1024;
/// Bytes of the open request a socket keeps for its connect hook: its URL,
/// `Cookie`, `Authorization`, `Origin`, `Host` and `X-Forwarded-*`.
const MAX_KEPT_HEAD: usize = 8 * 1024;
/// Engine.IO packets other than the CONNECT a client may send before it.
const PRE_CONNECT_CONTROL: u32 = 16;
/// Entries of a trail's write log (older ones are summed up per channel).
const TRAIL_LOG: usize = 64;

pub fn connect_error(namespace: &str, message: &str) -> Utf8Bytes {
    SocketIo::connect_error(namespace, message)
}

pub fn connected(namespace: &str, sid: &str) -> Utf8Bytes {
    SocketIo::connected(namespace, sid, None)
}

// ---------------------------------------------------------------------------
// Recovery trail

/// What a Socket.IO socket's next connection needs to recover: its rooms,
/// and where it was in each channel with history. The log keeps the last
/// offsets written in order, so the client's own last offset tells which of
/// them it really received (those after it may have been lost in flight).
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct Trail {
    pid: String,
    user: Option<String>,
    /// The namespace it was connected to first (the one recovered).
    #[serde(default)]
    namespace: String,
    rooms: Vec<Channel>,
    /// Per channel: the last offset written before the log.
    base: HashMap<Channel, Offset>,
    log: VecDeque<(Channel, Offset)>,
    /// The socket's connection id, and when it connected and ended (µs since
    /// the Unix epoch): app commands for it issued meanwhile still apply.
    #[serde(default)]
    connection: String,
    #[serde(default)]
    connected_us: u64,
    #[serde(default)]
    kept_us: u64,
    /// Rooms the app put the socket in while it was away: joined without a
    /// position (it was not in them, so it missed nothing there).
    #[serde(skip)]
    fresh: Vec<Channel>,
}

/// What an app command issued while the socket was away does to its trail.
#[derive(Debug, PartialEq, Eq)]
enum Applied {
    /// Not about this socket.
    Skipped,
    /// A room joined or left.
    Changed,
    /// The app disconnected it: nothing is recovered.
    Dropped,
}

impl Trail {
    /// Called for every message with an offset written to the socket:
    /// reference-count clones, no allocation once the log is full.
    fn wrote(&mut self, channel: &Channel, offset: &Offset) {
        // A channel's first message: it was at the one before (a channel
        // joined server-side has no position until then). Every channel in
        // the log has a base from its first message on.
        if !self.base.contains_key(channel) {
            let before = Offset { epoch: offset.epoch.clone(), seq: offset.seq.saturating_sub(1) };
            self.base.insert(channel.clone(), before);
        }
        if self.log.len() == TRAIL_LOG {
            if let Some((c, o)) = self.log.pop_front() {
                self.base.insert(c, o);
            }
        }
        self.log.push_back((channel.clone(), offset.clone()));
    }

    /// Applies an app command issued while the socket was away, as it would
    /// have applied to the socket (`/api/subscribe`, `/api/unsubscribe`,
    /// `/api/disconnect` of its user or connection).
    fn apply(&mut self, cmd: &NodeCommand) -> Applied {
        let (target, change) = match cmd {
            NodeCommand::Disconnect(t) => (t, None),
            NodeCommand::Subscribe { target, channel } => (target, Some((channel, true))),
            NodeCommand::Unsubscribe { target, channel } => (target, Some((channel, false))),
            NodeCommand::Call { .. } | NodeCommand::Answer { .. } => return Applied::Skipped,
        };
        let ours = match target {
            Target::User(u) => self.user.as_deref() == Some(u.as_str()),
            Target::Connection(c) => *c == self.connection,
        };
        match (ours, change) {
            (false, _) => Applied::Skipped,
            (true, None) => Applied::Dropped,
            (true, Some((channel, true))) => {
                if in_namespace(channel, &self.namespace) && !self.rooms.contains(channel) {
                    self.rooms.push(channel.clone());
                    self.fresh.push(channel.clone());
                }
                Applied::Changed
            }
            (true, Some((channel, false))) => {
                self.rooms.retain(|r| r != channel);
                self.fresh.retain(|r| r != channel);
                self.base.remove(channel);
                self.log.retain(|(c, _)| c != channel);
                Applied::Changed
            }
        }
    }

    /// Each room's `since` given the client's last offset, and whether that
    /// offset could be placed (the client's position is known).
    fn positions(&self, client_offset: Option<&str>) -> (HashMap<Channel, Offset>, bool) {
        let mut since = self.base.clone();
        let (upto, known) = match client_offset.map(Offset::parse) {
            None => (0, true),
            Some(o) => match o.and_then(|o| self.log.iter().rposition(|(_, x)| *x == o)) {
                Some(i) => (i + 1, true),
                // Older than the log, or not an offset: where it is cannot
                // be told (a base may be past what it received).
                None => (0, self.log.is_empty()),
            },
        };
        for (c, o) in self.log.iter().take(upto) {
            since.insert(c.clone(), o.clone());
        }
        (since, known)
    }
}

/// Where a trail is kept: its pid and its owner (user and namespace), so
/// that a `pid` presented by anyone else names nothing.
/// Whether connection-state recovery is on (`--socketio-recovery-window` > 0).
fn recovers(node: &Node) -> bool {
    node.cfg.session.socketio.as_ref().is_some_and(|s| !s.recovery_window.is_zero())
}

fn trail_key(pid: &str, user: Option<&str>, namespace: &str) -> String {
    // JSON keeps the parts apart whatever they contain.
    let owner = serde_json::to_string(&(namespace, user)).unwrap_or_default();
    format!("sio:{pid}:{owner}")
}

impl<C: Codec> Session<C> {
    /// Records a written channel message in the recovery trail.
    pub(super) fn trail_wrote(&mut self, m: &Message) {
        if let (Some(t), Some(off)) = (&mut self.trail, &m.offset) {
            t.wrote(&m.channel, off);
        }
    }

    pub(super) fn trail_join(&mut self, channel: &Channel) {
        if let Some(t) = &mut self.trail {
            // Only the first namespace is recovered; not the socket's own room.
            let own = room_channel(&t.namespace, &self.handle.id).ok();
            if in_namespace(channel, &t.namespace) && own.as_ref() != Some(channel) && !t.rooms.contains(channel) {
                t.rooms.push(channel.clone());
            }
        }
    }

    pub(super) fn trail_leave(&mut self, channel: &Channel) {
        if let Some(t) = &mut self.trail {
            t.rooms.retain(|r| r != channel);
            t.base.remove(channel);
        }
    }

    /// Keeps the trail for the client's next connection (in the background).
    pub(super) fn keep_trail(&mut self, reason: crate::error::CloseReason) {
        use crate::error::CloseReason;
        let Some(trail) = self.trail.take() else { return };
        if matches!(reason, CloseReason::Disconnected | CloseReason::TokenExpired | CloseReason::Protocol) {
            return;
        }
        let Some(window) = self.node.cfg.session.socketio.as_ref().map(|s| s.recovery_window) else { return };
        if window.is_zero() {
            return;
        }
        let mut trail = trail;
        // Commands that reached the queue but not the socket apply too.
        if let Some(rx) = self.rx.as_mut() {
            while let Ok(out) = rx.try_recv() {
                self.node.hub.budget().release(out.weight());
                if let Outbound::Command(cmd) = out {
                    match *cmd {
                        SessionCommand::Subscribe(c)
                            if in_namespace(&c, &trail.namespace) && !trail.rooms.contains(&c) =>
                        {
                            trail.rooms.push(c);
                        }
                        SessionCommand::Unsubscribe(c) => {
                            trail.rooms.retain(|r| *r != c);
                            trail.base.remove(&c);
                        }
                        _ => {}
                    }
                }
            }
        }
        trail.kept_us = now_us();
        let Ok(value) = serde_json::to_string(&trail) else { return };
        let node = self.node.clone();
        let Ok(rt) = tokio::runtime::Handle::try_current() else { return };
        rt.spawn(async move {
            let key = trail_key(&trail.pid, trail.user.as_deref(), &trail.namespace);
            if let Err(e) = node.broker.stash(&key, value, window).await {
                tracing::debug!(error = %e, "recovery state not kept: this socket will not be recovered");
            }
        });
    }
}

// ---------------------------------------------------------------------------
// The Engine.IO transport

/// An Engine.IO session's transport: polling until (and unless) the client
/// upgrades to a WebSocket. Engine.IO packets other than messages (pings,
/// pongs, noops, close) are handled here; messages (`4…`) go to the codec.
pub(crate) struct Eio {
    ws: Option<Ws>,
    poll: Option<Arc<Poll>>,
    inbound: Option<mpsc::Receiver<Payload>>,
    upgrade: Option<oneshot::Receiver<Ws>>,
    /// Client payloads read from polling and not yet walked through (each
    /// one buffer, counted in the node's queue budget until dropped).
    early: VecDeque<Payload>,
    /// Packets queued for polling and not fetched when the client upgraded.
    backlog: VecDeque<Utf8Bytes>,
    /// A binary packet waiting for its attachments: the text so far (the
    /// packet, then `␞b<base64>` for each attachment come), and how many
    /// are still to come.
    assembling: Option<(String, usize)>,
    node: Arc<Node>,
}

impl Drop for Eio {
    fn drop(&mut self) {
        if let Some(p) = &self.poll {
            p.close();
            self.node.polls.remove(&p.sid);
        }
    }
}

/// What an Engine.IO packet from the client means here.
enum Packet {
    /// A message for the codec, or a frame for the loop.
    Deliver(WsMessage),
    /// A client ping (only probes in v4): answer with this.
    Answer(Utf8Bytes),
    /// An attachment of a binary packet, over polling: `b<base64>`.
    Attachment(Utf8Bytes),
    Closed,
    Bad,
}

/// What the loop sees of a packet it has nothing to do with (a noop, an
/// upgrade, a client ping): a ping, which it counts against the client's
/// rate like any frame, so a flood of them closes the session.
fn control() -> WsMessage {
    WsMessage::Ping(Default::default())
}

fn classify(text: Utf8Bytes) -> Packet {
    match text.as_bytes().first() {
        Some(b'4') => Packet::Deliver(WsMessage::Text(text)),
        Some(b'3') => Packet::Deliver(WsMessage::Pong(Default::default())),
        Some(b'2') => Packet::Answer(Utf8Bytes::from(format!("3{}", &text.as_str()[1..]))),
        Some(b'1') => Packet::Closed,
        Some(b'6' | b'5') => Packet::Deliver(control()),
        Some(b'b') => Packet::Attachment(text),
        _ => Packet::Bad,
    }
}

/// How many attachments a client's packet announces (0: not a binary
/// packet, or not a valid count: the codec refuses it then).
fn binary_count(packet: &str) -> usize {
    let Some(rest) = packet.strip_prefix("45").or_else(|| packet.strip_prefix("46")) else { return 0 };
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    if rest.as_bytes().get(digits) != Some(&b'-') {
        return 0;
    }
    rest[..digits].parse::<usize>().ok().filter(|n| *n <= crate::protocol::MAX_ATTACHMENTS).unwrap_or(0)
}

/// Whether an outgoing packet is a binary one (with its attachments).
fn is_binary(packet: &str) -> bool {
    packet.starts_with("45") || packet.starts_with("46")
}

/// A packet as WebSocket frames: one text frame, and a binary packet's
/// attachments (`␞b<base64>` in the packet) as binary frames after it.
fn ws_frames(packet: Utf8Bytes) -> Vec<WsMessage> {
    use base64::Engine as _;
    let sep = crate::protocol::socketio::ATTACHMENT_SEPARATOR;
    let Some((head, rest)) = packet.as_str().split_once(sep).filter(|_| is_binary(&packet)) else {
        return vec![WsMessage::Text(packet)];
    };
    let mut frames = vec![WsMessage::Text(Utf8Bytes::from(head))];
    for a in rest.split(sep) {
        let raw =
            base64::engine::general_purpose::STANDARD.decode(a.strip_prefix('b').unwrap_or(a)).unwrap_or_default();
        frames.push(WsMessage::Binary(raw.into()));
    }
    frames
}

fn bad_packet() -> WsError {
    WsError::Protocol(ProtocolError::InvalidOpcode(0))
}

async fn upgraded(up: &mut Option<oneshot::Receiver<Ws>>) -> Option<Ws> {
    match up {
        Some(rx) => {
            let r = rx.await.ok();
            *up = None;
            r
        }
        None => std::future::pending().await,
    }
}

impl Eio {
    fn websocket(node: Arc<Node>, ws: Ws) -> Self {
        Eio {
            ws: Some(ws),
            poll: None,
            inbound: None,
            upgrade: None,
            early: VecDeque::new(),
            backlog: VecDeque::new(),
            assembling: None,
            node,
        }
    }

    fn polling(node: Arc<Node>, poll: Arc<Poll>, end: PollEnd) -> Self {
        Eio {
            ws: None,
            poll: Some(poll),
            inbound: Some(end.inbound),
            upgrade: Some(end.upgrade),
            early: VecDeque::new(),
            backlog: VecDeque::new(),
            assembling: None,
            node,
        }
    }

    /// The client upgraded: from now on the WebSocket carries everything;
    /// what polling still held goes first.
    fn switch(&mut self, ws: Ws) {
        if let Some(poll) = self.poll.take() {
            self.backlog.extend(poll.take_all());
            poll.close();
            self.node.polls.remove(&poll.sid);
        }
        if let Some(mut rx) = self.inbound.take() {
            while let Ok(p) = rx.try_recv() {
                self.early.push_back(p);
            }
        }
        self.ws = Some(ws);
        tracing::debug!("upgraded to websocket");
    }

    /// Writes the backlog to the WebSocket. Cancel safe: a packet leaves the
    /// backlog only when the socket took it.
    async fn drain_backlog(&mut self) -> Result<(), WsError> {
        let Some(ws) = self.ws.as_mut() else { return Ok(()) };
        while !self.backlog.is_empty() {
            std::future::poll_fn(|cx| ws.poll_ready_unpin(cx)).await?;
            if let Some(p) = self.backlog.pop_front() {
                let mut frames = ws_frames(p);
                let first = frames.remove(0);
                ws.start_send_unpin(first)?;
                for f in frames {
                    SinkExt::feed(ws, f).await?;
                }
            }
        }
        Ok(())
    }

    /// The next packet of what polling delivered, if any is left.
    fn next_early(&mut self) -> Option<Utf8Bytes> {
        while let Some(p) = self.early.front_mut() {
            if let Some(packet) = p.next_packet() {
                return Some(packet);
            }
            // Walked through: the payload's memory goes back now.
            self.early.pop_front();
        }
        None
    }

    /// Adds an attachment (`b<base64>`) to the binary packet being
    /// assembled; the whole packet once the last one came.
    fn attach(&mut self, attachment: &str) -> Result<Option<Utf8Bytes>, WsError> {
        // Attachments count as the message they belong to, base64 and all.
        let max = self.node.cfg.session.max_message_bytes.saturating_mul(2);
        let Some((text, left)) = self.assembling.as_mut() else { return Err(bad_packet()) };
        if text.len() + attachment.len() + 1 > max {
            let size = text.len() + attachment.len();
            self.assembling = None;
            use tokio_tungstenite::tungstenite::error::CapacityError;
            return Err(WsError::Capacity(CapacityError::MessageTooLong { size, max_size: max }));
        }
        text.push(crate::protocol::socketio::ATTACHMENT_SEPARATOR);
        text.push_str(attachment);
        *left -= 1;
        if *left > 0 {
            return Ok(None);
        }
        Ok(self.assembling.take().map(|(t, _)| Utf8Bytes::from(t)))
    }

    /// The session is over for a reason the client is not told (a ping
    /// timeout): what polling still held is dropped, so the next GET gets
    /// `400` at once, as from Engine.IO.
    fn discard(&mut self) {
        if let Some(p) = &self.poll {
            p.discard();
        }
    }

    /// A packet for the client, in Engine.IO terms (None: nothing to send).
    fn outgoing(msg: WsMessage) -> Option<Utf8Bytes> {
        match msg {
            WsMessage::Text(t) => Some(t),
            WsMessage::Ping(_) => Some(Utf8Bytes::from_static("2")),
            _ => None,
        }
    }
}

impl Transport for Eio {
    async fn recv(&mut self) -> Option<Result<WsMessage, WsError>> {
        loop {
            // Just upgraded: what polling still held goes out now, not at the
            // next write (there may be none for a while).
            if self.ws.is_some() && !self.backlog.is_empty() {
                if let Err(e) = self.flush().await {
                    return Some(Err(e));
                }
            }
            let text = if let Some(p) = self.next_early() {
                p
            } else if let Some(ws) = self.ws.as_mut() {
                match ws.next().await? {
                    Ok(WsMessage::Text(t)) => t,
                    Ok(WsMessage::Close(_)) => return None,
                    // An attachment of the binary packet being assembled.
                    Ok(WsMessage::Binary(b)) => {
                        use base64::Engine as _;
                        let text = format!("b{}", base64::engine::general_purpose::STANDARD.encode(&b));
                        match self.attach(&text) {
                            Ok(Some(whole)) => return Some(Ok(WsMessage::Text(whole))),
                            Ok(None) => continue,
                            Err(e) => return Some(Err(e)),
                        }
                    }
                    other => return Some(other),
                }
            } else {
                let inbound = self.inbound.as_mut()?;
                let poll = self.poll.clone()?;
                tokio::select! {
                    p = inbound.recv() => {
                        // A POST body: its packets, in order.
                        self.early.push_back(p?);
                        continue;
                    }
                    // Closed from the HTTP side (an oversized body).
                    () = poll.ended() => return None,
                    ws = upgraded(&mut self.upgrade) => {
                        if let Some(ws) = ws {
                            self.switch(ws);
                        }
                        continue;
                    }
                }
            };
            if self.assembling.is_some() && !text.starts_with('b') {
                // The attachments of a binary packet come right after it.
                return Some(Err(bad_packet()));
            }
            match classify(text) {
                Packet::Deliver(WsMessage::Text(t)) if binary_count(&t) > 0 => {
                    self.assembling = Some((t.as_str().to_owned(), binary_count(&t)));
                }
                Packet::Deliver(m) => return Some(Ok(m)),
                Packet::Attachment(a) => match self.attach(&a) {
                    Ok(Some(whole)) => return Some(Ok(WsMessage::Text(whole))),
                    Ok(None) => {}
                    Err(e) => return Some(Err(e)),
                },
                Packet::Answer(a) => {
                    if self.feed(WsMessage::Text(a)).await.is_err() || self.flush().await.is_err() {
                        return None;
                    }
                    return Some(Ok(control()));
                }
                Packet::Closed => {
                    if let Some(p) = &self.poll {
                        p.close_by_client();
                    }
                    return None;
                }
                Packet::Bad => return Some(Err(bad_packet())),
            }
        }
    }

    async fn feed(&mut self, msg: WsMessage) -> Result<(), WsError> {
        let Some(packet) = Eio::outgoing(msg) else { return Ok(()) };
        // An upgrade that completed meanwhile takes over now.
        if let Some(ws) = self.upgrade.as_mut().and_then(|rx| rx.try_recv().ok()) {
            self.upgrade = None;
            self.switch(ws);
        }
        loop {
            if self.ws.is_some() {
                self.drain_backlog().await?;
                let ws = self.ws.as_mut().ok_or(WsError::AlreadyClosed)?;
                if !is_binary(&packet) {
                    return SinkExt::feed(ws, WsMessage::Text(packet)).await;
                }
                for f in ws_frames(packet) {
                    SinkExt::feed(&mut *ws, f).await?;
                }
                return Ok(());
            }
            let poll = self.poll.clone().ok_or(WsError::AlreadyClosed)?;
            let room = poll.room();
            tokio::pin!(room);
            room.as_mut().enable();
            match poll.push(&packet) {
                Ok(true) => return Ok(()),
                Err(Closed::TooLarge) => {
                    // Dropped and counted: no response may carry it.
                    tracing::warn!(bytes = packet.len(), "a packet longer than maxPayload was dropped");
                    self.node.metrics.dropped_too_large.inc();
                    return Ok(());
                }
                Err(Closed::Closed) => return Err(WsError::ConnectionClosed),
                Ok(false) => poll.flush(),
            }
            tokio::select! {
                () = room => {}
                ws = upgraded(&mut self.upgrade) => {
                    if let Some(ws) = ws {
                        self.switch(ws);
                    }
                }
            }
        }
    }

    async fn flush(&mut self) -> Result<(), WsError> {
        if self.ws.is_some() {
            self.drain_backlog().await?;
            if let Some(ws) = self.ws.as_mut() {
                return SinkExt::flush(ws).await;
            }
        }
        if let Some(p) = &self.poll {
            p.flush();
        }
        Ok(())
    }

    async fn close(&mut self, frame: Option<CloseFrame>) {
        if let Some(p) = self.poll.clone() {
            p.close();
            // Give the client's GET a moment to collect what is left, or an
            // upgrade under way a moment to take it over.
            let drained = async {
                loop {
                    // A GET that takes packets wakes `room`.
                    let room = p.room();
                    tokio::pin!(room);
                    room.as_mut().enable();
                    if p.drained() {
                        return;
                    }
                    room.await;
                }
            };
            tokio::select! {
                _ = tokio::time::timeout(Duration::from_millis(500), drained) => {}
                ws = upgraded(&mut self.upgrade) => {
                    if let Some(ws) = ws {
                        self.switch(ws);
                    }
                }
            }
        }
        if self.ws.is_some() {
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
                let _ = self.drain_backlog().await;
                if let Some(ws) = self.ws.as_mut() {
                    close_ws(ws, frame).await;
                }
            })
            .await;
        }
    }
}

// ---------------------------------------------------------------------------
// HTTP

/// Engine.IO's error answers.
fn eio_error(code: u8, message: &str) -> Response<Body> {
    let mut r = Response::new(full(serde_json::json!({ "code": code, "message": message }).to_string()));
    *r.status_mut() = if code == 4 { StatusCode::FORBIDDEN } else { StatusCode::BAD_REQUEST };
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn unknown_sid() -> Response<Body> {
    eio_error(1, "Session ID unknown")
}

fn plain(status: StatusCode, body: impl Into<bytes::Bytes>) -> Response<Body> {
    with_plain(status, full(body))
}

fn plain_holding<G: Send + Sync + 'static>(
    status: StatusCode,
    body: impl Into<bytes::Bytes>,
    guard: G,
) -> Response<Body> {
    with_plain(status, full_holding(body, guard))
}

fn with_plain(status: StatusCode, body: Body) -> Response<Body> {
    let mut r = Response::new(body);
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=UTF-8"));
    r
}

fn refused(node: &Node, r: &Reject) -> Response<Body> {
    node.metrics.connection_result(r.result);
    node.metrics.error(r.error.fault);
    r.error.log("Socket.IO connection refused");
    let mut resp = eio_error(if r.status == StatusCode::FORBIDDEN { 4 } else { 3 }, &r.error.message);
    *resp.status_mut() = r.status;
    resp
}

/// The node named in a sid (`<node-id>.<random>`).
fn node_of(sid: &str) -> Option<&str> {
    sid.rsplit_once('.').map(|(n, _)| n).filter(|n| !n.is_empty())
}

struct Query {
    eio: Option<String>,
    transport: Option<String>,
    sid: Option<String>,
}

fn query(req: &Request<Incoming>) -> Query {
    let mut q = Query { eio: None, transport: None, sid: None };
    if let Some(s) = req.uri().query() {
        for (k, v) in form_urlencoded::parse(s.as_bytes()) {
            match &*k {
                "EIO" => q.eio = Some(v.into_owned()),
                "transport" => q.transport = Some(v.into_owned()),
                "sid" => q.sid = Some(v.into_owned()),
                _ => {}
            }
        }
    }
    q
}

fn is_websocket(req: &Request<Incoming>) -> bool {
    crate::proxy::is_upgrade(req)
        && req
            .headers()
            .get(header::UPGRADE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

/// Handles a request on the Socket.IO path.
pub(crate) async fn handle(node: Arc<Node>, req: Request<Incoming>, remote: SocketAddr) -> Response<Body> {
    let q = query(&req);
    if q.eio.as_deref() != Some("4") {
        return eio_error(5, "Unsupported protocol version");
    }
    let websocket = match q.transport.as_deref() {
        Some("polling") => false,
        Some("websocket") => true,
        _ => return eio_error(0, "Transport unknown"),
    };
    if websocket && !is_websocket(&req) {
        return eio_error(3, "Bad request");
    }
    match q.sid {
        None => {
            if req.method() != Method::GET {
                return eio_error(2, "Bad handshake method");
            }
            open(node, req, remote, websocket).await
        }
        Some(sid) => {
            let Some(owner) = node_of(&sid) else { return unknown_sid() };
            if owner != node.cfg.node_id {
                return forward(&node, req, remote, owner).await;
            }
            let Some(poll) = node.polls.get(&sid) else {
                // A WebSocket for a session that upgraded already (or is
                // gone): it opens and is closed, as from the reference server.
                return if websocket { refuse_upgrade(&node, req) } else { unknown_sid() };
            };
            if websocket {
                return probe(&node, req, poll);
            }
            match *req.method() {
                Method::GET => poll_get(&node, &poll).await,
                Method::POST => poll_post(&node, &poll, req).await,
                _ => eio_error(3, "Bad request"),
            }
        }
    }
}

/// A request for a session on another sidecar: forwarded there.
async fn forward(node: &Node, req: Request<Incoming>, remote: SocketAddr, owner: &str) -> Response<Body> {
    if req.headers().contains_key(FORWARDED) {
        // Forwarded once already: the named node does not hold it.
        return unknown_sid();
    }
    let url = match node.broker.peer_url(owner).await {
        Ok(Some(url)) => url,
        Ok(None) => {
            tracing::debug!(node = owner, "Socket.IO request for a node that is gone");
            node.metrics.socketio_forwards.with_label_values(&["gone"]).inc();
            return unknown_sid();
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot look the Socket.IO session's node up");
            node.metrics.socketio_forwards.with_label_values(&["error"]).inc();
            return plain(StatusCode::SERVICE_UNAVAILABLE, "broker unavailable");
        }
    };
    let Ok(base) = url.parse::<http::Uri>() else { return unknown_sid() };
    node.metrics.socketio_forwards.with_label_values(&["forwarded"]).inc();
    let mark = (header::HeaderName::from_static(FORWARDED), HeaderValue::from_str(&node.cfg.node_id).ok());
    // A long-poll GET waits up to a ping interval (and 5 s) over there.
    let timeout = node.cfg.session.ping_interval + Duration::from_secs(10);
    node.proxy.forward_to(&base, req, remote, mark.1.map(|v| (mark.0, v)), timeout).await
}

/// The open packet's content.
fn open_packet(node: &Node, sid: &str, upgrades: bool) -> String {
    let s = &node.cfg.session;
    let max_payload = s.socketio.as_ref().map_or(1_000_000, |c| c.max_payload);
    let ping_timeout = s.ping_timeout();
    let v = serde_json::json!({
        "sid": sid,
        "upgrades": if upgrades { vec!["websocket"] } else { Vec::new() },
        "pingInterval": s.ping_interval.as_millis() as u64,
        "pingTimeout": ping_timeout.as_millis() as u64,
        "maxPayload": max_payload,
    });
    format!("0{v}")
}

/// The request's head, kept for the connect hook (which runs at CONNECT,
/// for each namespace): its URI and the headers the hook is documented to
/// receive (and the JWT check and `X-Forwarded-*` read), nothing else, and
/// at most [`MAX_KEPT_HEAD`] bytes of them (None: more), since it lives as
/// long as the socket.
///
/// Copied, not cloned: a request's URI and header values are slices of the
/// HTTP connection's read buffer, and a clone would keep that whole buffer
/// (~16 KiB) alive for the socket's life.
fn head_of(req: &Request<Incoming>) -> Option<Request<()>> {
    let mut size = req.uri().path().len() + req.uri().query().map_or(0, str::len);
    let mut head = Request::new(());
    if let Ok(uri) = req.uri().to_string().parse() {
        *head.uri_mut() = uri;
    }
    for (name, value) in req.headers() {
        let kept = name == header::COOKIE
            || name == header::AUTHORIZATION
            || name == header::ORIGIN
            || name == header::HOST
            || name.as_str().starts_with("x-forwarded-");
        if !kept {
            continue;
        }
        size += name.as_str().len() + value.len();
        if size > MAX_KEPT_HEAD {
            return None;
        }
        let name = header::HeaderName::from_bytes(name.as_str().as_bytes());
        if let (Ok(n), Ok(v)) = (name, HeaderValue::from_bytes(value.as_bytes())) {
            head.headers_mut().append(n, v);
        }
    }
    (size <= MAX_KEPT_HEAD).then_some(head)
}

/// The client's address: the peer's, or behind a trusted reverse proxy the
/// nearest untrusted address in `X-Forwarded-For` (the server dropped that
/// header from anyone else).
fn client_ip(node: &Node, req: &Request<Incoming>, remote: SocketAddr) -> std::net::IpAddr {
    let server = &node.cfg.server;
    if !server.is_trusted(remote.ip()) {
        return remote.ip();
    }
    let hops = req.headers().get_all("x-forwarded-for").iter().filter_map(|v| v.to_str().ok());
    let hops: Vec<std::net::IpAddr> = hops.flat_map(|v| v.split(',')).filter_map(|a| a.trim().parse().ok()).collect();
    hops.into_iter().rev().find(|ip| !server.is_trusted(*ip)).unwrap_or(remote.ip())
}

/// A new Engine.IO session (no sid yet).
async fn open(node: Arc<Node>, mut req: Request<Incoming>, remote: SocketAddr, websocket: bool) -> Response<Body> {
    if node.drain.is_cancelled() {
        return refused(&node, &Reject::draining());
    }
    if let Err(r) = node.auth.check_origin(req.headers()) {
        return refused(&node, &r);
    }
    // What the connect hook will get is kept for the socket's life: bounded.
    let Some(head) = head_of(&req) else {
        node.metrics.connection_result(ConnResult::HandshakeFailed);
        let mut r = eio_error(3, "Bad request: cookies, authorization and URL over 8 KiB");
        *r.status_mut() = StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE;
        return r;
    };
    // Until its CONNECT a session is nobody's: how many may wait is capped
    // (a slot each), so opens cannot take every slot of the node.
    let opening = match node.polls.try_open(client_ip(&node, &req, remote)) {
        Ok(o) => o,
        Err(Busy::Node) => return refused(&node, &Reject::full()),
        Err(Busy::Address) => return refused(&node, &Reject::busy_address()),
    };
    let Some(slot) = node.take_slot() else { return refused(&node, &Reject::full()) };
    // The Engine.IO sid is this client's secret (polling requests and the
    // upgrade are authorized by it); the connection id (`socket.id`) is
    // public (rooms, presence, the app). Both name the node.
    let eio_sid: Arc<str> = Arc::from(format!("{}.{}", node.cfg.node_id, crate::config::random_id(24)).as_str());
    let sid: Arc<str> = Arc::from(format!("{}.{}", node.cfg.node_id, crate::config::random_id(12)).as_str());
    let span = tracing::info_span!("socketio", conn.id = %sid, remote.addr = %remote);
    let start = Start { head, remote, sid, slot, opening, opened: tokio::time::Instant::now() };
    if websocket {
        let Some(key) = req.headers().get(header::SEC_WEBSOCKET_KEY).and_then(|v| v.to_str().ok()).map(str::to_owned)
        else {
            return eio_error(3, "missing Sec-WebSocket-Key");
        };
        let on_upgrade = hyper::upgrade::on(&mut req);
        let open = open_packet(&node, &eio_sid, false);
        let n = node.clone();
        node.sessions.spawn(
            async move {
                // Boxed, and gone once open: the task keeps only the socket.
                let eio = Box::pin(open_websocket(n.clone(), on_upgrade, open)).await;
                if let Some(eio) = eio {
                    socket(n, eio, start).await;
                }
            }
            .instrument(span),
        );
        return super::upgrade::switching(&key, None);
    }
    // What waits for a GET is bounded well below maxPayload: beyond it the
    // session's own queue fills and a client that does not poll is closed
    // as a slow consumer, like a WebSocket that does not read.
    let max_payload = node.cfg.session.socketio.as_ref().map_or(1_000_000, |c| c.max_payload);
    let cap = max_payload.min(POLL_BUFFER);
    let (poll, end) = Poll::new(eio_sid.clone(), cap, node.cfg.session.max_message_bytes, max_payload);
    node.polls.insert(poll.clone());
    let eio = Eio::polling(node.clone(), poll, end);
    let open = open_packet(&node, &eio_sid, true);
    node.sessions.spawn(socket(node.clone(), eio, start).instrument(span));
    plain(StatusCode::OK, open)
}

/// Completes the WebSocket upgrade of a new session and sends the open packet.
async fn open_websocket(node: Arc<Node>, on_upgrade: hyper::upgrade::OnUpgrade, open: String) -> Option<Eio> {
    let Ok(Ok(up)) = tokio::time::timeout(node.cfg.session.handshake_timeout, on_upgrade).await else {
        node.metrics.connection_result(ConnResult::HandshakeFailed);
        return None;
    };
    let cfg = super::upgrade::ws_config(node.cfg.session.max_message_bytes);
    let ws = WebSocketStream::from_raw_socket(TokioIo::new(up), Role::Server, Some(cfg)).await;
    let mut eio = Eio::websocket(node, ws);
    if eio.feed(WsMessage::Text(Utf8Bytes::from(open))).await.is_err() || eio.flush().await.is_err() {
        return None;
    }
    Some(eio)
}

/// A polling GET: what the session queued (or a noop after a while). The
/// response keeps the session's GET mark until it is sent.
async fn poll_get(node: &Node, poll: &Arc<Poll>) -> Response<Body> {
    let wait = node.cfg.session.ping_interval + Duration::from_secs(5);
    match poll.get(wait).await {
        Ok((Taken::Payload(p), getting)) => plain_holding(StatusCode::OK, p, getting),
        Ok((Taken::Closed, _)) => {
            node.polls.remove(&poll.sid);
            plain(StatusCode::OK, "1")
        }
        Err(PollError::Overlap) => eio_error(3, "Bad request: overlapping GET requests"),
        Err(_) => unknown_sid(),
    }
}

/// A polling POST: the client's packets for the session. One at a time;
/// the body is read as proxied uploads are (`--upstream-timeout`,
/// `--upstream-min-upload-rate`), counted in the node's queue budget, and
/// abandoned when the session ends. Anything wrong with it ends the
/// session, as in Engine.IO.
async fn poll_post(node: &Node, poll: &Poll, req: Request<Incoming>) -> Response<Body> {
    let Ok(_posting) = poll.begin_post() else {
        return eio_error(3, "Bad request: overlapping POST requests");
    };
    let cap = node.cfg.session.socketio.as_ref().map_or(1_000_000, |c| c.max_payload);
    let mut held = Held::new(node.hub.clone());
    let proxy = &node.cfg.proxy;
    let read = read_paced(req.into_body(), cap, proxy.timeout, proxy.min_upload_rate, |n| {
        if held.grow(n) { Ok(()) } else { Err(ReadError::NoRoom) }
    });
    let body = tokio::select! {
        r = read => r,
        () = poll.ended() => return unknown_sid(),
    };
    let body = match body {
        Ok(b) => b,
        Err(e) => {
            poll.close();
            return match e {
                ReadError::TooLarge(_) => plain(StatusCode::PAYLOAD_TOO_LARGE, "payload too large"),
                ReadError::NoRoom => plain(StatusCode::SERVICE_UNAVAILABLE, "server busy"),
                ReadError::TimedOut => eio_error(3, "Bad request: body not received in time"),
                ReadError::Io(_) => eio_error(3, "Bad request"),
            };
        }
    };
    let Ok(text) = Utf8Bytes::try_from(body) else {
        poll.close();
        return eio_error(3, "Bad request: not UTF-8");
    };
    match poll.post(Payload::new(text, Some(held))).await {
        Ok(()) => plain(StatusCode::OK, "ok"),
        Err(PollError::TooLarge) => plain(StatusCode::PAYLOAD_TOO_LARGE, "a packet is larger than max-message-bytes"),
        Err(PollError::TooMany) => eio_error(3, "Bad request: too many packets in one payload"),
        Err(PollError::Invalid) => eio_error(3, "Bad request: invalid packet"),
        Err(_) => unknown_sid(),
    }
}

/// A WebSocket for a session that cannot take one (upgraded already, or
/// gone): it opens and is closed at once, as the reference server does (an
/// HTTP 400 is an error event to `ws` clients, not a close).
fn refuse_upgrade(node: &Node, mut req: Request<Incoming>) -> Response<Body> {
    let Some(key) = req.headers().get(header::SEC_WEBSOCKET_KEY).and_then(|v| v.to_str().ok()).map(str::to_owned)
    else {
        return eio_error(3, "missing Sec-WebSocket-Key");
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    let timeout = node.cfg.session.handshake_timeout;
    let cfg = super::upgrade::ws_config(node.cfg.session.max_message_bytes);
    node.sessions.spawn(async move {
        let Ok(Ok(up)) = tokio::time::timeout(timeout, on_upgrade).await else { return };
        let mut ws = WebSocketStream::from_raw_socket(TokioIo::new(up), Role::Server, Some(cfg)).await;
        let frame = CloseFrame { code: CloseCode::Policy, reason: Utf8Bytes::from_static("Session ID unknown") };
        let _ = tokio::time::timeout(timeout, ws.close(Some(frame))).await;
    });
    super::upgrade::switching(&key, None)
}

/// The WebSocket upgrade of a polling session: `2probe` → `3probe`, the
/// waiting GET gets a noop, then `5` hands the socket to the session.
fn probe(node: &Node, mut req: Request<Incoming>, poll: Arc<Poll>) -> Response<Body> {
    let Some(key) = req.headers().get(header::SEC_WEBSOCKET_KEY).and_then(|v| v.to_str().ok()).map(str::to_owned)
    else {
        return eio_error(3, "missing Sec-WebSocket-Key");
    };
    if !poll.can_upgrade() {
        return refuse_upgrade(node, req);
    }
    let on_upgrade = hyper::upgrade::on(&mut req);
    let timeout = node.cfg.session.handshake_timeout;
    let cfg = super::upgrade::ws_config(node.cfg.session.max_message_bytes);
    node.sessions.spawn(async move {
        let Ok(Ok(up)) = tokio::time::timeout(timeout, on_upgrade).await else { return };
        let mut ws = WebSocketStream::from_raw_socket(TokioIo::new(up), Role::Server, Some(cfg)).await;
        let probed = tokio::time::timeout(timeout, async {
            match ws.next().await {
                Some(Ok(WsMessage::Text(t))) if t.as_str() == "2probe" => {}
                _ => return false,
            }
            if ws.send(WsMessage::Text(Utf8Bytes::from_static("3probe"))).await.is_err() {
                return false;
            }
            poll.noop();
            loop {
                match ws.next().await {
                    Some(Ok(WsMessage::Text(t))) if t.as_str() == "5" => return true,
                    // A client ping during the probe.
                    Some(Ok(WsMessage::Text(t))) if t.as_str() == "2" => {}
                    _ => return false,
                }
            }
        })
        .await;
        if probed == Ok(true) {
            poll.hand_over(ws);
        }
    });
    super::upgrade::switching(&key, None)
}

// ---------------------------------------------------------------------------
// The socket: CONNECT, then the session

#[derive(Deserialize)]
struct RecoveryAuth {
    #[serde(default)]
    pid: Option<String>,
    #[serde(default)]
    offset: Option<String>,
}

/// What a new socket starts with.
struct Start {
    /// The open request's head, for the connect hook.
    head: Request<()>,
    remote: SocketAddr,
    /// Its connection id.
    sid: Arc<str>,
    slot: crate::node::Slot,
    /// Its place among the sessions waiting for CONNECT.
    opening: Opening,
    /// When the open packet was made: the heartbeat counts from there.
    opened: tokio::time::Instant,
}

/// Waits for the client's first CONNECT, authenticates it and runs the
/// session; a refusal is a CONNECT_ERROR.
async fn socket(node: Arc<Node>, mut eio: Eio, start: Start) {
    // On the heap while it runs, freed after: the connect hook's and the
    // broker's futures would otherwise size every socket's task for its life.
    // (A `let`, not an `if let`: the box must be gone before the session runs.)
    let connected = Box::pin(connect(&node, &mut eio, start)).await;
    if let Some((session, welcome)) = connected {
        session.run(eio, welcome).await;
    }
}

/// A socket's CONNECT: the session and its CONNECT answer, or None once
/// the client was refused (or failed) and told.
async fn connect(node: &Arc<Node>, eio: &mut Eio, start: Start) -> Option<(Session<SocketIo>, Utf8Bytes)> {
    let Start { head, remote, sid, slot, opening, opened } = start;
    let s = &node.cfg.session;
    let (every, pong_within) = (s.ping_interval, s.ping_timeout());
    let first = tokio::time::timeout(s.handshake_timeout, async {
        // Noops before the CONNECT: a few at most. The Engine.IO heartbeat
        // runs from the open packet on, as in Engine.IO: a ping every
        // interval, and no pong within pingTimeout ends the session.
        let mut control = 0;
        let mut ping = tokio::time::interval_at(opened + every, every);
        let mut pong_due: Option<tokio::time::Instant> = None;
        loop {
            let frame = tokio::select! {
                f = eio.recv() => f,
                at = ping.tick(), if pong_due.is_none() => {
                    if eio.feed(WsMessage::Ping(Default::default())).await.is_err() || eio.flush().await.is_err() {
                        return None;
                    }
                    // Counted from when the ping was due, as the client counts.
                    pong_due = Some(at + pong_within);
                    if let Some(p) = &eio.poll {
                        p.pong_due(pong_due);
                    }
                    continue;
                }
                () = tokio::time::sleep_until(pong_due.unwrap_or_else(tokio::time::Instant::now)), if pong_due.is_some() => {
                    tracing::debug!("no pong before CONNECT within pingTimeout: closed");
                    eio.discard();
                    return None;
                }
            };
            match frame? {
                Ok(WsMessage::Pong(_)) if pong_due.is_some() => {
                    pong_due = None;
                    if let Some(p) = &eio.poll {
                        p.pong_due(None);
                    }
                }
                Ok(WsMessage::Text(t)) => {
                    let Ok(p) = parse_packet(&t) else { return None };
                    if p.kind != 0 {
                        // Nothing but CONNECT before CONNECT.
                        return None;
                    }
                    let auth = match p.json.trim() {
                        "" => None,
                        j => Some(RawValue::from_string(j.to_owned()).ok()?),
                    };
                    return Some((p.namespace.to_owned(), auth));
                }
                Ok(_) if control < PRE_CONNECT_CONTROL => control += 1,
                Ok(_) | Err(_) => return None,
            }
        }
    })
    .await;
    let Ok(Some((namespace, auth))) = first else {
        node.metrics.connection_result(ConnResult::HandshakeFailed);
        let reason = Utf8Bytes::from_static("a CONNECT packet was expected");
        eio.close(Some(CloseFrame { code: CloseCode::Protocol, reason })).await;
        return None;
    };
    if !valid_namespace(&namespace) {
        say_goodbye(eio, Some(connect_error(&namespace, "Invalid namespace"))).await;
        return None;
    }
    let sio = SioConnect { namespace: &namespace, auth: auth.as_deref() };
    let ident = match node.auth.authenticate_with(&head, remote, Some(sio)).await {
        Ok(i) => i,
        Err(r) => {
            node.metrics.connection_result(r.result);
            node.metrics.error(r.error.fault);
            r.error.log("Socket.IO CONNECT refused");
            // A refusal is final for socket.io-client (CONNECT_ERROR); a
            // failure (the app or Redis unavailable) is not: the transport
            // closes and the client tries again.
            let final_refusal = matches!(r.status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN);
            say_goodbye(eio, final_refusal.then(|| connect_error(&namespace, &r.error.message))).await;
            return None;
        }
    };
    // Who it is is known: it no longer counts among the unauthenticated.
    drop(opening);
    let own_room = room_channel(&namespace, &sid).ok();
    // Channels: the namespace's, the sid's room, the app's (as rooms of this namespace).
    let mut channels: Vec<Channel> = Vec::new();
    let mut push = |c: Result<Channel, crate::channel::ChannelError>| {
        if let Ok(c) = c {
            if !channels.contains(&c) {
                channels.push(c);
            }
        }
    };
    push(namespace_channel(&namespace));
    push(room_channel(&namespace, &sid));
    for c in &ident.channels {
        push(if namespace == ROOT { Ok(c.clone()) } else { room_channel(&namespace, c) });
    }
    let user = ident.user.as_deref().map(str::to_owned);

    // Connection-state recovery: the previous socket's trail, if it is ours.
    let recovery = auth
        .as_deref()
        .and_then(|a| serde_json::from_str::<RecoveryAuth>(a.get()).ok())
        .filter(|r| r.pid.as_ref().is_some_and(|p| p.len() <= 64))
        .filter(|_| recovers(node));
    let mut since: HashMap<Channel, String> = HashMap::new();
    let mut known = false;
    let mut old_pid = None;
    // Put back if this connection fails, so the client's retry can use it.
    let mut taken: Option<(String, String)> = None;
    if let Some(RecoveryAuth { pid: Some(pid), offset }) = recovery {
        // Only the state of this user and namespace can be taken: someone
        // else's `pid` finds nothing, and leaves that state for its owner.
        let key = trail_key(&pid, user.as_deref(), &namespace);
        match node.broker.take_stash(&key).await {
            Ok(Some(saved)) => {
                let trail = match serde_json::from_str::<Trail>(&saved) {
                    Ok(trail) if trail.user == user && trail.namespace == namespace => {
                        match since_away(node, trail).await {
                            Ok(t) => Ok(t),
                            Err(e) => {
                                tracing::warn!(error = %e, "Socket.IO CONNECT failed: the app's commands unavailable");
                                restash(node, Some((key, saved)));
                                say_goodbye(eio, None).await;
                                return None;
                            }
                        }
                    }
                    other => other.map(Some),
                };
                match trail {
                    Ok(None) => tracing::debug!("the app disconnected this socket while it was away: not recovered"),
                    Ok(Some(trail)) if trail.user == user && trail.namespace == namespace => {
                        let (positions, k) = trail.positions(offset.as_deref());
                        known = k;
                        for ch in trail.rooms {
                            match positions.get(&ch) {
                                Some(o) => {
                                    since.insert(ch.clone(), o.to_string());
                                }
                                // Joined while away: nothing missed there.
                                None if trail.fresh.contains(&ch) => {}
                                // History kept, but where the socket was is not known.
                                None if node.cfg.namespaces.rule(&ch).history.is_some() => known = false,
                                None => {}
                            }
                            push(Ok(ch));
                        }
                        old_pid = Some(pid);
                    }
                    Ok(_) => tracing::debug!("recovery state of another user or namespace: not recovered"),
                    Err(e) => tracing::warn!(error = %e, "unreadable recovery state: not recovered"),
                }
                taken = Some((key, saved));
            }
            Ok(None) => tracing::debug!("no recovery state for this pid (expired, or its node died)"),
            Err(e) => tracing::debug!(error = %e, "recovery state unavailable"),
        }
    }
    let max = node.cfg.session.max_subscriptions;
    if channels.len() > max {
        tracing::warn!(channels = channels.len(), max, "more rooms than max-subscriptions: the rest are not joined");
        channels.truncate(max);
    }
    let (handle, rx) = node.hub.register(sid.clone(), ident.user.clone(), node.cfg.session.client_queue);
    let ident = Arc::new(ident);
    let mut session = Session::new(node.clone(), SocketIo, handle, ident, slot, rx);
    session.origin = Some(Arc::new((head, remote)));

    // Where history is kept, a channel joined without `since` starts its
    // trail at the channel's top (read before anything is written).
    let mut bases = Vec::new();
    for ch in &channels {
        if since.contains_key(ch) || Some(ch) == own_room.as_ref() {
            continue;
        }
        if let Some(policy) = node.cfg.namespaces.rule(ch).history {
            match node.broker.history(ch, policy, u64::MAX / 2, 1).await {
                // An empty history has no epoch yet: the channel's first
                // message will say where the socket was.
                Ok(h) if h.epoch.is_empty() => {}
                Ok(h) => bases.push((ch.clone(), h.top_offset())),
                Err(e) => {
                    tracing::warn!(error = %e, "Socket.IO CONNECT failed: history unavailable");
                    restash(node, taken);
                    say_goodbye(eio, None).await;
                    return None;
                }
            }
        }
    }
    let recovered = match session.subscribe_initial(&channels, &since).await {
        Ok(r) => r,
        Err(e) => {
            // The broker (or a limit): not the client's fault; it retries.
            e.log("Socket.IO CONNECT failed");
            restash(node, taken);
            say_goodbye(eio, None).await;
            return None;
        }
    };
    let mut trail = Trail {
        user,
        namespace: namespace.clone(),
        connection: sid.to_string(),
        connected_us: session.handle.connected_us,
        ..Trail::default()
    };
    trail.rooms = channels.iter().filter(|c| Some(*c) != own_room.as_ref()).cloned().collect();
    trail.base.extend(bases);
    for (ch, o) in &since {
        if let Some(o) = Offset::parse(o) {
            trail.base.entry(ch.clone()).or_insert(o);
        }
    }
    // Recovered: the trail was ours, the client's position known, and every
    // channel with history caught up.
    let is_recovered = old_pid.is_some() && known && recovered.iter().all(|(_, ok)| *ok);
    if old_pid.is_some() && !is_recovered {
        tracing::debug!(known, ?recovered, ?since, "recovery state found, but not everything missed could be sent");
    }
    if taken.is_some() {
        node.metrics
            .socketio_recoveries
            .with_label_values(&[if is_recovered { "recovered" } else { "not_recovered" }])
            .inc();
    }
    // The same pid tells socket.io-client it was recovered; a new one, not.
    trail.pid = match old_pid {
        Some(p) if is_recovered => p,
        _ => crate::config::random_id(16),
    };
    // No `pid` when recovery is off (`--socketio-recovery-window 0`), as
    // Socket.IO answers without connection-state recovery.
    let welcome = SocketIo::connected(&namespace, &sid, recovers(node).then_some(trail.pid.as_str()));
    session.trail = Some(Box::new(trail));
    node.metrics.connection_result(ConnResult::Accepted);
    tracing::debug!(namespace, recovered = is_recovered, "socket connected");
    Some((session, welcome))
}

/// Puts back a recovery state taken for a CONNECT that failed, so that the
/// client's retry can use it.
fn restash(node: &Arc<Node>, taken: Option<(String, String)>) {
    let (Some((key, saved)), Some(window)) = (taken, node.cfg.session.socketio.as_ref().map(|s| s.recovery_window))
    else {
        return;
    };
    let node = node.clone();
    tokio::spawn(async move {
        let _ = node.broker.stash(&key, saved, window).await;
    });
}

/// A trail with the app's commands issued while its socket was away
/// applied; None when the app disconnected the socket meanwhile, or when
/// the commands of that time are no longer all known.
async fn since_away(node: &Node, mut trail: Trail) -> Result<Option<Trail>, crate::broker::BrokerError> {
    // Commands issued well before the socket ended reached it live.
    let after = trail.kept_us.saturating_sub(5_000_000).max(trail.connected_us);
    let Some(commands) = node.broker.commands_after(after).await? else {
        tracing::debug!("the app's commands since this socket left are no longer all kept: not recovered");
        return Ok(None);
    };
    for (_, cmd) in &commands {
        if trail.apply(cmd) == Applied::Dropped {
            return Ok(None);
        }
    }
    Ok(Some(trail))
}

/// Ends a socket that never started: a CONNECT_ERROR first when it is a
/// refusal (final for the client), else a close that says "try again".
async fn say_goodbye(eio: &mut Eio, packet: Option<Utf8Bytes>) {
    let frame = match packet {
        Some(p) => {
            let _ = eio.feed(WsMessage::Text(p)).await;
            let _ = eio.flush().await;
            CloseFrame { code: CloseCode::Normal, reason: Utf8Bytes::from_static("") }
        }
        None => CloseFrame { code: CloseCode::Again, reason: Utf8Bytes::from_static("try again later") },
    };
    eio.close(Some(frame)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn off(s: &str) -> Offset {
        Offset::parse(s).unwrap()
    }

    fn ch(s: &str) -> Channel {
        Channel::parse(s).unwrap()
    }

    fn at(since: &HashMap<Channel, Offset>, c: &str) -> String {
        since[&ch(c)].to_string()
    }

    #[test]
    fn the_clients_last_offset_places_it_in_the_trail() {
        let mut t = Trail::default();
        t.base.insert(ch("a"), off("e:4"));
        for (c, o) in [("a", "e:5"), ("b", "f:1"), ("a", "e:6"), ("b", "f:2")] {
            t.wrote(&ch(c), &off(o));
        }
        // b had no position: its first message says where it was.
        assert_eq!(t.base[&ch("b")], off("f:0"));
        // It saw up to a's e:6: b's f:2 may have been lost in flight.
        let (since, known) = t.positions(Some("e:6"));
        assert!(known);
        assert_eq!((at(&since, "a"), at(&since, "b")), ("e:6".into(), "f:1".into()));
        // It saw nothing of the log.
        let (since, known) = t.positions(None);
        assert!(known);
        assert_eq!((at(&since, "a"), at(&since, "b")), ("e:4".into(), "f:0".into()));
        // An offset the trail does not know, or not an offset: not placed.
        assert!(!t.positions(Some("zz:1")).1);
        assert!(!t.positions(Some("hello")).1);
        // What is kept in the broker reads back the same.
        let back: Trail = serde_json::from_str(&serde_json::to_string(&t).unwrap()).unwrap();
        assert_eq!(back.positions(Some("e:6")).0, t.positions(Some("e:6")).0);
    }

    #[test]
    fn the_log_is_bounded_and_folds_into_the_base() {
        let mut t = Trail::default();
        for i in 1..=(TRAIL_LOG as u64 + 10) {
            t.wrote(&ch("a"), &Offset { epoch: Arc::from("e"), seq: i });
        }
        assert_eq!(t.log.len(), TRAIL_LOG);
        assert_eq!(t.base[&ch("a")], off("e:10"));
        // An offset older than the log cannot place the client.
        assert!(!t.positions(Some("e:10")).1);
        assert!(t.positions(Some("e:11")).1);
    }
}
