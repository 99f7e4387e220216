//! The admin listener: the app's API (`/api/publish`, `/api/disconnect`)
//! and the operator's endpoints (`/metrics`, `/healthz`, `/readyz`).
//! API errors are JSON `{"error":{"code","message"}}` with the status of
//! their code; a publish answers 200 only once the broker has the message.

use std::sync::Arc;

use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde::Deserialize;
use serde_json::value::RawValue;
use subtle::ConstantTimeEq;

use crate::body::{Body, ReadError, bearer_token, full, read_limited, text};
use crate::channel::{Channel, ConnectionId};
use crate::error::{ApiError, ErrorCode};
use crate::hub::{NodeCommand, Target};
use crate::node::{Node, Source};
use crate::protocol::{Offset, check_depth, check_event};

mod connections;

/// Channels one broadcast may name at most.
pub const MAX_BROADCAST: usize = 1000;

pub(crate) async fn handle(node: Arc<Node>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    match (req.method(), path.as_str()) {
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok"),
        (&Method::GET, "/readyz") => readyz(&node, wants_broker(req.uri().query())),
        (&Method::GET, "/metrics") => {
            // Read at scrape time: the budget's counter is the hot path's.
            node.metrics.queued_bytes.set(i64::try_from(node.hub.budget().used()).unwrap_or(i64::MAX));
            let mut r = Response::new(full(node.metrics.render()));
            r.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
            r
        }
        (_, p) if p.starts_with("/api/") => {
            if let Err(e) = check_token(&node, &req).and_then(|()| check_json(&req)) {
                return json_error(&node, &e);
            }
            let result = match (req.method(), p) {
                (&Method::POST, "/api/publish") => publish(&node, req).await,
                (&Method::POST, "/api/disconnect") => disconnect(&node, req).await,
                (&Method::POST, "/api/subscribe") => server_subscribe(&node, req, true).await,
                (&Method::POST, "/api/unsubscribe") => server_subscribe(&node, req, false).await,
                (&Method::POST, "/api/close_room") => close_room(&node, req).await,
                (&Method::POST, "/api/call") => call(&node, req).await,
                (&Method::GET, p) if channel_path(p, "/history").is_some() => {
                    history(&node, channel_path(p, "/history").unwrap_or_default(), req.uri().query()).await
                }
                (&Method::GET, p) if channel_path(p, "/connections").is_some() => {
                    connections::members(&node, channel_path(p, "/connections").unwrap_or_default()).await
                }
                (&Method::GET, p) if connections::connection_path(p, "").is_some() => {
                    connections::rooms(&node, connections::connection_path(p, "").unwrap_or_default()).await
                }
                (_, p) if connections::connection_path(p, "/session").is_some() => {
                    let id = connections::connection_path(p, "/session").unwrap_or_default().to_owned();
                    connections::session(&node, &id, req).await
                }
                (&Method::GET, p) if channel_path(p, "/presence").is_some() => {
                    presence(&node, channel_path(p, "/presence").unwrap_or_default()).await
                }
                (
                    _,
                    "/api/publish" | "/api/disconnect" | "/api/subscribe" | "/api/unsubscribe" | "/api/call"
                    | "/api/close_room",
                ) => Err(ApiError::new(ErrorCode::BadRequest, "use POST with a JSON body")),
                _ => Err(ApiError::new(ErrorCode::NotFound, format!("no such endpoint: {p}"))),
            };
            match result {
                Ok(body) => json(StatusCode::OK, &body),
                Err(e) => json_error(&node, &e),
            }
        }
        _ => text(StatusCode::NOT_FOUND, "not found: try /metrics, /healthz, /readyz or /api/publish"),
    }
}

/// The channel of `/api/channels/{channel}{suffix}`, if that is the path.
fn channel_path<'a>(path: &'a str, suffix: &str) -> Option<&'a str> {
    path.strip_prefix("/api/channels/")?.strip_suffix(suffix).filter(|c| !c.is_empty())
}

