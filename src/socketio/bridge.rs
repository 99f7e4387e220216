//! python-socketio's Redis manager as a publisher (`--socketio-redis-channel`).
//!
//! An app that keeps `socketio.AsyncRedisManager(url, write_only=True)`
//! publishes its emits and room changes as JSON on one Redis channel
//! (python-socketio ≥ 5.14). Every node subscribes to it and applies each
//! message to its own sockets, as python-socketio's servers do: an emit
//! reaches the local sockets in its rooms, `enter_room`/`leave_room` and
//! `disconnect` act on the socket if it is here. Emits that arrive this way
//! are not kept in history (publish with `/api/publish` for that).
//!
//! Pickled messages (python-socketio before 5.14) are refused and counted:
//! unpickling executes code, and is never done.

use std::sync::Arc;

use serde::Deserialize;
use serde_json::value::RawValue;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::channel::ConnectionId;
use crate::hub::{Hub, NodeCommand, Target, now_us};
use crate::metrics::Metrics;
use crate::protocol::socketio::{ROOT, namespace_channel, room_channel};
use crate::protocol::{Message, check_depth, check_event};

/// A room, or several (python-socketio accepts a list).
#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn list(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

#[derive(Deserialize)]
struct PyMessage {
    method: String,
    #[serde(default)]
    event: Option<String>,
    #[serde(default)]
    data: Option<Box<RawValue>>,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    room: Option<OneOrMany>,
    #[serde(default)]
    skip_sid: Option<OneOrMany>,
    #[serde(default)]
    sid: Option<String>,
    /// `data` is `[<arguments with placeholders>, <base64 attachment>…]`.
    #[serde(default)]
    binary: bool,
}

/// Applies one message from python-socketio's channel to this node's
/// sockets. Returns the method label it was counted under.
/// An emit larger than `max_bytes` (`--max-message-bytes`, as the event's
/// name and arguments) is dropped and counted, never sent: a frame over the
/// limit would be refused by the clients (and close WebSocket ones).
pub fn apply(hub: &Hub, metrics: &Metrics, payload: &[u8], max_bytes: usize) -> &'static str {
    let label = apply_inner(hub, payload, max_bytes);
    if label == "too_large" {
        metrics.dropped_too_large.inc();
    }
    metrics.socketio_bridge.with_label_values(&[label]).inc();
    label
}

/// A binary emit's `data`: `[<arguments with placeholders>, "<base64>", …]`.
fn binary_data(data: &RawValue) -> Option<(Box<RawValue>, crate::protocol::Attachments)> {
    let items: Vec<Box<RawValue>> = serde_json::from_str(data.get()).ok()?;
    let (first, rest) = items.split_first()?;
    let rest: Vec<String> = rest.iter().map(|r| serde_json::from_str(r.get())).collect::<Result<_, _>>().ok()?;
    Some((first.clone(), crate::protocol::check_attachments(rest).ok()?))
}

fn apply_inner(hub: &Hub, payload: &[u8], max_bytes: usize) -> &'static str {
    if payload.first() == Some(&0x80) {
        tracing::warn!(
            "a pickled message on the python-socketio channel was ignored: upgrade python-socketio to 5.14 or \
             later (JSON); wsrelay never unpickles"
        );
        return "refused";
    }
    let msg: PyMessage = match serde_json::from_slice(payload) {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!(error = %e, "a malformed message on the python-socketio channel was ignored");
            return "refused";
        }
    };
    let namespace = msg.namespace.unwrap_or_else(|| ROOT.to_owned());
    let room = |r: &str| room_channel(&namespace, r).ok();
    match msg.method.as_str() {
        "emit" => {
            let Some(event) = msg.event.filter(|e| check_event(e).is_ok()) else { return "refused" };
            let (data, attachments) = match msg.data {
                Some(d) if msg.binary => match binary_data(&d) {
                    Some((args, attachments)) => (Some(args), Some(attachments)),
                    None => return "refused",
                },
                d => (d, None),
            };
            // Since python-socketio 5.15.1 `data` is the list of arguments;
            // before, a list meant several arguments too, anything else one.
            let args = match data {
                Some(d) if d.get().trim_start().starts_with('[') => d.get().to_owned(),
                Some(d) => format!("[{}]", d.get()),
                None => "[]".to_owned(),
            };
            if check_depth(&args).is_err() {
                return "refused";
            }
            let attached: usize = attachments.iter().flat_map(|a| a.iter()).map(|x| x.len()).sum();
            if args.len() + event.len() + attached > max_bytes {
                tracing::warn!(
                    bytes = args.len(),
                    max_bytes,
                    "a python-socketio emit over max-message-bytes was dropped"
                );
                return "too_large";
            }
            let channels: Vec<_> = match msg.room {
                Some(r) => r.list().iter().filter_map(|r| room(r)).collect(),
                None => namespace_channel(&namespace).ok().into_iter().collect(),
            };
            let Some(first) = channels.first().cloned() else { return "refused" };
            let skip = msg.skip_sid.map(OneOrMany::list).unwrap_or_default();
            let m = Message::new(first, Utf8Bytes::from(args), None, now_us())
                .with_event(Some(Arc::from(event)))
                .with_attachments(attachments);
            hub.deliver_many(&channels, &Arc::new(m), &skip);
            "emit"
        }
        "enter_room" | "leave_room" => {
            let (Some(sid), Some(Some(channel))) = (msg.sid, msg.room.map(|r| r.list().first().and_then(|r| room(r))))
            else {
                return "refused";
            };
            let label = if msg.method == "enter_room" { "enter_room" } else { "leave_room" };
            // A sid that is no connection id names no socket of ours.
            let Some(sid) = ConnectionId::parse(&sid) else { return label };
            let target = Target::Connection(sid);
            let cmd = if msg.method == "enter_room" {
                NodeCommand::Subscribe { target, channel }
            } else {
                NodeCommand::Unsubscribe { target, channel }
            };
            hub.apply(&cmd, None);
            label
        }
        "close_room" => {
            let Some(Some(channel)) = msg.room.map(|r| r.list().first().and_then(|r| room(r))) else {
                return "refused";
            };
            for s in hub.subscribers(&channel) {
                let cmd =
                    NodeCommand::Unsubscribe { target: Target::Connection(s.id.clone()), channel: channel.clone() };
                hub.apply(&cmd, None);
            }
            "close_room"
        }
        "disconnect" => {
            let Some(sid) = msg.sid else { return "refused" };
            if let Some(sid) = ConnectionId::parse(&sid) {
                hub.disconnect(&Target::Connection(sid));
            }
            "disconnect"
        }
        // Acknowledgements for python-socketio servers: none here.
        "callback" => "callback",
        _ => "unknown",
    }
}
