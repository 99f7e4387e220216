//! Sessions and the `wsrelay.v1` protocol on one node: subscribe, fan-out,
//! order, exclude, broadcast, and what bad input gets.

use std::time::Duration;

use futures_util::SinkExt;
use serde_json::{Value, json};

use crate::common::{Relay, Upstream, WsClient, ws_connect, ws_connect_with};

const QUIET: Duration = Duration::from_millis(300);

async fn setup(args: &[&str]) -> (Upstream, Relay) {
    let app = Upstream::start().await;
    let relay = Relay::start(&app.url(), args).await;
    (app, relay)
}

/// Reads `n` message frames for `channel` and returns their `data.n` in order.
pub async fn read_numbers(c: &mut WsClient, channel: &str, n: usize) -> Vec<i64> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let m = c.recv().await;
        assert_eq!(m["op"], "message", "{m}");
        assert_eq!(m["channel"], channel);
        out.push(m["data"]["n"].as_i64().unwrap());
    }
    out
}

#[tokio::test]
async fn welcome_names_the_connection() {
    let (_app, relay) = setup(&[]).await;
    let c = ws_connect(&relay.ws_url("/ws")).await;
    assert!(c.welcome["connection"].as_str().is_some_and(|s| !s.is_empty()));
    assert_eq!(c.welcome["user"], Value::Null);
    assert_eq!(c.welcome["channels"], json!([]));
}

#[tokio::test]
async fn two_subscribers_get_a_thousand_messages_once_and_in_order() {
    let (_app, relay) = setup(&[]).await;
    let mut a = ws_connect(&relay.ws_url("/ws")).await;
    let mut b = ws_connect(&relay.ws_url("/ws")).await;
    a.subscribe("room:1").await;
    b.subscribe("room:1").await;

    let readers = [a, b].map(|mut c| {
        tokio::spawn(async move {
            let got = read_numbers(&mut c, "room:1", 1000).await;
            c.expect_silence(QUIET).await;
            got
        })
    });
    for i in 0..1000 {
        let (status, body) = relay.publish(json!({"channel":"room:1","data":{"n":i}})).await;
        assert_eq!(status, 200, "{body}");
    }
    let expected: Vec<i64> = (0..1000).collect();
    for r in readers {
        assert_eq!(r.await.unwrap(), expected);
    }
}

#[tokio::test]
async fn exclude_skips_the_named_connection() {
    let (_app, relay) = setup(&[]).await;
    let mut a = ws_connect(&relay.ws_url("/ws")).await;
    let mut b = ws_connect(&relay.ws_url("/ws")).await;
    a.subscribe("chat").await;
    b.subscribe("chat").await;
    let (status, _) = relay.publish(json!({"channel":"chat","data":{"n":1},"exclude":a.connection_id()})).await;
    assert_eq!(status, 200);
    assert_eq!(read_numbers(&mut b, "chat", 1).await, vec![1]);
    a.expect_silence(QUIET).await;
}

#[tokio::test]
async fn broadcast_reaches_every_named_channel() {
    let (_app, relay) = setup(&[]).await;
    let mut a = ws_connect(&relay.ws_url("/ws")).await;
    let mut b = ws_connect(&relay.ws_url("/ws")).await;
    a.subscribe("news:a").await;
    b.subscribe("news:b").await;
    let (status, _) = relay.publish(json!({"channels":["news:a","news:b","news:c"],"data":{"n":7}})).await;
    assert_eq!(status, 200);
    assert_eq!(read_numbers(&mut a, "news:a", 1).await, vec![7]);
    assert_eq!(read_numbers(&mut b, "news:b", 1).await, vec![7]);
    a.expect_silence(QUIET).await;
    b.expect_silence(QUIET).await;
}

#[tokio::test]
async fn unsubscribe_stops_delivery() {
    let (_app, relay) = setup(&[]).await;
    let mut a = ws_connect(&relay.ws_url("/ws")).await;
    a.subscribe("x").await;
    relay.publish(json!({"channel":"x","data":{"n":1}})).await;
    assert_eq!(read_numbers(&mut a, "x", 1).await, vec![1]);
    let r = a.request(json!({"op":"unsubscribe","channel":"x"})).await;
    assert_eq!(r["ok"], true);
    relay.publish(json!({"channel":"x","data":{"n":2}})).await;
    a.expect_silence(QUIET).await;
    assert_eq!(relay.metric("wsrelay_channels").await, 0.0, "empty channel pruned");
}

#[tokio::test]
async fn channels_in_the_url_are_subscribed() {
    let (_app, relay) = setup(&[]).await;
    let mut a = ws_connect(&relay.ws_url("/ws?channel=a&channel=b%3A1")).await;
    assert_eq!(a.welcome["channels"], json!(["a", "b:1"]));
    relay.publish(json!({"channel":"b:1","data":{"n":3}})).await;
    assert_eq!(read_numbers(&mut a, "b:1", 1).await, vec![3]);
}

