//! Client protocols. A protocol is a [`Codec`]: it parses a client's frames
//! into protocol-neutral [`Request`]s and encodes replies, the welcome and
//! channel messages. The session loop ([`crate::session`]) exists once and
//! drives any codec; adding a client protocol is a new file here plus its
//! upgrade path, not a copy of the loop.
//!
//! A published [`Message`] is shared by every subscriber on the node; each
//! protocol encodes it at most once ([`Message::encoded`]), whatever the
//! number of its sessions.

pub mod commands;
pub mod socketio;
pub mod wsrelay;

use std::sync::{Arc, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

/// Microseconds since the Unix epoch (comparable across nodes, give or
/// take their clocks).
pub fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

use serde_json::value::RawValue;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::channel::Channel;
use crate::error::ApiError;

/// Deepest nesting of arrays and objects accepted in client or API `data`:
/// it is relayed to every subscriber, whose JSON parsers may recurse.
pub const MAX_JSON_DEPTH: usize = 64;

/// Refuses JSON (already known to be valid) nested deeper than
/// [`MAX_JSON_DEPTH`]. A linear scan; strings are skipped.
pub fn check_depth(json: &str) -> Result<(), ApiError> {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for b in json.bytes() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_JSON_DEPTH {
                    return Err(ApiError::bad_request(format!("data is nested deeper than {MAX_JSON_DEPTH} levels")));
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

/// Protocols known to this build; each has a slot in [`Message`]'s cache.
pub const PROTOCOLS: usize = 2;

/// What a client asks of the core, whatever protocol it speaks, or (`Own`)
/// something only its front knows (`X`: the front's own requests, handled
/// by the front; wsrelay.v1 has none).
#[derive(Debug)]
pub enum Request<X = NoOwn> {
    Subscribe {
        channel: Channel,
        since: Option<String>,
    },
    Unsubscribe {
        channel: Channel,
    },
    Publish {
        channel: Channel,
        data: Box<RawValue>,
    },
    Send {
        data: Box<RawValue>,
    },
    Presence {
        channel: Channel,
    },
    Ping,
    /// A request of the front's own vocabulary.
    Own(X),
    /// Something this server does not do: the session is closed, saying why.
    Refuse(&'static str),
}

/// A front without requests of its own.
#[derive(Debug)]
pub enum NoOwn {}

/// A binary event's attachments, base64 (standard, padded) as they travel
/// in JSON (hooks, the API, the broker, history) and over Engine.IO
/// polling; decoded only for a WebSocket's binary frames. The event's
/// arguments hold Socket.IO's placeholders, `{"_placeholder":true,"num":i}`.
pub type Attachments = Arc<[Box<str>]>;

/// Attachments one event may carry.
pub const MAX_ATTACHMENTS: usize = 64;

/// Checks attachments given as JSON (base64 strings).
pub fn check_attachments(list: Vec<String>) -> Result<Attachments, ApiError> {
    use base64::Engine as _;
    if list.len() > MAX_ATTACHMENTS {
        return Err(ApiError::bad_request(format!("at most {MAX_ATTACHMENTS} attachments")));
    }
    for a in &list {
        if base64::engine::general_purpose::STANDARD.decode(a).is_err() {
            return Err(ApiError::bad_request("\"attachments\" must be base64 strings"));
        }
    }
    Ok(list.into_iter().map(String::into_boxed_str).collect())
}

/// Longest event name accepted.
pub const MAX_EVENT_LEN: usize = 255;

/// Event names socket.io-client reserves: an EVENT with one of them is a
/// parse error there, and the client drops its connection.
pub const RESERVED_EVENTS: [&str; 6] =
    ["connect", "connect_error", "disconnect", "disconnecting", "newListener", "removeListener"];

/// Checks an event name: 1–255 bytes, no control characters, not one
/// socket.io-client reserves.
pub fn check_event(event: &str) -> Result<(), ApiError> {
    if event.is_empty() || event.len() > MAX_EVENT_LEN || event.chars().any(char::is_control) {
        return Err(ApiError::bad_request(format!(
            "an event name must be 1-{MAX_EVENT_LEN} bytes without control characters"
        )));
    }
    if RESERVED_EVENTS.contains(&event) {
        return Err(ApiError::bad_request(format!("{event:?} is reserved by Socket.IO clients")));
    }
    Ok(())
}

/// One decoded client frame: where the reply goes (if anywhere) and the
/// request, or why it is not one.
#[derive(Debug)]
pub struct Decoded<Id, X = NoOwn> {
    pub id: Option<Id>,
    pub request: Result<Request<X>, ApiError>,
}

/// A client frame as read from the socket.
#[derive(Debug, Clone, Copy)]
pub enum Frame<'a> {
    Text(&'a str),
    Binary(&'a [u8]),
}

/// A client protocol's wire format.
pub trait Codec: Send + Sync + 'static {
    /// How a request names its reply (wsrelay.v1: the `id` field).
    type Id: Send + Sync + 'static;
    /// The protocol's own requests, beside the core's ([`Request::Own`]).
    type Own: Send + 'static;
    /// Index of this protocol's slot in [`Message`]'s encoding cache.
    const SLOT: usize;

    /// The first frame of a session; `recovered` tells, for URL channels
    /// given with `since`, whether their history was recovered.
    fn welcome(
        &self,
        connection: &str,
        user: Option<&str>,
        channels: &[Channel],
        recovered: &[(Channel, bool)],
    ) -> Utf8Bytes;
    /// Parses one client frame. Never fails: a bad frame is a request error
    /// (with the id when it could be read), answered with an error reply.
    fn decode(&self, frame: Frame<'_>) -> Decoded<Self::Id, Self::Own>;
    /// A successful reply, with an optional result (None: the protocol has
    /// no reply for it).
    fn reply_ok(&self, id: Option<&Self::Id>, result: Option<&RawValue>) -> Option<Utf8Bytes>;
    /// An error reply (None: the protocol has no way to say it).
    fn reply_err(&self, id: Option<&Self::Id>, err: &ApiError) -> Option<Utf8Bytes>;
    /// The app subscribed (`on`) or unsubscribed the client server-side.
    fn server_subscription(&self, channel: &Channel, on: bool) -> Option<Utf8Bytes>;
    /// An event the app sends with `/api/call`, whose answer comes back as
    /// the protocol's own acknowledgement with `ack`. None: the protocol cannot.
    fn call(
        &self,
        _namespace: &str,
        _event: &str,
        _args: &str,
        _attachments: &[Box<str>],
        _ack: u64,
    ) -> Option<Utf8Bytes> {
        None
    }
    /// Whether the session keeps reading while a request is pending, to
    /// take [`is_answer`](Self::is_answer) frames at once (Socket.IO: the
    /// client's ACK to an app call may be what the pending hook waits for).
    const READS_WHILE_PENDING: bool = false;
    /// Whether a ping must be answered within `--idle-timeout` −
    /// `--ping-interval` (Engine.IO's `pingTimeout`), checked when that
    /// passes, rather than any frame within `--idle-timeout`, checked at
    /// each ping.
    const PONG_DEADLINE: bool = false;
    /// A frame that answers the server (an ACK) and never starts a request.
    fn is_answer(&self, _frame: Frame<'_>) -> bool {
        false
    }
    /// Frames written before the session closes for `reason`.
    fn goodbye(
        &self,
        _reason: crate::error::CloseReason,
        _channels: &std::collections::HashSet<Channel>,
    ) -> Vec<Utf8Bytes> {
        Vec::new()
    }
    /// A channel message, encoded for this protocol (called through
    /// [`Message::encoded`], so once per message per node).
    fn encode_message(&self, msg: &Message) -> Utf8Bytes;
}

/// Where a message sits in its channel's history: the history's epoch (a
/// new one whenever the history is lost) and the message's sequence number.
/// Clients see it as the opaque string `<epoch>:<seq>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Offset {
    pub epoch: Arc<str>,
    pub seq: u64,
}

impl Offset {
    /// Parses `<epoch>:<seq>`; None for anything else (a client's `since`
    /// that is not ours simply cannot be recovered).
    pub fn parse(s: &str) -> Option<Offset> {
        let (epoch, seq) = s.rsplit_once(':')?;
        if epoch.is_empty() || epoch.len() > 64 || !epoch.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return None;
        }
        Some(Offset { epoch: Arc::from(epoch), seq: seq.parse().ok()? })
    }
}

/// As its text, `<epoch>:<seq>` (recovery state kept in the broker).
impl serde::Serialize for Offset {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Offset {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = std::borrow::Cow::<str>::deserialize(d)?;
        Offset::parse(&text).ok_or_else(|| serde::de::Error::custom("not an offset"))
    }
}

impl std::fmt::Display for Offset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.epoch, self.seq)
    }
}

