//! The Socket.IO v5 wire format, as carried in Engine.IO v4 message
//! packets (`4…`): `<type>[<namespace>,][<ack id>][JSON]`.
//!
//! Rooms are channels. In the main namespace `/` a room is the channel of
//! the same name; in a named namespace `/chat` room `r` is the channel
//! `/chat#r`. Every socket is also in its namespace's channel (`/`,
//! `/chat`: a broadcast to the whole namespace) and in the room named by its
//! id. A channel message is the event it was published as (`/api/publish`
//! with `event` and `args`), or `message` with the data as its argument;
//! where the channel keeps history its offset follows as one more, last,
//! string argument, as Socket.IO's own connection-state recovery does.

use std::sync::Arc;

use serde_json::value::RawValue;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use super::{Codec, Decoded, Frame, Kind, Message, Request, check_depth};
use crate::channel::Channel;
use crate::error::{ApiError, CloseReason};

/// Socket.IO's main namespace.
pub const ROOT: &str = "/";

/// The Socket.IO codec.
#[derive(Debug, Clone, Copy, Default)]
pub struct SocketIo;

/// Socket.IO's own requests, which its front handles (the core knows none
/// of them).
#[derive(Debug)]
pub enum SioRequest {
    /// Connect a further namespace (the first is connected before the
    /// session starts).
    Connect { namespace: Arc<str>, auth: Option<Box<RawValue>> },
    /// Leave a namespace.
    Leave { namespace: Arc<str> },
    /// An event for the app (the message hook); `ack` when the client waits
    /// for an answer.
    Emit {
        namespace: Arc<str>,
        event: Arc<str>,
        args: Box<RawValue>,
        ack: bool,
        /// A binary event's attachments (its `args` hold the placeholders).
        attachments: Option<super::Attachments>,
    },
    /// The client's answer to an event the app sent with `/api/call`.
    Ack { ack: u64, args: Box<RawValue>, attachments: Option<super::Attachments> },
}

/// Where an acknowledgement goes: the namespace and the client's ack id.
#[derive(Debug, Clone)]
pub struct AckId {
    pub namespace: Arc<str>,
    pub ack: u64,
}

/// The channel of `room` in `namespace`.
pub fn room_channel(namespace: &str, room: &str) -> Result<Channel, crate::channel::ChannelError> {
    if namespace == ROOT { Channel::parse(room) } else { Channel::parse(&format!("{namespace}#{room}")) }
}

/// The channel every socket of `namespace` is in.
pub fn namespace_channel(namespace: &str) -> Result<Channel, crate::channel::ChannelError> {
    Channel::parse(namespace)
}

pub use crate::channel::split_socketio as split_channel;

/// Whether `channel` belongs to `namespace` (its rooms and its own channel).
pub fn in_namespace(channel: &str, namespace: &str) -> bool {
    split_channel(channel).0 == namespace
}

/// Whether a namespace name is acceptable: `/` or `/name` that makes valid
/// channel names (no `#`).
pub fn valid_namespace(ns: &str) -> bool {
    ns == ROOT || (ns.starts_with('/') && !ns.contains('#') && crate::channel::check(ns).is_ok() && ns.len() <= 128)
}

/// `<type>[<namespace>,]`
fn head(kind: char, namespace: &str) -> String {
    let mut s = String::with_capacity(16 + namespace.len());
    s.push('4');
    s.push(kind);
    if namespace != ROOT {
        s.push_str(namespace);
        s.push(',');
    }
    s
}

fn json_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_owned())
}

/// The elements of a JSON array's text, without the brackets ("" if empty).
fn inner(array: &str) -> &str {
    let t = array.trim();
    t.strip_prefix('[').and_then(|t| t.strip_suffix(']')).map_or(t, str::trim)
}

/// Between a binary packet and each of its attachments (`b<base64>`), in
/// what the codec reads and writes: Engine.IO's payload separator, so a
/// polling response carries the packet as it is, and the transport turns
/// the attachments into binary frames on a WebSocket. JSON text never holds
/// this byte unescaped.
pub const ATTACHMENT_SEPARATOR: char = '\u{1e}';

