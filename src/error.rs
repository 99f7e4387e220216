//! The one place where failures become what a client or the app sees: reply
//! error codes, HTTP statuses of the admin API, and WebSocket close codes.

use std::borrow::Cow;

use http::StatusCode;

/// Error codes of the `wsrelay.v1` protocol and of the admin API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// Not JSON, unknown op, missing or malformed field, bad channel name.
    BadRequest,
    /// Admin API only: missing or wrong bearer token.
    Unauthorized,
    /// Authorization refused the operation.
    Forbidden,
    NotFound,
    TooLarge,
    RateLimited,
    /// A per-connection limit (subscriptions) is reached.
    LimitExceeded,
    /// An operation this build or configuration does not offer.
    NotSupported,
    /// The broker (or a hook the operation depends on) is unreachable.
    Unavailable,
    Internal,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not_found",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::LimitExceeded => "limit_exceeded",
            ErrorCode::NotSupported => "not_supported",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            ErrorCode::BadRequest => StatusCode::BAD_REQUEST,
            ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorCode::Forbidden => StatusCode::FORBIDDEN,
            ErrorCode::NotFound => StatusCode::NOT_FOUND,
            ErrorCode::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::RateLimited | ErrorCode::LimitExceeded => StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::NotSupported => StatusCode::NOT_IMPLEMENTED,
            ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// An error as a client or the app sees it: a code and a human message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {message}", code.as_str())]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: Cow<'static, str>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<Cow<'static, str>>) -> Self {
        Self { code, message: message.into() }
    }
    pub fn bad_request(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(ErrorCode::BadRequest, message)
    }
    pub fn forbidden(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(ErrorCode::Forbidden, message)
    }
    pub fn unavailable(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(ErrorCode::Unavailable, message)
    }

    /// `{"code":…,"message":…}`
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({ "code": self.code.as_str(), "message": self.message })
    }
}

/// Why a session ended: decides the close code sent, the reason text and the
/// `wsrelay_disconnects_total{reason}` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum CloseReason {
    /// The client closed or went away.
    Client = 1,
    /// Its outbound queue overflowed: it could not keep up.
    SlowConsumer,
    /// It sent a frame over `--max-message-bytes`.
    TooLarge,
    /// It kept sending over `--client-rate`.
    RateLimited,
    /// Nothing heard from it (not even a pong) for `--idle-timeout`.
    IdleTimeout,
    /// It broke the WebSocket protocol.
    Protocol,
    /// The app asked for it (`/api/disconnect`).
    Disconnected,
    /// The sidecar is shutting down.
    Shutdown,
    /// The socket failed (reset, write error).
    Error,
}

impl CloseReason {
    pub const ALL: [CloseReason; 9] = [
        CloseReason::Client,
        CloseReason::SlowConsumer,
        CloseReason::TooLarge,
        CloseReason::RateLimited,
        CloseReason::IdleTimeout,
        CloseReason::Protocol,
        CloseReason::Disconnected,
        CloseReason::Shutdown,
        CloseReason::Error,
    ];

    pub fn from_u8(v: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|r| *r as u8 == v)
    }

    pub fn label(self) -> &'static str {
        match self {
            CloseReason::Client => "client",
            CloseReason::SlowConsumer => "slow_consumer",
            CloseReason::TooLarge => "too_large",
            CloseReason::RateLimited => "rate_limited",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::Protocol => "protocol_error",
            CloseReason::Disconnected => "disconnected",
            CloseReason::Shutdown => "shutdown",
            CloseReason::Error => "error",
        }
    }

    /// The close frame to send, if one is sent at all.
    pub fn close_frame(self) -> Option<(u16, &'static str)> {
        match self {
            CloseReason::Client | CloseReason::Error => None,
            CloseReason::SlowConsumer => Some((1013, "slow consumer: messages arrived faster than read")),
            CloseReason::TooLarge => Some((1009, "frame larger than max-message-bytes")),
            CloseReason::RateLimited => Some((1008, "rate limit exceeded repeatedly")),
            CloseReason::IdleTimeout => Some((1001, "idle timeout: no frame or pong received")),
            CloseReason::Protocol => Some((1002, "protocol error")),
            CloseReason::Disconnected => Some((1008, "disconnected by the server")),
            CloseReason::Shutdown => Some((1001, "server shutting down")),
        }
    }
}
