//! What an app that had python-socketio's server asks of the sidecars:
//! membership without presence (`rooms(sid)`, `manager.rooms`), a session
//! value per connection shared by every worker and replica, and the bridge
//! reading Open WebUI's room-channel manager.

use std::time::Duration;

use futures_util::SinkExt;
use http::{Method, StatusCode};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::common::sio::Driven;
use crate::common::upstream::HookReply;
use crate::common::{Relay, STEP, Upstream, request, ws_connect};
use crate::socketio::{PATH, alice, cluster_with, open_polling, relay};

async fn get(relay: &Relay, path: &str) -> (StatusCode, Value) {
    let (s, _, body) = request(Method::GET, &relay.admin_url(path), None, &[]).await;
    (s, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

async fn send(relay: &Relay, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
    let headers = [("content-type", "application/json".to_owned())];
    let (s, _, body) = request(method, &relay.admin_url(path), body.map(|b| b.to_string()), &headers).await;
    (s, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

fn strs(v: &Value) -> Vec<String> {
    v.as_array().unwrap().iter().map(|x| x.as_str().unwrap().to_owned()).collect()
}

#[tokio::test]
async fn rooms_members_and_sessions_answer_from_any_node() {
    let app = Upstream::start().await;
    alice(&app);
    let c = cluster_with(&app, &[]).await;
    let mut on_a = Driven::node(&c.a.http_url(""), json!({"transports": ["websocket"]}));
    let mut on_b = Driven::node(&c.b.http_url(""), json!({"transports": ["websocket"]}));
    let id_a = on_a.wait_type("connect").await["id"].as_str().unwrap().to_owned();
    let id_b = on_b.wait_type("connect").await["id"].as_str().unwrap().to_owned();
    let (s, _) = c.a.api("/api/subscribe", json!({"channel": "doc_1", "connection": id_b}), None).await;
    assert_eq!(s, StatusCode::OK);

    // A connection's rooms, asked of the node that does not hold it.
    let mut rooms = Vec::new();
    for _ in 0..50 {
        let (s, body) = get(&c.a, &format!("/api/connections/{id_b}")).await;
        assert_eq!(s, StatusCode::OK, "{body}");
        rooms = strs(&body["channels"]);
        if rooms.contains(&"doc_1".to_owned()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for want in ["/", "doc_1", "user:alice", id_b.as_str()] {
        assert!(rooms.contains(&want.to_owned()), "{want} missing from {rooms:?}");
    }
    // A room's members on every node, without presence configured.
    let (s, body) = get(&c.b, "/api/channels/user:alice/connections").await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["complete"], true);
    let mut want = vec![id_a.clone(), id_b.clone()];
    want.sort();
    assert_eq!(strs(&body["connections"]), want);
    let (_, body) = get(&c.a, "/api/channels/nobody-here/connections").await;
    assert_eq!(body["connections"], json!([]));

    // Gone connections and ids of no shape are told apart.
    drop(on_b);
    let gone = id_b.clone();
    let mut status = StatusCode::OK;
    for _ in 0..100 {
        status = get(&c.a, &format!("/api/connections/{gone}")).await.0;
        if status == StatusCode::NOT_FOUND {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(get(&c.a, "/api/connections/not-an-id").await.0, StatusCode::BAD_REQUEST);

    // A session written through one node is read through the other.
    let path = format!("/api/connections/{id_a}/session");
    let (s, body) = get(&c.b, &path).await;
    assert_eq!((s, body), (StatusCode::OK, json!({"data": null})));
    let (s, _) = send(&c.a, Method::PUT, &path, Some(json!({"data": {"user": {"id": "u1"}, "n": 1}}))).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(get(&c.b, &path).await.1, json!({"data": {"user": {"id": "u1"}, "n": 1}}));
    // Per namespace.
    assert_eq!(get(&c.b, &format!("{path}?namespace=/chat")).await.1, json!({"data": null}));
    let big = "x".repeat(70 * 1024);
    assert_eq!(send(&c.a, Method::PUT, &path, Some(json!({"data": big}))).await.0, StatusCode::PAYLOAD_TOO_LARGE);
    let (s, _, _) = request(Method::PUT, &c.a.admin_url(&path), Some("{\"data\":1}".into()), &[]).await;
    assert_eq!(s, StatusCode::UNSUPPORTED_MEDIA_TYPE, "a PUT must declare JSON");
    assert_eq!(send(&c.b, Method::DELETE, &path, None).await.0, StatusCode::OK);
    assert_eq!(get(&c.a, &path).await.1, json!({"data": null}));
}

#[tokio::test]
async fn the_bridge_reads_room_channels_only_for_rooms_with_members_here() {
    let app = Upstream::start().await;
    alice(&app);
    let c = cluster_with(&app, &[]).await;
    let mut sock = Driven::node(&c.a.http_url(""), json!({"transports": ["websocket"]}));
    let id = sock.wait_type("connect").await["id"].as_str().unwrap().to_owned();
    // Node a has a member of user:alice (the connect hook's channel); node b none.
    let subscribed = |v: redis::Value| match v {
        redis::Value::Array(list) => list
            .into_iter()
            .map(|x| match x {
                redis::Value::BulkString(b) => String::from_utf8(b).unwrap(),
                other => panic!("{other:?}"),
            })
            .collect::<Vec<_>>(),
        other => panic!("{other:?}"),
    };
    let chans = subscribed(c._redis.cmd(&["PUBSUB", "CHANNELS", "socketio#*"]).await);
    assert!(chans.contains(&"socketio#/#user:alice".to_owned()), "{chans:?}");
    assert!(chans.contains(&format!("socketio#/#{id}")), "{chans:?}");
    assert_eq!(c._redis.numsub("socketio#/#user:alice").await, 1, "only the node with a member subscribes");

    let ops = json!([
        {"op": "emit", "event": "to-room", "data": {"n": 1}, "room": "user:alice"},
        {"op": "emit", "event": "to-sid", "data": "hi", "room": id},
        {"op": "emit", "event": "to-all", "data": "all"},
    ]);
    let (ok, out) = Driven::python("emitter.py", &[&c.redis_url, "socketio", &ops.to_string(), "room-channels"])
        .finish(Duration::from_secs(20))
        .await;
    assert!(ok, "emitter failed: {out:?}");
    assert_eq!(sock.event("to-room").await["args"], json!([{"n": 1}]));
    assert_eq!(sock.event("to-sid").await["args"], json!(["hi"]));
    assert_eq!(sock.event("to-all").await["args"], json!(["all"]));
    // Once the room has no member here, its room channel is left.
    let (s, _) = c.b.api("/api/unsubscribe", json!({"channel": "user:alice", "connection": id}), None).await;
    assert_eq!(s, StatusCode::OK);
    let mut n = 1;
    for _ in 0..100 {
        n = c._redis.numsub("socketio#/#user:alice").await;
        if n == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(n, 0);
}

#[tokio::test]
async fn socketio_clients_may_send_larger_packets_than_wsrelay_v1_clients() {
    // An app that takes 100 KB documents over Socket.IO (Open WebUI's notes)
    // raises the Socket.IO limit only; wsrelay.v1 clients keep 1 KiB.
    let app = Upstream::start().await;
    alice(&app);
    app.set_hook("/ws/message", HookReply::new(200, &json!("stored")));
    let limits = ["--max-message-bytes", "1024", "--socketio-max-message-bytes", "200000"];
    let relay = relay(&app, &limits).await;
    let base = relay.http_url("");
    let note = "n".repeat(100_000);

    // Over WebSocket: the 100 KB event reaches the message hook whole.
    let mut ws = Driven::node(&base, json!({"transports": ["websocket"]}));
    ws.wait_type("connect").await;
    ws.send(json!({"op": "emit", "event": "note", "args": [note], "ack": true, "id": 1})).await;
    assert_eq!(ws.wait_type("ack").await["args"], json!(["stored"]));
    let got = app.recorded("/ws/message");
    assert_eq!(got.last().map(|r| r.json()["args"][0].as_str().map(str::len)), Some(Some(100_000)));
    // Over polling: a 100 KB packet is accepted, past 200 000 bytes it is not.
    let sid = open_polling(&base).await;
    let url = format!("{base}{PATH}?EIO=4&transport=polling&sid={sid}");
    let (s, _, _) = request(Method::POST, &url, Some("40".into()), &[]).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _, _) = request(Method::POST, &url, Some(format!("42[\"note\",\"{note}\"]")), &[]).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _, _) = request(Method::POST, &url, Some(format!("42[\"note\",\"{note}{note}\"]")), &[]).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
    // The app may send what Socket.IO clients may: a 100 KB emit arrives.
    let (s, body) = relay.publish(json!({"channel": "user:alice", "event": "note", "args": [note]})).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(ws.event("note").await["args"][0].as_str().map(str::len), Some(100_000));

    // A wsrelay.v1 client's 2 KB frame is still too large.
    let mut v1 = ws_connect(&relay.ws_url("/ws")).await;
    let big = format!(r#"{{"op":"ping","pad":"{}"}}"#, "x".repeat(2000));
    v1.ws.send(Message::text(big)).await.unwrap();
    let close = v1.expect_close(STEP).await.expect("a close frame");
    assert_eq!(close.code, CloseCode::Size);
}

#[tokio::test]
async fn transports_can_be_limited_as_in_python_socketio() {
    let app = Upstream::start().await;
    alice(&app);
    // Polling only (Open WebUI with ENABLE_WEBSOCKET_SUPPORT=false): no upgrade offered, none taken.
    let relay = relay(&app, &["--socketio-transports", "polling"]).await;
    let base = relay.http_url("");
    let (s, _, body) = request(Method::GET, &format!("{base}{PATH}?EIO=4&transport=polling"), None, &[]).await;
    assert_eq!(s, StatusCode::OK);
    let open: Value = serde_json::from_slice(&body[1..]).unwrap();
    assert_eq!(open["upgrades"], json!([]));
    let upgrade = [("connection", "Upgrade".to_owned()), ("upgrade", "websocket".to_owned())];
    let url = format!("{base}{PATH}?EIO=4&transport=websocket&sid={}", open["sid"].as_str().unwrap());
    let (s, _, body) = request(Method::GET, &url, None, &upgrade).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(serde_json::from_slice::<Value>(&body).unwrap(), json!({"code": 0, "message": "Transport unknown"}));
    // socket.io-client with its defaults (polling, then the upgrade) connects and works.
    let mut c = Driven::node(&base, json!({}));
    c.wait_type("connect").await;
    relay.publish(json!({"channel": "user:alice", "event": "hi", "args": [1]})).await;
    assert_eq!(c.event("hi").await["args"], json!([1]));
    c.send(json!({"op": "state"})).await;
    assert_eq!(c.wait_type("state").await["transport"], "polling", "never upgraded");

    // WebSocket only: polling is refused.
    let relay = relay_ws_only(&app).await;
    let (s, _, body) =
        request(Method::GET, &relay.http_url(&format!("{PATH}?EIO=4&transport=polling")), None, &[]).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(serde_json::from_slice::<Value>(&body).unwrap()["message"], "Transport unknown");
}

async fn relay_ws_only(app: &Upstream) -> Relay {
    relay(app, &["--socketio-transports", "websocket"]).await
}

#[tokio::test]
async fn enter_room_then_emit_reaches_the_socket_every_time() {
    // python-socketio's `await enter_room(sid, room); await emit(..., room=room)`:
    // for a connection of this node, /api/subscribe answers once the socket
    // is in the room and the node subscribed in Redis, so the emit that
    // follows reaches it; /api/unsubscribe likewise before rooms(sid).
    let app = Upstream::start().await;
    alice(&app);
    let c = cluster_with(&app, &[]).await;
    let mut sock = Driven::node(&c.a.http_url(""), json!({"transports": ["websocket"]}));
    let id = sock.wait_type("connect").await["id"].as_str().unwrap().to_owned();
    for i in 0..20 {
        let room = format!("fresh-room-{i}");
        let (s, _) = c.a.api("/api/subscribe", json!({"channel": room, "connection": id}), None).await;
        assert_eq!(s, StatusCode::OK);
        // Published through the other node: it reaches a only through Redis.
        let (s, body) = c.b.publish(json!({"channel": room, "event": "in-room", "args": [i]})).await;
        assert_eq!(s, StatusCode::OK, "{body}");
        assert_eq!(sock.event("in-room").await["args"], json!([i]), "the emit right after enter_room");
        let (s, _) = c.a.api("/api/unsubscribe", json!({"channel": room, "connection": id}), None).await;
        assert_eq!(s, StatusCode::OK);
        let (_, body) = get(&c.a, &format!("/api/connections/{id}")).await;
        assert!(!strs(&body["channels"]).contains(&room), "left before the answer: {body}");
    }
}

#[tokio::test]
async fn a_local_subscribe_the_broker_cannot_confirm_is_not_reported_done() {
    // Redis down: enter_room for a socket of this node answers 503, not a
    // 200 for a room whose messages would not reach it.
    let app = Upstream::start().await;
    alice(&app);
    let mut c = cluster_with(&app, &[]).await;
    let mut sock = Driven::node(&c.a.http_url(""), json!({"transports": ["websocket"]}));
    let id = sock.wait_type("connect").await["id"].as_str().unwrap().to_owned();
    c._redis.kill();
    let (s, body) = c.a.api("/api/subscribe", json!({"channel": "while-down", "connection": id}), None).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    // Over the connection's limit: told, not ignored.
    c._redis.restart();
    c.a.wait_metric("wsrelay_broker_up", |v| v == 1.0).await;
    let relay = relay(&app, &["--max-subscriptions", "3"]).await;
    let mut one = Driven::node(&relay.http_url(""), json!({"transports": ["websocket"]}));
    let id = one.wait_type("connect").await["id"].as_str().unwrap().to_owned();
    // It holds "/", its own room and user:alice already.
    let (s, body) = relay.api("/api/subscribe", json!({"channel": "one-more", "connection": id}), None).await;
    assert_eq!((s, &body["error"]["code"]), (StatusCode::TOO_MANY_REQUESTS, &json!("limit_exceeded")), "{body}");
}
