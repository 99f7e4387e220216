//! wsrelay: a WebSocket relay that runs as a sidecar beside each replica of
//! a web app.
//!
//! How a message flows:
//!
//! 1. The app `POST`s `/api/publish` to its own sidecar ([`admin`]), or a
//!    client sends a `publish` frame ([`session`], authorized by [`auth`]).
//! 2. The frame the clients will receive is encoded once ([`protocol`]) and
//!    handed to the [`broker`]: in memory it goes straight to the hub; with
//!    Redis it is published once and every sidecar subscribed to the channel
//!    receives it on its single subscriber connection.
//! 3. Each node's [`hub`] hands the same bytes to the bounded queue of every
//!    local subscriber, and each [`session`] task writes its queue to its
//!    socket in batches.
//!
//! Everything else on the public listener is forwarded to the app
//! ([`proxy`]). [`server`] runs both listeners; [`run`] is the lifecycle,
//! from bound listeners to a drained exit.

pub mod admin;
pub mod auth;
pub mod broker;
pub mod config;
pub mod error;
pub mod hub;
pub mod metrics;
pub mod protocol;
pub mod proxy;
pub mod server;
pub mod session;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::info;

use crate::auth::Auth;
use crate::broker::{Broker, BrokerError, Interest};
use crate::config::Config;
use crate::error::CloseReason;
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::proxy::{Body, Proxy};

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

/// What every component of one relay shares.
pub(crate) struct Shared {
    pub cfg: Config,
    pub metrics: Arc<Metrics>,
    pub hub: Arc<Hub>,
    pub broker: Broker,
    pub auth: Auth,
    pub proxy: Proxy,
    /// Cancelled on SIGTERM: readyz turns 503, upgrades are refused,
    /// sessions close.
    pub drain: CancellationToken,
    pub sessions: TaskTracker,
    open: AtomicUsize,
    /// Hook paths, normalized once (see `is_hook_path`).
    hook_paths: Vec<String>,
}

impl Shared {
    /// Takes a connection slot under `--max-connections`.
    pub fn take_slot(&self) -> bool {
        let max = self.cfg.session.max_connections;
        let ok = self.open.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1)).is_ok();
        if ok {
            self.metrics.connections.inc();
        }
        ok
    }

    pub fn release_slot(&self) {
        self.open.fetch_sub(1, Ordering::AcqRel);
        self.metrics.connections.dec();
    }

    /// When a session closes after the drain starts: after `--shutdown-delay`,
    /// spread over 2 ms per open session, within 80 % of what is left of
    /// `--drain-timeout`, so a full replica does not send every client
    /// reconnecting at the same instant.
    pub fn drain_delay(&self) -> Duration {
        use rand::RngExt;
        let n = self.open.load(Ordering::Acquire) as u32;
        let room = self.cfg.drain_timeout.saturating_sub(self.cfg.shutdown_delay).mul_f64(0.8);
        let window = (Duration::from_millis(2) * n).min(room);
        if window.is_zero() {
            return self.cfg.shutdown_delay;
        }
        self.cfg.shutdown_delay + rand::rng().random_range(Duration::ZERO..window)
    }

    /// Whether a client request would reach a hook: the hook paths and
    /// everything starting with them, however spelled (case, `%`-escapes,
    /// `//`, `..`, trailing `/` or `.json`).
    fn is_hook_path(&self, path: &str) -> bool {
        if self.hook_paths.is_empty() {
            return false;
        }
        let path = proxy::normalized_path(path);
        self.hook_paths.iter().any(|h| path.starts_with(h.as_str()))
    }
}

async fn public(shared: Arc<Shared>, req: Request<Incoming>, remote: SocketAddr) -> Response<Body> {
    let path = req.uri().path();
    if shared.cfg.session.ws_paths.iter().any(|p| p == path) && proxy::is_upgrade(&req) {
        return session::upgrade::accept(shared, req, remote).await;
    }
    // Hooks trust what wsrelay sends them (the user id above all): a client
    // must not reach them through the proxy and claim to be someone else.
    if shared.is_hook_path(path) {
        return proxy::text(StatusCode::FORBIDDEN, "403 forbidden: reserved for wsrelay's hooks");
    }
    shared.proxy.forward(req, remote).await
}

