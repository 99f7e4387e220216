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
//!   to it are kept (a [`trail::Trail`]) for `--socketio-recovery-window` after it
//!   ends; a client reconnecting with that `pid` (and the last offset it
//!   saw) rejoins the rooms and gets what it missed where history is kept.
//!
//! Layout: [`http`] takes the requests on the path (opening sessions,
//! polling, upgrades, forwarding), [`engineio`] holds what a polling
//! session's requests and its transport share, [`transport`] is the
//! Engine.IO transport the session loop reads and writes, [`connect`] runs
//! a socket's CONNECT (authentication, recovery) and then the loop, and
//! [`trail`] is the recovery state, and [`bridge`] applies python-socketio's
//! Redis manager messages (which the broker hands up). The codec is
//! `crate::protocol::socketio`.

pub mod bridge;
pub(crate) mod connect;
pub mod engineio;
pub(crate) mod http;
pub(crate) mod requests;
pub(crate) mod trail;
pub(crate) mod transport;

pub(crate) use http::handle;

use crate::config::Config;

/// The Socket.IO front of a node: the Engine.IO sessions it holds.
pub struct Front {
    pub(crate) polls: engineio::Registry,
}

/// The largest packet a Socket.IO client may send
/// (`--socketio-max-message-bytes`, else `--max-message-bytes`).
pub(crate) fn max_message_bytes(cfg: &Config) -> usize {
    cfg.session.socketio.as_ref().map_or(cfg.session.max_message_bytes, |s| s.max_message_bytes)
}

impl Front {
    pub fn new(cfg: &Config) -> Self {
        let per_address = cfg.session.socketio.as_ref().map_or(16, |s| s.opening_per_address);
        Front { polls: engineio::Registry::new((cfg.session.max_connections / 4).max(16), per_address) }
    }
}