/// What a channel frame says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A published message; `data` is its data.
    Publication,
    /// A client joined (presence events); `data` is `{"user","connection","info"}`.
    Join,
    /// A client left; `data` as for `Join`.
    Leave,
    /// Messages of this channel were lost beyond what history covers: the
    /// client should reload the channel's state. `data` is `null`.
    Gap,
}

/// A message published to a channel, as it reaches a node's hub: the raw
/// JSON data (validated where it entered), never re-parsed on the way.
#[derive(Debug)]
pub struct Message {
    pub kind: Kind,
    pub channel: Channel,
    /// The `data` as JSON text.
    pub data: Utf8Bytes,
    /// Where history is kept: the message's offset.
    pub offset: Option<Offset>,
    /// A connection that must not receive it (the publisher's own).
    pub exclude: Option<Box<str>>,
    /// µs since the Unix epoch when it was published (any node's clock),
    /// for `wsrelay_delivery_seconds`.
    pub published_us: u64,
    /// A named event (`/api/publish` with `event`): `data` is then the JSON
    /// array of its arguments. Socket.IO sockets get it as that event;
    /// wsrelay.v1 sockets as `{"event","args"}` data.
    pub event: Option<Arc<str>>,
    /// A named event's binary attachments.
    pub attachments: Option<Attachments>,
    frames: [OnceLock<Utf8Bytes>; PROTOCOLS],
}

