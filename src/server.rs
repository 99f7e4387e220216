//! Both listeners: the accept loop (HTTP/1.1 with upgrades and HTTP/2
//! cleartext on one port, a deadline for the first request, graceful-
//! shutdown tracking of every connection so in-flight requests can finish
//! while draining) and the routing of each listener's requests.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use http::{HeaderName, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, warn};

use crate::body::{Body, text};
use crate::node::Node;
use crate::proxy;

/// hyper's HTTP/1 read buffer, per connection: room for a request head
/// (headers up to 32 KiB, as nginx's default 4 × 8 KiB) and body reads of
/// that size. hyper's default (~400 KiB) let every connection that
/// uploads fast hold 400 KiB (issue 16: 200 stalled polling POSTs).
const READ_BUFFER: usize = 32 * 1024;

/// An HTTP server builder with our limits.
pub fn builder(header_timeout: Duration) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1().timer(TokioTimer::new()).header_read_timeout(header_timeout).max_headers(128).max_buf_size(READ_BUFFER);
    b.http2().timer(TokioTimer::new()).max_concurrent_streams(256).keep_alive_interval(Some(Duration::from_secs(30)));
    b
}

/// The public listener: relay upgrades on a ws-path, everything else to the
/// app, except the hook paths.
pub(crate) async fn public(
    node: Arc<Node>,
    sio: Arc<crate::socketio::Front>,
    mut req: Request<Incoming>,
    remote: SocketAddr,
) -> Response<Body> {
    // What a client says about the original request (its address, scheme,
    // host) is believed only from a trusted reverse proxy: anyone else
    // could poison links, logs and the origin check.
    if !node.cfg.server.is_trusted(remote.ip()) {
        let forged: Vec<HeaderName> = req
            .headers()
            .keys()
            .filter(|k| k.as_str().starts_with("x-forwarded-") || *k == http::header::FORWARDED)
            .cloned()
            .collect();
        for k in forged {
            req.headers_mut().remove(k);
        }
    }
    let path = req.uri().path();
    if node.cfg.session.socketio.as_ref().is_some_and(|s| s.matches(path)) {
        return crate::socketio::handle(node, sio, req, remote).await;
    }
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

/// Limits of one listener.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections at most; more wait in the kernel's backlog.
    pub connections: usize,
    /// From accept to a complete first request head.
    pub first_request: Duration,
    /// No request in flight for this long closes the connection.
    pub idle: Duration,
}

/// When a connection last had a request in flight, and how many it has.
struct Activity {
    base: Instant,
    /// Milliseconds after `base`.
    last: AtomicU64,
    in_flight: AtomicUsize,
    seen: AtomicBool,
    /// Woken when a request starts or ends: the deadline moved.
    changed: Notify,
}

impl Activity {
    fn new() -> Self {
        Activity {
            base: Instant::now(),
            last: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            seen: AtomicBool::new(false),
            changed: Notify::new(),
        }
    }
    fn touch(&self) {
        let ms = u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(ms, Ordering::Relaxed);
    }
    /// The moment the connection may be closed, if nothing happens before.
    fn deadline(&self, limits: &Limits) -> Option<Instant> {
        if !self.seen.load(Ordering::Relaxed) {
            return Some(self.base + limits.first_request);
        }
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        Some(self.base + Duration::from_millis(self.last.load(Ordering::Relaxed)) + limits.idle)
    }
}

/// A request in flight, until its response body is done (streams included).
struct InFlight(Arc<Activity>);

impl InFlight {
    fn start(a: &Arc<Activity>) -> Self {
        a.seen.store(true, Ordering::Relaxed);
        a.in_flight.fetch_add(1, Ordering::AcqRel);
        a.touch();
        a.changed.notify_one();
        InFlight(a.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.0.changed.notify_one();
    }
}

pin_project_lite::pin_project! {
    /// A response body that keeps its request counted as in flight.
    struct Tracked {
        #[pin]
        inner: Body,
        _req: InFlight,
    }
}

impl hyper::body::Body for Tracked {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, hyper::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Accepts connections until `stop`, serving each with `handler`, within
/// `limits`: at most `connections` at once (the rest wait in the backlog),
/// a complete first request head within `first_request` (hyper's own
/// header timeout starts only once the HTTP version is known, and a silent
/// socket or a partial HTTP/2 preface would never get there), and no more
/// than `idle` without a request in flight (HTTP/1 keep-alive and HTTP/2,
/// whose pings would otherwise keep it open forever). Returns the tracker
/// of the connections still open, to shut them down gracefully.
pub async fn serve<F, Fut>(
    listener: TcpListener,
    builder: auto::Builder<TokioExecutor>,
    limits: Limits,
    handler: F,
    stop: CancellationToken,
) -> GracefulShutdown
where
    F: Fn(Request<Incoming>, SocketAddr) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(limits.connections));
    loop {
        let permit = tokio::select! {
            _ = stop.cancelled() => break,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
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
        let activity = Arc::new(Activity::new());
        let act = activity.clone();
        let svc = service_fn(move |req| {
            let req_guard = InFlight::start(&act);
            let handler = handler.clone();
            async move {
                let resp = handler(req, remote).await;
                // Not boxed again: hyper takes the wrapper as it is.
                Ok::<_, Infallible>(resp.map(|inner| Tracked { inner, _req: req_guard }))
            }
        });
        let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc).into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(
            async move {
                let _permit = permit;
                tokio::pin!(conn);
                loop {
                    let deadline = activity.deadline(&limits);
                    let wait = async {
                        match deadline {
                            Some(d) => tokio::time::sleep_until(d.into()).await,
                            // In flight: look again in a while.
                            None => tokio::time::sleep(limits.idle).await,
                        }
                    };
                    tokio::select! {
                        r = &mut conn => {
                            if let Err(e) = r {
                                debug!(error = %e, "connection ended with an error");
                            }
                            return;
                        }
                        () = activity.changed.notified() => {}
                        () = wait => {
                            // Still past its deadline (nothing happened meanwhile)?
                            if activity.deadline(&limits).is_some_and(|d| d <= Instant::now()) {
                                let first = !activity.seen.load(Ordering::Relaxed);
                                debug!(first_request = first, "connection closed: no request in time");
                                return;
                            }
                        }
                    }
                }
            }
            .instrument(tracing::debug_span!("conn", remote.addr = %remote)),
        );
    }
    graceful
}
