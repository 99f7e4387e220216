//! Calls to the app's HTTP hooks: bounded by a semaphore per hook kind
//! (`--hook-concurrency` each, so message hooks cannot starve connect
//! hooks) and by `--hook-timeout` (which includes waiting for a permit),
//! measured, and failing closed: a hook that is down or late denies.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, StatusCode, Uri};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug};

use crate::body::{full, read_limited};
use crate::error::{ApiError, HookError};
use crate::metrics::Metrics;
use crate::upstream::{self, UpstreamClient};

/// Largest hook answer read, in bytes.
const MAX_HOOK_BODY: usize = 1024 * 1024;

/// Which hook: the `hook` label of the metrics, the `X-Wsrelay-Hook` header,
/// and the concurrency budget a call draws from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookKind {
    Connect,
    Subscribe,
    Publish,
    Message,
    Disconnect,
}

impl HookKind {
    const ALL: [HookKind; 5] =
        [HookKind::Connect, HookKind::Subscribe, HookKind::Publish, HookKind::Message, HookKind::Disconnect];

    pub fn label(self) -> &'static str {
        match self {
            HookKind::Connect => "connect",
            HookKind::Subscribe => "subscribe",
            HookKind::Publish => "publish",
            HookKind::Message => "message",
            HookKind::Disconnect => "disconnect",
        }
    }
}

/// A hook's answer.
pub struct HookResponse {
    pub status: StatusCode,
    pub body: Bytes,
}

/// On every hook call: which hook. wsrelay strips `x-wsrelay-*` headers from
/// proxied requests, so an app reached only through wsrelay can trust it.
pub const HOOK_HEADER: &str = "x-wsrelay-hook";
/// On every hook call when `--hook-secret` is set.
pub const SECRET_HEADER: &str = "x-wsrelay-hook-secret";

pub struct Hooks {
    client: UpstreamClient,
    secret: Option<HeaderValue>,
    upstream: Uri,
    timeout: Duration,
    /// One budget per [`HookKind`], indexed by its position in `ALL`.
    permits: [Arc<Semaphore>; 5],
    metrics: Arc<Metrics>,
}

impl Hooks {
    pub fn new(
        client: UpstreamClient,
        upstream: Uri,
        secret: Option<&crate::config::Secret>,
        timeout: Duration,
        concurrency: usize,
        metrics: Arc<Metrics>,
    ) -> Self {
        let secret = secret.and_then(|s| HeaderValue::from_str(s.expose()).ok()).map(|mut v| {
            v.set_sensitive(true);
            v
        });
        let permits = HookKind::ALL.map(|_| Arc::new(Semaphore::new(concurrency)));
        Hooks { client, secret, upstream, timeout, permits, metrics }
    }

    fn permits(&self, kind: HookKind) -> &Arc<Semaphore> {
        &self.permits[kind as usize]
    }

    /// POSTs a JSON body to `path` on the app. A failed call (not a refusal:
    /// any answer is a response) is `unavailable`, blamed on the app, and logged.
    pub async fn call(
        &self,
        kind: HookKind,
        path: &str,
        headers: HeaderMap,
        body: Vec<u8>,
    ) -> Result<HookResponse, ApiError> {
        self.call_with(kind, path, headers, body, None).await
    }

