//! Downstream → upstream forwarding: every request that is not a relay
//! upgrade goes to the app with its body streamed both ways (SSE, large
//! uploads), hop-by-hop headers removed, `X-Forwarded-*` set, over pooled
//! connections. WebSocket upgrades on other paths are tunnelled to the app.
//! The app failing never takes the sidecar down: refused → 502, too slow →
//! 504, with a short plain-text body.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, warn};

use crate::body::{Body, Progress, full, text};
use crate::config::ProxyConfig;
use crate::metrics::Metrics;
use crate::upstream::{self, UpstreamClient, set_forwarded};

pub struct Proxy {
    client: UpstreamClient,
    upstream: Uri,
    timeout: Duration,
    min_upload_rate: usize,
    tunnel_idle: Duration,
    metrics: Arc<Metrics>,
    /// Every open tunnel, so the drain can close and wait for them.
    tunnels: TaskTracker,
    close_tunnels: CancellationToken,
}

/// Headers some routers take as the request's real path.
const REWRITE_HEADERS: [&str; 2] = ["x-original-url", "x-rewrite-url"];

/// Headers that describe one hop, never forwarded (RFC 9110 §7.6.1).
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("proxy-connection"),
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Removes hop-by-hop headers, including every header `Connection` names,
/// and `Upgrade` unless the request is being tunnelled.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        if keep_upgrade && name == header::UPGRADE {
            continue;
        }
        headers.remove(name);
    }
    if !keep_upgrade {
        headers.remove(header::UPGRADE);
    }
}

/// HTTP/2 may split `cookie` into several fields; HTTP/1.1 wants one, joined
/// with "; " (RFC 9113 §8.2.3).
fn join_cookies(headers: &mut HeaderMap) {
    let all: Vec<&str> = headers.get_all(header::COOKIE).iter().filter_map(|v| v.to_str().ok()).collect();
    if all.len() > 1 {
        if let Ok(v) = HeaderValue::from_str(&all.join("; ")) {
            headers.insert(header::COOKIE, v);
        }
    }
}

/// True for an HTTP/1.1 `Connection: upgrade` request carrying `Upgrade`.
pub fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade")))
}

impl Proxy {
    pub fn new(cfg: &ProxyConfig, client: UpstreamClient, metrics: Arc<Metrics>) -> Self {
        Proxy {
            client,
            upstream: cfg.upstream.clone(),
            timeout: cfg.timeout,
            min_upload_rate: cfg.min_upload_rate,
            tunnel_idle: cfg.tunnel_idle_timeout,
            metrics,
            tunnels: TaskTracker::new(),
            close_tunnels: CancellationToken::new(),
        }
    }

    /// Closes every tunnel (the drain: the app's own WebSockets reconnect
    /// to another replica) and waits for them, at most `within`.
    pub async fn close_tunnels(&self, within: Duration) {
        self.close_tunnels.cancel();
        self.tunnels.close();
        let _ = tokio::time::timeout(within, self.tunnels.wait()).await;
    }

    /// Forwards one request and returns the app's response (or 502/504).
    pub async fn forward(&self, req: Request<Incoming>, remote: SocketAddr) -> Response<Body> {
        self.forward_to(&self.upstream.clone(), req, remote, None, self.timeout).await
    }

    /// Forwards one request to `base` (the app, or another sidecar with a
    /// `mark` header added after the client's `x-wsrelay-*` are removed),
    /// waiting up to `timeout` for the response headers.
    pub async fn forward_to(
        &self,
        base: &http::Uri,
        mut req: Request<Incoming>,
        remote: SocketAddr,
        mark: Option<(HeaderName, HeaderValue)>,
        timeout: Duration,
    ) -> Response<Body> {
        let started = Instant::now();
        // Only WebSocket upgrades are tunnelled: a tunnel is opaque, and an
        // `h2c` upgrade would carry requests past every check of ours.
        let upgrade = is_upgrade(&req)
            && req
                .headers()
                .get(header::UPGRADE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
        let downstream_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));

