//! Attacks an anonymous client could make on a sidecar, each reproduced
//! against the limits that now stop it: silent sockets, starved hooks,
//! node-wide subscription floods, trickled uploads, idle keep-alives and
//! tunnels, deep JSON, cross-site posts to the admin API, expired tokens.

use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use http::{Method, StatusCode};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::common::redis::RedisServer;
use crate::common::upstream::HookReply;
use crate::common::{Binary, Relay, STEP, Upstream, eventually, request, try_request, ws_connect, ws_connect_with};

/// Reads until the peer closes; true if it did within `within`.
async fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

#[tokio::test]
async fn silent_sockets_and_partial_http2_prefaces_are_closed_at_the_handshake_timeout() {
    let app = Upstream::start().await;
    let relay = Relay::start(&app.url(), &["--handshake-timeout", "300ms"]).await;
    let mut socks = Vec::new();
    for i in 0..6 {
        let mut s = TcpStream::connect(relay.public).await.unwrap();
        if i % 2 == 1 {
            s.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
        }
        socks.push(s);
    }
    // The admin listener has the same deadline.
    let mut admin_sock = TcpStream::connect(relay.admin).await.unwrap();
    let started = Instant::now();
    for s in &mut socks {
        assert!(closed_within(s, STEP).await, "a silent socket is closed");
    }
    assert!(closed_within(&mut admin_sock, STEP).await);
    assert!(started.elapsed() >= Duration::from_millis(250), "not before the timeout");
}

#[tokio::test]
async fn idle_keep_alive_connections_are_closed_but_busy_ones_are_not() {
    let app = Upstream::start().await;
    let relay = Relay::start(&app.url(), &["--http-idle-timeout", "400ms"]).await;
    let mut s = TcpStream::connect(relay.public).await.unwrap();
    s.write_all(b"GET /a HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    assert!(closed_within(&mut s, STEP).await, "an idle keep-alive connection is closed");

    // A slow answer (in flight longer than the idle timeout) is not cut.
    let (status, _, _) = request(Method::GET, &relay.http_url("/slow"), None, &[]).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn silent_sockets_cannot_starve_health_checks_or_the_app_under_a_low_fd_limit() {
    let app = Upstream::start().await;
    // 64 descriptors: before the fix, ~55 silent sockets took the process down.
    let bin = Binary::spawn(Some(64), &["--upstream", &app.url(), "--handshake-timeout", "30s"]);
    let mut silent = Vec::new();
    for _ in 0..100 {
        silent.push(TcpStream::connect(&bin.public).await.unwrap());
    }
    let admin = format!("http://{}", bin.admin);
    for path in ["/healthz", "/metrics", "/readyz"] {
        let r = tokio::time::timeout(STEP, request(Method::GET, &format!("{admin}{path}"), None, &[])).await;
        assert_eq!(r.expect("the admin listener answers").0, StatusCode::OK, "{path}");
    }
    drop(silent);
    // Once they go, the public side serves again.
    eventually(STEP, "the app is reachable", || async {
        matches!(
            try_request(Method::GET, &format!("http://{}/x", bin.public), None, &[]).await,
            Ok((StatusCode::OK, _, _))
        )
    })
    .await;
}

#[tokio::test]
async fn message_hooks_cannot_starve_connect_hooks() {
    let app = Upstream::start().await;
    app.set_hook("/hook/connect", HookReply::new(200, &json!({"user":"u"})));
    app.set_hook("/hook/message", HookReply::new(200, &json!({})).delayed(Duration::from_secs(4)));
    let args = [
        "--connect-hook",
        "/hook/connect",
        "--message-hook",
        "/hook/message",
        "--hook-concurrency",
        "2",
        "--hook-timeout",
        "2s",
    ];
    let relay = Relay::start(&app.url(), &args).await;
    let mut busy = Vec::new();
    for _ in 0..4 {
        let mut c = ws_connect(&relay.ws_url("/ws")).await;
        c.send_json(json!({"op":"send","data":{},"id":1})).await;
        busy.push(c);
    }
    eventually(STEP, "message hooks in flight", || async { app.recorded("/hook/message").len() >= 2 }).await;
    // A shared budget of 2 would make this wait out --hook-timeout and get 503.
    let c = ws_connect_with(&relay.ws_url("/ws"), &[]).await;
    assert!(c.is_ok(), "connect hook has its own budget: {:?}", c.err());
}

#[tokio::test]
async fn node_wide_limits_bound_channels_and_subscriptions() {
    let app = Upstream::start().await;
    let relay = Relay::start(&app.url(), &["--max-channels", "3", "--max-node-subscriptions", "4"]).await;
    let mut a = ws_connect(&relay.ws_url("/ws")).await;
    let mut b = ws_connect(&relay.ws_url("/ws")).await;
    for ch in ["c1", "c2", "c3"] {
        a.subscribe(ch).await;
    }
    let r = a.request(json!({"op":"subscribe","channel":"c4"})).await;
    assert_eq!(r["error"]["code"], "limit_exceeded", "{r}");
    b.subscribe("c1").await;
    let r = b.request(json!({"op":"subscribe","channel":"c2"})).await;
    assert_eq!(r["error"]["code"], "limit_exceeded", "node subscriptions: {r}");
    // A channel named in the URL meets the same limits.
    let refused = ws_connect_with(&relay.ws_url("/ws?channel=c9"), &[]).await.err();
    assert_eq!(refused, Some(StatusCode::BAD_REQUEST));
    // Freed capacity is usable again.
    a.request(json!({"op":"unsubscribe","channel":"c3","id":2})).await;
    b.subscribe("c2").await;
    assert_eq!(relay.metric("wsrelay_subscriptions").await, 4.0);
}

#[tokio::test]
async fn a_trickled_upload_is_cut_but_a_steady_one_goes_through() {
    let app = Upstream::start().await;
    let relay = Relay::start(&app.url(), &["--upstream-timeout", "1s", "--upstream-min-upload-rate", "2048"]).await;
    let mut s = TcpStream::connect(relay.public).await.unwrap();
    s.write_all(b"POST /upload HTTP/1.1\r\nhost: x\r\ncontent-length: 100000\r\n\r\n").await.unwrap();
    let started = Instant::now();
    let mut answer = Vec::new();
    // One byte every 200 ms: each resets a plain "since last progress" clock.
    loop {
        if s.write_all(b"x").await.is_err() {
            break;
        }
        let mut buf = [0u8; 1024];
        match tokio::time::timeout(Duration::from_millis(200), s.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => break,
            Ok(Ok(n)) => {
                answer.extend_from_slice(&buf[..n]);
                break;
            }
            Err(_) => {}
        }
        assert!(started.elapsed() < STEP, "the trickle was never cut");
    }
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 504"), "{text}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

/// Whether a WebSocket ends (closed or reset) within `within`.
async fn ends_within<S>(ws: &mut S, within: Duration) -> bool
where
    S: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    let end = async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {}
            }
        }
    };
    tokio::time::timeout(within, end).await.is_ok()
}

