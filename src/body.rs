//! The HTTP body type of everything wsrelay sends or forwards, and the
//! small responses and bounded reads shared by the proxy, the hooks and the
//! admin API.

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited, combinators::BoxBody};

/// The body type of every response wsrelay sends and every request it makes.
pub type Body = BoxBody<Bytes, hyper::Error>;

/// A complete body from bytes.
pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
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

/// The token of an `Authorization: Bearer <token>` header (scheme matched
/// without regard to case, as RFC 9110 §11.1 says), if there is one.
pub fn bearer_token(headers: &http::HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}
