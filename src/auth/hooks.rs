//! Calls to the app's HTTP hooks: bounded by a semaphore (`--hook-concurrency`)
//! and by `--hook-timeout` (which includes waiting for a permit), measured,
//! and failing closed: a hook that is down or late denies.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Limited};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tracing::{Instrument, debug, warn};

use crate::metrics::Metrics;
use crate::proxy::{UpstreamClient, full};

/// Largest hook answer read, in bytes.
const MAX_HOOK_BODY: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("hook did not answer within {0:?}")]
    Timeout(Duration),
    #[error("hook unreachable: {0}")]
    Unreachable(String),
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
    permits: Arc<Semaphore>,
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
        Hooks { client, secret, upstream, timeout, permits: Arc::new(Semaphore::new(concurrency)), metrics }
    }

    /// POSTs a JSON body to `path` on the app. `name` labels the metrics.
    pub async fn call(
        &self,
        name: &'static str,
        path: &str,
        headers: HeaderMap,
        body: Vec<u8>,
    ) -> Result<HookResponse, HookError> {
        self.call_with(name, path, headers, body, None).await
    }

    /// As [`call`](Self::call), with a permit the caller already holds.
    async fn call_with(
        &self,
        name: &'static str,
        path: &str,
        mut headers: HeaderMap,
        body: Vec<u8>,
        permit: Option<OwnedSemaphorePermit>,
    ) -> Result<HookResponse, HookError> {
        let started = Instant::now();
        let result = tokio::time::timeout(self.timeout, async {
            let _permit = match permit {
                Some(p) => p,
                None => self
                    .permits
                    .clone()
                    .acquire_owned()
                    .await
                    .map_err(|_| HookError::Unreachable("shutting down".into()))?,
            };
            let mut parts = self.upstream.clone().into_parts();
            parts.path_and_query = Some(path.parse().map_err(|e| HookError::Unreachable(format!("bad path: {e}")))?);
            let uri = Uri::from_parts(parts).map_err(|e| HookError::Unreachable(e.to_string()))?;
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
            headers.insert(HOOK_HEADER, HeaderValue::from_static(name));
            if let Some(secret) = &self.secret {
                headers.insert(SECRET_HEADER, secret.clone());
            }
            let mut req = Request::new(full(body));
            *req.method_mut() = Method::POST;
            *req.uri_mut() = uri;
            *req.headers_mut() = headers;
            let resp = self.client.request(req).await.map_err(|e| HookError::Unreachable(e.to_string()))?;
            let status = resp.status();
            let body = Limited::new(resp.into_body(), MAX_HOOK_BODY)
                .collect()
                .await
                .map_err(|e| HookError::Unreachable(format!("reading the answer: {e}")))?
                .to_bytes();
            Ok(HookResponse { status, body })
        })
        .await
        .unwrap_or(Err(HookError::Timeout(self.timeout)));
        let label = match &result {
            Ok(r) => r.status.as_str().to_owned(),
            Err(HookError::Timeout(_)) => "timeout".to_owned(),
            Err(HookError::Unreachable(_)) => "error".to_owned(),
        };
        self.metrics.hook(name, &label, started.elapsed().as_secs_f64());
        if let Err(e) = &result {
            warn!(hook = name, error = %e, "hook failed");
        }
        result
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
/// by one task that POSTs each under the hook semaphore. Overflow is dropped
/// and counted, never allowed to slow sessions down or grow memory.
pub struct DisconnectNotifier {
    tx: mpsc::Sender<DisconnectEvent>,
    /// Notifications queued or in flight.
    pending: Arc<AtomicUsize>,
    metrics: Arc<Metrics>,
}

/// Counts a notification done when dropped, however its task ends.
struct Done(Arc<AtomicUsize>);

impl Drop for Done {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl DisconnectNotifier {
    pub fn start(hooks: Arc<Hooks>, path: String, queue: usize, metrics: Arc<Metrics>) -> Self {
        let (tx, mut rx) = mpsc::channel::<DisconnectEvent>(queue);
        let pending = Arc::new(AtomicUsize::new(0));
        let counter = pending.clone();
        tokio::spawn(
            async move {
                while let Some(ev) = rx.recv().await {
                    let done = Done(counter.clone());
                    // The permit is taken before spawning, so at most
                    // --hook-concurrency calls run and the queue is the only
                    // backlog.
                    let Ok(permit) = hooks.permits.clone().acquire_owned().await else {
                        return;
                    };
                    let hooks = hooks.clone();
                    let path = path.clone();
                    tokio::spawn(async move {
                        let _done = done;
                        let body = serde_json::to_vec(&ev).unwrap_or_default();
                        let r = hooks.call_with("disconnect", &path, HeaderMap::new(), body, Some(permit)).await;
                        if let Ok(r) = r {
                            debug!(status = %r.status, connection = %ev.connection, "disconnect hook told");
                        }
                    });
                }
            }
            .instrument(tracing::info_span!("disconnect_hook")),
        );
        DisconnectNotifier { tx, pending, metrics }
    }

    pub fn notify(&self, ev: DisconnectEvent) {
        self.pending.fetch_add(1, Ordering::AcqRel);
        if self.tx.try_send(ev).is_err() {
            self.pending.fetch_sub(1, Ordering::AcqRel);
            self.metrics.disconnect_hook_dropped.inc();
        }
    }

    /// Waits (at most `within`) for queued notifications to be delivered,
    /// so a draining sidecar tells the app about the clients it closed.
    pub async fn flush(&self, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        while self.pending.load(Ordering::Acquire) > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
