//! Memory per connection and fan-out throughput of the release binary, on
//! loopback. Not a test: numbers vary with the machine; run it to measure.
//!
//!   cargo build --release && cargo bench --bench relay -- [connections] [messages]
//!
//! It starts `target/release/wsrelay` (in-memory broker), opens `connections`
//! idle WebSockets and reads the sidecar's resident memory before and after,
//! then subscribes them all to one channel, publishes `messages` through the
//! admin API and times until every client has every message.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::Message;

/// CPU seconds (user + system) the process has used.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces) start after ')'.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    ticks / 100.0 // USER_HZ is 100 on Linux
}

fn rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let connections: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(2000);
    let messages: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(200);
    let bin = concat!(env!("CARGO_MANIFEST_DIR"), "/target/release/wsrelay");
    let mut child = Command::new(bin)
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--log-format", "json"])
        .args(["--max-connections", "100000", "--client-rate", "0", "--client-queue", &(messages + 16).to_string()])
        .stderr(Stdio::piped())
        .spawn()
        .expect("build the release binary first: cargo build --release");
    let pid = child.id();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let (public, admin) = loop {
        let line = lines.next().unwrap().unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        if v["message"] == "listening" {
            break (v["public"].as_str().unwrap().to_owned(), v["admin"].as_str().unwrap().to_owned());
        }
    };
    std::thread::spawn(move || for _ in lines {});
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = rss_kb(pid);

    let mut clients = Vec::with_capacity(connections);
    for _ in 0..connections {
        let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{public}/ws?channel=bench")).await.unwrap();
        ws.next().await.unwrap().unwrap(); // welcome
        clients.push(ws);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_kb(pid);
    println!(
        "idle connections: {connections}, sidecar RSS {before} KiB -> {after} KiB: {:.1} KiB per connection",
        (after - before) as f64 / connections as f64
    );

    let started = Instant::now();
    let cpu_before = cpu_secs(pid);
    let readers: Vec<_> = clients
        .into_iter()
        .map(|mut ws| {
            tokio::spawn(async move {
                let mut n = 0;
                while n < messages {
                    match ws.next().await {
                        Some(Ok(Message::Text(_))) => n += 1,
                        Some(Ok(_)) => {}
                        _ => panic!("client closed after {n} messages"),
                    }
                }
                let _ = ws.close(None).await;
            })
        })
        .collect();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    // Eight publishes in flight at a time, as an app with several workers would.
    let payload = "x".repeat(100);
    let publishers: Vec<_> = (0..8)
        .map(|w| {
            let client = client.clone();
            let admin = admin.clone();
            let payload = payload.clone();
            tokio::spawn(async move {
                for i in (w..messages).step_by(8) {
                    let body = format!(r#"{{"channel":"bench","data":{{"n":{i},"pad":"{payload}"}}}}"#);
                    let req = http::Request::post(format!("http://{admin}/api/publish"))
                        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
                        .unwrap();
                    assert_eq!(client.request(req).await.unwrap().status(), 200);
                }
            })
        })
        .collect();
    for p in publishers {
        p.await.unwrap();
    }
    for r in readers {
        r.await.unwrap();
    }
    let secs = started.elapsed().as_secs_f64();
    let cpu = cpu_secs(pid) - cpu_before;
    let deliveries = (connections * messages) as f64;
    println!(
        "fan-out: {messages} messages x {connections} subscribers = {deliveries} deliveries in {secs:.2}s: {:.0} deliveries/s wall (clients share the machine)",
        deliveries / secs
    );
    println!(
        "sidecar CPU: {cpu:.2}s for {deliveries} deliveries: {:.0} deliveries per CPU-second",
        deliveries / cpu.max(0.01)
    );
    let _ = child.kill();
    let _ = child.wait();
}
