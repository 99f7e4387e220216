//! Membership and per-connection state for the app, across nodes: what
//! python-socketio's `rooms(sid)`, `manager.rooms` and `get_session` /
//! `save_session` answer in one process, without presence turned on.
//!
//! - `GET /api/connections/{id}`: the connection's channels (asked of its node).
//! - `GET /api/channels/{channel}/connections`: a channel's connections on
//!   every live node, with `complete: false` if one did not answer in time.
//! - `GET|PUT|DELETE /api/connections/{id}/session?namespace=/`: a small
//!   JSON value the app keeps per connection, readable by every worker of
//!   every replica (in the broker, for [`SESSION_TTL`] after the last write).

use http::{Method, Request};
use hyper::body::Incoming;
use serde_json::value::RawValue;

use super::{parse_json, read_body};
use crate::channel::{Channel, ConnectionId};
use crate::error::{ApiError, ErrorCode};
use crate::node::Node;

/// A session value's size, at most.
pub const MAX_SESSION_BYTES: usize = 64 * 1024;
/// How long a session value is kept after its last write.
pub const SESSION_TTL: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// The connection id of `/api/connections/{id}{suffix}`, if that is the path.
pub(super) fn connection_path<'a>(path: &'a str, suffix: &str) -> Option<&'a str> {
    path.strip_prefix("/api/connections/")?.strip_suffix(suffix).filter(|c| !c.is_empty() && !c.contains('/'))
}

fn checked(id: &str) -> Result<ConnectionId, ApiError> {
    ConnectionId::parse(id).ok_or_else(|| ApiError::bad_request(format!("{id:?} is not a connection id")))
}

pub(super) async fn rooms(node: &Node, id: &str) -> Result<serde_json::Value, ApiError> {
    let rooms = node.rooms_of(&checked(id)?).await?;
    Ok(serde_json::json!({ "connection": id, "channels": rooms }))
}

pub(super) async fn members(node: &Node, channel: &str) -> Result<serde_json::Value, ApiError> {
    let channel = percent_encoding::percent_decode_str(channel).decode_utf8_lossy();
    let channel = Channel::parse(&channel).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let (ids, complete) = node.members(&channel).await?;
    Ok(serde_json::json!({ "connections": ids, "complete": complete }))
}

pub(super) async fn session(node: &Node, id: &str, req: Request<Incoming>) -> Result<serde_json::Value, ApiError> {
    let id = checked(id)?;
    let namespace = req
        .uri()
        .query()
        .and_then(|q| form_urlencoded::parse(q.as_bytes()).find(|(k, _)| k == "namespace").map(|(_, v)| v.into_owned()))
        .unwrap_or_else(|| "/".to_owned());
    if !namespace.starts_with('/') || namespace.len() > 256 {
        return Err(ApiError::bad_request("\"namespace\" must start with / (at most 256 bytes)"));
    }
    let key = format!("session:{namespace}:{id}");
    match *req.method() {
        Method::GET => {
            let stored = node.broker.read_stash(&key).await?;
            let data = match stored {
                Some(s) => serde_json::from_str(&s).unwrap_or(serde_json::Value::Null),
                None => serde_json::Value::Null,
            };
            Ok(serde_json::json!({ "data": data }))
        }
        Method::PUT => {
            let body = read_body(req, MAX_SESSION_BYTES + 64).await?;
            #[derive(serde::Deserialize)]
            #[serde(deny_unknown_fields)]
            struct Put {
                data: Box<RawValue>,
            }
            let put: Put = parse_json(&body)?;
            if put.data.get().len() > MAX_SESSION_BYTES {
                return Err(ApiError::new(
                    ErrorCode::TooLarge,
                    format!("a session is at most {MAX_SESSION_BYTES} bytes"),
                ));
            }
            node.broker.stash(&key, put.data.get().to_owned(), SESSION_TTL).await?;
            Ok(serde_json::json!({}))
        }
        Method::DELETE => {
            node.broker.drop_stash(&key).await?;
            Ok(serde_json::json!({}))
        }
        _ => Err(ApiError::bad_request("use GET, PUT or DELETE")),
    }
}