/// Runs a relay on bound listeners until `shutdown` completes, then drains:
/// `/readyz` 503 at once, new upgrades refused, sessions closed with 1001
/// spread over the drain window, in-flight proxied requests finished.
pub async fn run(config: Config, listeners: Listeners, shutdown: impl Future<Output = ()>) -> Result<(), RunError> {
    let metrics = Arc::new(Metrics::new(&config.node_id)?);
    let interest = Broker::needs_interest(&config.broker).then(|| Arc::new(Interest::default()));
    let hub = Arc::new(Hub::new(interest.clone(), metrics.clone()));
    let background = CancellationToken::new();
    let broker =
        Broker::start(&config.broker, &config.node_id, hub.clone(), interest, metrics.clone(), background.clone())?;
    info!("{}", broker.describe());
    let client = proxy::client(&config.proxy);
    let proxy = Proxy::new(&config.proxy, client.clone(), metrics.clone());
    let auth = Auth::new(config.auth.clone(), client, config.proxy.upstream.clone(), metrics.clone());
    let public_addr = listeners.public.local_addr()?;
    let admin_addr = listeners.admin.local_addr()?;
    let drain_timeout = config.drain_timeout;
    let builder = server::builder(config.session.handshake_timeout);
    let hook_paths = config.auth.hook_paths().map(proxy::normalized_path).filter(|h| h != "/").collect();
    let shared = Arc::new(Shared {
        cfg: config,
        metrics,
        hub,
        broker,
        auth,
        proxy,
        drain: CancellationToken::new(),
        sessions: TaskTracker::new(),
        open: AtomicUsize::new(0),
        hook_paths,
    });
    info!(
        public = %public_addr,
        admin = %admin_addr,
        node = %shared.cfg.node_id,
        upstream = %shared.cfg.proxy.upstream,
        "listening"
    );

    let stop_public = CancellationToken::new();
    let stop_admin = CancellationToken::new();
    let s = shared.clone();
    let public_task = tokio::spawn(server::serve(
        listeners.public,
        builder.clone(),
        move |req, remote| public(s.clone(), req, remote),
        stop_public.clone(),
    ));
    let s = shared.clone();
    let admin_task = tokio::spawn(server::serve(
        listeners.admin,
        builder,
        move |req, _| admin::handle(s.clone(), req),
        stop_admin.clone(),
    ));

    shutdown.await;
    let deadline = tokio::time::Instant::now() + drain_timeout;
    info!(sessions = shared.hub.session_count(), timeout = ?drain_timeout, "draining");
    shared.drain.cancel();
    shared.sessions.close();
    let serve_on = tokio::time::sleep(shared.cfg.shutdown_delay);
    let _ = tokio::time::timeout_at(deadline, async { tokio::join!(shared.sessions.wait(), serve_on) }).await;

    // Sessions are gone; stop taking requests and let in-flight ones finish.
    stop_public.cancel();
    if let Ok(graceful) = public_task.await {
        let grace = deadline.max(tokio::time::Instant::now() + Duration::from_secs(1));
        if tokio::time::timeout_at(grace, graceful.shutdown()).await.is_err() {
            info!("drain timeout: in-flight requests cut");
        }
    }
    // Sessions that outlived the window (stuck writes) are told once more.
    for s in shared.hub.all_sessions() {
        s.kill(CloseReason::Shutdown);
    }
    let _ = tokio::time::timeout(Duration::from_secs(3), shared.sessions.wait()).await;
    // Tell the app about the clients just closed (best effort, bounded).
    shared.auth.flush(Duration::from_secs(2)).await;
    stop_admin.cancel();
    if let Ok(graceful) = admin_task.await {
        let _ = tokio::time::timeout(Duration::from_secs(1), graceful.shutdown()).await;
    }
    background.cancel();
    info!("stopped");
    Ok(())
}
