//! Limits: slow consumers, oversize frames, rate, connection count, idle
//! clients. Asserted through what clients see and the metrics, never timings.

use std::time::Duration;

use futures_util::SinkExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::common::{Relay, STEP, Upstream, ws_connect, ws_connect_with};

#[tokio::test]
async fn slow_consumer_is_closed_with_1013_and_the_fast_one_gets_everything() {
    let app = Upstream::start().await;
    let relay = Relay::start(&app.url(), &["--client-queue", "32"]).await;
    let mut fast = ws_connect(&relay.ws_url("/ws")).await;
    let mut slow = ws_connect(&relay.ws_url("/ws")).await;
    fast.subscribe("flood").await;
    slow.subscribe("flood").await;
    // `slow` stops reading from here on.

    let (count_tx, mut count_rx) = tokio::sync::watch::channel(0usize);
    let reader = tokio::spawn(async move {
        let mut next = 0i64;
        loop {
            let m = fast.recv().await;
            assert_eq!(m["data"]["n"], next, "the fast client sees every message in order");
            next += 1;
            let _ = count_tx.send(next as usize);
            if m["data"]["last"] == true {
                return next;
            }
        }
    });

    let payload = "x".repeat(32 * 1024);
    let slow_closed = "wsrelay_disconnects_total{reason=\"slow_consumer\"}";
    let mut sent = 0i64;
    loop {
        assert!(sent < 20_000, "the slow client was never closed");
        let (status, _) = relay.publish(json!({"channel":"flood","data":{"n":sent,"pad":payload}})).await;
        assert_eq!(status, 200);
        sent += 1;
        // Publish no faster than the fast client reads, so only `slow` falls behind.
        count_rx.wait_for(|n| *n as i64 + 16 >= sent).await.unwrap();
        if sent % 50 == 0 && relay.metric(slow_closed).await >= 1.0 {
            break;
        }
    }
    for _ in 0..20 {
        relay.publish(json!({"channel":"flood","data":{"n":sent,"pad":"after"}})).await;
        sent += 1;
    }
    relay.publish(json!({"channel":"flood","data":{"n":sent,"last":true}})).await;
    sent += 1;
    let received = tokio::time::timeout(STEP * 3, reader).await.unwrap().unwrap();
    assert_eq!(received, sent, "fast client got every message");

    let mut slow_got = 0i64;
    let close = loop {
        match tokio::time::timeout(STEP, futures_util::StreamExt::next(&mut slow.ws)).await.expect("closed in time") {
            Some(Ok(Message::Text(_))) => slow_got += 1,
            Some(Ok(Message::Close(c))) => break c.expect("a close frame with a code"),
            Some(Ok(_)) => {}
            other => panic!("the socket ended without a close frame: {other:?}"),
        }
    };
    assert_eq!(close.code, CloseCode::Again, "1013 try again later: {close:?}");
    assert!(slow_got < sent, "the slow client was cut off: it got {slow_got} of {sent}");
    assert_eq!(relay.metric(slow_closed).await, 1.0);
    assert!(relay.metric("wsrelay_messages_dropped_total{reason=\"slow_consumer\"}").await >= 1.0);
    // The queue bound is what keeps memory bounded: the slow session never
    // held more than --client-queue messages, and it is gone now.
    assert_eq!(relay.metric("wsrelay_connections").await, 1.0);
    // And what it held is given back to the node's queue budget.
    relay.wait_metric("wsrelay_queued_bytes", |v| v == 0.0).await;
    let delivered = relay.metric("wsrelay_messages_delivered_total").await;
    assert!(delivered >= sent as f64, "fast client's deliveries counted: {delivered} < {sent}");
}

