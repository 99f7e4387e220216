//! The Engine.IO transport of a socket: polling until (and unless) the
//! client upgrades to a WebSocket.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::error::ProtocolError;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message as WsMessage, Utf8Bytes};

use super::Front;
use super::engineio::{Closed, Payload, Poll, PollEnd};
use crate::node::Node;
use crate::session::transport::Ws;
use crate::session::transport::{CLOSE_TIMEOUT, Transport, close_ws};

/// An Engine.IO session's transport: polling until (and unless) the client
/// upgrades to a WebSocket. Engine.IO packets other than messages (pings,
/// pongs, noops, close) are handled here; messages (`4…`) go to the codec.
pub(crate) struct Eio {
    ws: Option<Ws>,
    pub(super) poll: Option<Arc<Poll>>,
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
    /// Where a polling session is registered (None for a WebSocket).
    front: Option<Arc<Front>>,
}

impl Drop for Eio {
    fn drop(&mut self) {
        if let Some(p) = &self.poll {
            p.close();
            if let Some(f) = &self.front {
                f.polls.remove(&p.sid);
            }
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
    pub(super) fn websocket(node: Arc<Node>, ws: Ws) -> Self {
        Eio {
            ws: Some(ws),
            poll: None,
            inbound: None,
            upgrade: None,
            early: VecDeque::new(),
            backlog: VecDeque::new(),
            assembling: None,
            node,
            front: None,
        }
    }

    pub(super) fn polling(node: Arc<Node>, front: Arc<Front>, poll: Arc<Poll>, end: PollEnd) -> Self {
        Eio {
            ws: None,
            poll: Some(poll),
            inbound: Some(end.inbound),
            upgrade: Some(end.upgrade),
            early: VecDeque::new(),
            backlog: VecDeque::new(),
            assembling: None,
            node,
            front: Some(front),
        }
    }

    /// The client upgraded: from now on the WebSocket carries everything;
    /// what polling still held goes first.
    fn switch(&mut self, ws: Ws) {
        if let Some(poll) = self.poll.take() {
            self.backlog.extend(poll.take_all());
            poll.close();
            if let Some(f) = &self.front {
                f.polls.remove(&poll.sid);
            }
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
        let max = super::max_message_bytes(&self.node.cfg).saturating_mul(2);
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

    /// `websocket` once upgraded (or opened so), else `polling`.
    pub(super) fn transport_name(&self) -> &'static str {
        if self.ws.is_some() { "websocket" } else { "polling" }
    }

    /// The session is over for a reason the client is not told (a ping
    /// timeout): what polling still held is dropped, so the next GET gets
    /// `400` at once, as from Engine.IO.
    pub(super) fn discard(&mut self) {
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
                    // Closed from the HTTP side: an oversized body, or a
                    // waiting GET whose client went away (a transport error).
                    () = poll.ended() => {
                        return poll.abandoned().then(|| Err(WsError::Io(std::io::ErrorKind::ConnectionAborted.into())));
                    }
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
