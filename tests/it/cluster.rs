//! Several sidecars on one real Redis: cross-node delivery and order,
//! subscribe-only-what-is-needed, Redis outages, killed and silently dead
//! subscriber connections, prefixes.

use http::{Method, StatusCode};
use serde_json::json;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::common::redis::{FreezeProxy, RedisServer};
use crate::common::{Relay, STEP, Upstream, WsClient, eventually, request, ws_connect};

async fn node(app: &Upstream, redis_url: &str, extra: &[&str]) -> Relay {
    let mut args = vec!["--redis-url", redis_url];
    args.extend_from_slice(extra);
    let relay = Relay::start(&app.url(), &args).await;
    eventually(STEP, "broker up", || async { relay.readyz_broker().await == StatusCode::OK }).await;
    relay
}

/// Reads messages until `n` arrived for each of `channels`; returns the numbers per channel.
async fn read_per_channel(c: &mut WsClient, channels: &[&str], n: usize) -> Vec<Vec<i64>> {
    let mut got = vec![Vec::new(); channels.len()];
    while got.iter().any(|g| g.len() < n) {
        let m = c.recv().await;
        assert_eq!(m["op"], "message", "{m}");
        let i = channels.iter().position(|ch| m["channel"] == *ch).expect("a subscribed channel");
        got[i].push(m["data"]["n"].as_i64().unwrap());
    }
    got
}