#[tokio::test]
async fn oversize_frame_is_closed_with_1009() {
    let app = Upstream::start().await;
    let relay = Relay::start(&app.url(), &["--max-message-bytes", "1024"]).await;
    let mut c = ws_connect(&relay.ws_url("/ws")).await;
    let big = format!(r#"{{"op":"ping","pad":"{}"}}"#, "x".repeat(2000));
    c.ws.send(Message::text(big)).await.unwrap();
    let close = c.expect_close(STEP).await.expect("a close frame");
    assert_eq!(close.code, CloseCode::Size);
    relay.wait_metric("wsrelay_disconnects_total{reason=\"too_large\"}", |v| v == 1.0).await;
}

#[tokio::test]
async fn frames_over_the_rate_are_refused_then_closed_with_1008() {
    let app = Upstream::start().await;
    let relay = Relay::start(&app.url(), &["--client-rate", "1", "--client-burst", "3"]).await;
    let mut c = ws_connect(&relay.ws_url("/ws")).await;
    // Four frames at once: three fit the burst, the fourth is over the rate.
    for i in 1..=4 {
        c.send_json(json!({"op":"ping","id":i})).await;
    }
    for i in 1..=3 {
        assert_eq!(c.reply_to(json!(i)).await["ok"], true, "within the burst ({i})");
    }
    assert_eq!(c.reply_to(json!(4)).await["error"]["code"], "rate_limited");
    for _ in 0..40 {
        if c.ws.send(Message::text(r#"{"op":"ping"}"#)).await.is_err() {
            break;
        }
    }
    let close = c.expect_close(STEP).await.expect("a close frame");
    assert_eq!(close.code, CloseCode::Policy);
}

#[tokio::test]
async fn connections_over_the_limit_get_503() {
    let app = Upstream::start().await;
    let relay = Relay::start(&app.url(), &["--max-connections", "1"]).await;
    let first = ws_connect(&relay.ws_url("/ws")).await;
    let second = ws_connect_with(&relay.ws_url("/ws"), &[]).await.err();
    assert_eq!(second, Some(http::StatusCode::SERVICE_UNAVAILABLE));
    assert_eq!(relay.metric("wsrelay_connections_total{result=\"limit_reached\"}").await, 1.0);
    drop(first);
    relay.wait_metric("wsrelay_connections", |v| v == 0.0).await;
    ws_connect(&relay.ws_url("/ws")).await;
}

#[tokio::test]
async fn silent_client_is_closed_but_one_answering_pings_stays() {
    let app = Upstream::start().await;
    let relay = Relay::start(&app.url(), &["--ping-interval", "200ms", "--idle-timeout", "1s"]).await;
    let mut silent = ws_connect(&relay.ws_url("/ws")).await;
    let mut alive = ws_connect(&relay.ws_url("/ws")).await;
    // `alive` reads (so tungstenite answers pings); `silent` does not read at all.
    let keep = tokio::spawn(async move {
        alive.expect_silence(Duration::from_millis(3000)).await;
        alive
    });
    relay.wait_metric("wsrelay_disconnects_total{reason=\"idle_timeout\"}", |v| v == 1.0).await;
    let mut alive = keep.await.unwrap();
    let r = alive.request(json!({"op":"ping"})).await;
    assert_eq!(r["ok"], true, "a client answering pings is kept");
    let close = silent.expect_close(STEP).await.expect("a close frame");
    assert_eq!(close.code, CloseCode::Away);
}

#[tokio::test]
async fn a_client_that_never_finishes_its_headers_is_dropped() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = Upstream::start().await;
    let relay = Relay::start(&app.url(), &["--handshake-timeout", "300ms"]).await;
    let mut sock = tokio::net::TcpStream::connect(relay.public).await.unwrap();
    sock.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n").await.unwrap();
    // Slowloris: the rest never comes. The sidecar hangs up (408 or just EOF).
    let mut buf = Vec::new();
    let n = tokio::time::timeout(STEP, sock.read_to_end(&mut buf)).await.expect("connection closed in time");
    assert!(n.is_ok());
    let text = String::from_utf8_lossy(&buf);
    assert!(text.is_empty() || text.starts_with("HTTP/1.1 408"), "{text}");
}
