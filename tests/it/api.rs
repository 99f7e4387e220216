//! The admin listener: /api/* errors and token, disconnect, health, and
//! metrics that add up to what the test did.

use std::time::Duration;

use http::{Method, StatusCode};
use serde_json::json;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::common::{Relay, STEP, Upstream, request, ws_connect};

async fn setup(args: &[&str]) -> (Upstream, Relay) {
    let app = Upstream::start().await;
    let relay = Relay::start(&app.url(), args).await;
    (app, relay)
}

#[tokio::test]
async fn bad_publish_requests_get_400_with_a_json_error() {
    let (_app, relay) = setup(&[]).await;
    let cases = [
        ("{not json", "bad_request"),
        (r#"{"data":1}"#, "bad_request"),
        (r#"{"channel":"a"}"#, "bad_request"),
        (r#"{"channel":"bad channel","data":1}"#, "bad_request"),
        (r#"{"channels":[],"data":1}"#, "bad_request"),
        (r#"{"channel":"a","chanel":"b","data":1}"#, "bad_request"),
        (r#"{"channel":"a","channels":["b"],"data":1}"#, "bad_request"),
    ];
    for (body, code) in cases {
        let (status, _, answer) = request(
            Method::POST,
            &relay.admin_url("/api/publish"),
            Some(body.into()),
            &[("content-type", "application/json".into())],
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        let v: serde_json::Value = serde_json::from_slice(&answer).expect("JSON error body");
        assert_eq!(v["error"]["code"], code, "{body} → {v}");
        assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    }
    let (status, _, _) = request(Method::GET, &relay.admin_url("/api/publish"), None, &[]).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _, body) = request(Method::GET, &relay.admin_url("/api/nothing"), None, &[]).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&body).unwrap()["error"]["code"], "not_found");
}

#[tokio::test]
async fn oversize_publish_is_413() {
    let (_app, relay) = setup(&["--max-message-bytes", "1000"]).await;
    let (status, body) = relay.publish(json!({"channel":"a","data":"x".repeat(2000)})).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(body["error"]["code"], "too_large");
}

#[tokio::test]
async fn api_token_is_required_when_set() {
    let (_app, relay) = setup(&["--api-token", "s3cret"]).await;
    let publish = json!({"channel":"a","data":1});
    let (status, body) = relay.api("/api/publish", publish.clone(), None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["error"]["code"], "unauthorized");
    let (status, _) = relay.api("/api/publish", publish.clone(), Some("wrong")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = relay.api("/api/disconnect", json!({"connection":"x"}), None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = relay.api("/api/publish", publish, Some("s3cret")).await;
    assert_eq!(status, StatusCode::OK);
    // Operators' endpoints stay open.
    assert_eq!(request(Method::GET, &relay.admin_url("/metrics"), None, &[]).await.0, StatusCode::OK);
    assert_eq!(request(Method::GET, &relay.admin_url("/healthz"), None, &[]).await.0, StatusCode::OK);
    assert_eq!(relay.readyz().await, StatusCode::OK);
}

#[tokio::test]
async fn disconnect_closes_the_connection() {
    let (_app, relay) = setup(&[]).await;
    let mut a = ws_connect(&relay.ws_url("/ws")).await;
    let mut b = ws_connect(&relay.ws_url("/ws")).await;
    let (status, _) = relay.api("/api/disconnect", json!({"connection": a.connection_id()}), None).await;
    assert_eq!(status, StatusCode::OK);
    let close = a.expect_close(STEP).await.expect("a close frame");
    assert_eq!(close.code, CloseCode::Policy);
    b.expect_silence(Duration::from_millis(200)).await;
    relay.wait_metric("wsrelay_disconnects_total{reason=\"disconnected\"}", |v| v == 1.0).await;
    let (status, body) = relay.api("/api/disconnect", json!({}), None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
}

#[tokio::test]
async fn metrics_add_up_to_what_happened() {
    let (_app, relay) = setup(&[]).await;
    let mut a = ws_connect(&relay.ws_url("/ws")).await;
    let mut b = ws_connect(&relay.ws_url("/ws")).await;
    a.subscribe("m:1").await;
    a.subscribe("m:2").await;
    b.subscribe("m:1").await;
    for i in 0..5 {
        relay.publish(json!({"channel":"m:1","data":{"n":i}})).await;
    }
    relay.publish(json!({"channel":"m:2","data":{"n":9}})).await;
    for _ in 0..5 {
        b.recv().await;
    }
    for _ in 0..6 {
        a.recv().await;
    }
    let m = relay.metrics().await;
    let v = |s: &str| crate::common::metric_value(&m, s).unwrap_or_else(|| panic!("no series {s}"));
    assert_eq!(v("wsrelay_connections"), 2.0);
    assert_eq!(v("wsrelay_connections_total{result=\"accepted\"}"), 2.0);
    assert_eq!(v("wsrelay_subscriptions"), 3.0);
    assert_eq!(v("wsrelay_channels"), 2.0);
    assert_eq!(v("wsrelay_messages_received_total"), 3.0, "three subscribe frames");
    assert_eq!(v("wsrelay_messages_published_total{source=\"api\"}"), 6.0);
    assert_eq!(v("wsrelay_messages_delivered_total"), 11.0);
    assert_eq!(v("wsrelay_delivery_seconds_count"), 11.0);
    assert_eq!(v("wsrelay_broker_up"), 1.0);
    assert!(v("process_resident_memory_bytes") > 0.0, "process metrics exported");
    assert!(!m.contains("m:1"), "no channel names in labels");

    drop(a);
    relay.wait_metric("wsrelay_connections", |v| v == 1.0).await;
    assert_eq!(relay.metric("wsrelay_subscriptions").await, 1.0);
    assert_eq!(relay.metric("wsrelay_channels").await, 1.0);
    relay.wait_metric("wsrelay_disconnects_total{reason=\"client\"}", |v| v == 1.0).await;
}
