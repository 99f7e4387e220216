//! The `wsrelay.v1` wire format: JSON text frames, one object per frame.
//! Message frames are built by hand around the raw `data`, which is copied
//! once and never re-serialized.

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::value::RawValue;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use super::{Codec, Decoded, Frame, Kind, Message, Request};
use crate::channel::Channel;
use crate::error::ApiError;

/// The subprotocol clients may offer in `Sec-WebSocket-Protocol`.
pub const SUBPROTOCOL: &str = "wsrelay.v1";

/// The `wsrelay.v1` codec.
#[derive(Debug, Clone, Copy, Default)]
pub struct WsrelayV1;

impl Codec for WsrelayV1 {
    type Id = Box<RawValue>;
    type Own = super::NoOwn;
    const SLOT: usize = 0;

    fn welcome(
        &self,
        connection: &str,
        user: Option<&str>,
        channels: &[Channel],
        recovered: &[(Channel, bool)],
    ) -> Utf8Bytes {
        welcome(connection, user, channels, recovered)
    }

    fn decode(&self, frame: Frame<'_>) -> Decoded<Box<RawValue>> {
        match frame {
            Frame::Text(text) => parse_frame(text),
            Frame::Binary(_) => Decoded {
                id: None,
                request: Err(ApiError::bad_request("binary frames are not supported: send JSON text frames")),
            },
        }
    }

    fn reply_ok(&self, id: Option<&Box<RawValue>>, result: Option<&RawValue>) -> Option<Utf8Bytes> {
        Some(reply_ok(id.map(AsRef::as_ref), result))
    }

    fn reply_err(&self, id: Option<&Box<RawValue>>, err: &ApiError) -> Option<Utf8Bytes> {
        Some(reply_err(id.map(AsRef::as_ref), err))
    }

    fn server_subscription(&self, channel: &Channel, on: bool) -> Option<Utf8Bytes> {
        Some(event(if on { "subscribed" } else { "unsubscribed" }, channel, "{}"))
    }

