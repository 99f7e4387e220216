//! The Socket.IO front against the protocol as the reference server
//! behaves (issue 22, the deviations the socket.io-protocol suite found):
//! raw Engine.IO over polling and WebSocket, so every byte is checked.

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use http::{Method, StatusCode};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::common::upstream::HookReply;
use crate::common::{Relay, Upstream, request};
use crate::socketio::{PATH, alice, open_polling, relay};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The suite's timings: pings every 300 ms, pingTimeout 200 ms.
const FAST: [&str; 6] = ["--ping-interval", "300ms", "--idle-timeout", "500ms", "--handshake-timeout", "5s"];

async fn fast_relay(app: &Upstream, extra: &[&str]) -> Relay {
    let mut args = FAST.to_vec();
    args.extend_from_slice(extra);
    relay(app, &args).await
}

async fn ws_open(relay: &Relay) -> Ws {
    let url = relay.ws_url(&format!("{PATH}?EIO=4&transport=websocket"));
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let open = next_text(&mut ws).await.expect("the open packet");
    assert!(open.starts_with("0{"), "{open}");
    ws
}

/// The next text frame (None: the connection closed).
async fn next_text(ws: &mut Ws) -> Option<String> {
    loop {
        match tokio::time::timeout(Duration::from_secs(5), ws.next()).await.expect("a frame within 5 s") {
            Some(Ok(Message::Text(t))) => return Some(t.as_str().to_owned()),
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return None,
            Some(Ok(_)) => {}
        }
    }
}

/// The next text frame that is not a ping.
async fn next_packet(ws: &mut Ws) -> Option<String> {
    loop {
        match next_text(ws).await {
            Some(t) if t == "2" => ws.send(Message::text("3")).await.unwrap(),
            other => return other,
        }
    }
}

