//! Real Socket.IO clients for the tests: socket.io-client 4.8 under Node
//! (tests/socketio/client.mjs) and python-socketio (tests/socketio/*.py),
//! driven over stdin/stdout; and a per-request round-robin HTTP proxy (no
//! sticky sessions), as a load balancer in front of two sidecars.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::net::TcpListener;
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/socketio")
}

/// Fails with what to run when the test dependencies are missing.
pub fn require_node_client() {
    assert!(
        dir().join("node_modules/socket.io-client").exists(),
        "socket.io-client is not installed: run `make test` (or `npm ci --prefix tests/socketio`)"
    );
}

/// python3 with python-socketio (the venv `make test` makes).
pub fn python() -> PathBuf {
    let py = dir().join(".venv/bin/python3");
    assert!(py.exists(), "python-socketio is not installed: run `make test` (it makes tests/socketio/.venv)");
    py
}

/// A client process printing JSON lines.
pub struct Driven {
    child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
    /// Everything read so far that no `wait` took.
    pub seen: VecDeque<Value>,
}

impl Driven {
    fn start(mut cmd: Command) -> Driven {
        let mut child = cmd
            .current_dir(dir())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("client process starts");
        let stdin = child.stdin.take().unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        Driven { child, stdin, lines, seen: VecDeque::new() }
    }

    /// socket.io-client connecting to `url` with `opts` (see client.mjs).
    #[allow(clippy::needless_pass_by_value)] // `json!` literals read best inline at the call
    pub fn node(url: &str, opts: Value) -> Driven {
        require_node_client();
        let mut cmd = Command::new("node");
        cmd.arg("client.mjs").arg(url).arg(opts.to_string());
        Driven::start(cmd)
    }

    /// A python script of tests/socketio with arguments.
    pub fn python(script: &str, args: &[&str]) -> Driven {
        let mut cmd = Command::new(python());
        cmd.arg(script).args(args);
        Driven::start(cmd)
    }

    pub async fn send(&mut self, cmd: Value) {
        let mut line = cmd.to_string();
        line.push('\n');
        self.stdin.write_all(line.as_bytes()).await.unwrap();
        self.stdin.flush().await.unwrap();
    }

    /// The next line, within `within` (None: nothing, or the process ended).
    pub async fn next(&mut self, within: Duration) -> Option<Value> {
        if let Some(v) = self.seen.pop_front() {
            return Some(v);
        }
        match tokio::time::timeout(within, self.lines.next_line()).await {
            Ok(Ok(Some(line))) => Some(serde_json::from_str(&line).unwrap_or(Value::String(line))),
            _ => None,
        }
    }

    /// Waits for the first line matching `pred` (within 10 s); the others
    /// stay in `seen`, in order.
    pub async fn wait(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        if let Some(i) = self.seen.iter().position(&pred) {
            return self.seen.remove(i).unwrap();
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let line = match tokio::time::timeout(left, self.lines.next_line()).await {
                Ok(Ok(Some(line))) => line,
                Ok(_) => panic!("client exited while waiting for {what}; seen: {:?}", self.seen),
                Err(_) => panic!("timed out waiting for {what}; seen: {:?}", self.seen),
            };
            let v: Value = serde_json::from_str(&line).unwrap_or(Value::String(line));
            if pred(&v) {
                return v;
            }
            self.seen.push_back(v);
        }
    }

    pub async fn wait_type(&mut self, t: &str) -> Value {
        self.wait(t, |v| v["type"] == t).await
    }

    /// Waits for an event by name.
    pub async fn event(&mut self, name: &str) -> Value {
        self.wait(name, |v| v["type"] == "event" && v["event"] == name).await
    }

