//! Authorization: who may connect (JWT or the connect hook), subscribe and
//! publish (namespace policies, maybe asking the app), and talk to the app
//! (`send` → message hook). Everything fails closed: a hook that is down or
//! late denies.

pub mod hooks;

use std::net::SocketAddr;
use std::sync::Arc;

use http::header::{self, HeaderMap, HeaderName};
use http::{Request, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

pub use self::hooks::DisconnectEvent;
use self::hooks::{DisconnectNotifier, HookKind, Hooks};
use crate::body::bearer_token;
use crate::channel::Channel;
use crate::config::{AuthConfig, Policy};
use crate::error::{ApiError, ErrorCode, Fault, Reject};
use crate::metrics::Metrics;
use crate::upstream::{UpstreamClient, set_forwarded};

/// Who a connection is, as established at connect time.
#[derive(Debug, Default)]
pub struct Identity {
    pub user: Option<Arc<str>>,
    pub info: Option<serde_json::Value>,
    /// Channels the app (hook or token) subscribes the connection to.
    pub channels: Vec<Channel>,
    /// When a JWT-authenticated connection's token expires (seconds since
    /// the Unix epoch).
    pub expires: Option<u64>,
}

/// A user id as the app sends it: a string or a number (Ok(None) for null
/// or absent, Err for anything else). Used by the connect hook's answer and
/// by `/api/disconnect`, so an id works the same in both.
pub fn user_id(v: Option<serde_json::Value>) -> Result<Option<String>, serde_json::Value> {
    match v {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s).filter(|s| !s.is_empty())),
        Some(serde_json::Value::Number(n)) => Ok(Some(n.to_string())),
        Some(other) => Err(other),
    }
}

/// Which action a policy is checked for.
#[derive(Debug, Clone, Copy)]
pub enum Action {
    Subscribe,
    Publish,
}

pub struct Auth {
    cfg: AuthConfig,
    hooks: Arc<Hooks>,
    disconnects: Option<DisconnectNotifier>,
}

#[derive(Serialize)]
struct ConnectRequest<'a> {
    path: &'a str,
    query: &'a str,
    remote_addr: String,
    /// The connection id the session will have (`socket.id`).
    connection: &'a str,
    /// `websocket`, or `polling` (Socket.IO before an upgrade).
    transport: &'a str,
    /// Socket.IO: the namespace connected to.
    #[serde(skip_serializing_if = "Option::is_none")]
    namespace: Option<&'a str>,
    /// Socket.IO: the client's `auth` payload.
    #[serde(skip_serializing_if = "Option::is_none")]
    auth: Option<&'a RawValue>,
}

/// What a Socket.IO client's CONNECT adds to authentication: its namespace
/// and `auth` payload (whose `token` is taken as a JWT).
#[derive(Debug, Clone, Copy)]
pub struct SioConnect<'a> {
    pub namespace: &'a str,
    pub auth: Option<&'a RawValue>,
}

/// Who is connecting, beside its request: the connection id it will have,
/// its transport, and (Socket.IO) its CONNECT.
#[derive(Debug, Clone, Copy)]
pub struct Connecting<'a> {
    pub connection: &'a str,
    pub transport: &'a str,
    pub sio: Option<SioConnect<'a>>,
}

#[derive(Serialize)]
struct EmitRequest<'a> {
    event: &'a str,
    args: &'a RawValue,
    ack: bool,
    namespace: &'a str,
    connection: &'a str,
    user: Option<&'a str>,
    /// A binary event's attachments, base64 (its `args` hold placeholders).
    #[serde(skip_serializing_if = "Option::is_none")]
    attachments: Option<&'a [Box<str>]>,
}

/// A Socket.IO client's event, for the message hook.
#[derive(Debug)]
pub struct Event<'a> {
    pub namespace: &'a str,
    pub event: &'a str,
    pub args: &'a RawValue,
    /// The client waits for an answer.
    pub ack: bool,
    pub attachments: Option<&'a [Box<str>]>,
}

#[derive(Deserialize)]
struct ConnectAnswer {
    #[serde(default)]
    user: Option<serde_json::Value>,
    #[serde(default)]
    channels: Vec<Channel>,
    #[serde(default)]
    info: Option<serde_json::Value>,
}

#[derive(Serialize)]
struct ChannelRequest<'a> {
    user: Option<&'a str>,
    connection: &'a str,
    channel: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<&'a RawValue>,
}

#[derive(Serialize)]
struct MessageRequest<'a> {
    user: Option<&'a str>,
    connection: &'a str,
    data: &'a RawValue,
}

/// Headers of the upgrade request the connect hook sees.
fn is_forwarded_to_hook(name: &HeaderName) -> bool {
    name == header::COOKIE
        || name == header::AUTHORIZATION
        || name == header::ORIGIN
        || name.as_str().starts_with("x-forwarded-")
}