/// `<type><n>-[<namespace>,]`: a binary packet's head.
fn binary_head(kind: char, namespace: &str, n: usize) -> String {
    let mut s = String::with_capacity(20 + namespace.len());
    s.push('4');
    s.push(kind);
    s.push_str(&n.to_string());
    s.push('-');
    if namespace != ROOT {
        s.push_str(namespace);
        s.push(',');
    }
    s
}

/// Appends attachments to a binary packet, each as `␞b<base64>`.
fn push_attachments(s: &mut String, attachments: &[Box<str>]) {
    for a in attachments {
        s.push(ATTACHMENT_SEPARATOR);
        s.push('b');
        s.push_str(a);
    }
}

/// An EVENT packet: `event` with the arguments of the JSON array `args`,
/// then `extra` (already JSON) if any, and an ack id if any; a BINARY_EVENT
/// followed by its attachments when there are any.
pub fn event_packet(
    namespace: &str,
    ack: Option<u64>,
    event: &str,
    args: &str,
    extra: Option<&str>,
    attachments: Option<&[Box<str>]>,
) -> String {
    let attachments = attachments.unwrap_or_default();
    let mut s =
        if attachments.is_empty() { head('2', namespace) } else { binary_head('5', namespace, attachments.len()) };
    if let Some(id) = ack {
        s.push_str(&id.to_string());
    }
    s.push('[');
    s.push_str(&json_str(event));
    let args = inner(args);
    if !args.is_empty() {
        s.push(',');
        s.push_str(args);
    }
    if let Some(x) = extra {
        s.push(',');
        s.push_str(x);
    }
    s.push(']');
    push_attachments(&mut s, attachments);
    s
}

impl SocketIo {
    /// The CONNECT answer: the socket's id and, for recovery, its `pid`.
    pub fn connected(namespace: &str, sid: &str, pid: Option<&str>) -> Utf8Bytes {
        let v = match pid {
            Some(pid) => serde_json::json!({ "sid": sid, "pid": pid }),
            None => serde_json::json!({ "sid": sid }),
        };
        Utf8Bytes::from(head('0', namespace) + &v.to_string())
    }

    /// CONNECT_ERROR with a message (`err.message` in socket.io-client).
    pub fn connect_error(namespace: &str, message: &str) -> Utf8Bytes {
        Utf8Bytes::from(head('4', namespace) + &serde_json::json!({ "message": message }).to_string())
    }

    /// DISCONNECT from the server: the client does not reconnect on its own.
    pub fn disconnect(namespace: &str) -> Utf8Bytes {
        Utf8Bytes::from(head('1', namespace))
    }

    /// An ACK with the arguments in the JSON array `args` (a BINARY_ACK
    /// followed by its attachments when there are any).
    pub fn ack(namespace: &str, ack: u64, args: &str, attachments: &[Box<str>]) -> Utf8Bytes {
        let head =
            if attachments.is_empty() { head('3', namespace) } else { binary_head('6', namespace, attachments.len()) };
        let mut s = format!("{head}{ack}[{}]", inner(args));
        push_attachments(&mut s, attachments);
        Utf8Bytes::from(s)
    }
}

/// A client's packet, parsed. Errors name what was wrong.
pub struct Packet<'a> {
    pub kind: u8,
    pub namespace: &'a str,
    pub ack: Option<u64>,
    pub json: &'a str,
    /// Attachments a binary packet (5, 6) announces.
    pub attachments: usize,
}

