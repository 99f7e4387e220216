//! The HTTP body type of everything wsrelay sends or forwards, and the
//! small responses and bounded reads shared by the proxy, the hooks and the
//! admin API.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited, combinators::BoxBody};

/// The body type of every response wsrelay sends and every request it makes.
pub type Body = BoxBody<Bytes, hyper::Error>;

/// A complete body from bytes.
pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

pin_project_lite::pin_project! {
    /// A complete body that keeps a guard until it is sent or dropped.
    struct Holding<G> {
        #[pin]
        inner: Full<Bytes>,
        guard: G,
    }
}

impl<G> hyper::body::Body for Holding<G> {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// A complete body that keeps `guard` until hyper has taken it to send (or
/// dropped the response): over HTTP/2 that waits for the client's window.
pub fn full_holding<G: Send + Sync + 'static>(b: impl Into<Bytes>, guard: G) -> Body {
    Holding { inner: Full::new(b.into()), guard }.map_err(|never| match never {}).boxed()
}

/// A short plain-text response (errors of our own).
pub fn text(status: StatusCode, msg: &str) -> Response<Body> {
    let mut r = Response::new(full(format!("{msg}\n")));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}

/// Why a bounded body read failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("body larger than {0} bytes")]
    TooLarge(usize),
    #[error("cannot read body: {0}")]
    Io(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("body not received in time")]
    TimedOut,
    #[error("no room for the body now (the node's memory budget is used up)")]
    NoRoom,
}

/// Reads a whole body of at most `limit` bytes.
pub async fn read_limited<B>(body: B, limit: usize) -> Result<Bytes, ReadError>
where
    B: hyper::body::Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    match Limited::new(body, limit).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(ReadError::TooLarge(limit)),
        Err(e) => Err(ReadError::Io(e)),
    }
}

/// Reads a whole body of at most `limit` bytes, paced as proxied uploads
/// are ([`Progress`]): `timeout` after the last chunk, and no later than
/// `timeout` plus what the bytes so far earn at `min_rate` bytes/s. Cancel
/// safe (dropping the future drops what was read). `on_chunk` is told each
/// chunk's size before it is kept, and may refuse it (`Err` is returned).
pub async fn read_paced<B, F>(
    body: B,
    limit: usize,
    timeout: Duration,
    min_rate: usize,
    mut on_chunk: F,
) -> Result<Bytes, ReadError>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    F: FnMut(usize) -> Result<(), ReadError>,
{
    let progress = Progress::new(min_rate);
    let mut body = body;
    // The chunks as they came (slices of hyper's read buffer), joined once
    // at the end: no buffer grown by doubling, no copy for a single chunk.
    let mut chunks: Vec<Bytes> = Vec::new();
    let mut len = 0;
    loop {
        let frame = tokio::select! {
            f = body.frame() => f,
            () = tokio::time::sleep_until(progress.deadline(timeout).into()) => {
                if progress.deadline(timeout) <= Instant::now() {
                    return Err(ReadError::TimedOut);
                }
                continue;
            }
        };
        let Some(frame) = frame else { break };
        let Ok(data) = frame.map_err(|e| ReadError::Io(e.into()))?.into_data() else { continue };
        if len + data.len() > limit {
            return Err(ReadError::TooLarge(limit));
        }
        on_chunk(data.len())?;
        len += data.len();
        progress.touch(data.len());
        chunks.push(data);
    }
    Ok(match chunks.len() {
        0 => Bytes::new(),
        1 => chunks.swap_remove(0),
        _ => {
            let mut all = BytesMut::with_capacity(len);
            for c in chunks {
                all.extend_from_slice(&c);
            }
            all.freeze()
        }
    })
}

/// How a body moves: when the last chunk came and how much came, for a
/// deadline that a trickle cannot push back forever.
pub struct Progress {
    base: Instant,
    min_rate: u64,
    /// Nanoseconds after `base` of the last chunk.
    last: AtomicU64,
    /// Bytes so far.
    bytes: AtomicU64,
}

impl Progress {
    pub fn new(min_rate: usize) -> Self {
        Progress { base: Instant::now(), min_rate: min_rate as u64, last: AtomicU64::new(0), bytes: AtomicU64::new(0) }
    }

    pub fn touch(&self, bytes: usize) {
        let n = u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last.store(n, Ordering::Release);
        self.bytes.fetch_add(bytes as u64, Ordering::AcqRel);
    }

    /// `timeout` after the last progress, but no later than `timeout` plus
    /// the time the bytes so far earn at the minimum rate.
    pub fn deadline(&self, timeout: Duration) -> Instant {
        let last = self.base + Duration::from_nanos(self.last.load(Ordering::Acquire)) + timeout;
        if self.min_rate == 0 {
            return last;
        }
        let earned = Duration::from_secs_f64(self.bytes.load(Ordering::Acquire) as f64 / self.min_rate as f64);
        last.min(self.base + timeout + earned)
    }
}

/// The token of an `Authorization: Bearer <token>` header (scheme matched
/// without regard to case, as RFC 9110 §11.1 says), if there is one.
pub fn bearer_token(headers: &http::HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}