#[tokio::test]
async fn three_nodes_deliver_every_message_once_in_one_order_per_channel() {
    let redis = RedisServer::start();
    let app = Upstream::start().await;
    let nodes =
        [node(&app, &redis.url(), &[]).await, node(&app, &redis.url(), &[]).await, node(&app, &redis.url(), &[]).await];
    let channels = ["room:a", "room:b"];
    let mut readers = Vec::new();
    for n in &nodes {
        for _ in 0..2 {
            let mut c = ws_connect(&n.ws_url("/ws")).await;
            for ch in channels {
                c.subscribe(ch).await;
            }
            // 500 messages and then, on each channel, the marker published
            // after them: a duplicate or a stray would come before it.
            readers.push(tokio::spawn(async move { read_per_channel(&mut c, &channels, 501).await }));
        }
    }
    for i in 0..1000 {
        let node = &nodes[i % 3];
        let channel = channels[i % 2];
        let (status, body) = node.publish(json!({"channel": channel, "data": {"n": i}})).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    for channel in channels {
        let (status, _) = nodes[0].publish(json!({"channel": channel, "data": {"n": -1}})).await;
        assert_eq!(status, StatusCode::OK);
    }
    let expected_a: Vec<i64> = (0..1000).step_by(2).chain([-1]).collect();
    let expected_b: Vec<i64> = (1..1000).step_by(2).chain([-1]).collect();
    for r in readers {
        let got = tokio::time::timeout(STEP * 3, r).await.unwrap().unwrap();
        assert_eq!(got[0], expected_a, "room:a in publish order, once each");
        assert_eq!(got[1], expected_b, "room:b in publish order, once each");
    }
    for n in &nodes {
        assert_eq!(n.metric("wsrelay_messages_delivered_total").await, 2004.0);
    }
}

#[tokio::test]
async fn a_node_subscribes_in_redis_only_to_channels_it_needs() {
    let redis = RedisServer::start();
    let app = Upstream::start().await;
    let a = node(&app, &redis.url(), &[]).await;
    let b = node(&app, &redis.url(), &[]).await;
    let mut c1 = ws_connect(&a.ws_url("/ws")).await;
    let mut c2 = ws_connect(&a.ws_url("/ws")).await;
    c1.subscribe("only:a").await;
    c1.subscribe("marker").await;
    c2.subscribe("only:a").await;
    assert_eq!(redis.numsub("wsrelay:ch:only:a").await, 1, "one Redis subscription per node, not per client");
    assert_eq!(a.metric("wsrelay_broker_subscriptions").await, 2.0, "only:a and marker");
    assert_eq!(b.metric("wsrelay_broker_subscriptions").await, 0.0);

    let (status, _) = b.publish(json!({"channel":"only:a","data":{"n":1}})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(c1.recv().await["data"]["n"], 1);
    assert_eq!(c2.recv().await["data"]["n"], 1);

    c1.request(json!({"op":"unsubscribe","channel":"only:a"})).await;
    // c2 still subscribed on node a: delivery must go on.
    b.publish(json!({"channel":"only:a","data":{"n":2}})).await;
    assert_eq!(c2.recv().await["data"]["n"], 2);
    // Node b publishes on one connection and node a reads one: order holds
    // across channels, so the marker comes next only if n:2 never came.
    b.publish(json!({"channel":"marker","data":{"n":3}})).await;
    assert_eq!(c1.recv().await["data"]["n"], 3, "nothing after unsubscribing");
    drop(c2);
    eventually(STEP, "Redis subscription dropped", || async { redis.numsub("wsrelay:ch:only:a").await == 0 }).await;
    a.wait_metric("wsrelay_broker_subscriptions", |v| v == 1.0).await;
}

#[tokio::test]
async fn exclude_and_disconnect_work_across_nodes() {
    let redis = RedisServer::start();
    let app = Upstream::start().await;
    let a = node(&app, &redis.url(), &[]).await;
    let b = node(&app, &redis.url(), &[]).await;
    let mut on_a = ws_connect(&a.ws_url("/ws")).await;
    let mut on_b = ws_connect(&b.ws_url("/ws")).await;
    on_a.subscribe("x").await;
    on_b.subscribe("x").await;
    let (status, _) = b.publish(json!({"channel":"x","data":{"n":5},"exclude":on_a.connection_id()})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(on_b.recv().await["data"]["n"], 5);
    b.publish(json!({"channel":"x","data":{"n":6}})).await;
    assert_eq!(on_a.recv().await["data"]["n"], 6, "the excluded connection skipped n:5");
    assert_eq!(on_b.recv().await["data"]["n"], 6);

    let (status, _) = b.api("/api/disconnect", json!({"connection": on_a.connection_id()}), None).await;
    assert_eq!(status, StatusCode::OK);
    let close = on_a.expect_close(STEP).await.expect("a close frame");
    assert_eq!(close.code, CloseCode::Policy);
    assert_eq!(on_b.request(json!({"op":"ping"})).await["ok"], true, "the other connection stays");
}

#[tokio::test]
async fn losing_redis_keeps_clients_and_says_so_then_recovers() {
    let mut redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("ns.toml");
    std::fs::write(&cfg, "[[namespace]]\nprefix = \"open:\"\npublish = \"anyone\"\n").unwrap();
    let app = Upstream::start().await;
    let args = ["--config", cfg.to_str().unwrap()];
    let a = node(&app, &redis.url(), &args).await;
    let b = node(&app, &redis.url(), &args).await;
    let mut on_a = ws_connect(&a.ws_url("/ws")).await;
    let mut on_b = ws_connect(&b.ws_url("/ws")).await;
    on_a.subscribe("open:r").await;
    on_b.subscribe("open:r").await;

    redis.kill();
    for n in [&a, &b] {
        eventually(STEP, "readyz?broker 503", || async { n.readyz_broker().await == StatusCode::SERVICE_UNAVAILABLE })
            .await;
        assert_eq!(n.metric("wsrelay_broker_up").await, 0.0);
        // A Redis outage hits every node at once: the pods stay ready and
        // the app's own HTTP keeps working through them.
        assert_eq!(n.readyz().await, StatusCode::OK, "plain /readyz does not follow the broker");
        let (status, _, _) = request(Method::GET, &n.http_url("/hello"), None, &[]).await;
        assert_eq!(status, StatusCode::OK, "HTTP through the sidecar works while Redis is down");
        let (status, body) = n.publish(json!({"channel":"open:r","data":{"n":0}})).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "never a silent drop: {body}");
        assert_eq!(body["error"]["code"], "unavailable");
    }
    let r = on_a.request(json!({"op":"publish","channel":"open:r","data":{"n":0}})).await;
    assert_eq!(r["error"]["code"], "unavailable", "{r}");
    let r = on_a.request(json!({"op":"subscribe","channel":"open:new"})).await;
    assert_eq!(r["error"]["code"], "unavailable", "{r}");
    // Clients stay connected through the outage.
    assert_eq!(on_b.request(json!({"op":"ping"})).await["ok"], true);
    assert_eq!(a.metric("wsrelay_connections").await, 1.0);

    redis.restart();
    for n in [&a, &b] {
        eventually(STEP, "readyz?broker 200 again", || async { n.readyz_broker().await == StatusCode::OK }).await;
        assert!(n.metric("wsrelay_broker_reconnects_total").await >= 1.0);
    }
    let (status, body) = b.publish(json!({"channel":"open:r","data":{"n":1}})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(on_a.recv().await["data"]["n"], 1, "resubscribed by itself");
    assert_eq!(on_b.recv().await["data"]["n"], 1);
    // The refused publishes (n:0) must never arrive: the next one is the marker.
    b.publish(json!({"channel":"open:r","data":{"n":2}})).await;
    assert_eq!(on_a.recv().await["data"]["n"], 2);
    assert_eq!(on_b.recv().await["data"]["n"], 2);
}

async fn publish_until_delivered(relay: &Relay, client: &mut WsClient, channel: &str) {
    // The node may still be reconnecting: a 503 is an honest answer, retry.
    let mut n = 100;
    eventually(STEP, "a publish answered 200", || {
        n += 1;
        let body = json!({"channel": channel, "data": {"n": n}});
        async move { relay.publish(body).await.0 == StatusCode::OK }
    })
    .await;
    assert_eq!(client.recv().await["data"]["n"], n, "delivery resumed without any client action");
}

#[tokio::test]
async fn a_killed_subscriber_connection_is_noticed_and_replaced() {
    let redis = RedisServer::start();
    let app = Upstream::start().await;
    let relay = node(&app, &redis.url(), &[]).await;
    let mut c = ws_connect(&relay.ws_url("/ws")).await;
    c.subscribe("k").await;
    // What Redis does to a subscriber over client-output-buffer-limit pubsub.
    redis.cmd(&["CLIENT", "KILL", "TYPE", "pubsub"]).await;
    relay.wait_metric("wsrelay_broker_reconnects_total", |v| v >= 1.0).await;
    eventually(STEP, "ready again", || async { relay.readyz_broker().await == StatusCode::OK }).await;
    assert_eq!(redis.numsub("wsrelay:ch:k").await, 1, "resubscribed");
    publish_until_delivered(&relay, &mut c, "k").await;
}

#[tokio::test]
async fn a_silently_dead_subscriber_fails_the_probe_and_is_replaced() {
    let redis = RedisServer::start();
    let proxy = FreezeProxy::start(redis.port).await;
    let app = Upstream::start().await;
    let args = ["--redis-probe-interval", "300ms", "--redis-probe-timeout", "1500ms", "--redis-timeout", "1s"];
    let relay = node(&app, &proxy.url(), &args).await;
    let mut c = ws_connect(&relay.ws_url("/ws")).await;
    c.subscribe("quiet").await;
    // The subscriber's connection (the node's first) stays open but delivers
    // nothing: no error, no close. Publishing still works.
    proxy.freeze(0);
    relay.wait_metric("wsrelay_broker_probe_failures_total", |v| v >= 1.0).await;
    eventually(STEP, "ready again on a fresh connection", || async { relay.readyz_broker().await == StatusCode::OK })
        .await;
    publish_until_delivered(&relay, &mut c, "quiet").await;
}

#[tokio::test]
async fn clusters_with_different_prefixes_do_not_see_each_other() {
    let redis = RedisServer::start();
    let app = Upstream::start().await;
    let one = node(&app, &redis.url(), &["--redis-prefix", "app1:"]).await;
    let two = node(&app, &redis.url(), &["--redis-prefix", "app2:"]).await;
    let mut c1 = ws_connect(&one.ws_url("/ws")).await;
    let mut c2 = ws_connect(&two.ws_url("/ws")).await;
    c1.subscribe("same").await;
    c2.subscribe("same").await;
    assert_eq!(redis.numsub("app1:ch:same").await, 1);
    one.publish(json!({"channel":"same","data":{"n":1}})).await;
    assert_eq!(c1.recv().await["data"]["n"], 1);
    two.publish(json!({"channel":"same","data":{"n":2}})).await;
    assert_eq!(c2.recv().await["data"]["n"], 2, "app1's message never reached app2's node");
}

#[tokio::test]
async fn rediss_connects_with_tls_and_verifies_certificates() {
    let redis = RedisServer::start_tls();
    let tls = redis.tls_port.unwrap();
    let app = Upstream::start().await;
    // Self-signed test certificate: verification must refuse it...
    let strict = Relay::start(&app.url(), &["--redis-url", &format!("rediss://127.0.0.1:{tls}/0")]).await;
    // ...unless explicitly told not to verify (test setups only).
    let a = node(&app, &format!("rediss://127.0.0.1:{tls}/0#insecure"), &[]).await;
    let b = node(&app, &format!("rediss://127.0.0.1:{tls}/0#insecure"), &[]).await;
    let mut c = ws_connect(&a.ws_url("/ws")).await;
    c.subscribe("secure").await;
    let (status, _) = b.publish(json!({"channel":"secure","data":{"n":1}})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(c.recv().await["data"]["n"], 1);
    strict.wait_broker_failure().await;
    assert_eq!(strict.readyz_broker().await, StatusCode::SERVICE_UNAVAILABLE, "an unverifiable certificate is refused");
    assert_eq!(strict.metric("wsrelay_broker_up").await, 0.0);
}

pub fn user_token(user: &str) -> String {
    let exp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 600;
    let claims = json!({"sub": user, "exp": exp});
    let key = jsonwebtoken::EncodingKey::from_secret(b"k");
    jsonwebtoken::encode(&jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256), &claims, &key).unwrap()
}

#[tokio::test]
async fn a_disconnect_missed_by_a_reconnecting_node_is_applied_when_it_is_back() {
    let redis = RedisServer::start();
    let proxy = FreezeProxy::start(redis.port).await;
    let app = Upstream::start().await;
    let probe = ["--redis-probe-interval", "300ms", "--redis-probe-timeout", "1500ms", "--redis-timeout", "1s"];
    let jwt = ["--jwt-secret", "k"];
    let a = node(&app, &proxy.url(), &[&probe[..], &jwt[..]].concat()).await;
    let b = node(&app, &redis.url(), &jwt).await;
    let url = a.ws_url(&format!("/ws?token={}", user_token("42")));
    let mut revoked = ws_connect(&url).await;
    let mut bystander = ws_connect(&a.ws_url(&format!("/ws?token={}", user_token("7")))).await;

    // Node a's subscriber stops delivering, silently: it cannot hear b.
    proxy.freeze(0);
    let (status, _) = b.api("/api/disconnect", json!({"user": "42"}), None).await;
    assert_eq!(status, StatusCode::OK);
    // The same user signs in again on node a after the command: that session is new.
    let mut fresh = ws_connect(&url).await;

    // Node a notices, reconnects, and replays what it missed.
    a.wait_metric("wsrelay_broker_probe_failures_total", |v| v >= 1.0).await;
    let close = revoked.expect_close(STEP * 2).await.expect("a close frame");
    assert_eq!(close.code, CloseCode::Policy);
    assert_eq!(fresh.request(json!({"op":"ping"})).await["ok"], true, "a session newer than the command stays");
    assert_eq!(bystander.request(json!({"op":"ping"})).await["ok"], true, "other users stay");
    // Replayed once: a later reconnect does not close the fresh session.
    let (status, _) = b.api("/api/disconnect", json!({"user": "nobody"}), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(fresh.request(json!({"op":"ping"})).await["ok"], true);
}

#[tokio::test]
async fn a_starting_node_waits_for_redis_but_an_outage_fails_fast() {
    // Redis is not there yet when the sidecar starts (a pod whose Redis is
    // still coming up): a publish waits for the first connection instead of
    // failing at once.
    let app = Upstream::start().await;
    let mut redis = RedisServer::start();
    redis.kill();
    let url = redis.url();
    let relay = Relay::start(&app.url(), &["--redis-url", &url, "--redis-timeout", "5s"]).await;
    let publish = relay.publish(json!({"channel": "early", "data": 1}));
    let restart = async {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        redis.restart();
    };
    let ((status, body), ()) = tokio::join!(publish, restart);
    assert_eq!(status, StatusCode::OK, "{body}");
    // Once it has been up, an outage is answered at once.
    redis.kill();
    relay.wait_broker_failure().await;
    let started = std::time::Instant::now();
    let (status, _) = relay.publish(json!({"channel": "early", "data": 2})).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(started.elapsed() < std::time::Duration::from_secs(2), "{:?}", started.elapsed());
}
