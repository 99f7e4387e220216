//! From an HTTP upgrade request to a running session. Everything that can
//! refuse a client happens here, before the `101`: a refused client gets a
//! plain HTTP status it can act on (400, 401, 403, 426, 503), not an opened
//! and immediately closed socket.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tracing::Instrument;

use super::Session;
use crate::auth::Action;
use crate::body::{Body, full, text};
use crate::channel::Channel;
use crate::error::{ApiError, ConnResult, Reject};
use crate::node::Node;
use crate::protocol::Codec;
use crate::protocol::wsrelay::{SUBPROTOCOL, WsrelayV1};

/// Bytes read from the socket per call; also the idle read buffer, which
/// tungstenite zero-fills before every read attempt. Small keeps idle
/// connections cheap (the 128 KiB default costs ~137 KB each; 4 KiB cost
/// ~3 KiB more than this) and wake-ups cheap; clients send small frames.
const READ_BUFFER: usize = 1024;
/// Bytes gathered before a write reaches the socket (a flush always writes).
const WRITE_BUFFER: usize = 16 * 1024;

/// `max_in`: the largest frame the client may send; `largest`: the largest
/// message the app may publish or answer with (`largest_message`).
pub(crate) fn ws_config(max_in: usize, largest: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        // Room for the buffer plus two of the largest frames we send (a
        // message's data and a hook's answer are both capped at
        // `largest`); beyond it a write fails instead of growing.
        .max_write_buffer_size(WRITE_BUFFER + 2 * (largest.max(max_in) + 1024))
        .max_message_size(Some(max_in))
        .max_frame_size(Some(max_in))
}

fn reject(node: &Node, r: &Reject) -> Response<Body> {
    node.metrics.connection_result(r.result);
    node.metrics.error(r.error.fault);
    r.error.log("upgrade refused");
    let mut resp = text(r.status, &r.error.message);
    if r.status == StatusCode::UPGRADE_REQUIRED {
        // RFC 6455 §4.4: name the version we speak.
        resp.headers_mut().insert(header::SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
    }
    resp
}

fn bad(msg: impl Into<String>) -> Reject {
    Reject::from(ApiError::bad_request(msg.into()))
}

/// Handles a WebSocket upgrade on a relay path.
pub(crate) async fn accept(node: Arc<Node>, mut req: Request<Incoming>, remote: SocketAddr) -> Response<Body> {
    let prepared = match prepare(&node, &req, remote).await {
        Ok(p) => p,
        Err(r) => return reject(&node, &r),
    };
    let Prepared { key, protocol, mut session, channels, since } = prepared;

    // Subscriptions are in place before the 101, so a client never sees a
    // welcome for channels that are not delivering.
    let recovered = match session.subscribe_initial(&channels, &since).await {
        Ok(r) => r,
        Err(e) => return reject(&node, &Reject::from(e)),
    };

    let on_upgrade = hyper::upgrade::on(&mut req);
    let welcome = session.codec.welcome(&session.handle.id, session.ident.user.as_deref(), &channels, &recovered);
    let span = tracing::info_span!(
        "session",
        conn.id = %session.handle.id,
        user = session.ident.user.as_deref().unwrap_or(""),
        remote.addr = %remote,
    );
    let ws_cfg = ws_config(node.cfg.session.max_message_bytes, node.cfg.session.largest_message);
    let handshake_timeout = node.cfg.session.handshake_timeout;
    let metrics = node.metrics.clone();
    node.sessions.spawn(
        async move {
            match tokio::time::timeout(handshake_timeout, on_upgrade).await {
                Ok(Ok(upgraded)) => {
                    metrics.connection_result(ConnResult::Accepted);
                    let ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(ws_cfg)).await;
                    tracing::debug!("session open");
                    session.run(ws, welcome).await;
                }
                _ => {
                    metrics.connection_result(ConnResult::HandshakeFailed);
                    tracing::debug!("upgrade did not complete");
                }
            }
        }
        .instrument(span),
    );

    switching(&key, protocol.then_some(SUBPROTOCOL))
}

