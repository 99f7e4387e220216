//! Test harness: a real upstream app (HTTP + WebSocket + hooks), wsrelay
//! on port 0 beside it (in-process through `wsrelay::run`, or the real
//! binary), real WebSocket and HTTP clients, and real `redis-server`
//! processes on free ports.

#![allow(dead_code)]

pub mod redis;
pub mod sio;
pub mod upstream;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub use self::upstream::Upstream;

pub const STEP: Duration = Duration::from_secs(10);

/// A wsrelay running in this process on two port-0 listeners.
pub struct Relay {
    pub public: SocketAddr,
    pub admin: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Relay {
    /// Starts wsrelay with `--upstream <upstream>` and `args`.
    pub async fn start(upstream: &str, args: &[&str]) -> Relay {
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::start_with_admin(upstream, args, admin).await
    }

    /// As `start`, on an admin listener the caller bound (and kept, so no
    /// other test can take its port meanwhile).
    pub async fn start_with_admin(upstream: &str, args: &[&str], admin: TcpListener) -> Relay {
        let mut argv = vec!["wsrelay", "--upstream", upstream];
        argv.extend_from_slice(args);
        init_log();
        let config = wsrelay::config::Config::from_args(argv).expect("valid test config");
        let public = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (public_addr, admin_addr) = (public.local_addr().unwrap(), admin.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let listeners = wsrelay::Listeners { public, admin };
            wsrelay::run(config, listeners, async {
                let _ = stopped.await;
            })
            .await
            .expect("relay runs");
        });
        let relay = Relay { public: public_addr, admin: admin_addr, stop: Some(stop), task: Some(task) };
        relay.wait_healthy().await;
        relay
    }

    async fn wait_healthy(&self) {
        for _ in 0..200 {
            if let Ok((StatusCode::OK, _, _)) = try_request(Method::GET, &self.admin_url("/healthz"), None, &[]).await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("relay did not become healthy");
    }

    pub fn ws_url(&self, path_and_query: &str) -> String {
        format!("ws://{}{}", self.public, path_and_query)
    }
    pub fn http_url(&self, path_and_query: &str) -> String {
        format!("http://{}{}", self.public, path_and_query)
    }
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }

    /// POST /api/publish with a JSON body; returns status and JSON answer.
    pub async fn publish(&self, body: Value) -> (StatusCode, Value) {
        self.api("/api/publish", body, None).await
    }

    pub async fn api(&self, path: &str, body: Value, token: Option<&str>) -> (StatusCode, Value) {
        let mut headers = vec![("content-type", "application/json".to_owned())];
        if let Some(t) = token {
            headers.push(("authorization", format!("Bearer {t}")));
        }
        let (status, _, body) = request(Method::POST, &self.admin_url(path), Some(body.to_string()), &headers).await;
        let v = serde_json::from_slice(&body).unwrap_or(Value::Null);
        (status, v)
    }

    pub async fn readyz(&self) -> StatusCode {
        request(Method::GET, &self.admin_url("/readyz"), None, &[]).await.0
    }

    /// `/readyz?broker`: ready and the broker reachable.
    pub async fn readyz_broker(&self) -> StatusCode {
        request(Method::GET, &self.admin_url("/readyz?broker"), None, &[]).await.0
    }

    /// Waits until the node has tried the broker and failed at least once:
    /// a 503 before that would prove nothing.
    pub async fn wait_broker_failure(&self) {
        eventually(STEP, "a failed broker connection", || async {
            self.metric("wsrelay_broker_connection_errors_total").await >= 1.0
        })
        .await;
    }

    pub async fn metrics(&self) -> String {
        let (status, _, body) = request(Method::GET, &self.admin_url("/metrics"), None, &[]).await;
        assert_eq!(status, StatusCode::OK);
        String::from_utf8(body.to_vec()).unwrap()
    }

    /// The value of one series, e.g. `wsrelay_disconnects_total{reason="slow_consumer"}`;
    /// panics if the series does not exist (a typo must not read as 0).
    pub async fn metric(&self, series: &str) -> f64 {
        let text = self.metrics().await;
        metric_value(&text, series).unwrap_or_else(|| panic!("no series {series} in /metrics"))
    }

