//! The one place where failures become what a client or the app sees.
//!
//! Every failure is classified by who caused it ([`Fault`]: the client, the
//! app behind the sidecar, the broker, or wsrelay itself). The fault decides
//! the log level and the `wsrelay_errors_total{source}` label; the
//! [`ErrorCode`] decides the reply code and the HTTP status; [`CloseReason`]
//! decides the WebSocket close code. Module edges return typed errors
//! ([`BrokerError`], [`HookError`]) that convert into [`ApiError`] here.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;

/// Who caused a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The downstream client (or the app calling the API) sent something wrong.
    Client,
    /// The upstream app: a hook that is down, late or answered nonsense.
    App,
    /// The broker (Redis) is unreachable or slow.
    Broker,
    /// wsrelay itself.
    Internal,
}

impl Fault {
    pub const ALL: [Fault; 4] = [Fault::Client, Fault::App, Fault::Broker, Fault::Internal];

    /// The `source` label of `wsrelay_errors_total`.
    pub fn label(self) -> &'static str {
        match self {
            Fault::Client => "client",
            Fault::App => "app",
            Fault::Broker => "broker",
            Fault::Internal => "internal",
        }
    }

    /// A client's mistakes are routine (debug); the app or the broker
    /// failing is an operator's concern (warn); our own bugs are errors.
    pub fn level(self) -> tracing::Level {
        match self {
            Fault::Client => tracing::Level::DEBUG,
            Fault::App | Fault::Broker => tracing::Level::WARN,
            Fault::Internal => tracing::Level::ERROR,
        }
    }
}

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
    /// Admin API: a body that is not declared as JSON.
    UnsupportedMediaType,
    /// The broker (or a hook the operation depends on) is unreachable.
    Unavailable,
    Internal,
    /// Admin API (`/api/call`): the client did not answer in time.
    Timeout,
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
            ErrorCode::UnsupportedMediaType => "unsupported_media_type",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
            ErrorCode::Timeout => "timeout",
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
            ErrorCode::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::Timeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// Who caused an error with this code, unless said otherwise.
    pub fn fault(self) -> Fault {
        match self {
            ErrorCode::Unavailable => Fault::Broker,
            ErrorCode::Internal => Fault::Internal,
            _ => Fault::Client,
        }
    }
}

/// An error as a client or the app sees it: a code and a human message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {message}", code.as_str())]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: Cow<'static, str>,
    pub fault: Fault,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<Cow<'static, str>>) -> Self {
        Self { code, message: message.into(), fault: code.fault() }
    }
    /// The same error, blamed on someone else than its code suggests.
    pub fn blame(mut self, fault: Fault) -> Self {
        self.fault = fault;
        self
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

    /// Logs the error at its fault's level, naming what failed.
    pub fn log(&self, what: &'static str) {
        macro_rules! at {
            ($lvl:expr) => {
                tracing::event!(
                    $lvl,
                    code = self.code.as_str(),
                    source = self.fault.label(),
                    "{what}: {}",
                    self.message
                )
            };
        }
        match self.fault.level() {
            tracing::Level::ERROR => at!(tracing::Level::ERROR),
            tracing::Level::WARN => at!(tracing::Level::WARN),
            _ => at!(tracing::Level::DEBUG),
        }
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
    /// The JWT it connected with expired.
    TokenExpired,
}

impl CloseReason {
    pub const ALL: [CloseReason; 10] = [
        CloseReason::Client,
        CloseReason::SlowConsumer,
        CloseReason::TooLarge,
        CloseReason::RateLimited,
        CloseReason::IdleTimeout,
        CloseReason::Protocol,
        CloseReason::Disconnected,
        CloseReason::Shutdown,
        CloseReason::Error,
        CloseReason::TokenExpired,
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
            CloseReason::TokenExpired => "token_expired",
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
            CloseReason::TokenExpired => Some((1008, "token expired: reconnect with a new one")),
        }
    }
}

/// Why the broker could not do what was asked. Always `unavailable` to the
/// client or the app (HTTP 503): the message may or may not have gone out,
/// and a retry is theirs to decide.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BrokerError {
    #[error("not connected to Redis")]
    NotConnected,
    #[error("Redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the publish queue is full")]
    QueueFull,
    #[error("subscription not confirmed by Redis in time")]
    NotConfirmed,
    #[error("the broker is stopping")]
    Stopped,
    #[error("no Redis connection: {0}")]
    Pool(Arc<deadpool::managed::PoolError<redis::RedisError>>),
    #[error("Redis: {0}")]
    Redis(Arc<redis::RedisError>),
    #[error("invalid Redis configuration: {0}")]
    Config(String),
}

impl From<redis::RedisError> for BrokerError {
    fn from(e: redis::RedisError) -> Self {
        BrokerError::Redis(Arc::new(e))
    }
}