#[tokio::test]
async fn tunnels_are_counted_closed_when_idle_and_drained() {
    let app = Upstream::start().await;
    let relay = Relay::start(&app.url(), &["--tunnel-idle-timeout", "500ms"]).await;
    let (mut ws, _) = tokio_tungstenite::connect_async(relay.ws_url("/ws-echo")).await.expect("tunnelled");
    ws.send(Message::text("hi")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("echo: hi"));
    assert_eq!(relay.metric("wsrelay_tunnels").await, 1.0);
    // Nothing moves: the tunnel is closed.
    assert!(ends_within(&mut ws, STEP).await, "an idle tunnel is closed");
    relay.wait_metric("wsrelay_tunnels", |v| v == 0.0).await;

    // And the drain closes the ones still moving.
    let relay2 = Relay::start(&app.url(), &["--drain-timeout", "2s"]).await;
    let (mut ws, _) = tokio_tungstenite::connect_async(relay2.ws_url("/ws-echo")).await.expect("tunnelled");
    ws.send(Message::text("hi")).await.unwrap();
    ws.next().await.unwrap().unwrap();
    let stopping = tokio::spawn(relay2.stop());
    assert!(ends_within(&mut ws, STEP).await, "the drain closes tunnels");
    tokio::time::timeout(STEP, stopping).await.unwrap().unwrap();
}