    /// As [`call`](Self::call), with a permit the caller already holds.
    async fn call_with(
        &self,
        kind: HookKind,
        path: &str,
        mut headers: HeaderMap,
        body: Vec<u8>,
        permit: Option<OwnedSemaphorePermit>,
    ) -> Result<HookResponse, ApiError> {
        let started = Instant::now();
        let result = tokio::time::timeout(self.timeout, async {
            let _permit = match permit {
                Some(p) => p,
                // The semaphores are never closed, so this cannot fail; if it
                // did, waiting out the timeout would be the honest answer.
                None => match self.permits(kind).clone().acquire_owned().await {
                    Ok(p) => p,
                    Err(_) => std::future::pending().await,
                },
            };
            let uri = upstream::uri(&self.upstream, path).map_err(|_| HookError::BadPath)?;
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
            headers.insert(HOOK_HEADER, HeaderValue::from_static(kind.label()));
            if let Some(secret) = &self.secret {
                headers.insert(SECRET_HEADER, secret.clone());
            }
            let mut req = Request::new(full(body));
            *req.method_mut() = Method::POST;
            *req.uri_mut() = uri;
            *req.headers_mut() = headers;
            let resp = self.client.request(req).await.map_err(HookError::Request)?;
            let status = resp.status();
            let body = read_limited(resp.into_body(), MAX_HOOK_BODY).await.map_err(|e| HookError::Body(Box::new(e)))?;
            Ok(HookResponse { status, body })
        })
        .await
        .unwrap_or(Err(HookError::Timeout(self.timeout)));
        let label = match &result {
            Ok(r) => r.status.as_str().to_owned(),
            Err(e) => e.label().to_owned(),
        };
        self.metrics.hook(kind.label(), &label, started.elapsed().as_secs_f64());
        result.map_err(|e| {
            let err = ApiError::from(e);
            err.log(kind.label());
            err
        })
    }
}

/// What the disconnect hook is told.
#[derive(Debug, serde::Serialize)]
pub struct DisconnectEvent {
    pub user: Option<String>,
    pub connection: String,
    pub reason: &'static str,
}

/// Best-effort delivery of disconnect notifications: a bounded queue, drained
/// by one task that POSTs each under the disconnect hook's budget. Overflow
/// is dropped and counted, never allowed to slow sessions down or grow
/// memory.
pub struct DisconnectNotifier {
    /// Taken by [`flush`](Self::flush): the queue then ends once drained.
    tx: Mutex<Option<mpsc::Sender<DisconnectEvent>>>,
    /// The queue's reader and every call in flight.
    tasks: TaskTracker,
    metrics: Arc<Metrics>,
}

impl DisconnectNotifier {
    pub fn start(hooks: Arc<Hooks>, path: String, queue: usize, metrics: Arc<Metrics>) -> Self {
        let (tx, mut rx) = mpsc::channel::<DisconnectEvent>(queue);
        let tasks = TaskTracker::new();
        let calls = tasks.clone();
        tasks.spawn(
            async move {
                while let Some(ev) = rx.recv().await {
                    // The permit is taken before spawning, so at most
                    // --hook-concurrency calls run and the queue is the only
                    // backlog.
                    let Ok(permit) = hooks.permits(HookKind::Disconnect).clone().acquire_owned().await else {
                        return;
                    };
                    let hooks = hooks.clone();
                    let path = path.clone();
                    let span = tracing::debug_span!("disconnect_hook", conn.id = %ev.connection);
                    calls.spawn(
                        async move {
                            let body = serde_json::to_vec(&ev).unwrap_or_default();
                            let r = hooks.call_with(HookKind::Disconnect, &path, HeaderMap::new(), body, Some(permit));
                            if let Ok(r) = r.await {
                                debug!(status = %r.status, "disconnect hook told");
                            }
                        }
                        .instrument(span),
                    );
                }
            }
            .instrument(tracing::info_span!("disconnect_hook_queue")),
        );
        DisconnectNotifier { tx: Mutex::new(Some(tx)), tasks, metrics }
    }

    pub fn notify(&self, ev: DisconnectEvent) {
        let tx = self.tx.lock().unwrap_or_else(PoisonError::into_inner);
        let sent = tx.as_ref().is_some_and(|tx| tx.try_send(ev).is_ok());
        if !sent {
            self.metrics.disconnect_hook_dropped.inc();
        }
    }

    /// Closes the queue and waits (at most `within`) for what it holds to be
    /// delivered, so a draining sidecar tells the app about the clients it
    /// closed.
    pub async fn flush(&self, within: Duration) {
        drop(self.tx.lock().unwrap_or_else(PoisonError::into_inner).take());
        self.tasks.close();
        let _ = tokio::time::timeout(within, self.tasks.wait()).await;
    }
}
