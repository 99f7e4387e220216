//! Client protocols. A protocol is a [`Codec`]: it parses a client's frames
//! into protocol-neutral [`Request`]s and encodes replies, the welcome and
//! channel messages. The session loop ([`crate::session`]) exists once and
//! drives any codec; adding a client protocol is a new file here plus its
//! upgrade path, not a copy of the loop.
//!
//! A published [`Message`] is shared by every subscriber on the node; each
//! protocol encodes it at most once ([`Message::encoded`]), whatever the
//! number of its sessions.

pub mod wsrelay;

use std::sync::OnceLock;

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
pub const PROTOCOLS: usize = 1;

/// What a client asks for, whatever protocol it speaks.
#[derive(Debug)]
pub enum Request {
    Subscribe { channel: Channel, since: Option<String> },
    Unsubscribe { channel: Channel },
    Publish { channel: Channel, data: Box<RawValue> },
    Send { data: Box<RawValue> },
    Presence { channel: Channel },
    Ping,
}

/// One decoded client frame: where the reply goes (if anywhere) and the
/// request, or why it is not one.
#[derive(Debug)]
pub struct Decoded<Id> {
    pub id: Option<Id>,
    pub request: Result<Request, ApiError>,
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
    /// Index of this protocol's slot in [`Message`]'s encoding cache.
    const SLOT: usize;

    /// The first frame of a session.
    fn welcome(&self, connection: &str, user: Option<&str>, channels: &[Channel]) -> Utf8Bytes;
    /// Parses one client frame. Never fails: a bad frame is a request error
    /// (with the id when it could be read), answered with an error reply.
    fn decode(&self, frame: Frame<'_>) -> Decoded<Self::Id>;
    /// A successful reply, with an optional result.
    fn reply_ok(&self, id: Option<&Self::Id>, result: Option<&RawValue>) -> Utf8Bytes;
    /// An error reply.
    fn reply_err(&self, id: Option<&Self::Id>, err: &ApiError) -> Utf8Bytes;
    /// A channel message, encoded for this protocol (called through
    /// [`Message::encoded`], so once per message per node).
    fn encode_message(&self, msg: &Message) -> Utf8Bytes;
}

/// A message published to a channel, as it reaches a node's hub: the raw
/// JSON data (validated where it entered), never re-parsed on the way.
#[derive(Debug)]
pub struct Message {
    pub channel: Channel,
    /// The `data` as JSON text.
    pub data: Utf8Bytes,
    /// Where history is kept: the message's offset (opaque to clients).
    pub offset: Option<String>,
    /// A connection that must not receive it (the publisher's own).
    pub exclude: Option<Box<str>>,
    /// µs since the Unix epoch when it was published (any node's clock),
    /// for `wsrelay_delivery_seconds`.
    pub published_us: u64,
    frames: [OnceLock<Utf8Bytes>; PROTOCOLS],
}

impl Message {
    pub fn new(channel: Channel, data: Utf8Bytes, exclude: Option<Box<str>>, published_us: u64) -> Self {
        Message { channel, data, offset: None, exclude, published_us, frames: Default::default() }
    }

    /// Bytes it stands for in a session's queue (its frame, roughly).
    pub fn weight(&self) -> usize {
        self.data.len() + self.channel.len() + 64
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
