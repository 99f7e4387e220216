//! A real upstream app for the tests: HTTP routes that show what arrived,
//! a test-paced SSE stream, a streaming upload counter, a WebSocket echo,
//! and hook endpoints whose answers the test sets and whose requests it reads.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;

type Body = BoxBody<Bytes, Infallible>;

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).boxed()
}

/// One request as the upstream saw it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Recorded {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers.get(name).map(|v| v.to_str().unwrap().to_owned())
    }
}

/// How a hook path answers.
#[derive(Debug, Clone)]
pub struct HookReply {
    pub status: u16,
    pub body: String,
    pub delay: Duration,
}

impl HookReply {
    pub fn new(status: u16, body: &serde_json::Value) -> Self {
        HookReply { status, body: body.to_string(), delay: Duration::ZERO }
    }
    pub fn delayed(mut self, d: Duration) -> Self {
        self.delay = d;
        self
    }
}

pub struct State {
    pub recorded: Mutex<Vec<Recorded>>,
    pub hooks: Mutex<HashMap<String, HookReply>>,
    /// Permits to emit the next SSE event.
    pub sse_gate: Semaphore,
    /// Bytes of /upload bodies received so far.
    pub upload_bytes: AtomicUsize,
}

impl Default for State {
    fn default() -> Self {
        State {
            recorded: Mutex::default(),
            hooks: Mutex::default(),
            sse_gate: Semaphore::new(0),
            upload_bytes: AtomicUsize::new(0),
        }
    }
}

pub struct Upstream {
    pub addr: SocketAddr,
    pub state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Upstream {
    pub async fn start() -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State::default());
        let st = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let st = st.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let st = st.clone();
                        async move { Ok::<_, Infallible>(route(st, req).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Upstream { addr, state, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set_hook(&self, path: &str, reply: HookReply) {
        self.state.hooks.lock().unwrap().insert(path.to_owned(), reply);
    }

    /// Requests received on `path`, oldest first.
    pub fn recorded(&self, path: &str) -> Vec<Recorded> {
        self.state.recorded.lock().unwrap().iter().filter(|r| r.path == path).cloned().collect()
    }
}

async fn route(st: Arc<State>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    if matches!(path.as_str(), "/sse" | "/upload" | "/slow" | "/hop" | "/ws-echo") {
        let r = Recorded {
            method: req.method().to_string(),
            path: path.clone(),
            headers: req.headers().clone(),
            body: Bytes::new(),
        };
        st.recorded.lock().unwrap().push(r);
    }
    match path.as_str() {
        "/sse" => sse(st),
        "/upload" => upload(st, req).await,
        "/slow" => {
            let ms: u64 =
                req.uri().query().and_then(|q| q.strip_prefix("ms=")).and_then(|v| v.parse().ok()).unwrap_or(1000);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Response::new(full("slow done"))
        }
        "/hop" => Response::builder()
            .header("connection", "x-hop")
            .header("x-hop", "must-not-pass")
            .header("keep-alive", "timeout=5")
            .header("x-kept", "yes")
            .body(full("hop"))
            .unwrap(),
        "/ws-echo" => ws_echo(req),
        _ => {
            let reply = st.hooks.lock().unwrap().get(&path).cloned();
            let method = req.method().to_string();
            let headers = req.headers().clone();
            let query = req.uri().query().unwrap_or("").to_owned();
            let body = req.into_body().collect().await.map(|c| c.to_bytes()).unwrap_or_default();
            st.recorded.lock().unwrap().push(Recorded {
                method: method.clone(),
                path: path.clone(),
                headers: headers.clone(),
                body: body.clone(),
            });
            if let Some(r) = reply {
                tokio::time::sleep(r.delay).await;
                return Response::builder()
                    .status(r.status)
                    .header("content-type", "application/json")
                    .body(full(r.body))
                    .unwrap();
            }
            // Default: echo what arrived.
            let hdrs: serde_json::Map<String, serde_json::Value> = headers
                .keys()
                .map(|k| {
                    let all: Vec<&str> = headers.get_all(k).iter().map(|v| v.to_str().unwrap_or("?")).collect();
                    (k.to_string(), json!(all.join(", ")))
                })
                .collect();
            let echo = json!({
                "method": method, "path": path, "query": query, "headers": hdrs,
                "body": String::from_utf8_lossy(&body),
            });
            Response::builder().header("content-type", "application/json").body(full(echo.to_string())).unwrap()
        }
    }
}

/// An event stream paced by the test: event N goes out when a permit is added.
fn sse(st: Arc<State>) -> Response<Body> {
    let stream = futures_util::stream::unfold((st, 0u32), |(st, n)| async move {
        if n == 3 {
            return None;
        }
        st.sse_gate.acquire().await.unwrap().forget();
        let frame = Frame::data(Bytes::from(format!("data: event {n}\n\n")));
        Some((Ok::<_, Infallible>(frame), (st, n + 1)))
    });
    Response::builder()
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .unwrap()
}

/// Counts body bytes as they arrive (visible to the test before the end).
async fn upload(st: Arc<State>, req: Request<Incoming>) -> Response<Body> {
    let mut body = req.into_body();
    let mut total = 0usize;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else { break };
        if let Some(d) = frame.data_ref() {
            total += d.len();
            st.upload_bytes.fetch_add(d.len(), Ordering::SeqCst);
        }
    }
    Response::new(full(json!({ "received": total }).to_string()))
}

/// The app's own WebSocket: echoes every text frame with an "echo: " prefix.
fn ws_echo(mut req: Request<Incoming>) -> Response<Body> {
    let key = req.headers().get("sec-websocket-key").unwrap().to_str().unwrap().to_owned();
    let on = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let up = on.await.unwrap();
        let mut ws = WebSocketStream::from_raw_socket(TokioIo::new(up), Role::Server, None).await;
        while let Some(Ok(msg)) = ws.next().await {
            if let tokio_tungstenite::tungstenite::Message::Text(t) = msg {
                let _ = ws.send(tokio_tungstenite::tungstenite::Message::text(format!("echo: {t}"))).await;
            }
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header("upgrade", "websocket")
        .header("connection", "Upgrade")
        .header("sec-websocket-accept", derive_accept_key(key.as_bytes()))
        .body(full(""))
        .unwrap()
}
