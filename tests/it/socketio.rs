//! The Socket.IO front with real clients: socket.io-client 4.8 (Node) and
//! python-socketio, against wsrelay alone and two sidecars + Redis behind a
//! round-robin proxy; python-socketio's Redis manager as a publisher; bad
//! Engine.IO / Socket.IO input.

use std::time::Duration;

use http::{Method, StatusCode};
use serde_json::{Value, json};

use crate::common::redis::RedisServer;
use crate::common::sio::{Driven, RoundRobin, settle};
use crate::common::upstream::HookReply;
use crate::common::{Relay, Upstream, request};

pub(crate) const PATH: &str = "/socket.io/";

pub(crate) fn history_config() -> tempfile::NamedTempFile {
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), "[[namespace]]\nprefix = \"h:\"\nhistory = { size = 1000, ttl = \"10m\" }\n").unwrap();
    f
}

/// A relay with the Socket.IO front, the connect and message hooks.
pub(crate) async fn relay(app: &Upstream, extra: &[&str]) -> Relay {
    let mut args = vec!["--socketio-path", PATH, "--connect-hook", "/ws/connect", "--message-hook", "/ws/message"];
    args.extend_from_slice(extra);
    Relay::start(&app.url(), &args).await
}

pub(crate) fn alice(app: &Upstream) {
    app.set_hook("/ws/connect", HookReply::new(200, &json!({"user": "alice", "channels": ["user:alice"]})));
}

#[tokio::test]
async fn socketio_clients_connect_with_auth_and_receive_app_events_on_both_transports() {
    let app = Upstream::start().await;
    alice(&app);
    let relay = relay(&app, &[]).await;
    let url = relay.http_url("");
    // socket.io-client's default (polling, then the upgrade) and websocket only.
    let mut polling = Driven::node(&url, json!({"auth": {"token": "t1"}}));
    let mut ws = Driven::node(&url, json!({"auth": {"token": "t2"}, "transports": ["websocket"]}));
    let c1 = polling.wait_type("connect").await;
    // Polling first (the upgrade may complete before or after CONNECT).
    let up = polling.wait_type("upgrade").await;
    assert_eq!(up["transport"], "websocket");
    let c2 = ws.wait_type("connect").await;
    assert_eq!(c2["transport"], "websocket");
    // socket.id is the connection id, named after the node.
    assert!(c1["id"].as_str().unwrap().contains('.'), "{c1}");

    // The connect hook saw the auth payload and the namespace.
    let hooks = app.recorded("/ws/connect");
    assert_eq!(hooks.len(), 2);
    let asked: Vec<Value> = hooks.iter().map(|r| r.json()).collect();
    assert!(asked.iter().any(|a| a["auth"]["token"] == "t1" && a["namespace"] == "/"), "{asked:?}");
    // It names the connection (`socket.id`) and the transport of the CONNECT.
    let by_token = |t: &str| asked.iter().find(|a| a["auth"]["token"] == t).unwrap().clone();
    assert_eq!(
        (by_token("t1")["connection"].clone(), by_token("t1")["transport"].clone()),
        (c1["id"].clone(), json!("polling"))
    );
    assert_eq!(
        (by_token("t2")["connection"].clone(), by_token("t2")["transport"].clone()),
        (c2["id"].clone(), json!("websocket"))
    );

    // The hook's channels are rooms; an event published there reaches both.
    let (s, _) = relay.publish(json!({"channel": "user:alice", "event": "notify", "args": ["hi", {"n": 1}]})).await;
    assert_eq!(s, StatusCode::OK);
    for c in [&mut polling, &mut ws] {
        let e = c.event("notify").await;
        assert_eq!(e["args"], json!(["hi", {"n": 1}]));
    }
    // A plain publish is the `message` event; `exclude` is skip_sid.
    let skip = c2["id"].as_str().unwrap();
    relay.publish(json!({"channel": "user:alice", "data": {"x": 1}, "exclude": skip})).await;
    assert_eq!(polling.event("message").await["args"], json!([{"x": 1}]));
    // Each socket is in the room named by its id.
    relay.publish(json!({"channel": skip, "event": "only-you"})).await;
    assert_eq!(ws.event("only-you").await["args"], json!([]));
    let others = polling.drain(Duration::from_millis(300)).await;
    assert!(others.iter().all(|v| v["event"] != "only-you" && v["event"] != "message"), "{others:?}");
    assert!(ws.drain(Duration::from_millis(100)).await.iter().all(|v| v["event"] != "message"));
}

#[tokio::test]
async fn client_events_go_to_the_message_hook_and_its_answer_is_the_ack() {
    let app = Upstream::start().await;
    alice(&app);
    app.set_hook("/ws/message", HookReply::new(200, &json!(["ok", {"saved": true}])));
    let relay = relay(&app, &[]).await;
    let mut c = Driven::node(&relay.http_url(""), json!({"transports": ["websocket"]}));
    let id = c.wait_type("connect").await["id"].as_str().unwrap().to_owned();
    c.send(json!({"op": "emit", "event": "chat", "args": ["hello", 2], "ack": true, "id": 1})).await;
    let ack = c.wait_type("ack").await;
    assert_eq!(ack["error"], Value::Null);
    // An array answer is the callback's arguments.
    assert_eq!(ack["args"], json!(["ok", {"saved": true}]));
    let hook = app.recorded("/ws/message").pop().unwrap().json();
    assert_eq!(
        hook,
        json!({"event": "chat", "args": ["hello", 2], "ack": true, "namespace": "/", "connection": id, "user": "alice"})
    );
    // Without an ack the hook is told so, and nothing comes back.
    c.send(json!({"op": "emit", "event": "typing", "args": []})).await;
    crate::common::eventually(Duration::from_secs(5), "the hook hears the event", || async {
        app.recorded("/ws/message").iter().any(|r| r.json()["event"] == "typing" && r.json()["ack"] == false)
    })
    .await;
    // A refusal by the app is an error object in the ack.
    app.set_hook("/ws/message", HookReply::new(403, &json!({"error": {"message": "no"}})));
    c.send(json!({"op": "emit", "event": "chat", "args": [], "ack": true, "id": 2})).await;
    let ack = c.wait_type("ack").await;
    assert_eq!(ack["args"][0]["error"]["code"], "forbidden", "{ack}");
    assert_eq!(ack["args"][0]["error"]["message"], "no");
}