    /// Lines that arrive within `within` (all of them).
    pub async fn drain(&mut self, within: Duration) -> Vec<Value> {
        let mut all: Vec<Value> = self.seen.drain(..).collect();
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match tokio::time::timeout(left, self.lines.next_line()).await {
                Ok(Ok(Some(line))) => all.push(serde_json::from_str(&line).unwrap_or(Value::String(line))),
                _ => return all,
            }
        }
    }

    /// Waits for the process to end by itself; its exit success.
    pub async fn finish(mut self, within: Duration) -> (bool, Vec<Value>) {
        let mut all: Vec<Value> = self.seen.drain(..).collect();
        let read = async {
            while let Ok(Some(line)) = self.lines.next_line().await {
                all.push(serde_json::from_str(&line).unwrap_or(Value::String(line)));
            }
        };
        let _ = tokio::time::timeout(within, read).await;
        let ok =
            matches!(tokio::time::timeout(Duration::from_secs(2), self.child.wait()).await, Ok(Ok(s)) if s.success());
        (ok, all)
    }
}

type Body = BoxBody<bytes::Bytes, hyper::Error>;

/// Round-robin over `backends`, per request (a new backend for every
/// request, however the client reuses its connection): a load balancer
/// without sticky sessions. WebSocket upgrades are tunnelled.
pub struct RoundRobin {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
    pub served: Arc<Vec<AtomicUsize>>,
    out: Arc<Vec<std::sync::atomic::AtomicBool>>,
}

impl Drop for RoundRobin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RoundRobin {
    pub async fn start(backends: Vec<SocketAddr>) -> RoundRobin {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let next = Arc::new(AtomicUsize::new(0));
        let served: Arc<Vec<AtomicUsize>> = Arc::new(backends.iter().map(|_| AtomicUsize::new(0)).collect());
        let out: Arc<Vec<std::sync::atomic::AtomicBool>> =
            Arc::new(backends.iter().map(|_| std::sync::atomic::AtomicBool::new(false)).collect());
        let taken_out = out.clone();
        let client: Client<HttpConnector, Incoming> = Client::builder(TokioExecutor::new()).build_http();
        let backends = Arc::new(backends);
        let counts = served.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let (backends, next, client, counts) = (backends.clone(), next.clone(), client.clone(), counts.clone());
                let out = taken_out.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let mut i = next.fetch_add(1, Ordering::Relaxed) % backends.len();
                        // Skip what was taken out of rotation (a failing readiness probe).
                        for _ in 0..backends.len() {
                            if !out[i].load(Ordering::Relaxed) {
                                break;
                            }
                            i = (i + 1) % backends.len();
                        }
                        counts[i].fetch_add(1, Ordering::Relaxed);
                        forward(client.clone(), backends[i], req)
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .with_upgrades()
                        .await;
                });
            }
        });
        RoundRobin { addr, task, served, out }
    }

    /// Takes backend `i` out of rotation (as Kubernetes does with a pod
    /// whose readiness fails when it starts draining).
    pub fn take_out(&self, i: usize) {
        self.out[i].store(true, Ordering::Relaxed);
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

async fn forward(
    client: Client<HttpConnector, Incoming>,
    backend: SocketAddr,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, hyper::Error> {
    let down = hyper::upgrade::on(&mut req);
    let pq = req.uri().path_and_query().map_or("/".to_owned(), |p| p.as_str().to_owned());
    *req.uri_mut() = format!("http://{backend}{pq}").parse().unwrap();
    let mut resp = match client.request(req).await {
        Ok(r) => r,
        Err(_) => {
            let mut r = Response::new(Full::new(bytes::Bytes::from("bad gateway")).map_err(|n| match n {}).boxed());
            *r.status_mut() = StatusCode::BAD_GATEWAY;
            return Ok(r);
        }
    };
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let up = hyper::upgrade::on(&mut resp);
        tokio::spawn(async move {
            if let (Ok(a), Ok(b)) = (down.await, up.await) {
                let _ = tokio::io::copy_bidirectional(&mut TokioIo::new(a), &mut TokioIo::new(b)).await;
            }
        });
    }
    Ok(resp.map(|b| b.boxed()))
}

/// Waits a moment for nothing (the tests' "meanwhile").
pub async fn settle() {
    tokio::time::sleep(Duration::from_millis(300)).await;
}