impl Auth {
    pub fn new(cfg: AuthConfig, client: UpstreamClient, upstream: http::Uri, metrics: Arc<Metrics>) -> Self {
        let hooks = Arc::new(Hooks::new(
            client,
            upstream,
            cfg.hook_secret.as_ref(),
            cfg.hook_timeout,
            cfg.hook_concurrency,
            metrics.clone(),
        ));
        let disconnects = cfg
            .disconnect_hook
            .clone()
            .map(|path| DisconnectNotifier::start(hooks.clone(), path, cfg.disconnect_hook_queue, metrics));
        Auth { cfg, hooks, disconnects }
    }

    /// Cross-site WebSocket hijacking guard. With no `--allowed-origin`, a
    /// browser's `Origin` must be the very origin it connects to: same
    /// scheme, host and port (the `Host`, or behind a trusted proxy its
    /// `X-Forwarded-Host` and `X-Forwarded-Proto`; the server drops those
    /// headers from untrusted peers before this runs). Requests without
    /// `Origin` (non-browser clients) pass.
    pub fn check_origin(&self, headers: &HeaderMap) -> Result<(), Reject> {
        let Some(origin) = headers.get(header::ORIGIN) else {
            return Ok(());
        };
        let origin = origin.to_str().unwrap_or("").trim_end_matches('/').to_ascii_lowercase();
        let allowed = &self.cfg.allowed_origins;
        if allowed.iter().any(|o| o == "*" || *o == origin) {
            return Ok(());
        }
        let forbidden = || Reject::from(ApiError::forbidden("origin not allowed"));
        if !allowed.is_empty() {
            return Err(forbidden());
        }
        let origin = origin.parse::<http::Uri>().ok().and_then(|u| Site::of(&u)).ok_or_else(forbidden)?;
        let first = |name: &str| {
            headers.get(name).and_then(|v| v.to_str().ok()).and_then(|v| v.split(',').next()).map(str::trim)
        };
        let scheme = first("x-forwarded-proto").unwrap_or("http").to_ascii_lowercase();
        let served = [first("host"), first("x-forwarded-host")]
            .into_iter()
            .flatten()
            .filter_map(|host| format!("{scheme}://{host}").parse::<http::Uri>().ok())
            .filter_map(|u| Site::of(&u));
        for site in served {
            if site == origin {
                return Ok(());
            }
        }
        Err(forbidden())
    }

    /// Establishes who connects: a JWT when one is presented (and a key is
    /// configured), else the connect hook when configured, else anonymous.
    pub async fn authenticate<B>(
        &self,
        req: &Request<B>,
        remote: SocketAddr,
        connection: &str,
    ) -> Result<Identity, Reject> {
        self.authenticate_with(req, remote, Connecting { connection, transport: "websocket", sio: None }).await
    }

    /// As [`authenticate`](Self::authenticate), for a Socket.IO CONNECT.
    pub async fn authenticate_with<B>(
        &self,
        req: &Request<B>,
        remote: SocketAddr,
        who: Connecting<'_>,
    ) -> Result<Identity, Reject> {
        let sio = who.sio;
        if let Some(key) = &self.cfg.jwt {
            let from_auth = sio.and_then(|s| s.auth).and_then(|a| {
                serde_json::from_str::<serde_json::Value>(a.get()).ok()?.get("token")?.as_str().map(str::to_owned)
            });
            if let Some(token) = from_auth.or_else(|| token_of(req)) {
                let claims = key.verify(&token).map_err(|e| unauthorized(format!("invalid token: {e}")))?;
                return Ok(Identity {
                    channels: self.personal_channels(&claims.user, claims.channels),
                    user: Some(Arc::from(claims.user)),
                    info: claims.info,
                    // Closed when the token would no longer be accepted.
                    expires: Some(claims.exp.saturating_add(key.leeway())),
                });
            }
            if self.cfg.connect_hook.is_none() {
                return Err(unauthorized("a token is required (?token= or Authorization: Bearer)".into()));
            }
        }
        match &self.cfg.connect_hook {
            Some(path) => self.connect_hook(path, req, remote, who).await,
            None => Ok(Identity::default()),
        }
    }