/// `/readyz?broker` (or `?broker=1`): also require the broker.
fn wants_broker(query: Option<&str>) -> bool {
    query.is_some_and(|q| form_urlencoded::parse(q.as_bytes()).any(|(k, v)| k == "broker" && v != "0" && v != "false"))
}

/// "This pod can serve": 503 only while draining. In the sidecar layout the
/// pod's readiness gates the app's own HTTP too, and a Redis outage hits
/// every node at once, so the broker counts only when asked for.
fn readyz(node: &Node, with_broker: bool) -> Response<Body> {
    if node.drain.is_cancelled() {
        text(StatusCode::SERVICE_UNAVAILABLE, "draining")
    } else if with_broker && !node.broker.is_up() {
        text(StatusCode::SERVICE_UNAVAILABLE, "broker unavailable")
    } else {
        text(StatusCode::OK, "ready")
    }
}

fn check_token(node: &Node, req: &Request<Incoming>) -> Result<(), ApiError> {
    let Some(want) = &node.cfg.api_token else {
        return Ok(());
    };
    let given = bearer_token(req.headers()).unwrap_or("");
    if bool::from(given.as_bytes().ct_eq(want.expose().as_bytes())) {
        Ok(())
    } else {
        Err(ApiError::new(ErrorCode::Unauthorized, "missing or wrong bearer token (Authorization: Bearer <api-token>)"))
    }
}

/// A POST must say it carries JSON. A browser can send a "simple"
/// cross-site POST (text/plain, form data) to a loopback admin listener
/// without any preflight; it cannot send `application/json` without one.
fn check_json(req: &Request<Incoming>) -> Result<(), ApiError> {
    if req.method() != Method::POST && req.method() != Method::PUT {
        return Ok(());
    }
    let ct = req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let mime = ct.split(';').next().unwrap_or("").trim();
    if mime.eq_ignore_ascii_case("application/json") {
        Ok(())
    } else {
        Err(ApiError::new(ErrorCode::UnsupportedMediaType, "send the body as Content-Type: application/json"))
    }
}

