//! Both listeners: the accept loop (HTTP/1.1 with upgrades and HTTP/2
//! cleartext on one port, a deadline for the first request, graceful-
//! shutdown tracking of every connection so in-flight requests can finish
//! while draining) and the routing of each listener's requests.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, warn};

use crate::body::{Body, text};
use crate::node::Node;
use crate::proxy;

/// An HTTP server builder with our limits.
pub fn builder(header_timeout: Duration) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1().timer(TokioTimer::new()).header_read_timeout(header_timeout).max_headers(128);
    b.http2().timer(TokioTimer::new()).max_concurrent_streams(256).keep_alive_interval(Some(Duration::from_secs(30)));
    b
}

/// The public listener: relay upgrades on a ws-path, everything else to the
/// app, except the hook paths.
pub(crate) async fn public(node: Arc<Node>, req: Request<Incoming>, remote: SocketAddr) -> Response<Body> {
    let path = req.uri().path();
    if node.cfg.session.ws_paths.iter().any(|p| p == path) && proxy::is_upgrade(&req) {
        return crate::session::upgrade::accept(node, req, remote).await;
    }
    // Hooks trust what wsrelay sends them (the user id above all): a client
    // must not reach them through the proxy and claim to be someone else.
    if node.is_hook_path(path) {
        return text(StatusCode::FORBIDDEN, "403 forbidden: reserved for wsrelay's hooks");
    }
    node.proxy.forward(req, remote).await
}

/// Accepts connections until `stop`, serving each with `handler`. A
/// connection that has not sent a complete first request head within
/// `first_request` is closed (hyper's own header timeout starts only once
/// the HTTP version is known, and a silent socket would never get there).
/// Returns the tracker of the connections still open, to shut them down
/// gracefully.
pub async fn serve<F, Fut>(
    listener: TcpListener,
    builder: auto::Builder<TokioExecutor>,
    first_request: Duration,
    handler: F,
    stop: CancellationToken,
) -> GracefulShutdown
where
    F: Fn(Request<Incoming>, SocketAddr) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let graceful = GracefulShutdown::new();
    loop {
        let (stream, remote) = tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => match r {
                Ok(pair) => pair,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        let seen = Arc::new(AtomicBool::new(false));
        let saw = seen.clone();
        let svc = service_fn(move |req| {
            saw.store(true, Ordering::Relaxed);
            let handler = handler.clone();
            async move { Ok::<_, Infallible>(handler(req, remote).await) }
        });
        let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc).into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(
            async move {
                tokio::pin!(conn);
                let ended = tokio::select! {
                    r = &mut conn => Some(r),
                    _ = tokio::time::sleep(first_request) => None,
                };
                let result = match ended {
                    Some(r) => r,
                    None if !seen.load(Ordering::Relaxed) => {
                        debug!("no request within the handshake timeout: closed");
                        return;
                    }
                    None => conn.await,
                };
                if let Err(e) = result {
                    debug!(error = %e, "connection ended with an error");
                }
            }
            .instrument(tracing::debug_span!("conn", remote.addr = %remote)),
        );
    }
    graceful
}