    async fn connect_hook<B>(
        &self,
        path: &str,
        req: &Request<B>,
        remote: SocketAddr,
        who: Connecting<'_>,
    ) -> Result<Identity, Reject> {
        let sio = who.sio;
        let mut headers = HeaderMap::new();
        for (name, value) in req.headers() {
            if is_forwarded_to_hook(name) {
                headers.append(name.clone(), value.clone());
            }
        }
        set_forwarded(&mut headers, remote, req.headers().get(header::HOST).cloned());
        let body = serde_json::to_vec(&ConnectRequest {
            path: req.uri().path(),
            query: req.uri().query().unwrap_or(""),
            remote_addr: remote.to_string(),
            connection: who.connection,
            transport: who.transport,
            namespace: sio.map(|s| s.namespace),
            auth: sio.and_then(|s| s.auth),
        })
        .unwrap_or_default();
        let unavailable = || Reject::from(ApiError::unavailable("authorization unavailable").blame(Fault::App));
        let resp = self.hooks.call(HookKind::Connect, path, headers, body).await.map_err(|_| unavailable())?;
        match resp.status {
            StatusCode::OK => {}
            StatusCode::UNAUTHORIZED => return Err(unauthorized(refusal(&resp.body))),
            StatusCode::FORBIDDEN => return Err(ApiError::forbidden(refusal(&resp.body)).into()),
            s => {
                tracing::warn!(status = %s, "connect hook answered neither 200, 401 nor 403: refusing (fail closed)");
                return Err(unavailable());
            }
        }
        let answer: ConnectAnswer = serde_json::from_slice(&resp.body).map_err(|e| {
            tracing::warn!(error = %e, "connect hook answered 200 with an invalid body (or channel name): refusing");
            unavailable()
        })?;
        let user = match user_id(answer.user) {
            Ok(u) => u.map(Arc::from),
            Err(other) => {
                tracing::warn!(user = %other, "connect hook answered a user that is not a string: refusing");
                return Err(unavailable());
            }
        };
        Ok(Identity { user, info: answer.info, channels: answer.channels, expires: None })
    }

    /// May this connection subscribe to / publish on `channel`?
    pub async fn authorize(
        &self,
        action: Action,
        ident: &Identity,
        connection: &str,
        channel: &str,
        data: Option<&RawValue>,
    ) -> Result<(), ApiError> {
        let (rule, name) = self.cfg.resolve(channel);
        let (policy, verb) = match action {
            Action::Subscribe => (rule.subscribe, "subscribe to"),
            Action::Publish => (rule.publish, "publish on"),
        };
        let user = ident.user.as_deref();
        let denied = |why: &str| Err(ApiError::forbidden(format!("may not {verb} {channel:?}: {why}")));
        if crate::channel::is_private(channel) && !self.cfg.namespaces.names(channel) {
            return denied("it stands for a Socket.IO namespace or connection");
        }
        match policy {
            Policy::Anyone => Ok(()),
            Policy::Authenticated if user.is_some() => Ok(()),
            Policy::Authenticated => denied("authentication required"),
            Policy::Owner => {
                let owner = &name[rule.prefix.len()..];
                if user == Some(owner) { Ok(()) } else { denied("only its owner may") }
            }
            Policy::None => denied("not allowed in this namespace"),
            Policy::Hook => {
                let (kind, path) = match action {
                    Action::Subscribe => (HookKind::Subscribe, self.cfg.subscribe_hook.as_deref()),
                    Action::Publish => (HookKind::Publish, self.cfg.publish_hook.as_deref()),
                };
                // Config validation guarantees the path exists for a hook policy.
                let Some(path) = path else {
                    return denied("no hook configured");
                };
                let body = serde_json::to_vec(&ChannelRequest { user, connection, channel, data }).unwrap_or_default();
                match self.hooks.call(kind, path, HeaderMap::new(), body).await? {
                    r if r.status.is_success() => Ok(()),
                    _ => denied("refused by the app"),
                }
            }
        }
    }

    /// Sends a client's `send` data to the message hook; the app's JSON
    /// answer is the reply's `result`.
    pub async fn send(
        &self,
        ident: &Identity,
        connection: &str,
        data: &RawValue,
    ) -> Result<Option<Box<RawValue>>, ApiError> {
        let Some(path) = &self.cfg.message_hook else {
            return Err(ApiError::new(ErrorCode::NotSupported, "send is not available: no message hook is configured"));
        };
        let body =
            serde_json::to_vec(&MessageRequest { user: ident.user.as_deref(), connection, data }).unwrap_or_default();
        self.message(path, body).await
    }

    /// Sends a Socket.IO client's event to the message hook
    /// (`{"event","args","ack","namespace","connection","user"}`); the app's
    /// JSON answer is the acknowledgement's arguments.
    pub async fn emit(
        &self,
        ident: &Identity,
        connection: &str,
        e: Event<'_>,
    ) -> Result<Option<Box<RawValue>>, ApiError> {
        let Event { namespace, event, args, ack, attachments } = e;
        let Some(path) = &self.cfg.message_hook else {
            return Err(ApiError::new(
                ErrorCode::NotSupported,
                "events are not handled: no message hook is configured",
            ));
        };
        let req = EmitRequest { event, args, ack, namespace, connection, user: ident.user.as_deref(), attachments };
        self.message(path, serde_json::to_vec(&req).unwrap_or_default()).await
    }

