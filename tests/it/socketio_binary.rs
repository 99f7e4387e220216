//! Binary events and acknowledgements (Socket.IO's `BINARY_EVENT` and
//! `BINARY_ACK`: `Buffer`/`ArrayBuffer` arguments) through every path:
//! client to the message hook and back, the API's publish and call, the
//! python-socketio bridge, history and recovery, and the JSON form
//! wsrelay.v1 clients get. socket.io-client's Buffers are `{"$bin": base64}`
//! in its JSON lines (tests/socketio/client.mjs).

use std::time::Duration;

use http::StatusCode;
use serde_json::json;

use crate::common::Upstream;
use crate::common::redis::RedisServer;
use crate::common::sio::Driven;
use crate::common::upstream::HookReply;
use crate::common::ws_connect;
use crate::socketio::{history_config, relay};

const PLACEHOLDER: &str = r#"{"_placeholder":true,"num":0}"#;

fn placeholder(n: u32) -> serde_json::Value {
    json!({"_placeholder": true, "num": n})
}

#[tokio::test]
async fn binary_events_reach_the_message_hook_and_binary_acks_come_back() {
    let app = Upstream::start().await;
    app.set_hook("/ws/connect", HookReply::new(200, &json!({"user": "alice"})));
    // A binary ack: the callback's arguments with placeholders, and the data.
    app.set_hook("/ws/message", HookReply::new(200, &json!({"args": [placeholder(0), "ok"], "attachments": ["BAUG"]})));
    let relay = relay(&app, &[]).await;
    for transports in [json!(["polling"]), json!(["websocket"])] {
        let mut c = Driven::node(&relay.http_url(""), json!({"transports": transports}));
        c.wait_type("connect").await;
        let args = json!([{"$bin": "AQID"}, "name", {"nested": {"$bin": "AAE="}}]);
        c.send(json!({"op": "emit", "event": "upload", "args": args, "ack": true, "id": 1})).await;
        let ack = c.wait_type("ack").await;
        assert_eq!(ack["error"], serde_json::Value::Null, "{ack}");
        assert_eq!(ack["args"], json!([{"$bin": "BAUG"}, "ok"]), "{transports}");
        let hook = app.recorded("/ws/message").pop().unwrap().json();
        assert_eq!(hook["event"], "upload");
        assert_eq!(hook["args"], json!([placeholder(0), "name", {"nested": placeholder(1)}]), "{hook}");
        assert_eq!(hook["attachments"], json!(["AQID", "AAE="]), "{hook}");
    }
    // A text event's hook body has no attachments.
    app.set_hook("/ws/message", HookReply::new(200, &json!(["fine"])));
    let mut c = Driven::node(&relay.http_url(""), json!({"transports": ["websocket"]}));
    c.wait_type("connect").await;
    c.send(json!({"op": "emit", "event": "text", "args": [1], "ack": true, "id": 2})).await;
    assert_eq!(c.wait_type("ack").await["args"], json!(["fine"]));
    let hook = app.recorded("/ws/message").pop().unwrap().json();
    assert!(hook.get("attachments").is_none(), "{hook}");
}

#[tokio::test]
async fn binary_publishes_calls_bridge_emits_and_recovery() {
    let app = Upstream::start().await;
    app.set_hook("/ws/connect", HookReply::new(200, &json!({"user": "alice", "channels": ["h:alice"]})));
    let redis = RedisServer::start();
    let url = redis.url();
    let cfg = history_config();
    let relay = relay(
        &app,
        &["--redis-url", &url, "--socketio-redis-channel", "socketio", "--config", cfg.path().to_str().unwrap()],
    )
    .await;
    let mut ws = Driven::node(
        &relay.http_url(""),
        json!({"transports": ["websocket"], "answers": {"confirm": [{"$bin": "CQo="}, "yes"]}}),
    );
    let mut polling = Driven::node(&relay.http_url(""), json!({"transports": ["polling"]}));
    let id = ws.wait_type("connect").await["id"].as_str().unwrap().to_owned();
    polling.wait_type("connect").await;
    let mut v1 = ws_connect(&relay.ws_url("/ws")).await;
    v1.subscribe("h:alice").await;

    // /api/publish: Buffers for Socket.IO clients, base64 for wsrelay.v1.
    let (s, body) = relay
        .publish(
            json!({"channel": "h:alice", "event": "file", "args": [placeholder(0), "a.bin"], "attachments": ["AQID"]}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    for c in [&mut ws, &mut polling] {
        let e = c.event("file").await;
        assert_eq!(e["args"][0], json!({"$bin": "AQID"}), "{e}");
        assert_eq!(e["args"][1], "a.bin");
        // The offset, last, as for any event of a channel with history.
        assert!(e["args"][2].as_str().unwrap().contains(':'), "{e}");
    }
    let m = v1.recv().await;
    assert_eq!(m["data"], json!({"event": "file", "args": [placeholder(0), "a.bin"], "attachments": ["AQID"]}), "{m}");

    // Refused: attachments that are not base64, or without an event.
    let (s, _) =
        relay.publish(json!({"channel": "x", "event": "e", "args": [PLACEHOLDER], "attachments": ["**"]})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, _) = relay.publish(json!({"channel": "x", "data": 1, "attachments": ["AQID"]})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);

    // /api/call with a Buffer, answered with a Buffer.
    let call = json!({"connection": id, "event": "confirm", "args": [placeholder(0)], "attachments": ["AQID"]});
    let (s, body) = relay.api("/api/call", call, None).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body, json!({"args": [placeholder(0), "yes"], "attachments": ["CQo="]}));
    assert_eq!(ws.wait_type("call").await["args"], json!([{"$bin": "AQID"}]));

    // python-socketio's Redis manager emitting bytes.
    let ops = json!([{"op": "emit", "event": "blob", "data": {"$bin": "BwgJ"}, "room": "h:alice"}]);
    let (ok, out) =
        Driven::python("emitter.py", &[&url, "socketio", &ops.to_string()]).finish(Duration::from_secs(20)).await;
    assert!(ok, "{out:?}");
    assert_eq!(ws.event("blob").await["args"], json!([{"$bin": "BwgJ"}]));
    assert_eq!(polling.event("blob").await["args"], json!([{"$bin": "BwgJ"}]));

    // Kept in history: a socket that was away recovers the Buffer.
    ws.send(json!({"op": "close-engine"})).await;
    ws.wait_type("disconnect").await;
    relay
        .publish(json!({"channel": "h:alice", "event": "missed", "args": [placeholder(0)], "attachments": ["AAAA"]}))
        .await;
    assert_eq!(ws.wait_type("connect").await["recovered"], true);
    assert_eq!(ws.event("missed").await["args"][0], json!({"$bin": "AAAA"}));
}