fn json(status: StatusCode, body: &serde_json::Value) -> Response<Body> {
    let mut r = Response::new(full(body.to_string()));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn json_error(node: &Node, e: &ApiError) -> Response<Body> {
    node.metrics.error(e.fault);
    e.log("API request refused");
    let mut r = json(e.code.status(), &serde_json::json!({ "error": e.to_json() }));
    if e.code == ErrorCode::Unauthorized {
        r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    r
}

/// Reads a body of at most `limit` bytes.
async fn read_body(req: Request<Incoming>, limit: usize) -> Result<bytes::Bytes, ApiError> {
    read_limited(req.into_body(), limit).await.map_err(|e| match e {
        ReadError::TooLarge(_) => ApiError::new(ErrorCode::TooLarge, e.to_string()),
        ReadError::Io(_) | ReadError::TimedOut | ReadError::NoRoom => ApiError::bad_request(e.to_string()),
    })
}

fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishBody {
    #[serde(default)]
    channel: Option<String>,
    #[serde(default)]
    channels: Option<Vec<String>>,
    #[serde(default, deserialize_with = "present")]
    data: Option<Box<RawValue>>,
    #[serde(default)]
    exclude: Option<String>,
    /// A named event (Socket.IO): its arguments are `args`, or `[data]`.
    #[serde(default)]
    event: Option<String>,
    #[serde(default, deserialize_with = "present")]
    args: Option<Box<RawValue>>,
    /// A binary event's attachments, base64 (`args` holds placeholders).
    #[serde(default)]
    attachments: Option<Vec<String>>,
}

/// A field that may be `null` (Some(None)) as well as absent (None).
fn nullable<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<f64>>, D::Error> {
    Option::<f64>::deserialize(d).map(Some)
}

fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Box<RawValue>>, D::Error> {
    Box::<RawValue>::deserialize(d).map(Some)
}

/// A validated `POST /api/publish` body.
#[derive(Debug)]
pub struct PublishRequest {
    pub channels: Vec<Channel>,
    pub data: Box<RawValue>,
    pub exclude: Option<String>,
    /// A named event: `data` is then the JSON array of its arguments.
    pub event: Option<Arc<str>>,
    /// A named event's binary attachments.
    pub attachments: Option<crate::protocol::Attachments>,
}

/// The arguments of an event as one JSON array: `args` (an array) or `[data]`.
pub fn event_args(args: Option<Box<RawValue>>, data: Option<Box<RawValue>>) -> Result<Box<RawValue>, ApiError> {
    match (args, data) {
        (Some(a), None) if a.get().trim_start().starts_with('[') => Ok(a),
        (Some(_), None) => Err(ApiError::bad_request("\"args\" must be a JSON array")),
        (None, Some(d)) => {
            RawValue::from_string(format!("[{}]", d.get())).map_err(|_| ApiError::bad_request("invalid \"data\""))
        }
        (None, None) => Ok(RawValue::from_string("[]".to_owned()).unwrap_or_default()),
        (Some(_), Some(_)) => Err(ApiError::bad_request("give \"args\" or \"data\", not both")),
    }
}

/// Parses and validates a `POST /api/publish` body (`max`: max-message-bytes).
pub fn parse_publish(body: &[u8], max: usize) -> Result<PublishRequest, ApiError> {
    let body: PublishBody = parse_json(body)?;
    let event = match &body.event {
        Some(e) => {
            check_event(e)?;
            Some(Arc::<str>::from(e.as_str()))
        }
        None if body.args.is_some() => return Err(ApiError::bad_request("\"args\" needs an \"event\"")),
        None => None,
    };
    let data = match event {
        Some(_) => event_args(body.args, body.data)?,
        None => body.data.ok_or_else(|| ApiError::bad_request("missing field \"data\""))?,
    };
    check_depth(data.get())?;
    let attachments = match body.attachments {
        Some(_) if event.is_none() => return Err(ApiError::bad_request("\"attachments\" needs an \"event\"")),
        Some(a) => Some(crate::protocol::check_attachments(a)?),
        None => None,
    };
    // Arguments and attachments (base64) together.
    let size = data.get().len() + attachments.as_ref().map_or(0, |a| a.iter().map(|x| x.len()).sum());
    if size > max {
        return Err(ApiError::new(ErrorCode::TooLarge, format!("data is {size} bytes, max-message-bytes is {max}")));
    }
    let channels = match (body.channel, body.channels) {
        (Some(c), None) => vec![c],
        (None, Some(list)) if !list.is_empty() => list,
        (None, Some(_)) => return Err(ApiError::bad_request("\"channels\" is empty")),
        (None, None) => return Err(ApiError::bad_request("missing field \"channel\" (or \"channels\")")),
        (Some(_), Some(_)) => return Err(ApiError::bad_request("give \"channel\" or \"channels\", not both")),
    };
    if channels.len() > MAX_BROADCAST {
        return Err(ApiError::bad_request(format!(
            "{} channels in one broadcast, the limit is {MAX_BROADCAST}",
            channels.len()
        )));
    }
    let channels = channels
        .iter()
        .map(|c| Channel::parse(c).map_err(|e| ApiError::bad_request(format!("{c:?}: {e}"))))
        .collect::<Result<Vec<_>, _>>()?;
    if body.exclude.as_ref().is_some_and(|x| x.len() > 256) {
        return Err(ApiError::bad_request("\"exclude\" is not a connection id"));
    }
    Ok(PublishRequest { channels, data, exclude: body.exclude, event, attachments })
}

async fn publish(node: &Arc<Node>, req: Request<Incoming>) -> Result<serde_json::Value, ApiError> {
    let max = node.cfg.session.largest_message;
    let p = parse_publish(&read_body(req, max + 64 * 1024).await?, max)?;
    let channels = p.channels.clone();
    let offsets = node.publish(p.channels, &p.data, p.exclude.as_deref(), p.event, p.attachments, Source::Api).await?;
    Ok(publish_answer(&channels, &offsets))
}

/// `{}`; `{"offset":…}` for one channel with history; for a broadcast,
/// `{"offsets":{channel: offset}}` for those with history.
fn publish_answer(channels: &[Channel], offsets: &[Option<crate::protocol::Offset>]) -> serde_json::Value {
    let with: serde_json::Map<String, serde_json::Value> = channels
        .iter()
        .zip(offsets)
        .filter_map(|(c, o)| o.as_ref().map(|o| (c.to_string(), serde_json::Value::from(o.to_string()))))
        .collect();
    match (channels.len(), with.values().next()) {
        (_, None) => serde_json::json!({}),
        (1, Some(o)) => serde_json::json!({ "offset": o }),
        _ => serde_json::json!({ "offsets": with }),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CallBody {
    connection: String,
    event: String,
    #[serde(default, deserialize_with = "present")]
    args: Option<Box<RawValue>>,
    #[serde(default, deserialize_with = "present")]
    data: Option<Box<RawValue>>,
    #[serde(default)]
    namespace: Option<String>,
    /// Seconds, as python-socketio's `call(timeout=)`; absent: 60; `null`
    /// (`timeout=None`): until the client answers or goes, at most
    /// [`MAX_CALL_TIMEOUT`].
    #[serde(default, deserialize_with = "nullable")]
    timeout: Option<Option<f64>>,
    /// Binary attachments, base64 (`args` holds their placeholders).
    #[serde(default)]
    attachments: Option<Vec<String>>,
}

/// Longest `/api/call` wait.
const MAX_CALL_TIMEOUT: f64 = 600.0;

/// `POST /api/call`: an event for one connection, answered with the
/// client's acknowledgement, wherever the connection is.
async fn call(node: &Arc<Node>, req: Request<Incoming>) -> Result<serde_json::Value, ApiError> {
    let max = node.cfg.session.largest_message;
    let body: CallBody = parse_json(&read_body(req, max + 64 * 1024).await?)?;
    check_event(&body.event)?;
    let args = event_args(body.args, body.data)?;
    check_depth(args.get())?;
    if args.get().len() > max {
        return Err(ApiError::new(ErrorCode::TooLarge, format!("args are larger than max-message-bytes ({max})")));
    }
    let namespace = body.namespace.unwrap_or_else(|| "/".to_owned());
    if !crate::protocol::socketio::valid_namespace(&namespace) {
        return Err(ApiError::bad_request("\"namespace\" must be \"/\" or \"/name\""));
    }
    let timeout = match body.timeout {
        None => 60.0,
        Some(None) => MAX_CALL_TIMEOUT,
        Some(Some(t)) => t,
    };
    if !(timeout > 0.0 && timeout <= MAX_CALL_TIMEOUT) {
        return Err(ApiError::bad_request(format!("\"timeout\" must be 0-{MAX_CALL_TIMEOUT} seconds")));
    }
    let attachments = match body.attachments {
        Some(a) => Some(crate::protocol::check_attachments(a)?.iter().map(|x| x.to_string()).collect()),
        None => None,
    };
    let call = crate::hub::Call {
        id: crate::config::random_id(16),
        namespace,
        event: body.event,
        args: args.get().to_owned(),
        attachments,
    };
    let connection = ConnectionId::parse(&body.connection)
        .ok_or_else(|| ApiError::bad_request(format!("{:?} is not a connection id", body.connection)))?;
    match node.call(&connection, call, std::time::Duration::from_secs_f64(timeout)).await? {
        crate::hub::CallAnswer::Args(a) => {
            let args: serde_json::Value = serde_json::from_str(&a).unwrap_or(serde_json::Value::Null);
            Ok(serde_json::json!({ "args": args }))
        }
        crate::hub::CallAnswer::Binary { args, attachments } => {
            let args: serde_json::Value = serde_json::from_str(&args).unwrap_or(serde_json::Value::Null);
            Ok(serde_json::json!({ "args": args, "attachments": attachments }))
        }
        // `Node::call` answers these as errors.
        crate::hub::CallAnswer::Gone | crate::hub::CallAnswer::Unsupported | crate::hub::CallAnswer::Names(_) => {
            Err(ApiError::new(ErrorCode::NotFound, "no such connection"))
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DisconnectBody {
    /// A string, or a number (the connect hook accepts numeric user ids too).
    #[serde(default)]
    user: Option<serde_json::Value>,
    #[serde(default)]
    connection: Option<String>,
}

/// Parses and validates a `POST /api/disconnect` body.
pub fn parse_disconnect(body: &[u8]) -> Result<Target, ApiError> {
    let body: DisconnectBody = parse_json(body)?;
    target(body.user, body.connection)
}

/// `"user"` (a string or a number) or `"connection"`, exactly one of them.
fn target(user: Option<serde_json::Value>, connection: Option<String>) -> Result<Target, ApiError> {
    let user =
        crate::auth::user_id(user).map_err(|_| ApiError::bad_request("\"user\" must be a string or a number"))?;
    match (user, connection) {
        (Some(u), None) if !u.is_empty() => Ok(Target::User(u)),
        (None, Some(c)) if !c.is_empty() => ConnectionId::parse(&c)
            .map(Target::Connection)
            .ok_or_else(|| ApiError::bad_request(format!("{c:?} is not a connection id"))),
        (Some(_), Some(_)) => Err(ApiError::bad_request("give \"user\" or \"connection\", not both")),
        _ => Err(ApiError::bad_request("missing field \"user\" or \"connection\"")),
    }
}

async fn disconnect(node: &Node, req: Request<Incoming>) -> Result<serde_json::Value, ApiError> {
    let target = parse_disconnect(&read_body(req, 64 * 1024).await?)?;
    node.broker.command(NodeCommand::Disconnect(target)).await?;
    Ok(serde_json::json!({}))
}

/// Most messages one history request returns.
const MAX_HISTORY_LIMIT: usize = 1000;

/// `GET /api/channels/{channel}/history?since=<offset>&limit=N`:
/// `{"messages":[{"data","offset"}…],"offset","epoch","recovered"}` —
/// `recovered` says whether everything after `since` is there (no `since`:
/// the newest `limit` messages kept, and `recovered` is false).
async fn history(node: &Node, channel: &str, query: Option<&str>) -> Result<serde_json::Value, ApiError> {
    let channel = percent_encoding::percent_decode_str(channel).decode_utf8_lossy();
    let channel = Channel::parse(&channel).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let Some(policy) = node.cfg.namespaces.rule(&channel).history else {
        return Err(ApiError::new(ErrorCode::NotFound, format!("no history is kept for {channel:?}")));
    };
    let mut since = None;
    let mut limit = policy.size.min(MAX_HISTORY_LIMIT);
    for (k, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match &*k {
            "since" => {
                let o = Offset::parse(&v).ok_or_else(|| ApiError::bad_request("\"since\" is not an offset"))?;
                since = Some(o);
            }
            "limit" => {
                limit = v
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=MAX_HISTORY_LIMIT).contains(n))
                    .ok_or_else(|| ApiError::bad_request(format!("\"limit\" must be 1 to {MAX_HISTORY_LIMIT}")))?;
            }
            _ => {}
        }
    }
    node.metrics.history_reads.inc();
    // Without since: the newest `limit` (read from where they start).
    let after = match &since {
        Some(o) => o.seq,
        None => {
            let top = node.broker.history(&channel, policy, u64::MAX - 1, 1).await?.top;
            top.saturating_sub(limit as u64)
        }
    };
    let h = node.broker.history(&channel, policy, after, limit).await?;
    let recovered = since.as_ref().is_some_and(|s| h.covers(s));
    let messages: Vec<serde_json::Value> = h
        .messages
        .iter()
        .map(|m| {
            let data: serde_json::Value = serde_json::from_str(m.data.as_str()).unwrap_or(serde_json::Value::Null);
            serde_json::json!({ "data": data, "offset": m.offset.as_ref().map(ToString::to_string) })
        })
        .collect();
    Ok(serde_json::json!({
        "messages": messages,
        "offset": h.top_offset().to_string(),
        "epoch": &*h.epoch,
        "recovered": recovered,
    }))
}

/// `GET /api/channels/{channel}/presence`: `{"count","clients":[{"connection","user","info"}…]}`
/// (`clients` left out past 1000 members).
async fn presence(node: &Node, channel: &str) -> Result<serde_json::Value, ApiError> {
    let channel = percent_encoding::percent_decode_str(channel).decode_utf8_lossy();
    let channel = Channel::parse(&channel).map_err(|e| ApiError::bad_request(e.to_string()))?;
    if !node.cfg.namespaces.rule(&channel).presence {
        return Err(ApiError::new(ErrorCode::NotFound, format!("no presence is kept for {channel:?}")));
    }
    Ok(node.presence(&channel).await?.to_json())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SubscribeBody {
    channel: String,
    #[serde(default)]
    user: Option<serde_json::Value>,
    #[serde(default)]
    connection: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CloseRoomBody {
    channel: String,
}

/// `POST /api/close_room` `{"channel"}`: every session subscribed to the
/// channel, on every node, leaves it (python-socketio's `close_room`; a
/// Socket.IO room in a named namespace is the channel `/chat#room`).
async fn close_room(node: &Node, req: Request<Incoming>) -> Result<serde_json::Value, ApiError> {
    let body: CloseRoomBody = parse_json(&read_body(req, 64 * 1024).await?)?;
    let channel = Channel::parse(&body.channel).map_err(|e| ApiError::bad_request(e.to_string()))?;
    node.broker.command(NodeCommand::Unsubscribe { target: Target::Room(channel.clone()), channel }).await?;
    Ok(serde_json::json!({}))
}

/// Parses a `POST /api/subscribe` or `/api/unsubscribe` body.
pub fn parse_subscribe(body: &[u8]) -> Result<(Target, Channel), ApiError> {
    let body: SubscribeBody = parse_json(body)?;
    let channel = Channel::parse(&body.channel).map_err(|e| ApiError::bad_request(e.to_string()))?;
    Ok((target(body.user, body.connection)?, channel))
}

/// `POST /api/subscribe` / `/api/unsubscribe` `{"channel","connection"|"user"}`:
/// subscribes (or unsubscribes) those sessions on every node, without any
/// policy check (the app decides); each session is told with a
/// `subscribed`/`unsubscribed` frame.
async fn server_subscribe(node: &Node, req: Request<Incoming>, on: bool) -> Result<serde_json::Value, ApiError> {
    let (target, channel) = parse_subscribe(&read_body(req, 64 * 1024).await?)?;
    // A connection of this node (a hook's own socket, python-socketio's
    // `enter_room` inside a handler): applied here, and answered once it took
    // effect, its broker subscription included, so an emit right after
    // reaches it (read your writes, as python-socketio's local rooms).
    if let Target::Connection(id) = &target {
        let (applied, done) = crate::hub::Applied::pair();
        let cmd = if on {
            crate::hub::SessionCommand::Subscribe(channel.clone(), applied)
        } else {
            crate::hub::SessionCommand::Unsubscribe(channel.clone(), applied)
        };
        if node.hub.command_local(id, cmd) {
            // Bounded: the broker's own timeout is the longest step. Not
            // confirmed in time is not reported as done.
            let within = node.cfg.broker.timeout * 2 + std::time::Duration::from_secs(1);
            return match tokio::time::timeout(within, done).await {
                Ok(Ok(Ok(()))) | Ok(Err(_)) => Ok(serde_json::json!({})),
                Ok(Ok(Err(e))) => Err(e),
                Err(_) => Err(ApiError::unavailable("the subscription was not confirmed in time")),
            };
        }
    }
    let cmd =
        if on { NodeCommand::Subscribe { target, channel } } else { NodeCommand::Unsubscribe { target, channel } };
    node.broker.command(cmd).await?;
    Ok(serde_json::json!({}))
}