    /// Asks the message hook; its JSON answer (if any) is the result.
    async fn message(&self, path: &str, body: Vec<u8>) -> Result<Option<Box<RawValue>>, ApiError> {
        let resp = self.hooks.call(HookKind::Message, path, HeaderMap::new(), body).await?;
        if resp.status.is_success() {
            if resp.body.iter().all(u8::is_ascii_whitespace) {
                return Ok(None);
            }
            if resp.body.len() > self.cfg.max_result_bytes {
                let msg = format!("the app's answer is larger than max-message-bytes ({})", self.cfg.max_result_bytes);
                return Err(ApiError::new(ErrorCode::TooLarge, msg).blame(Fault::App));
            }
            return serde_json::from_slice::<Box<RawValue>>(&resp.body).map(Some).map_err(|_| {
                ApiError::new(ErrorCode::Internal, "the app answered with invalid JSON").blame(Fault::App)
            });
        }
        let code = match resp.status {
            StatusCode::BAD_REQUEST | StatusCode::UNPROCESSABLE_ENTITY => ErrorCode::BadRequest,
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => ErrorCode::Forbidden,
            StatusCode::NOT_FOUND => ErrorCode::NotFound,
            StatusCode::PAYLOAD_TOO_LARGE => ErrorCode::TooLarge,
            StatusCode::TOO_MANY_REQUESTS => ErrorCode::RateLimited,
            s if s.is_server_error() => ErrorCode::Unavailable,
            _ => ErrorCode::Internal,
        };
        // The app may explain itself with {"error":{"message":…}}.
        let message = serde_json::from_slice::<serde_json::Value>(&resp.body)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
            .unwrap_or_else(|| format!("the app answered {}", resp.status));
        // The app's own refusals are the client's doing; its failures are the app's.
        let fault =
            if code == ErrorCode::Unavailable || code == ErrorCode::Internal { Fault::App } else { Fault::Client };
        Err(ApiError::new(code, message).blame(fault))
    }

    /// Tells the disconnect hook (if any), best effort.
    pub fn disconnected(&self, ev: DisconnectEvent) {
        if let Some(d) = &self.disconnects {
            d.notify(ev);
        }
    }

    /// Gives queued disconnect notifications up to `within` to go out.
    pub async fn flush(&self, within: std::time::Duration) {
        if let Some(d) = &self.disconnects {
            d.flush(within).await;
        }
    }
}

/// An origin: scheme, host and port (the scheme's default when not given).
#[derive(Debug, PartialEq, Eq)]
struct Site {
    scheme: String,
    host: String,
    port: u16,
}

impl Site {
    fn of(u: &http::Uri) -> Option<Site> {
        let scheme = u.scheme_str()?.to_ascii_lowercase();
        let default = match scheme.as_str() {
            "https" | "wss" => 443,
            _ => 80,
        };
        Some(Site { port: u.port_u16().unwrap_or(default), host: u.host()?.to_ascii_lowercase(), scheme })
    }
}

impl Auth {
    /// A JWT's channels, and the user's own channel from
    /// `--jwt-user-channel` (e.g. `user:{user}`) when set and valid.
    fn personal_channels(&self, user: &str, mut channels: Vec<Channel>) -> Vec<Channel> {
        if let Some(template) = &self.cfg.jwt_user_channel {
            match Channel::parse(&template.replace("{user}", user)) {
                Ok(c) if !channels.contains(&c) => channels.push(c),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "jwt-user-channel makes no valid channel for this user"),
            }
        }
        channels
    }
}

/// Longest refusal message passed on from a hook to the client.
const MAX_REFUSAL: usize = 256;

/// What a connect hook's 401/403 says to the client: the message of a
/// `{"error":{"message":…}}` body (as the message hook's errors), or
/// "refused by the app".
fn refusal(body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Body {
        error: Inner,
    }
    #[derive(serde::Deserialize)]
    struct Inner {
        message: String,
    }
    match serde_json::from_slice::<Body>(body) {
        Ok(b) if !b.error.message.is_empty() => {
            let mut m = b.error.message;
            if m.len() > MAX_REFUSAL {
                let mut end = MAX_REFUSAL;
                while !m.is_char_boundary(end) {
                    end -= 1;
                }
                m.truncate(end);
            }
            m
        }
        _ => "refused by the app".to_owned(),
    }
}

fn unauthorized(message: String) -> Reject {
    Reject::from(ApiError::new(ErrorCode::Unauthorized, message))
}

/// The client's token: `?token=` or `Authorization: Bearer`.
fn token_of<B>(req: &Request<B>) -> Option<String> {
    if let Some(q) = req.uri().query() {
        for (k, v) in form_urlencoded::parse(q.as_bytes()) {
            if k == "token" && !v.is_empty() {
                return Some(v.into_owned());
            }
        }
    }
    bearer_token(req.headers()).map(str::to_owned)
}