impl From<deadpool::managed::PoolError<redis::RedisError>> for BrokerError {
    fn from(e: deadpool::managed::PoolError<redis::RedisError>) -> Self {
        BrokerError::Pool(Arc::new(e))
    }
}

impl From<BrokerError> for ApiError {
    fn from(e: BrokerError) -> Self {
        let fault = if matches!(e, BrokerError::Config(_)) { Fault::Internal } else { Fault::Broker };
        ApiError::unavailable(format!("broker unavailable: {e}")).blame(fault)
    }
}

/// Why a hook call to the app failed (its answer, whatever the status, is
/// not an error here).
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("hook did not answer within {0:?}")]
    Timeout(Duration),
    #[error("hook unreachable: {0}")]
    Request(#[source] hyper_util::client::legacy::Error),
    #[error("reading the hook's answer: {0}")]
    Body(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("the hook path is not a valid path")]
    BadPath,
}

impl HookError {
    /// The `status` label of `wsrelay_hook_requests_total` for a failed call.
    pub fn label(&self) -> &'static str {
        match self {
            HookError::Timeout(_) => "timeout",
            HookError::Request(_) | HookError::Body(_) | HookError::BadPath => "error",
        }
    }
}

impl From<HookError> for ApiError {
    fn from(e: HookError) -> Self {
        ApiError::unavailable(format!("the app's hook failed: {e}")).blame(Fault::App)
    }
}

/// The `result` label of `wsrelay_connections_total`: how an upgrade ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnResult {
    Accepted,
    BadRequest,
    Forbidden,
    Unauthorized,
    Unavailable,
    LimitReached,
    Draining,
    HandshakeFailed,
}

impl ConnResult {
    pub const ALL: [ConnResult; 8] = [
        ConnResult::Accepted,
        ConnResult::BadRequest,
        ConnResult::Forbidden,
        ConnResult::Unauthorized,
        ConnResult::Unavailable,
        ConnResult::LimitReached,
        ConnResult::Draining,
        ConnResult::HandshakeFailed,
    ];

    pub fn label(self) -> &'static str {
        match self {
            ConnResult::Accepted => "accepted",
            ConnResult::BadRequest => "bad_request",
            ConnResult::Forbidden => "forbidden",
            ConnResult::Unauthorized => "unauthorized",
            ConnResult::Unavailable => "unavailable",
            ConnResult::LimitReached => "limit_reached",
            ConnResult::Draining => "draining",
            ConnResult::HandshakeFailed => "handshake_failed",
        }
    }
}

/// Why an upgrade is refused, before any WebSocket exists: a plain HTTP
/// status the client can act on, and the metric label.
#[derive(Debug)]
pub struct Reject {
    pub status: StatusCode,
    pub result: ConnResult,
    pub error: ApiError,
}

impl Reject {
    /// The replica is at `--max-connections`.
    pub fn full() -> Self {
        let error = ApiError::unavailable("too many connections on this replica").blame(Fault::Internal);
        Reject { status: StatusCode::SERVICE_UNAVAILABLE, result: ConnResult::LimitReached, error }
    }

    /// One client address has too many sessions waiting for their CONNECT.
    pub fn busy_address() -> Self {
        let error = ApiError::new(ErrorCode::RateLimited, "too many connections opening from this address")
            .blame(Fault::Client);
        Reject { status: StatusCode::TOO_MANY_REQUESTS, result: ConnResult::LimitReached, error }
    }

    /// The replica is draining.
    pub fn draining() -> Self {
        // Expected during a planned shutdown, not a fault of this node: the
        // client (or its proxy) is told to go elsewhere; counted as
        // `result="draining"`, logged at debug.
        let error = ApiError::unavailable("shutting down: reconnect to another replica").blame(Fault::Client);
        Reject { status: StatusCode::SERVICE_UNAVAILABLE, result: ConnResult::Draining, error }
    }

    /// A WebSocket version other than 13.
    pub fn version() -> Self {
        Reject {
            status: StatusCode::UPGRADE_REQUIRED,
            result: ConnResult::BadRequest,
            error: ApiError::bad_request("unsupported Sec-WebSocket-Version: use 13"),
        }
    }
}

impl From<ApiError> for Reject {
    /// The upgrade's status is the error's; so is the metric label.
    fn from(error: ApiError) -> Self {
        let result = match error.code {
            ErrorCode::Unauthorized => ConnResult::Unauthorized,
            ErrorCode::Forbidden => ConnResult::Forbidden,
            ErrorCode::Unavailable | ErrorCode::Internal => ConnResult::Unavailable,
            ErrorCode::LimitExceeded => ConnResult::LimitReached,
            _ => ConnResult::BadRequest,
        };
        let status = match error.code {
            // Too many channels for one connection is a bad request, not a rate.
            ErrorCode::LimitExceeded => StatusCode::BAD_REQUEST,
            code => code.status(),
        };
        Reject { status, result, error }
    }
}
