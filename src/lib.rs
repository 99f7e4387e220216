//! wsrelay: a WebSocket relay that runs as a sidecar beside each replica of
//! a web app.
//!
//! How a message flows:
//!
//! 1. The app `POST`s `/api/publish` to its own sidecar ([`admin`]), or a
//!    client sends a `publish` frame ([`session`], authorized by [`auth`]).
//!    Both go through the one publish path, [`node::Node::publish`], which
//!    builds one [`protocol::Message`] (a validated [`channel::Channel`] and
//!    the raw JSON data).
//! 2. The [`broker`] carries it to every node: in memory it goes straight
//!    to the hub; with Redis it is published once and every sidecar
//!    subscribed to the channel receives it on its single subscriber
//!    connection. The broker hands what it receives up through
//!    [`broker::BrokerEvents`] (wired here to the hub and to the Socket.IO
//!    front's python-socketio bridge).
//! 3. Each node's [`hub`] hands the same `Arc<Message>` to the bounded
//!    queue of every local subscriber; each [`session`] task has its
//!    protocol's codec frame it (once per protocol per message, shared) and
//!    writes its queue to its transport in batches: a WebSocket for
//!    wsrelay.v1, the Engine.IO transport of the [`socketio`] front
//!    (polling, then WebSocket) for Socket.IO.
//!
//! Everything else on the public listener is forwarded to the app
//! ([`proxy`]). [`server`] runs both listeners and routes their requests;
//! [`run`] is the lifecycle, from bound listeners to a drained exit.
//!
//! Dependencies point one way (a test keeps it so): `error`, `channel` →
//! `config`, `metrics` → `protocol`, `interest` → `hub` → `broker` →
//! `body`, `upstream` → `auth`, `proxy` → `node` → `session`, `admin` →
//! `socketio` (the fronts) → `server` → `lib`. A further client protocol
//! is a [`protocol::Codec`] in `protocol/`, a `session::ProtocolFront` for
//! its own requests, and its entry (an upgrade path, or a front folder like
//! `socketio/`); the session loop is shared and names no protocol.

pub mod admin;
pub mod auth;
pub mod body;
pub mod broker;
pub mod channel;
pub mod config;
pub mod error;
pub mod hub;
pub mod interest;
pub mod metrics;
pub mod node;
pub mod protocol;
pub mod proxy;
pub mod server;
pub mod session;
pub mod socketio;
pub mod upstream;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info};

use crate::auth::Auth;
use crate::broker::{Broker, BrokerError};
use crate::config::Config;
use crate::error::CloseReason;
use crate::hub::{Hub, HubLimits};
use crate::interest::Interest;
use crate::metrics::Metrics;
use crate::node::Node;
use crate::proxy::Proxy;

/// The two listeners, bound by the caller (tests bind port 0).
pub struct Listeners {
    pub public: TcpListener,
    pub admin: TcpListener,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("listener: {0}")]
    Io(#[from] std::io::Error),
}

/// What the broker reports, handed to this node's hub, and python-socketio's
/// messages to the Socket.IO front's bridge.
struct NodeEvents {
    node_id: String,
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    max_message_bytes: usize,
}

impl broker::BrokerEvents for NodeEvents {
    fn deliver(&self, m: &Arc<protocol::Message>) {
        self.hub.deliver(m);
    }

    fn command(&self, cmd: &protocol::commands::NodeCommand, replayed_at: Option<u64>) -> usize {
        self.hub.apply(cmd, replayed_at)
    }

    fn foreign(&self, payload: &[u8]) {
        socketio::bridge::apply(&self.hub, &self.metrics, payload, self.max_message_bytes);
    }

    fn query(&self, q: &protocol::commands::Query) -> Option<protocol::commands::CallAnswer> {
        node::answer_query(&self.hub, &self.node_id, q)
    }
}