    /// Polls a metric until it exists and `pred` holds (or panics after `STEP`).
    pub async fn wait_metric(&self, series: &str, pred: impl Fn(f64) -> bool) -> f64 {
        let deadline = tokio::time::Instant::now() + STEP;
        loop {
            let v = metric_value(&self.metrics().await, series);
            if let Some(v) = v.filter(|v| pred(*v)) {
                return v;
            }
            if tokio::time::Instant::now() > deadline {
                panic!("{series} stayed at {v:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the relay (as on SIGTERM) and waits for it to finish.
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(60), t).await.expect("relay stops").unwrap();
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// The value of `series` in a Prometheus text exposition, if it is there.
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok()).flatten()
    })
}

type Stream = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A WebSocket test client that speaks `wsrelay.v1`.
pub struct WsClient {
    pub ws: Stream,
    pub welcome: Value,
    /// Frames received while waiting for something else.
    backlog: VecDeque<Value>,
    next_id: u64,
}

/// Opens a WebSocket with extra request headers; Err carries the HTTP status of a refused upgrade.
pub async fn ws_connect_with(url: &str, headers: &[(&str, &str)]) -> Result<WsClient, StatusCode> {
    let mut req = url.into_client_request().unwrap();
    for (k, v) in headers {
        req.headers_mut().insert(http::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
    }
    let (ws, _resp) = match tokio::time::timeout(STEP, tokio_tungstenite::connect_async(req)).await {
        Ok(Ok(pair)) => pair,
        Ok(Err(tokio_tungstenite::tungstenite::Error::Http(resp))) => return Err(resp.status()),
        Ok(Err(e)) => panic!("connect {url}: {e}"),
        Err(_) => panic!("connect {url}: timed out"),
    };
    let mut c = WsClient { ws, welcome: Value::Null, backlog: VecDeque::new(), next_id: 1 };
    let welcome = c.recv().await;
    assert_eq!(welcome["op"], "welcome", "first frame must be welcome: {welcome}");
    c.welcome = welcome;
    Ok(c)
}

pub async fn ws_connect(url: &str) -> WsClient {
    ws_connect_with(url, &[]).await.expect("upgrade accepted")
}

impl WsClient {
    pub fn connection_id(&self) -> String {
        self.welcome["connection"].as_str().unwrap().to_owned()
    }

    pub async fn send_text(&mut self, text: &str) {
        self.ws.send(Message::text(text)).await.unwrap();
    }

    pub async fn send_json(&mut self, v: Value) {
        self.send_text(&v.to_string()).await;
    }

    /// Next JSON frame (backlog first), skipping pings; panics after `STEP`.
    pub async fn recv(&mut self) -> Value {
        if let Some(v) = self.backlog.pop_front() {
            return v;
        }
        self.recv_wire(STEP).await.unwrap_or_else(|| panic!("no frame within {STEP:?}"))
    }

    /// Next JSON frame off the wire within `within`, or None.
    pub async fn recv_wire(&mut self, within: Duration) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let msg = match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => return None,
                Ok(None) => panic!("connection closed while waiting for a frame"),
                Ok(Some(Err(e))) => panic!("read error: {e}"),
                Ok(Some(Ok(m))) => m,
            };
            match msg {
                Message::Text(t) => return Some(serde_json::from_str(&t).expect("server frames are JSON")),
                Message::Close(c) => panic!("closed while waiting for a frame: {c:?}"),
                _ => continue,
            }
        }
    }

    /// Asserts nothing arrives within `within`.
    pub async fn expect_silence(&mut self, within: Duration) {
        assert!(self.backlog.is_empty(), "unexpected frames: {:?}", self.backlog);
        if let Some(v) = self.recv_wire(within).await {
            panic!("unexpected frame: {v}");
        }
    }

    /// Sends `op` with a fresh id and returns the reply with that id,
    /// keeping other frames for `recv`.
    pub async fn request(&mut self, mut op: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        op["id"] = json!(id);
        self.send_json(op).await;
        self.reply_to(json!(id)).await
    }

    pub async fn reply_to(&mut self, id: Value) -> Value {
        loop {
            let v = self.recv_wire(STEP).await.expect("reply in time");
            if v["op"] == "reply" && v["id"] == id {
                return v;
            }
            self.backlog.push_back(v);
        }
    }

    pub async fn subscribe(&mut self, channel: &str) {
        let r = self.request(json!({"op":"subscribe","channel":channel})).await;
        assert_eq!(r["ok"], true, "subscribe {channel}: {r}");
    }

    /// Reads until the server closes; returns the close frame (None if the socket just ended).
    pub async fn expect_close(&mut self, within: Duration) -> Option<CloseFrame> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => panic!("not closed within {within:?}"),
                Ok(None) | Ok(Some(Err(_))) => return None,
                Ok(Some(Ok(Message::Close(c)))) => return c,
                Ok(Some(Ok(_))) => continue,
            }
        }
    }
}