        let (mut parts, body) = req.into_parts();
        // HTTP/2 carries the host in the URI, HTTP/1.1 in the Host header.
        let host = parts
            .headers
            .get(header::HOST)
            .cloned()
            .or_else(|| parts.uri.authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok()));
        strip_hop_by_hop(&mut parts.headers, upgrade);
        if upgrade {
            parts.headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }
        // Hooks carry x-wsrelay-* headers; a client must not be able to forge
        // them. X-Original-URL / X-Rewrite-URL make some routers (IIS,
        // Symfony, Spring) route by the header instead of the path: a way
        // around the hook-path guard.
        let ours: Vec<HeaderName> = parts
            .headers
            .keys()
            .filter(|k| k.as_str().starts_with("x-wsrelay-") || REWRITE_HEADERS.contains(&k.as_str()))
            .cloned()
            .collect();
        for k in ours {
            parts.headers.remove(k);
        }
        if let Some((k, v)) = mark {
            parts.headers.insert(k, v);
        }
        if parts.version == Version::HTTP_2 {
            join_cookies(&mut parts.headers);
        }
        set_forwarded(&mut parts.headers, remote, host.clone());
        if let Some(h) = host {
            parts.headers.insert(header::HOST, h);
        }
        let pq = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        parts.uri = match upstream::uri(base, pq) {
            Ok(u) => u,
            Err(_) => return self.done(text(StatusCode::BAD_REQUEST, "bad request target"), started),
        };
        parts.version = Version::HTTP_11;
        let progress = Arc::new(Progress::new(self.min_upload_rate));
        let body = Watched { inner: body, progress: progress.clone() };
        let upstream_req = Request::from_parts(parts, body.boxed());

        let mut resp = match self.with_deadline(self.client.request(upstream_req), &progress, timeout).await {
            Err(_) => {
                return self.done(
                    text(StatusCode::GATEWAY_TIMEOUT, "504 gateway timeout: the app did not answer in time"),
                    started,
                );
            }
            Ok(Err(e)) => {
                debug!(error = %e, connect = e.is_connect(), "upstream request failed");
                return self.done(text(StatusCode::BAD_GATEWAY, "502 bad gateway: the app is unreachable"), started);
            }
            Ok(Ok(r)) => r,
        };

        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            if let Some(down) = downstream_upgrade {
                let up = hyper::upgrade::on(&mut resp);
                let t = tunnel(down, up, self.tunnel_idle, self.close_tunnels.clone(), self.metrics.clone());
                self.tunnels.spawn(t.instrument(tracing::debug_span!("tunnel", remote.addr = %remote)));
                let (parts, _) = resp.into_parts();
                return self.done(Response::from_parts(parts, full(Bytes::new())), started);
            }
        }
        strip_hop_by_hop(resp.headers_mut(), false);
        self.done(resp.map(BodyExt::boxed), started)
    }

    /// Waits for the app's response headers. The clock starts again at every
    /// chunk of request body the app reads, so an upload that takes minutes
    /// is fine while it moves; but it must move at `--upstream-min-upload-rate`
    /// on average, or a client trickling a byte now and then would hold the
    /// request (and a connection to the app) forever.
    async fn with_deadline<F: std::future::Future>(
        &self,
        fut: F,
        progress: &Progress,
        timeout: Duration,
    ) -> Result<F::Output, ()> {
        tokio::pin!(fut);
        loop {
            let deadline = progress.deadline(timeout);
            tokio::select! {
                out = &mut fut => return Ok(out),
                _ = tokio::time::sleep_until(deadline.into()) => {
                    if progress.deadline(timeout) <= Instant::now() {
                        return Err(());
                    }
                }
            }
        }
    }

    fn done(&self, resp: Response<Body>, started: Instant) -> Response<Body> {
        self.metrics.upstream(resp.status(), started.elapsed().as_secs_f64());
        resp
    }
}

pin_project_lite::pin_project! {
    /// The downstream request body, noting each chunk the app takes.
    struct Watched {
        #[pin]
        inner: Incoming,
        progress: Arc<Progress>,
    }
}

impl hyper::body::Body for Watched {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if let std::task::Poll::Ready(r) = &polled {
            let n = match r {
                Some(Ok(frame)) => frame.data_ref().map_or(0, Bytes::len),
                _ => 0,
            };
            this.progress.touch(n);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Copies bytes both ways between the client and the app after an upgrade,
/// until either side closes, nothing moves for `idle`, or the drain.
async fn tunnel(
    down: hyper::upgrade::OnUpgrade,
    up: hyper::upgrade::OnUpgrade,
    idle: Duration,
    close: CancellationToken,
    metrics: Arc<Metrics>,
) {
    let (down, up) = match tokio::try_join!(down, up) {
        Ok(pair) => pair,
        Err(e) => {
            warn!(error = %e, "upgrade tunnel failed to start");
            return;
        }
    };
    metrics.tunnels.inc();
    let moved = Arc::new(Progress::new(0));
    let mut down = Counted { inner: TokioIo::new(down), moved: moved.clone() };
    let mut up = Counted { inner: TokioIo::new(up), moved: moved.clone() };
    let copy = tokio::io::copy_bidirectional(&mut down, &mut up);
    tokio::pin!(copy);
    loop {
        tokio::select! {
            r = &mut copy => {
                if let Err(e) = r {
                    debug!(error = %e, "upgrade tunnel ended with an error");
                }
                break;
            }
            _ = tokio::time::sleep_until(moved.deadline(idle).into()) => {
                if moved.deadline(idle) <= Instant::now() {
                    debug!("upgrade tunnel idle: closed");
                    break;
                }
            }
            _ = close.cancelled() => {
                debug!("upgrade tunnel closed by the drain");
                break;
            }
        }
    }
    metrics.tunnels.dec();
}

pin_project_lite::pin_project! {
    /// A tunnel's stream, noting when bytes move in either direction.
    struct Counted<S> {
        #[pin]
        inner: S,
        moved: Arc<Progress>,
    }
}

impl<S: tokio::io::AsyncRead> tokio::io::AsyncRead for Counted<S> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let r = this.inner.poll_read(cx, buf);
        if buf.filled().len() > before {
            this.moved.touch(buf.filled().len() - before);
        }
        r
    }
}

impl<S: tokio::io::AsyncWrite> tokio::io::AsyncWrite for Counted<S> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.project().inner.poll_write(cx, buf)
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}