    fn encode_message(&self, msg: &Message) -> Utf8Bytes {
        match msg.kind {
            Kind::Publication => {
                let offset = msg.offset.as_ref().map(ToString::to_string);
                match &msg.event {
                    // A named event reads as `{"event","args"}` data here, and
                    // a binary one with `"attachments"` (base64) besides.
                    Some(event) => {
                        let name = serde_json::to_string(&**event).unwrap_or_default();
                        let data = match &msg.attachments {
                            None => format!(r#"{{"event":{name},"args":{}}}"#, msg.data.as_str()),
                            Some(a) => {
                                let list = serde_json::to_string(&**a).unwrap_or_else(|_| "[]".to_owned());
                                format!(r#"{{"event":{name},"args":{},"attachments":{list}}}"#, msg.data.as_str())
                            }
                        };
                        message(&msg.channel, &data, offset.as_deref())
                    }
                    None => message(&msg.channel, msg.data.as_str(), offset.as_deref()),
                }
            }
            Kind::Join => event("join", &msg.channel, msg.data.as_str()),
            Kind::Leave => event("leave", &msg.channel, msg.data.as_str()),
            Kind::Gap => event("gap", &msg.channel, r#"{"recovered":false}"#),
        }
    }
}

#[derive(Deserialize)]
struct Loose {
    // Untyped here so that a field of the wrong type still leaves the `id`
    // readable: the error reply must carry it.
    #[serde(default)]
    op: Option<serde_json::Value>,
    #[serde(default, deserialize_with = "present")]
    id: Option<Box<RawValue>>,
    #[serde(default)]
    channel: Option<serde_json::Value>,
    #[serde(default)]
    since: Option<serde_json::Value>,
    // `present` so that `"data": null` is data, not a missing field.
    #[serde(default, deserialize_with = "present")]
    data: Option<Box<RawValue>>,
}

fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Box<RawValue>>, D::Error> {
    Box::<RawValue>::deserialize(d).map(Some)
}

/// Parses one text frame. Never fails: a bad frame becomes a request error
/// that the session answers with a `bad_request` reply.
pub fn parse_frame(text: &str) -> Decoded<Box<RawValue>> {
    let loose: Loose = match serde_json::from_str(text) {
        Ok(l) => l,
        Err(e) => {
            let msg = if e.is_data() {
                format!("frame must be a JSON object with an \"op\": {e}")
            } else {
                format!("frame is not valid JSON: {e}")
            };
            return Decoded { id: None, request: Err(ApiError::bad_request(msg)) };
        }
    };
    let id = loose.id;
    if let Some(raw) = &id {
        let s = raw.get();
        if !(s.starts_with('"') || s.starts_with(|c: char| c == '-' || c.is_ascii_digit())) {
            return Decoded { id: None, request: Err(ApiError::bad_request("\"id\" must be a number or a string")) };
        }
    }
    let request = (|| {
        let op = string(loose.op, "op")?;
        if let Some(d) = &loose.data {
            super::check_depth(d.get())?;
        }
        let channel = string(loose.channel, "channel");
        let need = |v: Result<Option<String>, ApiError>, field: &'static str| {
            let name = v?.ok_or_else(|| missing(field))?;
            Channel::try_from(name).map_err(|e| ApiError::bad_request(e.to_string()))
        };
        match op.as_deref() {
            None => Err(missing("op")),
            Some("subscribe") => {
                // Offsets are opaque strings; a number is taken as its text.
                let since = match loose.since {
                    Some(serde_json::Value::Number(n)) => Some(n.to_string()),
                    other => string(other, "since")?,
                };
                need(channel, "channel").map(|channel| Request::Subscribe { channel, since })
            }
            Some("unsubscribe") => need(channel, "channel").map(|channel| Request::Unsubscribe { channel }),
            Some("publish") => need(channel, "channel").and_then(|channel| {
                loose.data.ok_or_else(|| missing("data")).map(|data| Request::Publish { channel, data })
            }),
            Some("send") => loose.data.ok_or_else(|| missing("data")).map(|data| Request::Send { data }),
            Some("presence") => need(channel, "channel").map(|channel| Request::Presence { channel }),
            Some("ping") => Ok(Request::Ping),
            Some(other) => Err(ApiError::bad_request(format!(
                "unknown op {other:?}: expected subscribe, unsubscribe, publish, send, presence or ping"
            ))),
        }
    })();
    Decoded { id, request }
}

/// A field that must be a string when present.
fn string(v: Option<serde_json::Value>, field: &str) -> Result<Option<String>, ApiError> {
    match v {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(ApiError::bad_request(format!("\"{field}\" must be a string"))),
    }
}

fn missing(field: &str) -> ApiError {
    ApiError::bad_request(format!("missing field \"{field}\""))
}

fn encode<T: Serialize>(v: &T) -> Utf8Bytes {
    // Serializing our own frame types (strings, raw JSON, bools) cannot fail.
    match serde_json::to_string(v) {
        Ok(s) => Utf8Bytes::from(s),
        Err(_) => Utf8Bytes::from_static(
            r#"{"op":"reply","ok":false,"error":{"code":"internal","message":"encoding failed"}}"#,
        ),
    }
}

/// `{"op":"welcome","connection":…,"user":…,"channels":[…]}`
/// With `"recovered":{channel: bool}` when URL channels came with `since`.
pub fn welcome(connection: &str, user: Option<&str>, channels: &[Channel], recovered: &[(Channel, bool)]) -> Utf8Bytes {
    #[derive(Serialize)]
    struct Welcome<'a> {
        op: &'static str,
        connection: &'a str,
        user: Option<&'a str>,
        channels: Vec<&'a str>,
        #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
        recovered: std::collections::BTreeMap<&'a str, bool>,
    }
    encode(&Welcome {
        op: "welcome",
        connection,
        user,
        channels: channels.iter().map(AsRef::as_ref).collect(),
        recovered: recovered.iter().map(|(c, r)| (c.as_str(), *r)).collect(),
    })
}

#[derive(Serialize)]
struct Reply<'a> {
    op: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a RawValue>,
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    result: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<serde_json::Value>,
}

/// `{"op":"reply","id":…,"ok":true,"result":…}`
pub fn reply_ok(id: Option<&RawValue>, result: Option<&RawValue>) -> Utf8Bytes {
    encode(&Reply { op: "reply", id, ok: true, result, error: None })
}