#[tokio::test]
async fn deep_json_is_refused_from_clients_and_the_api() {
    let app = Upstream::start().await;
    let cfg = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(cfg.path(), "[[namespace]]\nprefix = \"open:\"\npublish = \"anyone\"\n").unwrap();
    let relay = Relay::start(&app.url(), &["--config", cfg.path().to_str().unwrap()]).await;
    let deep: serde_json::Value = serde_json::from_str(&("[".repeat(100) + &"]".repeat(100))).unwrap();
    let (status, body) = relay.publish(json!({"channel":"open:a","data": deep})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let mut c = ws_connect(&relay.ws_url("/ws")).await;
    let text =
        format!(r#"{{"op":"publish","channel":"open:a","id":1,"data":{}}}"#, "[".repeat(30_000) + &"]".repeat(30_000));
    c.send_text(&text).await;
    let r = c.reply_to(json!(1)).await;
    assert_eq!(r["error"]["code"], "bad_request", "{r}");
    assert!(r["error"]["message"].as_str().unwrap().contains("nested"), "{r}");
}

#[tokio::test]
async fn the_admin_api_refuses_posts_not_declared_as_json() {
    let app = Upstream::start().await;
    let relay = Relay::start(&app.url(), &[]).await;
    // What a cross-site <form> or fetch without preflight can send.
    for ct in ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"] {
        let body = json!({"channel":"a","data":1}).to_string();
        let (status, _, _) =
            request(Method::POST, &relay.admin_url("/api/publish"), Some(body), &[("content-type", ct.to_owned())])
                .await;
        assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{ct}");
    }
    let (status, _) = relay.publish(json!({"channel":"a","data":1})).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn a_jwt_session_is_closed_when_its_token_expires() {
    let app = Upstream::start().await;
    let relay = Relay::start(&app.url(), &["--jwt-secret", "s3cret", "--jwt-leeway", "0s"]).await;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    let claims = json!({"sub":"9","exp": now + 2});
    let token =
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(b"s3cret")).unwrap();
    let mut c = ws_connect(&relay.ws_url(&format!("/ws?token={token}"))).await;
    assert_eq!(c.request(json!({"op":"ping"})).await["ok"], true);
    let close = c.expect_close(STEP).await.expect("a close frame");
    assert_eq!(close.code, CloseCode::Policy);
    assert!(close.reason.contains("expired"), "{close:?}");
    assert_eq!(relay.metric("wsrelay_disconnects_total{reason=\"token_expired\"}").await, 1.0);
}

#[tokio::test]
async fn a_cpu_starved_node_does_not_take_itself_for_a_dead_redis() {
    let redis = RedisServer::start();
    let app = Upstream::start().await;
    let args = ["--upstream", &app.url(), "--redis-url", &redis.url(), "--redis-probe-interval", "200ms"];
    let bin = Binary::spawn(None, &[&args[..], &["--redis-probe-timeout", "1s"]].concat());
    eventually(STEP, "broker up", || async { bin.metric("wsrelay_broker_up").await == Some(1.0) }).await;
    // Several probes fit in the stop: the node must not blame Redis for it.
    let pid = bin.child.id().to_string();
    assert!(Command::new("kill").args(["-STOP", &pid]).status().unwrap().success());
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(Command::new("kill").args(["-CONT", &pid]).status().unwrap().success());
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(bin.metric("wsrelay_broker_probe_failures_total").await, Some(0.0));
    assert_eq!(bin.metric("wsrelay_broker_reconnects_total").await, Some(0.0));
    assert_eq!(bin.metric("wsrelay_broker_up").await, Some(1.0));
}

pub(crate) fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// A WebSocket opened by hand (so a frame can be left half sent).
async fn raw_ws(addr: &str, path: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "GET {path} HTTP/1.1\r\nhost: {addr}\r\nupgrade: websocket\r\nconnection: upgrade\r\n\
         sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
    s
}

#[tokio::test]
async fn the_worst_case_the_limits_allow_stays_within_the_memory_budget() {
    const CONNS: u64 = 150;
    const MAX_MSG: u64 = 65_536;
    const QUEUED: u64 = 4 << 20;
    let app = Upstream::start().await;
    let bin = Binary::spawn(
        None,
        &[
            "--upstream",
            &app.url(),
            "--max-connections",
            &CONNS.to_string(),
            "--max-queued-bytes",
            &QUEUED.to_string(),
            "--client-rate",
            "0",
        ],
    );
    let pid = bin.child.id();
    let base = rss_kib(pid);
    // Every connection subscribed, never reading, and holding a frame that
    // announces the largest size and sends most of it.
    let mut socks = Vec::new();
    for _ in 0..CONNS {
        let mut s = raw_ws(&bin.public, "/ws?channel=flood").await;
        let mut frame = vec![0x81u8, 0xFF];
        frame.extend_from_slice(&MAX_MSG.to_be_bytes());
        frame.extend_from_slice(&[1, 2, 3, 4]);
        frame.extend(std::iter::repeat_n(b'a', 60_000));
        s.write_all(&frame).await.unwrap();
        socks.push(s);
    }
    // The app floods the channel with the largest messages.
    let data = "x".repeat(60_000);
    for _ in 0..60 {
        let body = json!({"channel":"flood","data": data}).to_string();
        let (status, _, _) = request(
            Method::POST,
            &format!("http://{}/api/publish", bin.admin),
            Some(body),
            &[("content-type", "application/json".to_owned())],
        )
        .await;
        assert_eq!(status, StatusCode::OK);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let peak = rss_kib(pid);
    // README "Memory budget": per connection, the read buffer (4 KiB) and a
    // partial frame (max-message-bytes), the write buffer (16 KiB + 2 frames)
    // and the session (~4 KiB); plus --max-queued-bytes node-wide.
    let per_conn_kib = 4 + MAX_MSG / 1024 + 16 + 2 * (MAX_MSG / 1024 + 1) + 4;
    let budget = base + CONNS * per_conn_kib + QUEUED / 1024;
    eprintln!("RSS base {base} KiB, peak {peak} KiB, budget {budget} KiB");
    assert!(peak <= budget, "RSS {peak} KiB over the budget {budget} KiB (base {base} KiB)");
    drop(socks);
}