/// Parses a Socket.IO packet carried in an Engine.IO message (`4…`).
pub fn parse_packet(text: &str) -> Result<Packet<'_>, &'static str> {
    let p = text.strip_prefix('4').ok_or("not an Engine.IO message packet")?;
    let kind = *p.as_bytes().first().ok_or("empty Socket.IO packet")?;
    if !kind.is_ascii_digit() || kind > b'6' {
        return Err("unknown Socket.IO packet type");
    }
    let mut rest = &p[1..];
    let mut attachments = 0;
    if kind == b'5' || kind == b'6' {
        // Attachments count: `<n>-`.
        let i = rest.find('-').ok_or("a binary packet needs its attachment count")?;
        attachments = rest[..i].parse::<usize>().map_err(|_| "invalid attachment count")?;
        if attachments == 0 || attachments > super::MAX_ATTACHMENTS {
            return Err("invalid attachment count");
        }
        rest = &rest[i + 1..];
    }
    let mut namespace = ROOT;
    if rest.starts_with('/') {
        match rest.find(',') {
            Some(i) => {
                namespace = &rest[..i];
                rest = &rest[i + 1..];
            }
            None => {
                namespace = rest;
                rest = "";
            }
        }
    }
    if !valid_namespace(namespace) {
        return Err("invalid namespace");
    }
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    let ack = if digits > 0 { Some(rest[..digits].parse::<u64>().map_err(|_| "ack id out of range")?) } else { None };
    Ok(Packet { kind: kind - b'0', namespace, ack, json: &rest[digits..], attachments })
}

/// A hook's answer that is a binary ack: exactly `{"args": [...],
/// "attachments": ["<base64>", ...]}`.
fn binary_answer(answer: &RawValue) -> Option<(Box<RawValue>, super::Attachments)> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Binary {
        args: Box<RawValue>,
        attachments: Vec<String>,
    }
    let text = answer.get();
    if !text.trim_start().starts_with('{') || !text.contains("\"attachments\"") {
        return None;
    }
    let b: Binary = serde_json::from_str(text).ok()?;
    if !b.args.get().trim_start().starts_with('[') {
        return None;
    }
    Some((b.args, super::check_attachments(b.attachments).ok()?))
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError::bad_request(msg.into())
}

/// The event name and the other arguments (a JSON array) of an EVENT.
fn split_event(json: &str) -> Result<(String, Box<RawValue>), ApiError> {
    let items: Vec<&RawValue> =
        serde_json::from_str(json).map_err(|e| bad(format!("an EVENT's data must be a JSON array: {e}")))?;
    let (first, rest) = items.split_first().ok_or_else(|| bad("an EVENT needs an event name"))?;
    let event: String = serde_json::from_str(first.get()).map_err(|_| bad("the event name must be a string"))?;
    crate::protocol::check_event(&event)?;
    let args = format!("[{}]", rest.iter().map(|r| r.get()).collect::<Vec<_>>().join(","));
    let args = RawValue::from_string(args).map_err(|_| bad("invalid event arguments"))?;
    Ok((event, args))
}

impl Codec for SocketIo {
    type Id = AckId;
    type Own = SioRequest;
    const SLOT: usize = 1;

    fn welcome(&self, connection: &str, _: Option<&str>, _: &[Channel], _: &[(Channel, bool)]) -> Utf8Bytes {
        SocketIo::connected(ROOT, connection, None)
    }