/// `{"op":"reply","id":…,"ok":false,"error":{"code":…,"message":…}}`
pub fn reply_err(id: Option<&RawValue>, err: &ApiError) -> Utf8Bytes {
    encode(&Reply { op: "reply", id, ok: false, result: None, error: Some(err.to_json()) })
}

/// `{"op":"message","channel":…,"data":…}`, built by hand around the raw
/// data so the payload is copied once and never re-parsed.
pub fn message(channel: &str, data: &str, offset: Option<&str>) -> Utf8Bytes {
    let mut s = String::with_capacity(40 + channel.len() + data.len());
    s.push_str(r#"{"op":"message","channel":"#);
    push_json_str(&mut s, channel);
    s.push_str(r#","data":"#);
    s.push_str(data);
    if let Some(off) = offset {
        s.push_str(r#","offset":"#);
        push_json_str(&mut s, off);
    }
    s.push('}');
    Utf8Bytes::from(s)
}

/// `{"op":<op>,"channel":…,<the fields of the object `fields`>}`.
fn event(op: &str, channel: &str, fields: &str) -> Utf8Bytes {
    let mut s = String::with_capacity(32 + channel.len() + fields.len());
    s.push_str(r#"{"op":""#);
    s.push_str(op);
    s.push_str(r#"","channel":"#);
    push_json_str(&mut s, channel);
    let inner = fields.trim().strip_prefix('{').and_then(|f| f.strip_suffix('}')).unwrap_or("").trim();
    if !inner.is_empty() {
        s.push(',');
        s.push_str(inner);
    }
    s.push('}');
    Utf8Bytes::from(s)
}

fn push_json_str(out: &mut String, s: &str) {
    // Serializing a &str into a String cannot fail.
    if let Ok(q) = serde_json::to_string(s) {
        out.push_str(&q);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ops_and_reports_missing_fields() {
        let f = parse_frame(r#"{"op":"subscribe","channel":"room:1","id":7}"#);
        assert_eq!(f.id.as_ref().map(|r| r.get()), Some("7"));
        assert!(matches!(f.request, Ok(Request::Subscribe { ref channel, .. }) if channel.as_str() == "room:1"));

        let f = parse_frame(r#"{"op":"publish","channel":"a","data":null,"id":"x"}"#);
        assert!(matches!(f.request, Ok(Request::Publish { ref data, .. }) if data.get() == "null"));

        let f = parse_frame(r#"{"op":"publish","channel":"a","id":1}"#);
        let e = f.request.unwrap_err();
        assert!(e.message.contains("data"), "{e}");
        assert_eq!(f.id.unwrap().get(), "1");

        assert!(parse_frame("not json").request.is_err());
        assert!(parse_frame("[1,2]").request.is_err());
        assert!(parse_frame(r#"{"op":"dance"}"#).request.unwrap_err().message.contains("unknown op"));

        // A field of the wrong type is an error that still carries the id.
        let f = parse_frame(r#"{"op":"subscribe","channel":5,"id":9}"#);
        assert_eq!(f.id.unwrap().get(), "9");
        assert!(f.request.unwrap_err().message.contains("must be a string"));
        let f = parse_frame(r#"{"op":3,"id":"x"}"#);
        assert_eq!(f.id.unwrap().get(), "\"x\"");
        assert!(f.request.is_err());
        let f = parse_frame(r#"{"op":"subscribe","channel":"a","since":12}"#);
        assert!(matches!(f.request, Ok(Request::Subscribe { since: Some(ref s), .. }) if s == "12"));
    }

    #[test]
    fn bad_channel_is_a_bad_request_with_the_id() {
        let f = parse_frame(r#"{"op":"subscribe","channel":"a b","id":4}"#);
        assert_eq!(f.id.unwrap().get(), "4");
        assert!(f.request.unwrap_err().message.contains("channel name"));
    }

    #[test]
    fn message_frame_is_valid_json() {
        let f = message("room:1", r#"{"text":"hi \"you\""}"#, Some("3-0"));
        let v: serde_json::Value = serde_json::from_str(f.as_str()).unwrap();
        assert_eq!(v["data"]["text"], "hi \"you\"");
        assert_eq!(v["offset"], "3-0");
    }
}