async fn closes_within(ws: &mut Ws, within: Duration) -> bool {
    tokio::time::timeout(within, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await
    .is_ok()
}

fn poll_url(relay: &Relay, sid: &str) -> String {
    relay.http_url(&format!("{PATH}?EIO=4&transport=polling&sid={sid}"))
}

async fn get(url: &str) -> (StatusCode, String) {
    let (s, _, b) = request(Method::GET, url, None, &[]).await;
    (s, String::from_utf8_lossy(&b).into_owned())
}

async fn post(url: &str, body: &str) -> (StatusCode, String) {
    let h = [("content-type", "text/plain;charset=UTF-8".to_owned())];
    let (s, _, b) = request(Method::POST, url, Some(body.to_owned()), &h).await;
    (s, String::from_utf8_lossy(&b).into_owned())
}

#[tokio::test]
async fn the_heartbeat_runs_from_the_open_packet_and_a_missed_pong_ends_the_session() {
    let app = Upstream::start().await;
    alice(&app);
    let relay = fast_relay(&app, &[]).await;
    // Polling, before any CONNECT: pings, answered.
    let sid = open_polling(&relay.http_url("")).await;
    let url = poll_url(&relay, &sid);
    for _ in 0..3 {
        assert_eq!(get(&url).await, (StatusCode::OK, "2".to_owned()));
        assert_eq!(post(&url, "3").await.0, StatusCode::OK);
    }
    // Not answered: gone at pingTimeout, and the next GET is a 400.
    let sid = open_polling(&relay.http_url("")).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(get(&poll_url(&relay, &sid)).await.0, StatusCode::BAD_REQUEST);
    // WebSocket, before CONNECT: pings; silent, closed long before the
    // 5 s handshake timeout.
    let mut ws = ws_open(&relay).await;
    for _ in 0..3 {
        assert_eq!(next_text(&mut ws).await.as_deref(), Some("2"));
        ws.send(Message::text("3")).await.unwrap();
    }
    let mut silent = ws_open(&relay).await;
    assert!(closes_within(&mut silent, Duration::from_secs(2)).await, "a silent socket outlived its pingTimeout");
}

#[tokio::test]
async fn after_connect_a_missed_pong_ends_the_session_at_ping_timeout_not_a_tick_later() {
    let app = Upstream::start().await;
    alice(&app);
    // Pings every 1 s, pingTimeout 200 ms: silent, closed ~1.2 s after
    // CONNECT (checking at the next ping would make it 2 s).
    let relay = relay(&app, &["--ping-interval", "1s", "--idle-timeout", "1200ms"]).await;
    let mut ws = ws_open(&relay).await;
    ws.send(Message::text("40")).await.unwrap();
    let answer = next_text(&mut ws).await.unwrap();
    assert!(answer.starts_with("40{"), "{answer}");
    let connected = Instant::now();
    assert!(closes_within(&mut ws, Duration::from_millis(1800)).await, "not closed at pingTimeout");
    assert!(connected.elapsed() >= Duration::from_millis(1100), "closed before its pingTimeout");
}

#[tokio::test]
async fn polling_close_answers_the_waiting_get_with_a_noop_and_then_400() {
    let app = Upstream::start().await;
    alice(&app);
    let relay = relay(&app, &[]).await;
    let sid = open_polling(&relay.http_url("")).await;
    let url = poll_url(&relay, &sid);
    let waiting = tokio::spawn({
        let url = url.clone();
        async move { get(&url).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(post(&url, "1").await.0, StatusCode::OK);
    assert_eq!(waiting.await.unwrap(), (StatusCode::OK, "6".to_owned()));
    assert_eq!(get(&url).await.0, StatusCode::BAD_REQUEST);
    // An invalid packet in a POST: 400, and the session is over.
    let sid = open_polling(&relay.http_url("")).await;
    let url = poll_url(&relay, &sid);
    let (s, body) = post(&url, "abc").await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(get(&url).await.0, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn a_second_upgrade_of_a_session_opens_and_is_closed() {
    let app = Upstream::start().await;
    alice(&app);
    let relay = relay(&app, &[]).await;
    let sid = open_polling(&relay.http_url("")).await;
    let url = relay.ws_url(&format!("{PATH}?EIO=4&transport=websocket&sid={sid}"));
    let (mut first, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    first.send(Message::text("2probe")).await.unwrap();
    assert_eq!(next_text(&mut first).await.as_deref(), Some("3probe"));
    first.send(Message::text("5")).await.unwrap();
    // The second: 101, then closed (an HTTP error would fail `ws` clients).
    let (mut second, resp) = tokio_tungstenite::connect_async(&url).await.expect("the upgrade completes");
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    assert!(closes_within(&mut second, Duration::from_secs(2)).await);
    // The first goes on: it can CONNECT.
    first.send(Message::text("40")).await.unwrap();
    assert!(next_packet(&mut first).await.unwrap().starts_with("40{"));
}

#[tokio::test]
async fn leaving_the_main_namespace_keeps_the_engineio_connection() {
    let app = Upstream::start().await;
    alice(&app);
    let relay = fast_relay(&app, &[]).await;
    let mut ws = ws_open(&relay).await;
    ws.send(Message::text("40")).await.unwrap();
    assert!(next_packet(&mut ws).await.unwrap().starts_with("40{"));
    ws.send(Message::text("41")).await.unwrap();
    // The heartbeat goes on: the next frame is a ping, not a close.
    assert_eq!(next_text(&mut ws).await.as_deref(), Some("2"));
    ws.send(Message::text("3")).await.unwrap();
    // And the client may CONNECT again.
    ws.send(Message::text("40")).await.unwrap();
    assert!(next_packet(&mut ws).await.unwrap().starts_with("40{"));
}

#[tokio::test]
async fn connect_refusals_carry_the_apps_message_and_recovery_can_be_off() {
    let app = Upstream::start().await;
    app.set_hook("/ws/connect", HookReply::new(403, &json!({"error": {"message": "Invalid namespace"}})));
    let relay = relay(&app, &["--socketio-recovery-window", "0s"]).await;
    let mut ws = ws_open(&relay).await;
    ws.send(Message::text("40/random")).await.unwrap();
    assert_eq!(next_packet(&mut ws).await.unwrap(), r#"44/random,{"message":"Invalid namespace"}"#);
    // Without recovery, the CONNECT answer is exactly {"sid"}.
    alice(&app);
    let mut ws = ws_open(&relay).await;
    ws.send(Message::text("40")).await.unwrap();
    let answer = next_packet(&mut ws).await.unwrap();
    let v: Value = serde_json::from_str(answer.strip_prefix("40").unwrap()).unwrap();
    assert_eq!(v.as_object().unwrap().keys().collect::<Vec<_>>(), ["sid"], "{answer}");
}

#[tokio::test]
async fn packets_that_cannot_be_parsed_close_the_connection() {
    let app = Upstream::start().await;
    alice(&app);
    let relay = relay(&app, &[]).await;
    for bad in ["4abc", "42{}", r#"42abc["message-with-ack",1]"#, "41extra"] {
        let mut ws = ws_open(&relay).await;
        ws.send(Message::text("40")).await.unwrap();
        assert!(next_packet(&mut ws).await.unwrap().starts_with("40{"));
        ws.send(Message::text(bad)).await.unwrap();
        assert!(closes_within(&mut ws, Duration::from_secs(2)).await, "{bad} left the connection open");
    }
    // Before CONNECT too.
    let mut ws = ws_open(&relay).await;
    ws.send(Message::text("4abc")).await.unwrap();
    assert!(closes_within(&mut ws, Duration::from_secs(2)).await);
}

#[tokio::test]
async fn a_waiting_get_whose_client_goes_away_ends_the_session_at_once() {
    // Engine.IO: "poll connection closed prematurely". A tab that navigates
    // away leaves no socket in its rooms until a ping timeout (a minute).
    let app = Upstream::start().await;
    alice(&app);
    let relay = relay(&app, &["--disconnect-hook", "/ws/gone"]).await;
    app.set_hook("/ws/gone", HookReply::new(200, &json!({})));
    let base = relay.http_url("");
    let sid = open_polling(&base).await;
    let url = format!("{base}{PATH}?EIO=4&transport=polling&sid={sid}");
    let (s, _, _) = request(Method::POST, &url, Some("40".into()), &[]).await;
    assert_eq!(s, StatusCode::OK);
    let (_, _, body) = request(Method::GET, &url, None, &[]).await;
    let connected = String::from_utf8_lossy(&body).into_owned();
    assert!(connected.starts_with("40{"), "{connected}");
    // A GET that waits, then its connection closes.
    let mut tcp = TcpStream::connect(relay.public).await.unwrap();
    let head = format!("GET {PATH}?EIO=4&transport=polling&sid={sid} HTTP/1.1\r\nHost: x\r\n\r\n");
    tokio::io::AsyncWriteExt::write_all(&mut tcp, head.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    drop(tcp);
    relay.wait_metric("wsrelay_disconnects_total{reason=\"error\"}", |v| v == 1.0).await;
    assert!(started.elapsed() < Duration::from_secs(3), "ended after {:?}", started.elapsed());
    let mut told = Vec::new();
    for _ in 0..50 {
        told = app.recorded("/ws/gone");
        if !told.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(told.first().map(|r| r.json()["reason"].clone()), Some(json!("error")));
    let (s, _, _) = request(Method::GET, &url, None, &[]).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "the session is gone");
}