    fn decode(&self, frame: Frame<'_>) -> Decoded<AckId, SioRequest> {
        let text = match frame {
            Frame::Text(t) => t,
            Frame::Binary(_) => {
                return Decoded { id: None, request: Ok(Request::Refuse("a binary frame outside a binary packet")) };
            }
        };
        // A binary packet comes with its attachments (`␞b<base64>` each).
        let (text, rest) = text.split_once(ATTACHMENT_SEPARATOR).unwrap_or((text, ""));
        let p = match parse_packet(text) {
            Ok(p) => p,
            Err(e) => return Decoded { id: None, request: Ok(Request::Refuse(e)) },
        };
        let attachments: Option<super::Attachments> = if p.attachments == 0 {
            if !rest.is_empty() {
                return Decoded { id: None, request: Ok(Request::Refuse("attachments after a text packet")) };
            }
            None
        } else {
            let list: Option<Vec<Box<str>>> =
                rest.split(ATTACHMENT_SEPARATOR).map(|a| a.strip_prefix('b').map(Box::from)).collect();
            match list {
                Some(list) if list.len() == p.attachments => Some(list.into()),
                _ => {
                    return Decoded {
                        id: None,
                        request: Ok(Request::Refuse("a binary packet without its attachments")),
                    };
                }
            }
        };
        let namespace: Arc<str> = Arc::from(p.namespace);
        let id = p.ack.map(|ack| AckId { namespace: namespace.clone(), ack });
        if let Err(e) = check_depth(p.json) {
            return Decoded { id, request: Err(e) };
        }
        let request = match p.kind {
            // A packet that cannot be parsed closes the connection, as the
            // reference server does (socket.io-parser's payload checks).
            0 => match p.json.trim() {
                "" => Ok(Request::Own(SioRequest::Connect { namespace, auth: None })),
                j if j.starts_with('{') => match RawValue::from_string(j.to_owned()) {
                    Ok(auth) => Ok(Request::Own(SioRequest::Connect { namespace, auth: Some(auth) })),
                    Err(_) => Ok(Request::Refuse("CONNECT data must be a JSON object")),
                },
                _ => Ok(Request::Refuse("CONNECT data must be a JSON object")),
            },
            1 if p.json.trim().is_empty() => Ok(Request::Own(SioRequest::Leave { namespace })),
            1 => Ok(Request::Refuse("a DISCONNECT carries no data")),
            2 | 5 => match split_event(p.json) {
                Ok((event, args)) => Ok(Request::Own(SioRequest::Emit {
                    namespace,
                    event: Arc::from(event),
                    args,
                    ack: p.ack.is_some(),
                    attachments,
                })),
                Err(e) if e.code == crate::error::ErrorCode::BadRequest && !p.json.trim_start().starts_with('[') => {
                    Ok(Request::Refuse("an EVENT must be a JSON array starting with the event name"))
                }
                Err(e) => Err(e),
            },
            // Parsed in full: the app gets these arguments back as a JSON
            // value (`/api/call`), so a number out of range is refused here.
            3 | 6 => match (p.ack, serde_json::from_str::<Vec<serde_json::Value>>(p.json)) {
                (Some(ack), Ok(_)) => match RawValue::from_string(p.json.to_owned()) {
                    Ok(args) => {
                        return Decoded {
                            id: None,
                            request: Ok(Request::Own(SioRequest::Ack { ack, args, attachments })),
                        };
                    }
                    Err(_) => Ok(Request::Refuse("an ACK needs an id and a JSON array")),
                },
                _ => Ok(Request::Refuse("an ACK needs an id and a JSON array")),
            },
            _ => Ok(Request::Refuse("CONNECT_ERROR is sent by servers only")),
        };
        Decoded { id, request }
    }

    const READS_WHILE_PENDING: bool = true;
    const PONG_DEADLINE: bool = true;

    fn is_answer(&self, frame: Frame<'_>) -> bool {
        matches!(frame, Frame::Text(t) if t.starts_with("43") || t.starts_with("46"))
    }

    fn reply_ok(&self, id: Option<&AckId>, result: Option<&RawValue>) -> Option<Utf8Bytes> {
        let id = id?;
        if let Some((args, attachments)) = result.and_then(binary_answer) {
            return Some(SocketIo::ack(&id.namespace, id.ack, args.get(), &attachments));
        }
        let args = match result.map(RawValue::get) {
            None => "[]".to_owned(),
            Some(r) if r.trim_start().starts_with('[') => r.to_owned(),
            Some(r) => format!("[{r}]"),
        };
        Some(SocketIo::ack(&id.namespace, id.ack, &args, &[]))
    }

    fn reply_err(&self, id: Option<&AckId>, err: &ApiError) -> Option<Utf8Bytes> {
        let id = id?;
        let v = serde_json::json!([{ "error": err.to_json() }]);
        Some(SocketIo::ack(&id.namespace, id.ack, &v.to_string(), &[]))
    }

    fn server_subscription(&self, _: &Channel, _: bool) -> Option<Utf8Bytes> {
        // Socket.IO clients are not told about rooms.
        None
    }

    fn call(&self, namespace: &str, event: &str, args: &str, attachments: &[Box<str>], ack: u64) -> Option<Utf8Bytes> {
        Some(Utf8Bytes::from(event_packet(namespace, Some(ack), event, args, None, Some(attachments))))
    }