/// Runs a relay on bound listeners until `shutdown` completes, then drains:
/// `/readyz` 503 at once, new upgrades refused, sessions closed with 1001
/// spread over the drain window, in-flight proxied requests finished.
pub async fn run(config: Config, listeners: Listeners, shutdown: impl Future<Output = ()>) -> Result<(), RunError> {
    let node_span = tracing::info_span!("node", node = %config.node_id);
    let metrics = Arc::new(Metrics::new(&config.node_id)?);
    let interest = Broker::needs_interest(&config.broker).then(|| Arc::new(Interest::default()));
    let limits = HubLimits {
        channels: config.session.max_channels,
        subscriptions: config.session.max_node_subscriptions,
        queued_bytes: config.session.max_queued_bytes,
    };
    let hub = Arc::new(Hub::new(interest.clone(), metrics.clone(), limits));
    let background = CancellationToken::new();
    let background_tasks = tokio_util::task::TaskTracker::new();
    let wiring = broker::Wiring {
        node_id: config.node_id.clone(),
        events: Arc::new(NodeEvents {
            node_id: config.node_id.clone(),
            hub: hub.clone(),
            metrics: metrics.clone(),
            max_message_bytes: config.broker.max_message_bytes,
        }),
        metrics: metrics.clone(),
        namespaces: config.namespaces.clone(),
        shutdown: background.clone(),
        tasks: background_tasks.clone(),
    };
    let broker = node_span.in_scope(|| Broker::start(&config.broker, wiring, interest))?;
    info!("{}", broker.describe());
    let client = upstream::client(&config.proxy);
    let proxy = Proxy::new(&config.proxy, client.clone(), metrics.clone());
    let auth =
        node_span.in_scope(|| Auth::new(config.auth.clone(), client, config.proxy.upstream.clone(), metrics.clone()));
    let public_addr = listeners.public.local_addr()?;
    let admin_addr = listeners.admin.local_addr()?;
    let drain_timeout = config.drain_timeout;
    let builder = server::builder(config.server.handshake_timeout);
    let public_limits = server::Limits {
        connections: config.server.max_http_connections,
        first_request: config.server.handshake_timeout,
        idle: config.server.http_idle_timeout,
    };
    let admin_limits = server::Limits { connections: config.server.max_admin_connections, ..public_limits };
    let advertise = config.advertise_url.clone().unwrap_or_else(|| config::default_advertise_url(public_addr));
    broker.advertise(&config.node_id, advertise, background.clone());
    let node = Arc::new(Node::new(config, metrics, hub, broker, auth, proxy));
    info!(
        public = %public_addr,
        admin = %admin_addr,
        node = %node.cfg.node_id,
        upstream = %node.cfg.proxy.upstream,
        "listening"
    );

    let stop_public = CancellationToken::new();
    let stop_admin = CancellationToken::new();
    let n = node.clone();
    let sio = Arc::new(socketio::Front::new(&node.cfg));
    let public_task = tokio::spawn(
        server::serve(
            listeners.public,
            builder.clone(),
            public_limits,
            move |req, remote| server::public(n.clone(), sio.clone(), req, remote),
            stop_public.clone(),
        )
        .instrument(tracing::info_span!(parent: &node_span, "public")),
    );
    let n = node.clone();
    let admin_task = tokio::spawn(
        server::serve(
            listeners.admin,
            builder,
            admin_limits,
            move |req, _| admin::handle(n.clone(), req),
            stop_admin.clone(),
        )
        .instrument(tracing::info_span!(parent: &node_span, "admin")),
    );

    shutdown.await;
    let deadline = tokio::time::Instant::now() + drain_timeout;
    info!(sessions = node.hub.session_count(), timeout = ?drain_timeout, "draining");
    node.drain.cancel();
    node.sessions.close();
    let serve_on = tokio::time::sleep(node.cfg.shutdown_delay);
    let _ = tokio::time::timeout_at(deadline, async { tokio::join!(node.sessions.wait(), serve_on) }).await;

    // Sessions are gone; stop taking requests and let in-flight ones finish.
    stop_public.cancel();
    if let Ok(graceful) = public_task.await {
        let grace = deadline.max(tokio::time::Instant::now() + Duration::from_secs(1));
        if tokio::time::timeout_at(grace, graceful.shutdown()).await.is_err() {
            info!("drain timeout: in-flight requests cut");
        }
    }
    // The app's own WebSockets (tunnels) go too: their clients reconnect elsewhere.
    node.proxy.close_tunnels(Duration::from_secs(1)).await;
    // Sessions that outlived the window (stuck writes) are told once more.
    for s in node.hub.all_sessions() {
        s.kill(CloseReason::Shutdown);
    }
    let _ = tokio::time::timeout(Duration::from_secs(3), node.sessions.wait()).await;
    // Tell the app about the clients just closed (best effort, bounded).
    node.auth.flush(Duration::from_secs(2)).await;
    stop_admin.cancel();
    if let Ok(graceful) = admin_task.await {
        let _ = tokio::time::timeout(Duration::from_secs(1), graceful.shutdown()).await;
    }
    background.cancel();
    // The broker's tasks end on that (the node's address is removed from
    // Redis on the way out); bounded, as Redis may be unreachable.
    background_tasks.close();
    let _ = tokio::time::timeout(Duration::from_secs(2), background_tasks.wait()).await;
    info!("stopped");
    Ok(())
}