#[tokio::test]
async fn api_call_returns_the_clients_ack_or_504_or_404() {
    let app = Upstream::start().await;
    alice(&app);
    let relay = relay(&app, &[]).await;
    let mut c = Driven::node(&relay.http_url(""), json!({"answers": {"confirm": ["yes", 42]}}));
    let id = c.wait_type("connect").await["id"].as_str().unwrap().to_owned();
    let (s, body) =
        relay.api("/api/call", json!({"connection": id, "event": "confirm", "args": ["sure?"]}), None).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["args"], json!(["yes", 42]));
    assert_eq!(c.wait_type("call").await["args"], json!(["sure?"]));
    // Not answered: 504 after the timeout.
    let (s, body) = relay.api("/api/call", json!({"connection": id, "event": "ignored", "timeout": 0.5}), None).await;
    assert_eq!(s, StatusCode::GATEWAY_TIMEOUT, "{body}");
    assert_eq!(body["error"]["code"], "timeout");
    // No such socket: 404.
    let gone = format!("{}.nosuchsocket", id.rsplit_once('.').unwrap().0);
    let (s, _) = relay.api("/api/call", json!({"connection": gone, "event": "x"}), None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    // A wsrelay.v1 connection cannot answer: 501.
    let mut v1 = crate::common::ws_connect(&relay.ws_url("/ws")).await;
    let v1_id = v1.connection_id();
    let (s, body) = relay.api("/api/call", json!({"connection": v1_id, "event": "x", "timeout": 2}), None).await;
    assert_eq!(s, StatusCode::NOT_IMPLEMENTED, "{body}");
    assert_eq!(relay.metric("wsrelay_calls_total{result=\"answered\"}").await, 1.0);
    // A named event reaches a wsrelay.v1 socket as `{"event","args"}` data.
    v1.subscribe("both").await;
    relay.publish(json!({"channel": "both", "event": "notify", "args": [1, "a"]})).await;
    let m = v1.recv().await;
    assert_eq!((&m["op"], &m["data"]), (&json!("message"), &json!({"event": "notify", "args": [1, "a"]})), "{m}");
}