fn http_client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// One HTTP request with a whole body; `Err` if it could not be made.
pub async fn try_request(
    method: Method,
    url: &str,
    body: Option<String>,
    headers: &[(&str, String)],
) -> Result<(StatusCode, HeaderMap, Bytes), String> {
    let mut req = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, v);
    }
    let req = req.body(Full::new(Bytes::from(body.unwrap_or_default()))).map_err(|e| e.to_string())?;
    let resp = tokio::time::timeout(STEP, http_client().request(req))
        .await
        .map_err(|_| "timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = tokio::time::timeout(STEP, resp.into_body().collect())
        .await
        .map_err(|_| "body timed out".to_owned())?
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, headers, body))
}

pub async fn request(
    method: Method,
    url: &str,
    body: Option<String>,
    headers: &[(&str, String)],
) -> (StatusCode, HeaderMap, Bytes) {
    try_request(method, url, body, headers).await.unwrap_or_else(|e| panic!("request {url}: {e}"))
}

/// Polls `f` until it returns true (or panics after `within`).
pub async fn eventually<F, Fut>(within: Duration, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    while !f().await {
        if tokio::time::Instant::now() > deadline {
            panic!("timed out waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Logs of the in-process relays, when `TEST_LOG` is set (e.g. `TEST_LOG=wsrelay=debug`).
pub fn init_log() {
    if let Ok(filter) = std::env::var("TEST_LOG") {
        let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
    }
}

/// The wsrelay binary in its own process (optionally under a file-descriptor
/// limit), its addresses read from its JSON log.
pub struct Binary {
    pub child: std::process::Child,
    pub public: String,
    pub admin: String,
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Binary {
    pub fn spawn(fd_limit: Option<u32>, args: &[&str]) -> Binary {
        use std::io::{BufRead, BufReader};
        use std::process::{Command, Stdio};
        const BIN: &str = env!("CARGO_BIN_EXE_wsrelay");
        let limit = fd_limit.map_or(String::new(), |n| format!("ulimit -n {n} && "));
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(format!("{limit}exec \"$0\" \"$@\""))
            .arg(BIN)
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--log-format", "json"])
            .args(args)
            .env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let mut bin = Binary { child, public: String::new(), admin: String::new() };
        for line in lines.by_ref().map_while(Result::ok) {
            let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
            if v["message"] == "listening" {
                bin.public = v["public"].as_str().unwrap().to_owned();
                bin.admin = v["admin"].as_str().unwrap().to_owned();
                break;
            }
        }
        assert!(!bin.admin.is_empty(), "the binary started");
        // Keep reading its log so it never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines.map_while(Result::ok) {});
        bin
    }

    /// One series from its /metrics, None if absent.
    pub async fn metric(&self, series: &str) -> Option<f64> {
        let (_, _, body) = request(Method::GET, &format!("http://{}/metrics", self.admin), None, &[]).await;
        metric_value(&String::from_utf8_lossy(&body), series)
    }
}
