//! The Socket.IO path over HTTP: opening Engine.IO sessions, polling GETs
//! and POSTs, WebSocket upgrades, and forwarding to the sidecar that holds
//! a session.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use tokio_tungstenite::tungstenite::{Message as WsMessage, Utf8Bytes};
use tracing::Instrument;

use super::Front;
use super::connect::{Start, socket};
use super::engineio::{Busy, Payload, Poll, PollError, Taken};
use super::transport::Eio;
use crate::body::{Body, ReadError, full, full_holding, read_paced};
use crate::channel::node_of;
use crate::error::{ConnResult, Reject};
use crate::hub::Held;
use crate::node::Node;
use crate::session::transport::Transport;
use crate::session::transport::Ws;

/// Marks a request one sidecar forwarded to another (never forwarded again).
const FORWARDED: &str = "x-wsrelay-forwarded";
/// Bytes of packets a polling session holds for the client's next GET.
const POLL_BUFFER: usize = 64 * 1024;
/// Bytes of the open request a socket keeps for its connect hook: its URL,
/// `Cookie`, `Authorization`, `Origin`, `Host` and `X-Forwarded-*`.
const MAX_KEPT_HEAD: usize = 8 * 1024;

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
pub(crate) async fn handle(
    node: Arc<Node>,
    front: Arc<Front>,
    req: Request<Incoming>,
    remote: SocketAddr,
) -> Response<Body> {
    let q = query(&req);
    if q.eio.as_deref() != Some("4") {
        return eio_error(5, "Unsupported protocol version");
    }
    let websocket = match q.transport.as_deref() {
        Some("polling") => false,
        Some("websocket") => true,
        _ => return eio_error(0, "Transport unknown"),
    };
    // A transport the operator switched off is unknown, as in Engine.IO.
    let allowed = node.cfg.session.socketio.as_ref().is_none_or(|c| if websocket { c.websocket } else { c.polling });
    if !allowed {
        return eio_error(0, "Transport unknown");
    }
    if websocket && !is_websocket(&req) {
        return eio_error(3, "Bad request");
    }
    match q.sid {
        None => {
            if req.method() != Method::GET {
                return eio_error(2, "Bad handshake method");
            }
            open(node, front, req, remote, websocket).await
        }
        Some(sid) => {
            let Some(owner) = node_of(&sid) else { return unknown_sid() };
            if owner != node.cfg.node_id {
                return forward(&node, req, remote, owner).await;
            }
            let Some(poll) = front.polls.get(&sid) else {
                // A WebSocket for a session that upgraded already (or is
                // gone): it opens and is closed, as from the reference server.
                return if websocket { refuse_upgrade(&node, req) } else { unknown_sid() };
            };
            if websocket {
                return probe(&node, req, poll);
            }
            match *req.method() {
                Method::GET => poll_get(&node, &front, &poll).await,
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
async fn open(
    node: Arc<Node>,
    front: Arc<Front>,
    mut req: Request<Incoming>,
    remote: SocketAddr,
    websocket: bool,
) -> Response<Body> {
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
    let opening = match front.polls.try_open(client_ip(&node, &req, remote)) {
        Ok(o) => o,
        Err(Busy::Node) => return refused(&node, &Reject::full()),
        Err(Busy::Address) => return refused(&node, &Reject::busy_address()),
    };
    let Some(slot) = node.take_slot() else { return refused(&node, &Reject::full()) };
    // The Engine.IO sid is this client's secret (polling requests and the
    // upgrade are authorized by it); the connection id (`socket.id`) is
    // public (rooms, presence, the app). Both name the node.
    let eio_sid: Arc<str> = Arc::from(crate::channel::engineio_sid(&node.cfg.node_id));
    let sid = crate::channel::ConnectionId::mint(&node.cfg.node_id);
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
        return crate::session::upgrade::switching(&key, None);
    }
    // What waits for a GET is bounded well below maxPayload: beyond it the
    // session's own queue fills and a client that does not poll is closed
    // as a slow consumer, like a WebSocket that does not read.
    let max_payload = node.cfg.session.socketio.as_ref().map_or(1_000_000, |c| c.max_payload);
    let cap = max_payload.min(POLL_BUFFER);
    let (poll, end) = Poll::new(eio_sid.clone(), cap, super::max_message_bytes(&node.cfg), max_payload);
    front.polls.insert(poll.clone());
    let eio = Eio::polling(node.clone(), front, poll, end);
    let upgrades = node.cfg.session.socketio.as_ref().is_none_or(|c| c.websocket);
    let open = open_packet(&node, &eio_sid, upgrades);
    node.sessions.spawn(socket(node.clone(), eio, start).instrument(span));
    plain(StatusCode::OK, open)
}

/// Completes the WebSocket upgrade of a new session and sends the open packet.
async fn open_websocket(node: Arc<Node>, on_upgrade: hyper::upgrade::OnUpgrade, open: String) -> Option<Eio> {
    let Ok(Ok(up)) = tokio::time::timeout(node.cfg.session.handshake_timeout, on_upgrade).await else {
        node.metrics.connection_result(ConnResult::HandshakeFailed);
        return None;
    };
    let cfg = crate::session::upgrade::ws_config(super::max_message_bytes(&node.cfg), node.cfg.session.largest_message);
    let ws = WebSocketStream::from_raw_socket(TokioIo::new(up), Role::Server, Some(cfg)).await;
    let mut eio = Eio::websocket(node, ws);
    if eio.feed(WsMessage::Text(Utf8Bytes::from(open))).await.is_err() || eio.flush().await.is_err() {
        return None;
    }
    Some(eio)
}

/// A polling GET: what the session queued (or a noop after a while). The
/// response keeps the session's GET mark until it is sent.
async fn poll_get(node: &Node, front: &Front, poll: &Arc<Poll>) -> Response<Body> {
    /// Armed while the GET waits: dropped armed, the client is gone.
    struct Waiting<'a>(Option<&'a Poll>);
    impl Drop for Waiting<'_> {
        fn drop(&mut self) {
            if let Some(p) = self.0 {
                p.abandon();
            }
        }
    }
    let wait = node.cfg.session.ping_interval + Duration::from_secs(5);
    let mut waiting = Waiting(Some(poll));
    let taken = poll.get(wait).await;
    waiting.0 = None;
    match taken {
        Ok((Taken::Payload(p), getting)) => plain_holding(StatusCode::OK, p, getting),
        Ok((Taken::Closed, _)) => {
            front.polls.remove(&poll.sid);
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

/// Answers a WebSocket upgrade with 101 and, once the socket is upgraded
/// (within the handshake timeout), runs `then` with it in a tracked task.
fn upgrade_then<F, Fut>(node: &Node, mut req: Request<Incoming>, then: F) -> Response<Body>
where
    F: FnOnce(Ws) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let Some(key) = req.headers().get(header::SEC_WEBSOCKET_KEY).and_then(|v| v.to_str().ok()).map(str::to_owned)
    else {
        return eio_error(3, "missing Sec-WebSocket-Key");
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    let timeout = node.cfg.session.handshake_timeout;
    let cfg = crate::session::upgrade::ws_config(super::max_message_bytes(&node.cfg), node.cfg.session.largest_message);
    node.sessions.spawn(async move {
        let Ok(Ok(up)) = tokio::time::timeout(timeout, on_upgrade).await else { return };
        then(WebSocketStream::from_raw_socket(TokioIo::new(up), Role::Server, Some(cfg)).await).await;
    });
    crate::session::upgrade::switching(&key, None)
}

/// A WebSocket for a session that cannot take one (upgraded already, or
/// gone): it opens and is closed at once, as the reference server does (an
/// HTTP 400 is an error event to `ws` clients, not a close).
fn refuse_upgrade(node: &Node, req: Request<Incoming>) -> Response<Body> {
    let timeout = node.cfg.session.handshake_timeout;
    upgrade_then(node, req, move |mut ws| async move {
        let frame = CloseFrame { code: CloseCode::Policy, reason: Utf8Bytes::from_static("Session ID unknown") };
        let _ = tokio::time::timeout(timeout, ws.close(Some(frame))).await;
    })
}

/// The WebSocket upgrade of a polling session: `2probe` → `3probe`, the
/// waiting GET gets a noop, then `5` hands the socket to the session.
fn probe(node: &Node, req: Request<Incoming>, poll: Arc<Poll>) -> Response<Body> {
    if !poll.can_upgrade() {
        return refuse_upgrade(node, req);
    }
    let timeout = node.cfg.session.handshake_timeout;
    upgrade_then(node, req, move |mut ws| async move {
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
    })
}