#[tokio::test]
async fn subprotocol_is_echoed_and_others_refused() {
    let (_app, relay) = setup(&[]).await;
    let url = relay.ws_url("/ws");
    let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(url.as_str()).unwrap();
    req.headers_mut().insert("sec-websocket-protocol", "wsrelay.v1".parse().unwrap());
    let (_ws, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert_eq!(resp.headers()["sec-websocket-protocol"], "wsrelay.v1");

    let refused = ws_connect_with(&url, &[("sec-websocket-protocol", "graphql-ws")]).await.err();
    assert_eq!(refused, Some(http::StatusCode::BAD_REQUEST));
}

async fn expect_error(c: &mut WsClient, frame: &str, code: &str) -> Value {
    c.send_text(frame).await;
    let r = c.recv().await;
    assert_eq!(r["op"], "reply", "{r}");
    assert_eq!(r["ok"], false, "{frame} → {r}");
    assert_eq!(r["error"]["code"], code, "{frame} → {r}");
    assert!(r["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
    r
}

#[tokio::test]
async fn bad_frames_get_an_error_and_the_connection_stays_open() {
    let (_app, relay) = setup(&[]).await;
    let mut c = ws_connect(&relay.ws_url("/ws")).await;
    expect_error(&mut c, "this is not json", "bad_request").await;
    expect_error(&mut c, "[1,2,3]", "bad_request").await;
    let r = expect_error(&mut c, r#"{"op":"fly","id":5}"#, "bad_request").await;
    assert_eq!(r["id"], 5, "the id is echoed even on errors");
    expect_error(&mut c, r#"{"op":"subscribe","id":6}"#, "bad_request").await;
    let r = expect_error(&mut c, r#"{"op":"subscribe","channel":5,"id":13}"#, "bad_request").await;
    assert_eq!(r["id"], 13, "a field of the wrong type still gets the id back");
    expect_error(&mut c, r#"{"op":"publish","channel":"a","id":7}"#, "bad_request").await;
    expect_error(&mut c, r#"{"op":"subscribe","channel":"no spaces","id":8}"#, "bad_request").await;
    expect_error(&mut c, &format!(r#"{{"op":"subscribe","channel":"{}","id":9}}"#, "x".repeat(300)), "bad_request")
        .await;
    // Client publish is forbidden by the default namespace.
    expect_error(&mut c, r#"{"op":"publish","channel":"a","data":1,"id":10}"#, "forbidden").await;
    // No message hook and no presence in this configuration.
    expect_error(&mut c, r#"{"op":"send","data":{},"id":11}"#, "not_supported").await;
    expect_error(&mut c, r#"{"op":"presence","channel":"a","id":12}"#, "not_found").await;
    c.ws.send(tokio_tungstenite::tungstenite::Message::binary(vec![1, 2, 3])).await.unwrap();
    assert_eq!(c.recv().await["error"]["code"], "bad_request");

    // Still open and working.
    let r = c.request(json!({"op":"ping"})).await;
    assert_eq!(r["ok"], true);
    c.subscribe("still:here").await;
}

#[tokio::test]
async fn subscription_limit_is_enforced() {
    let (_app, relay) = setup(&["--max-subscriptions", "2"]).await;
    let mut c = ws_connect(&relay.ws_url("/ws")).await;
    c.subscribe("a").await;
    c.subscribe("b").await;
    let r = c.request(json!({"op":"subscribe","channel":"c"})).await;
    assert_eq!(r["ok"], false);
    assert_eq!(r["error"]["code"], "limit_exceeded");
    // Resubscribing an existing channel is fine, and leaving frees a slot.
    c.subscribe("a").await;
    c.request(json!({"op":"unsubscribe","channel":"a"})).await;
    c.subscribe("c").await;
}

#[tokio::test]
async fn subscribe_with_since_says_nothing_was_recovered() {
    let (_app, relay) = setup(&[]).await;
    let mut c = ws_connect(&relay.ws_url("/ws")).await;
    let r = c.request(json!({"op":"subscribe","channel":"h","since":"12"})).await;
    assert_eq!(r["ok"], true);
    assert_eq!(r["result"]["recovered"], false, "no history: the client must reload");
}

#[tokio::test]
async fn client_publish_where_the_namespace_allows_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wsrelay.toml");
    std::fs::write(&path, "[[namespace]]\nprefix = \"open:\"\npublish = \"anyone\"\n").unwrap();
    let (_app, relay) = setup(&["--config", path.to_str().unwrap()]).await;
    let mut a = ws_connect(&relay.ws_url("/ws")).await;
    let mut b = ws_connect(&relay.ws_url("/ws")).await;
    b.subscribe("open:room").await;
    let r = a.request(json!({"op":"publish","channel":"open:room","data":{"n":42}})).await;
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(read_numbers(&mut b, "open:room", 1).await, vec![42]);
    let r = a.request(json!({"op":"publish","channel":"closed:room","data":{"n":1}})).await;
    assert_eq!(r["error"]["code"], "forbidden");
    assert_eq!(relay.metric("wsrelay_messages_published_total{source=\"client\"}").await, 1.0);
}

#[tokio::test]
async fn wrong_websocket_version_gets_426_naming_13() {
    let (_app, relay) = setup(&[]).await;
    let headers = [
        ("connection", "Upgrade".to_owned()),
        ("upgrade", "websocket".to_owned()),
        ("sec-websocket-version", "8".to_owned()),
        ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==".to_owned()),
    ];
    let (status, headers, _) = crate::common::request(http::Method::GET, &relay.http_url("/ws"), None, &headers).await;
    assert_eq!(status, http::StatusCode::UPGRADE_REQUIRED);
    assert_eq!(headers["sec-websocket-version"], "13");
}