    fn goodbye(&self, reason: CloseReason, channels: &std::collections::HashSet<Channel>) -> Vec<Utf8Bytes> {
        // The app's or the protocol's decision: tell the client not to come
        // back on its own. A drain, a slow consumer or an idle timeout are
        // not: it reconnects (elsewhere).
        if !matches!(reason, CloseReason::Disconnected | CloseReason::TokenExpired | CloseReason::Protocol) {
            return Vec::new();
        }
        channels
            .iter()
            .filter_map(|c| match split_channel(c) {
                (ns, None) => Some(SocketIo::disconnect(ns)),
                _ => None,
            })
            .collect()
    }

    fn encode_message(&self, msg: &Message) -> Utf8Bytes {
        let (namespace, room) = split_channel(&msg.channel);
        let room = json_str(room.unwrap_or(""));
        let s = match msg.kind {
            Kind::Publication => {
                let offset = msg.offset.as_ref().map(|o| json_str(&o.to_string()));
                match &msg.event {
                    Some(event) => event_packet(
                        namespace,
                        None,
                        event,
                        msg.data.as_str(),
                        offset.as_deref(),
                        msg.attachments.as_deref(),
                    ),
                    None => {
                        let args = format!("[{}]", msg.data.as_str());
                        event_packet(namespace, None, "message", &args, offset.as_deref(), None)
                    }
                }
            }
            Kind::Join => event_packet(namespace, None, "wsrelay:join", &format!("[{room},{}]", msg.data), None, None),
            Kind::Leave => {
                event_packet(namespace, None, "wsrelay:leave", &format!("[{room},{}]", msg.data), None, None)
            }
            Kind::Gap => event_packet(namespace, None, "wsrelay:gap", &format!("[{room}]"), None, None),
        };
        Utf8Bytes::from(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rooms_map_to_channels_and_back() {
        assert_eq!(room_channel("/", "user:1").unwrap().as_str(), "user:1");
        assert_eq!(room_channel("/chat", "r").unwrap().as_str(), "/chat#r");
        assert_eq!(split_channel("/chat#r"), ("/chat", Some("r")));
        assert_eq!(split_channel("/chat"), ("/chat", None));
        assert_eq!(split_channel("/"), ("/", None));
        assert_eq!(split_channel("user:1"), ("/", Some("user:1")));
    }

    #[test]
    fn packets_parse() {
        let p = parse_packet("42/chat,17[\"ev\",1]").unwrap();
        assert_eq!((p.kind, p.namespace, p.ack, p.json), (2, "/chat", Some(17), "[\"ev\",1]"));
        let p = parse_packet("40{\"token\":\"x\"}").unwrap();
        assert_eq!((p.kind, p.namespace, p.ack), (0, "/", None));
        assert!(parse_packet("49").is_err());
        assert!(parse_packet("2").is_err());
        assert!(parse_packet("4").is_err());
        assert!(parse_packet("42/a#b,[]").is_err());
    }

    #[test]
    fn acks_with_numbers_out_of_range_are_refused() {
        // Found by the fuzzer: valid raw JSON that no JSON value can hold.
        // (an ACK that cannot be parsed closes the connection)
        let d = SocketIo.decode(Frame::Text("431[4e524]"));
        assert!(matches!(d.request, Ok(Request::Refuse(_))));
        let d = SocketIo.decode(Frame::Text("431[4e5,\"x\"]"));
        assert!(matches!(d.request, Ok(Request::Own(SioRequest::Ack { ack: 1, .. }))));
    }

    #[test]
    fn events_encode_with_offset_last() {
        assert_eq!(
            event_packet("/", None, "ev", "[1,{\"a\":2}]", Some("\"e:3\""), None),
            "42[\"ev\",1,{\"a\":2},\"e:3\"]"
        );
        assert_eq!(event_packet("/chat", Some(4), "ev", "[]", None, None), "42/chat,4[\"ev\"]");
        let bin: Vec<Box<str>> = vec!["AQID".into()];
        assert_eq!(
            event_packet("/chat", None, "up", r#"[{"_placeholder":true,"num":0}]"#, None, Some(&bin)),
            "451-/chat,[\"up\",{\"_placeholder\":true,\"num\":0}]\u{1e}bAQID"
        );
        let (ev, args) = split_event("[\"hello\",1,[2]]").unwrap();
        assert_eq!((ev.as_str(), args.get()), ("hello", "[1,[2]]"));
    }
}