/// The `101 Switching Protocols` answer to a WebSocket upgrade with `key`.
pub(crate) fn switching(key: &str, subprotocol: Option<&'static str>) -> Response<Body> {
    let mut resp = Response::new(full(bytes::Bytes::new()));
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(v) = HeaderValue::from_str(&derive_accept_key(key.as_bytes())) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    if let Some(p) = subprotocol {
        h.insert(header::SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(p));
    }
    resp
}

struct Prepared {
    key: String,
    protocol: bool,
    session: Session<WsrelayV1>,
    channels: Vec<Channel>,
    /// `since` of URL channels (`?channel=a&since=<offset>`).
    since: HashMap<Channel, String>,
}

async fn prepare(node: &Arc<Node>, req: &Request<Incoming>, remote: SocketAddr) -> Result<Prepared, Reject> {
    let h = req.headers();
    if req.method() != Method::GET {
        return Err(bad("WebSocket upgrades use GET"));
    }
    let is_websocket =
        h.get(header::UPGRADE).and_then(|v| v.to_str().ok()).is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    if !is_websocket {
        return Err(bad("expected Upgrade: websocket"));
    }
    if h.get(header::SEC_WEBSOCKET_VERSION).map(HeaderValue::as_bytes) != Some(b"13") {
        return Err(Reject::version());
    }
    let key = h
        .get(header::SEC_WEBSOCKET_KEY)
        .and_then(|v| v.to_str().ok())
        .filter(|k| !k.is_empty())
        .ok_or_else(|| bad("missing Sec-WebSocket-Key"))?
        .to_owned();
    if node.drain.is_cancelled() {
        return Err(Reject::draining());
    }
    node.auth.check_origin(h)?;
    let offered: Vec<&str> = h
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect();
    let protocol = offered.contains(&SUBPROTOCOL);
    if !offered.is_empty() && !protocol {
        return Err(bad(format!("unsupported subprotocol: offer {SUBPROTOCOL}")));
    }

    // Channels named in the URL, checked like a subscribe.
    let mut url_channels: Vec<Channel> = Vec::new();
    let mut since: HashMap<Channel, String> = HashMap::new();
    if let Some(q) = req.uri().query() {
        for (k, v) in form_urlencoded::parse(q.as_bytes()) {
            if k == "since" {
                // `since` recovers the channel named just before it.
                let Some(last) = url_channels.last() else {
                    return Err(bad("`since` must follow the `channel` it applies to"));
                };
                since.insert(last.clone(), v.into_owned());
                continue;
            }
            if k == "channel" {
                let c = Channel::parse(&v).map_err(|e| bad(e.to_string()))?;
                if !url_channels.contains(&c) {
                    url_channels.push(c);
                }
                if url_channels.len() > node.cfg.session.max_subscriptions {
                    return Err(bad("more channels in the URL than max-subscriptions"));
                }
            }
        }
    }

    let id = crate::channel::ConnectionId::mint(&node.cfg.node_id);
    let ident = node.auth.authenticate(req, remote, &id).await?;
    let slot = node.take_slot().ok_or_else(Reject::full)?;
    let (handle, rx) = node.hub.register(id.clone(), ident.user.clone(), node.cfg.session.client_queue);
    let ident = Arc::new(ident);
    // The session owns the slot and the registration from here: its Drop
    // gives both back whichever way this ends.
    let session = Session::new(node.clone(), WsrelayV1, handle, ident.clone(), slot, rx);

    // The limit is checked before any hook is asked about a URL channel.
    let url_channels: Vec<Channel> = url_channels.into_iter().filter(|c| !ident.channels.contains(c)).collect();
    let total = ident.channels.len() + url_channels.len();
    let max = node.cfg.session.max_subscriptions;
    if total > max {
        return Err(bad(format!("{total} channels requested, the limit is {max}")));
    }
    for ch in &url_channels {
        node.auth.authorize(Action::Subscribe, &ident, &id, ch, None).await?;
    }
    let channels = ident.channels.iter().cloned().chain(url_channels).collect();
    Ok(Prepared { key, protocol, session, channels, since })
}

/// wsrelay.v1 has no requests beyond the core's.
impl super::ProtocolFront for crate::protocol::wsrelay::WsrelayV1 {
    type Socket = ();

    fn handle(_: &mut Session<Self>, _: Option<Self::Id>, req: Self::Own) -> Option<super::Pending<Self::Id>> {
        match req {}
    }
}