impl Message {
    pub fn new(channel: Channel, data: Utf8Bytes, exclude: Option<Box<str>>, published_us: u64) -> Self {
        Message {
            kind: Kind::Publication,
            channel,
            data,
            offset: None,
            exclude,
            published_us,
            event: None,
            attachments: None,
            frames: Default::default(),
        }
    }

    /// The same message with binary attachments (a named event's).
    pub fn with_attachments(mut self, attachments: Option<Attachments>) -> Self {
        self.attachments = attachments.filter(|a| !a.is_empty());
        self
    }

    /// The same message as the named event `event` (`data` holds its
    /// arguments as a JSON array).
    pub fn with_event(mut self, event: Option<Arc<str>>) -> Self {
        self.event = event;
        self
    }

    /// A presence event or a gap notice for `channel` (not for `exclude`:
    /// a client is not told of its own join).
    pub fn event(kind: Kind, channel: Channel, data: Utf8Bytes, exclude: Option<Box<str>>) -> Self {
        Message { kind, ..Message::new(channel, data, exclude, 0) }
    }

    /// The same message at `offset` (the broker assigns it).
    pub fn with_offset(&self, offset: Offset) -> Self {
        Message {
            kind: self.kind,
            channel: self.channel.clone(),
            data: self.data.clone(),
            offset: Some(offset),
            exclude: self.exclude.clone(),
            published_us: self.published_us,
            event: self.event.clone(),
            attachments: self.attachments.clone(),
            frames: Default::default(),
        }
    }

    /// Bytes it stands for in a session's queue (its frame, roughly).
    pub fn weight(&self) -> usize {
        self.data.len()
            + self.channel.len()
            + self.event.as_ref().map_or(0, |e| e.len())
            + self.attachments.as_ref().map_or(0, |a| a.iter().map(|x| x.len() + 2).sum())
            + 64
    }

    /// The message as `C` frames it, encoded on first use and shared after.
    pub fn encoded<C: Codec>(&self, codec: &C) -> Utf8Bytes {
        match self.frames.get(C::SLOT) {
            Some(slot) => slot.get_or_init(|| codec.encode_message(self)).clone(),
            // A codec without a slot still works, uncached.
            None => codec.encode_message(self),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depth_is_limited_outside_strings() {
        let deep = "[".repeat(65) + &"]".repeat(65);
        assert!(check_depth(&deep).is_err());
        let ok = "[".repeat(64) + &"]".repeat(64);
        assert!(check_depth(&ok).is_ok());
        let in_string = format!("{{\"a\":\"{}\\\"\"}}", "[".repeat(100));
        assert!(check_depth(&in_string).is_ok(), "{in_string}");
    }
}

#[cfg(test)]
mod offset_tests {
    use super::*;

    #[test]
    fn offsets_round_trip_and_refuse_garbage() {
        let o = Offset::parse("ab12:42").unwrap();
        assert_eq!(o.seq, 42);
        assert_eq!(o.to_string(), "ab12:42");
        for bad in ["", "42", ":42", "ab:", "ab:x", "a b:1", "ab:-1"] {
            assert!(Offset::parse(bad).is_none(), "{bad}");
        }
    }
}