#[tokio::test]
async fn rooms_namespaces_and_disconnect_by_the_app() {
    let app = Upstream::start().await;
    alice(&app);
    let relay = relay(&app, &[]).await;
    let url = relay.http_url("");
    let mut root = Driven::node(&url, json!({"transports": ["websocket"]}));
    let mut admin = Driven::node(&url, json!({"namespace": "/admin"}));
    let root_id = root.wait_type("connect").await["id"].as_str().unwrap().to_owned();
    let admin_id = admin.wait_type("connect").await["id"].as_str().unwrap().to_owned();
    // The connect hook was told the namespace.
    assert!(app.recorded("/ws/connect").iter().any(|r| r.json()["namespace"] == "/admin"));

    // enter_room is the server-side subscribe: room `lobby` in `/`, and
    // `/admin#ops` for room `ops` of namespace `/admin`.
    let (s, _) = relay.api("/api/subscribe", json!({"connection": root_id, "channel": "lobby"}), None).await;
    assert_eq!(s, StatusCode::OK);
    relay.api("/api/subscribe", json!({"connection": admin_id, "channel": "/admin#ops"}), None).await;
    settle().await;
    relay.publish(json!({"channel": "lobby", "event": "in-lobby"})).await;
    relay.publish(json!({"channel": "/admin#ops", "event": "in-ops"})).await;
    // A namespace's own channel reaches all of its sockets.
    relay.publish(json!({"channel": "/admin", "event": "all-admin"})).await;
    relay.publish(json!({"channel": "/", "event": "all-root"})).await;
    root.event("in-lobby").await;
    root.event("all-root").await;
    admin.event("in-ops").await;
    admin.event("all-admin").await;
    let r: Vec<Value> = root.drain(Duration::from_millis(300)).await;
    assert!(r.iter().all(|v| v["event"] != "in-ops" && v["event"] != "all-admin"), "{r:?}");
    let a: Vec<Value> = admin.drain(Duration::from_millis(100)).await;
    assert!(a.iter().all(|v| v["event"] != "in-lobby" && v["event"] != "all-root"), "{a:?}");
    // leave_room.
    relay.api("/api/unsubscribe", json!({"connection": root_id, "channel": "lobby"}), None).await;
    settle().await;
    relay.publish(json!({"channel": "lobby", "event": "after-leave"})).await;
    relay.publish(json!({"channel": "/", "event": "marker"})).await;
    root.event("marker").await;
    assert!(root.seen.iter().all(|v| v["event"] != "after-leave"));

    // Disconnected by the app: "io server disconnect", and no reconnection.
    let (s, _) = relay.api("/api/disconnect", json!({"connection": root_id}), None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(root.wait_type("disconnect").await["reason"], "io server disconnect");
    let after = root.drain(Duration::from_millis(800)).await;
    assert!(after.iter().all(|v| v["type"] != "connect"), "reconnected: {after:?}");
}

#[tokio::test]
async fn refused_connects_are_connect_errors_with_the_reason() {
    let app = Upstream::start().await;
    app.set_hook("/ws/connect", HookReply::new(401, &json!({})));
    let relay = relay(&app, &[]).await;
    let mut c = Driven::node(&relay.http_url(""), json!({"reconnection": false}));
    let e = c.wait_type("connect_error").await;
    assert_eq!(e["message"], "refused by the app", "{e}");
    assert!(c.drain(Duration::from_millis(300)).await.iter().all(|v| v["type"] != "connect"));
    // JWT in auth.token, without any hook.
    let secret = "0123456789abcdef0123456789abcdef";
    let relay = Relay::start(&app.url(), &["--socketio-path", PATH, "--jwt-secret", secret]).await;
    let token = crate::auth::hs256(secret, &json!({"sub": "bob", "exp": 4_000_000_000u64, "channels": ["user:bob"]}));
    let mut ok = Driven::node(&relay.http_url(""), json!({"auth": {"token": token}}));
    ok.wait_type("connect").await;
    relay.publish(json!({"channel": "user:bob", "event": "for-bob"})).await;
    ok.event("for-bob").await;
    let mut bad = Driven::node(&relay.http_url(""), json!({"auth": {"token": "nope"}, "reconnection": false}));
    let e = bad.wait_type("connect_error").await;
    assert!(e["message"].as_str().unwrap().starts_with("invalid token"), "{e}");
}

#[tokio::test]
async fn a_reconnecting_client_recovers_what_it_missed() {
    let app = Upstream::start().await;
    app.set_hook("/ws/connect", HookReply::new(200, &json!({"user": "alice", "channels": ["h:alice", "plain"]})));
    let cfg = history_config();
    let relay = relay(&app, &["--config", cfg.path().to_str().unwrap()]).await;
    let mut c = Driven::node(&relay.http_url(""), json!({"transports": ["websocket"]}));
    let first = c.wait_type("connect").await;
    assert_eq!(first["recovered"], false);
    for n in 0..3 {
        relay.publish(json!({"channel": "h:alice", "event": "n", "args": [n]})).await;
    }
    // Where history is kept, the offset follows as the last argument.
    let e = c.event("n").await;
    assert_eq!(e["args"][0], 0);
    assert!(e["args"][1].as_str().unwrap().contains(':'), "{e}");
    c.event("n").await;
    c.event("n").await;
    // The transport drops; meanwhile the app publishes.
    c.send(json!({"op": "close-engine"})).await;
    c.wait_type("disconnect").await;
    for n in 3..6 {
        relay.publish(json!({"channel": "h:alice", "event": "n", "args": [n]})).await;
    }
    let again = c.wait_type("connect").await;
    assert_eq!(again["recovered"], true, "{again}");
    let mut got = Vec::new();
    while got.len() < 3 {
        got.push(c.event("n").await["args"][0].as_i64().unwrap());
    }
    assert_eq!(got, [3, 4, 5]);
    // Nothing twice, and the rooms are back (live events still arrive).
    relay.publish(json!({"channel": "h:alice", "event": "n", "args": [6]})).await;
    assert_eq!(c.event("n").await["args"][0], 6);
    relay.publish(json!({"channel": "plain", "event": "p"})).await;
    c.event("p").await;
    assert!(c.seen.iter().all(|v| v["event"] != "n"), "{:?}", c.seen);
    assert_eq!(relay.metric("wsrelay_socketio_recoveries_total{result=\"recovered\"}").await, 1.0);
}

/// Two sidecars sharing a Redis, behind a per-request round-robin proxy.
pub(crate) struct Cluster {
    pub(crate) _redis: RedisServer,
    pub(crate) redis_url: String,
    pub(crate) a: Relay,
    pub(crate) b: Relay,
    pub(crate) lb: RoundRobin,
}

async fn cluster(app: &Upstream) -> Cluster {
    cluster_with(app, &[]).await
}

pub(crate) async fn cluster_with(app: &Upstream, extra: &[&str]) -> Cluster {
    let redis = RedisServer::start();
    let url = redis.url();
    let mut common = vec!["--redis-url", &url, "--socketio-redis-channel", "socketio"];
    common.extend_from_slice(extra);
    let mut a_args = common.clone();
    a_args.extend(["--node-id", "a"]);
    let mut b_args = common.to_vec();
    b_args.extend(["--node-id", "b"]);
    let a = relay(app, &a_args).await;
    let b = relay(app, &b_args).await;
    let lb = RoundRobin::start(vec![a.public, b.public]).await;
    // Each node has advertised its address.
    settle().await;
    Cluster { redis_url: url, _redis: redis, a, b, lb }
}

fn node_of(id: &Value) -> &str {
    id.as_str().unwrap().rsplit_once('.').unwrap().0
}

#[tokio::test]
async fn without_sticky_sessions_polling_and_upgrades_work_across_two_sidecars() {
    let app = Upstream::start().await;
    alice(&app);
    let c = cluster(&app).await;
    let url = c.lb.url();
    // Polling only: every request alternates between the sidecars.
    let mut polling = Driven::node(&url, json!({"transports": ["polling"]}));
    // The default: polling, then an upgrade that may land on the other one.
    let mut upgrading = Driven::node(&url, json!({}));
    let mut ws = Driven::node(&url, json!({"transports": ["websocket"]}));
    for client in [&mut polling, &mut upgrading, &mut ws] {
        client.wait_type("connect").await;
    }
    upgrading.wait_type("upgrade").await;
    // Events published on either node reach every socket.
    for (n, node) in [&c.a, &c.b].into_iter().enumerate() {
        let (s, _) = node.publish(json!({"channel": "user:alice", "event": "n", "args": [n]})).await;
        assert_eq!(s, StatusCode::OK);
    }
    for client in [&mut polling, &mut upgrading, &mut ws] {
        let mut got = vec![client.event("n").await["args"][0].as_i64().unwrap()];
        got.push(client.event("n").await["args"][0].as_i64().unwrap());
        assert_eq!(got, [0, 1]);
    }
    // Requests were forwarded to the node that holds the session.
    let forwarded = c.a.metric("wsrelay_socketio_forwards_total{result=\"forwarded\"}").await
        + c.b.metric("wsrelay_socketio_forwards_total{result=\"forwarded\"}").await;
    assert!(forwarded > 0.0, "no request needed forwarding?");

    // /api/call on one node reaches a socket on the other.
    let mut answering = Driven::node(&url, json!({"transports": ["polling"], "answers": {"ping?": ["pong!"]}}));
    let id = answering.wait_type("connect").await["id"].clone();
    let other = if node_of(&id) == "a" { &c.b } else { &c.a };
    let (s, body) = other.api("/api/call", json!({"connection": id, "event": "ping?", "timeout": 5}), None).await;
    assert_eq!((s, &body["args"]), (StatusCode::OK, &json!(["pong!"])), "{body}");
    // A socket of the other node that is gone: 404 (the node says so).
    let gone = format!("{}.gonegonegone", node_of(&id));
    let (s, _) = other.api("/api/call", json!({"connection": gone, "event": "x", "timeout": 5}), None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    // A polling request for a node that is not there: Engine.IO's "Session ID unknown".
    let (s, _, body) =
        request(Method::GET, &format!("{url}{PATH}?EIO=4&transport=polling&sid=gone.abcdef"), None, &[]).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(serde_json::from_slice::<Value>(&body).unwrap()["code"], 1);
}

#[tokio::test]
async fn python_socketio_redis_manager_emits_reach_sockets_on_both_nodes() {
    let app = Upstream::start().await;
    alice(&app);
    let c = cluster(&app).await;
    // One socket on each node.
    let mut on_a = Driven::node(&c.a.http_url(""), json!({"transports": ["websocket"]}));
    let mut on_b = Driven::node(&c.b.http_url(""), json!({}));
    let id_a = on_a.wait_type("connect").await["id"].as_str().unwrap().to_owned();
    let id_b = on_b.wait_type("connect").await["id"].as_str().unwrap().to_owned();
    // The app process: python-socketio's AsyncRedisManager(write_only=True), no server.
    let ops = json!([
        {"op": "emit", "event": "news", "data": {"headline": "hi"}, "room": "user:alice"},
        {"op": "emit", "event": "all", "data": [1, 2]},
        {"op": "emit", "event": "not-a", "data": "x", "room": "user:alice", "skip_sid": id_a},
        {"op": "enter_room", "sid": id_b, "room": "vip"},
        {"op": "sleep", "seconds": 0.3},
        {"op": "emit", "event": "vip-only", "data": null, "room": "vip"},
        {"op": "emit", "event": "to-sid", "data": "direct", "room": id_a},
    ]);
    let (ok, out) = Driven::python("emitter.py", &[&c.redis_url, "socketio", &ops.to_string()])
        .finish(Duration::from_secs(20))
        .await;
    assert!(ok, "emitter failed: {out:?}");
    for client in [&mut on_a, &mut on_b] {
        assert_eq!(client.event("news").await["args"], json!([{"headline": "hi"}]));
        // A list is one argument (a tuple would be several).
        assert_eq!(client.event("all").await["args"], json!([[1, 2]]));
    }
    on_b.event("not-a").await;
    on_b.event("vip-only").await;
    assert_eq!(on_a.event("to-sid").await["args"], json!(["direct"]));
    let rest = on_a.drain(Duration::from_millis(500)).await;
    assert!(rest.iter().all(|v| v["event"] != "not-a" && v["event"] != "vip-only"), "{rest:?}");
    // A pickled message (python-socketio < 5.14) is refused, never unpickled.
    c._redis.cmd(&["PUBLISH", "socketio", "\u{80}\u{4}pickled"]).await;
    c.a.wait_metric("wsrelay_socketio_bridge_messages_total{method=\"refused\"}", |v| v >= 1.0).await;
    // leave_room, then close_room: the sockets are out of those rooms.
    let ops = json!([
        {"op": "leave_room", "sid": id_b, "room": "vip"},
        {"op": "enter_room", "sid": id_a, "room": "club"},
        {"op": "sleep", "seconds": 0.3},
        {"op": "emit", "event": "club-first", "data": null, "room": "club"},
        {"op": "close_room", "room": "club"},
        {"op": "sleep", "seconds": 0.3},
        {"op": "emit", "event": "vip-again", "data": null, "room": "vip"},
        {"op": "emit", "event": "club-again", "data": null, "room": "club"},
        {"op": "emit", "event": "marker", "data": null},
    ]);
    let (ok, out) = Driven::python("emitter.py", &[&c.redis_url, "socketio", &ops.to_string()])
        .finish(Duration::from_secs(20))
        .await;
    assert!(ok, "emitter failed: {out:?}");
    on_a.event("club-first").await;
    on_a.event("marker").await;
    on_b.event("marker").await;
    for seen in [&on_a.seen, &on_b.seen] {
        assert!(seen.iter().all(|v| v["event"] != "vip-again" && v["event"] != "club-again"), "{seen:?}");
    }
    assert_eq!(c.a.metric("wsrelay_socketio_bridge_messages_total{method=\"close_room\"}").await, 1.0);
    // The python disconnect reaches the socket wherever it is.
    let ops = json!([{"op": "disconnect", "sid": id_b}]);
    let (ok, _) = Driven::python("emitter.py", &[&c.redis_url, "socketio", &ops.to_string()])
        .finish(Duration::from_secs(20))
        .await;
    assert!(ok);
    assert_eq!(on_b.wait_type("disconnect").await["reason"], "io server disconnect");
}

#[tokio::test]
async fn python_socketio_client_connects_emits_with_ack_and_answers_calls() {
    let app = Upstream::start().await;
    alice(&app);
    app.set_hook("/ws/message", HookReply::new(200, &json!({"stored": 1})));
    let relay = relay(&app, &[]).await;
    let mut py = Driven::python(
        "client.py",
        &[&relay.http_url(""), &json!({"auth": {"token": "py"}, "answers": {"sure?": ["yes"]}}).to_string()],
    );
    let id = py.wait_type("connect").await["id"].as_str().unwrap().to_owned();
    assert_eq!(app.recorded("/ws/connect")[0].json()["auth"], json!({"token": "py"}));
    relay.publish(json!({"channel": "user:alice", "event": "hello", "args": ["py"]})).await;
    assert_eq!(py.event("hello").await["args"], json!(["py"]));
    py.send(json!({"op": "emit", "event": "save", "args": [{"a": 1}], "ack": true, "id": 7})).await;
    assert_eq!(py.wait_type("ack").await["args"], json!([{"stored": 1}]));
    let (s, body) = relay.api("/api/call", json!({"connection": id, "event": "sure?", "timeout": 5}), None).await;
    assert_eq!((s, &body["args"]), (StatusCode::OK, &json!(["yes"])), "{body}");
    // Rooms by the app, a named namespace over WebSocket only, and a
    // disconnect by the app.
    relay.api("/api/subscribe", json!({"connection": id, "channel": "py-room"}), None).await;
    settle().await;
    relay.publish(json!({"channel": "py-room", "event": "in-room", "args": [1]})).await;
    assert_eq!(py.event("in-room").await["args"], json!([1]));
    let mut ws = Driven::python(
        "client.py",
        &[&relay.http_url(""), &json!({"transports": ["websocket"], "namespace": "/py"}).to_string()],
    );
    let c = ws.wait_type("connect").await;
    assert_eq!(c["transport"], "websocket");
    relay.publish(json!({"channel": "/py", "event": "ns-wide"})).await;
    ws.event("ns-wide").await;
    relay.api("/api/disconnect", json!({"connection": id}), None).await;
    py.wait_type("disconnect").await;
    py.send(json!({"op": "exit"})).await;
    ws.send(json!({"op": "exit"})).await;
}

/// Polls a session that must be over: what was left for it, if anything,
/// then `400` (the sid unknown), as from Engine.IO. A session still open
/// would hold the GET for a ping interval: `request` times out and the test
/// fails.
pub(crate) async fn assert_closed(base: &str, sid: &str) {
    let url = format!("{base}{PATH}?EIO=4&transport=polling&sid={sid}");
    let mut bodies: Vec<String> = Vec::new();
    for _ in 0..3 {
        let (s, _, body) = request(Method::GET, &url, None, &[]).await;
        if s == StatusCode::BAD_REQUEST {
            return;
        }
        bodies.push(String::from_utf8_lossy(&body).into_owned());
    }
    panic!("the session did not end: {bodies:?}");
}

/// Opens an Engine.IO polling session by hand; returns its sid.
pub(crate) async fn open_polling(base: &str) -> String {
    let (s, _, body) = request(Method::GET, &format!("{base}{PATH}?EIO=4&transport=polling"), None, &[]).await;
    assert_eq!(s, StatusCode::OK);
    let text = String::from_utf8(body.to_vec()).unwrap();
    let open: Value = serde_json::from_str(text.strip_prefix('0').unwrap()).unwrap();
    open["sid"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn malformed_and_oversized_engineio_input_gets_clear_errors_and_harms_nothing() {
    let app = Upstream::start().await;
    alice(&app);
    let relay = relay(&app, &["--socketio-max-payload", "2048"]).await;
    let base = relay.http_url("");
    let get = |q: String| {
        let url = format!("{base}{PATH}?{q}");
        async move {
            let (s, _, b) = request(Method::GET, &url, None, &[]).await;
            (s, String::from_utf8_lossy(&b).into_owned())
        }
    };
    let code = |b: &str| serde_json::from_str::<Value>(b).map(|v| v["code"].clone()).unwrap_or(Value::Null);
    let (s, b) = get("EIO=3&transport=polling".into()).await;
    assert_eq!((s, code(&b)), (StatusCode::BAD_REQUEST, json!(5)), "{b}");
    let (s, b) = get("EIO=4&transport=carrier-pigeon".into()).await;
    assert_eq!((s, code(&b)), (StatusCode::BAD_REQUEST, json!(0)), "{b}");
    let (s, b) = get("EIO=4&transport=polling&sid=nosuchsession".into()).await;
    assert_eq!((s, code(&b)), (StatusCode::BAD_REQUEST, json!(1)), "{b}");

    // A session, CONNECTed by hand, then a malformed Socket.IO packet: closed.
    let post = |sid: String, body: String| {
        let url = format!("{base}{PATH}?EIO=4&transport=polling&sid={sid}");
        async move {
            let h = [("content-type", "text/plain;charset=UTF-8".to_owned())];
            let (s, _, b) = request(Method::POST, &url, Some(body), &h).await;
            (s, String::from_utf8_lossy(&b).into_owned())
        }
    };
    let sid = open_polling(&base).await;
    assert_eq!(post(sid.clone(), "40".into()).await.0, StatusCode::OK);
    let (_, b) = get(format!("EIO=4&transport=polling&sid={sid}")).await;
    assert!(b.starts_with("40{\"pid\""), "CONNECT answered: {b}");
    assert_eq!(post(sid.clone(), "4zzz".into()).await.0, StatusCode::OK);
    // The session ends: the client is told (close packet), then the sid is unknown.
    assert_closed(&base, &sid).await;
    // A binary packet must be followed by its attachments: anything else
    // ends the session.
    let sid = open_polling(&base).await;
    post(sid.clone(), "40".into()).await;
    let _ = get(format!("EIO=4&transport=polling&sid={sid}")).await;
    post(sid.clone(), "451-[\"up\",{\"_placeholder\":true,\"num\":0}]\u{1e}42[\"text\"]".into()).await;
    assert_closed(&base, &sid).await;

    // An oversized polling body: 413, and the session is over.
    let sid = open_polling(&base).await;
    let (s, _) = post(sid.clone(), format!("42[\"big\",\"{}\"]", "x".repeat(4096))).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
    assert_closed(&base, &sid).await;

    // Events before CONNECT: the session is not made.
    let sid = open_polling(&base).await;
    post(sid.clone(), "42[\"early\"]".into()).await;
    assert_closed(&base, &sid).await;

    // The node is unharmed: a real client connects and gets events.
    let mut c = Driven::node(&base, json!({}));
    c.wait_type("connect").await;
    relay.publish(json!({"channel": "user:alice", "event": "still-fine"})).await;
    c.event("still-fine").await;
    // The refused sessions are gone (a closing one waits up to 500 ms for
    // the client's poll to take its close packet).
    relay.wait_metric("wsrelay_connections", |v| v == 1.0).await;
}

#[tokio::test]
async fn a_sidecar_deploy_loses_nothing_socketio_clients_recover_on_the_other() {
    let app = Upstream::start().await;
    app.set_hook("/ws/connect", HookReply::new(200, &json!({"user": "alice", "channels": ["h:alice"]})));
    let cfg = history_config();
    let c = cluster_with(&app, &["--config", cfg.path().to_str().unwrap(), "--drain-timeout", "3s"]).await;
    let url = c.lb.url();
    let mut clients = vec![
        Driven::node(&url, json!({"transports": ["websocket"]})),
        Driven::node(&url, json!({"transports": ["websocket"]})),
        Driven::node(&url, json!({"transports": ["polling"]})),
        Driven::node(&url, json!({})),
    ];
    let mut on_a = 0;
    for cl in &mut clients {
        let id = cl.wait_type("connect").await["id"].clone();
        on_a += usize::from(node_of(&id) == "a");
    }
    assert!(on_a > 0 && on_a < clients.len(), "the proxy spread them over both sidecars");
    for n in 0..5 {
        assert_eq!(c.b.publish(json!({"channel": "h:alice", "event": "n", "args": [n]})).await.0, StatusCode::OK);
    }
    // Sidecar a is deployed away (SIGTERM: drain) while the app keeps publishing.
    let Cluster { a, b, lb, _redis, .. } = c;
    let publisher = tokio::spawn(async move {
        for n in 5..20 {
            assert_eq!(b.publish(json!({"channel": "h:alice", "event": "n", "args": [n]})).await.0, StatusCode::OK);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        b
    });
    // Its readiness fails at once: the load balancer stops sending it requests.
    lb.take_out(0);
    a.stop().await;
    let _b = publisher.await.unwrap();
    // Every client has every message once, in order; those of a recovered.
    for cl in &mut clients {
        let mut got = Vec::new();
        while got.len() < 20 {
            got.push(cl.event("n").await["args"][0].as_i64().unwrap());
        }
        assert_eq!(got, (0..20).collect::<Vec<_>>());
        let extra: Vec<Value> = cl.drain(Duration::from_millis(300)).await;
        assert!(extra.iter().all(|v| v["event"] != "n"), "duplicates: {extra:?}");
        let reconnects: Vec<&Value> = extra.iter().filter(|v| v["type"] == "connect").collect();
        assert!(reconnects.iter().all(|v| v["recovered"] == true), "{reconnects:?}");
    }
    drop(lb);
}

#[tokio::test]
async fn pongs_keep_a_socket_alive_and_a_silent_one_is_closed() {
    let app = Upstream::start().await;
    alice(&app);
    let relay = relay(&app, &["--ping-interval", "200ms", "--idle-timeout", "700ms"]).await;
    let mut c = Driven::node(&relay.http_url(""), json!({"transports": ["websocket"]}));
    c.wait_type("connect").await;
    // A real client answers the Engine.IO pings: still connected well past the idle timeout.
    let lines = c.drain(Duration::from_millis(2000)).await;
    assert!(lines.iter().all(|v| v["type"] != "disconnect"), "{lines:?}");
    relay.publish(json!({"channel": "user:alice", "event": "alive"})).await;
    c.event("alive").await;
    // A polling session whose client never polls nor answers: closed.
    let sid = open_polling(&relay.http_url("")).await;
    let url = relay.http_url(&format!("{PATH}?EIO=4&transport=polling&sid={sid}"));
    request(Method::POST, &url, Some("40".into()), &[]).await;
    relay.wait_metric("wsrelay_disconnects_total{reason=\"idle_timeout\"}", |v| v >= 1.0).await;
    // Its polls get what was left, then the close packet; then the sid is unknown.
    assert_closed(&relay.http_url(""), &sid).await;
}

#[tokio::test]
async fn socketio_sockets_are_rate_limited_and_slow_ones_are_cut_off() {
    let app = Upstream::start().await;
    alice(&app);
    app.set_hook("/ws/message", HookReply::new(200, &json!(null)));
    let relay = relay(&app, &["--client-rate", "5", "--client-burst", "5", "--client-queue", "16"]).await;
    // A client flooding events is closed (it reconnects, as after any drop).
    let mut flood = Driven::node(&relay.http_url(""), json!({"transports": ["websocket"]}));
    flood.wait_type("connect").await;
    for i in 0..60 {
        flood.send(json!({"op": "emit", "event": "spam", "args": [i]})).await;
    }
    relay.wait_metric("wsrelay_disconnects_total{reason=\"rate_limited\"}", |v| v >= 1.0).await;
    // A polling client that never polls while events pile up: a slow consumer.
    let sid = open_polling(&relay.http_url("")).await;
    let url = relay.http_url(&format!("{PATH}?EIO=4&transport=polling&sid={sid}"));
    request(Method::POST, &url, Some("40".into()), &[]).await;
    settle().await;
    // Past what polling holds for a GET (64 KiB) and the client queue (16).
    for i in 0..400 {
        relay.publish(json!({"channel": "/", "event": "pile", "args": [i, "x".repeat(400)]})).await;
    }
    relay.wait_metric("wsrelay_disconnects_total{reason=\"slow_consumer\"}", |v| v >= 1.0).await;
}

#[tokio::test]
async fn review_fixes_sid_secret_namespace_hooks_calls_inside_hooks_and_retries() {
    let app = Upstream::start().await;
    alice(&app);
    let relay = relay(&app, &["--max-message-bytes", "1024"]).await;
    let base = relay.http_url("");

    // The public socket.id does not open the Engine.IO session.
    let mut c = Driven::node(&base, json!({"transports": ["polling"]}));
    let id = c.wait_type("connect").await["id"].as_str().unwrap().to_owned();
    let (s, _, _) = request(Method::GET, &format!("{base}{PATH}?EIO=4&transport=polling&sid={id}"), None, &[]).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "socket.id must not be the polling session's key");

    // A polling packet over --max-message-bytes: 413, the session ends.
    let sid = open_polling(&base).await;
    let url = format!("{base}{PATH}?EIO=4&transport=polling&sid={sid}");
    let (s, _, _) = request(Method::POST, &url, Some(format!("42[\"big\",\"{}\"]", "x".repeat(2000))), &[]).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);

    // Reserved event names are refused.
    let (s, body) = relay.publish(json!({"channel": "/", "event": "disconnect"})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{body}");

    // The app calls the client from inside its event handler: the client's
    // ACK is read while the hook is still pending.
    app.set_hook("/ws/message", HookReply::new(200, &json!("handled")).delayed(Duration::from_secs(3)));
    let mut caller = Driven::node(&base, json!({"transports": ["websocket"], "answers": {"really?": ["yes"]}}));
    let cid = caller.wait_type("connect").await["id"].as_str().unwrap().to_owned();
    caller.send(json!({"op": "emit", "event": "work", "args": [], "ack": true, "id": 1})).await;
    settle().await;
    let started = std::time::Instant::now();
    let (s, body) = relay.api("/api/call", json!({"connection": cid, "event": "really?", "timeout": 10}), None).await;
    assert_eq!((s, &body["args"]), (StatusCode::OK, &json!(["yes"])), "{body}");
    assert!(started.elapsed() < Duration::from_secs(2), "the ACK waited for the hook: {:?}", started.elapsed());
    assert_eq!(caller.wait_type("ack").await["args"], json!(["handled"]));
}

#[tokio::test]
async fn each_namespace_asks_the_connect_hook_and_failures_are_retried() {
    let app = Upstream::start().await;
    app.set_hook("/ws/connect", HookReply::new(503, &json!({})));
    let relay = relay(&app, &["--hook-timeout", "1s"]).await;
    let base = relay.http_url("");
    // The app is down: no final CONNECT_ERROR, the client keeps trying and
    // gets in once the app answers.
    let mut c = Driven::node(&base, json!({"transports": ["websocket"]}));
    tokio::time::sleep(Duration::from_millis(800)).await;
    let early = c.drain(Duration::from_millis(10)).await;
    assert!(early.iter().all(|v| v["type"] != "connect"), "{early:?}");
    assert!(app.recorded("/ws/connect").len() >= 2, "retried");
    app.set_hook("/ws/connect", HookReply::new(200, &json!({"user": "alice", "channels": ["r1"]})));
    c.wait_type("connect").await;
    // A second namespace on the same connection: the hook is asked again
    // with its namespace; its rooms are that namespace's.
    let mut admin = Driven::node(&base, json!({"transports": ["websocket"], "namespace": "/admin"}));
    admin.wait_type("connect").await;
    assert!(app.recorded("/ws/connect").iter().any(|r| r.json()["namespace"] == "/admin"));
    relay.publish(json!({"channel": "/admin#r1", "event": "admin-room"})).await;
    admin.event("admin-room").await;
    // Refused for one namespace: a CONNECT_ERROR there only.
    app.set_hook("/ws/connect", HookReply::new(403, &json!({})));
    let mut denied =
        Driven::node(&base, json!({"transports": ["websocket"], "namespace": "/secret", "reconnection": false}));
    assert_eq!(denied.wait_type("connect_error").await["message"], "refused by the app");
    relay.publish(json!({"channel": "r1", "event": "still-here"})).await;
    c.event("still-here").await;
}

#[tokio::test]
async fn a_call_without_a_timeout_waits_for_the_answer_or_the_socket_going() {
    let app = Upstream::start().await;
    alice(&app);
    let relay = relay(&app, &[]).await;
    let mut c = Driven::node(&relay.http_url(""), json!({"answers": {"confirm": ["ok"]}}));
    let id = c.wait_type("connect").await["id"].as_str().unwrap().to_owned();
    // python-socketio's call(timeout=None): `"timeout": null`.
    let (s, body) = relay.api("/api/call", json!({"connection": id, "event": "confirm", "timeout": null}), None).await;
    assert_eq!((s, &body["args"]), (StatusCode::OK, &json!(["ok"])), "{body}");
    // Never answered: it ends when the socket does, not at a default 60 s.
    let call = relay.api("/api/call", json!({"connection": id, "event": "ignored", "timeout": null}), None);
    let leave = async {
        c.wait("the ignored call", |v| v["type"] == "call" && v["event"] == "ignored").await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        c.send(json!({"op": "disconnect"})).await;
    };
    let ((s, body), ()) = tokio::join!(call, leave);
    assert_eq!(s, StatusCode::NOT_FOUND, "{body}");
}

#[tokio::test]
async fn close_room_empties_a_room_on_every_node() {
    let app = Upstream::start().await;
    alice(&app);
    let c = cluster(&app).await;
    let mut on_a = Driven::node(&c.a.http_url(""), json!({"transports": ["websocket"]}));
    let mut on_b = Driven::node(&c.b.http_url(""), json!({"transports": ["websocket"]}));
    let id_a = on_a.wait_type("connect").await["id"].as_str().unwrap().to_owned();
    on_b.wait_type("connect").await;
    let mut v1 = crate::common::ws_connect(&c.b.ws_url("/ws")).await;
    v1.subscribe("user:alice").await;
    let (s, body) = c.a.api("/api/close_room", json!({"channel": "user:alice"}), None).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    // The wsrelay.v1 client is told; then nothing published there arrives.
    assert_eq!(v1.recv().await["op"], "unsubscribed");
    c.b.publish(json!({"channel": "user:alice", "event": "after-close"})).await;
    c.b.publish(json!({"channel": id_a, "event": "marker"})).await;
    on_a.event("marker").await;
    assert!(on_a.seen.iter().all(|v| v["event"] != "after-close"), "{:?}", on_a.seen);
    assert!(on_b.drain(Duration::from_millis(300)).await.iter().all(|v| v["event"] != "after-close"));
    v1.expect_silence(Duration::from_millis(100)).await;
    let (s, _) = c.a.api("/api/close_room", json!({"channel": "no spaces"}), None).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
}

/// Found by the soak: while Redis was down, a polling request that reached
/// the sidecar not holding its session could not learn where to forward it
/// (503), so behind a round-robin proxy every polling client lost its
/// session in each Redis blip (and, Redis being down, its recovery state
/// too). The node's last known address (younger than a node's expiry) is
/// used now.
#[tokio::test]
async fn polling_requests_are_forwarded_while_redis_is_down() {
    let app = Upstream::start().await;
    alice(&app);
    let mut c = cluster_with(&app, &["--ping-interval", "1s"]).await;
    let sid = open_polling(&c.a.http_url("")).await;
    let via_b = c.b.http_url(&format!("{PATH}?EIO=4&transport=polling&sid={sid}"));
    // CONNECT through b, forwarded to a (which holds the session); b learns a's address.
    let (s, _, _) = request(Method::POST, &via_b, Some("40".into()), &[]).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _, body) = request(Method::GET, &via_b, None, &[]).await;
    assert_eq!(s, StatusCode::OK);
    assert!(body.starts_with(b"40"), "{body:?}");
    c._redis.kill();
    // A poll through b still reaches a: the next ping, not a 503.
    let (s, _, body) = request(Method::GET, &via_b, None, &[]).await;
    assert_eq!((s, body.as_ref()), (StatusCode::OK, b"2".as_ref()), "{body:?}");
    let (s, _, _) = request(Method::POST, &via_b, Some("3".into()), &[]).await;
    assert_eq!(s, StatusCode::OK, "the pong, through b");
}
