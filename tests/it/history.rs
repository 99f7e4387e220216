//! History and recovery: offsets, `since` (frame and URL), the history API,
//! and the guarantees across failures — a killed Redis (with and without
//! persistence), a killed subscriber connection, a killed sidecar: every
//! message the API acknowledged reaches every subscriber exactly once, in
//! offset order, or the subscriber is told it must reload.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http::StatusCode;
use serde_json::{Value, json};

use crate::common::redis::RedisServer;
use crate::common::{Binary, Relay, STEP, Upstream, WsClient, eventually, ws_connect};

const NS: &str = "[[namespace]]\nprefix = \"h:\"\npublish = \"anyone\"\nhistory = { size = 1000, ttl = \"10m\" }\n";

pub(crate) fn config(extra: &str) -> tempfile::NamedTempFile {
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), format!("{NS}{extra}")).unwrap();
    f
}

pub(crate) fn seq(offset: &Value) -> u64 {
    offset.as_str().unwrap().rsplit_once(':').unwrap().1.parse().unwrap()
}

/// Reads messages of `channel` until one with data n == `until` arrives; returns
/// every n in arrival order (gap frames as -1).
pub(crate) async fn read_until(c: &mut WsClient, until: i64) -> Vec<i64> {
    let mut got = Vec::new();
    loop {
        let m = c.recv().await;
        match m["op"].as_str() {
            Some("message") => {
                let n = m["data"]["n"].as_i64().unwrap();
                got.push(n);
                if n == until {
                    return got;
                }
            }
            Some("gap") => got.push(-1),
            _ => {}
        }
    }
}

#[tokio::test]
async fn offsets_recovery_and_the_history_api_in_memory() {
    let app = Upstream::start().await;
    let cfg = config("[[namespace]]\nprefix = \"small:\"\nhistory = { size = 3, ttl = \"10m\" }\n");
    let relay = Relay::start(&app.url(), &["--config", cfg.path().to_str().unwrap()]).await;
    let mut live = ws_connect(&relay.ws_url("/ws")).await;
    live.subscribe("h:a").await;
    let mut offsets = Vec::new();
    for n in 1..=3 {
        let (status, body) = relay.publish(json!({"channel":"h:a","data":{"n":n}})).await;
        assert_eq!(status, StatusCode::OK);
        offsets.push(body["offset"].clone());
    }
    assert_eq!(offsets.iter().map(seq).collect::<Vec<_>>(), [1, 2, 3]);
    let m = live.recv().await;
    assert_eq!(m["offset"], offsets[0], "message frames carry their offset");
    // Without history: no offset.
    let (_, body) = relay.publish(json!({"channel":"plain","data":1})).await;
    assert_eq!(body, json!({}));

    // Recover after the first: 2 and 3 from history, then live 4, once each.
    let mut late = ws_connect(&relay.ws_url("/ws")).await;
    let r = late.request(json!({"op":"subscribe","channel":"h:a","since": offsets[0]})).await;
    assert_eq!(r["result"]["recovered"], true, "{r}");
    assert_eq!(r["result"]["offset"], offsets[2]);
    relay.publish(json!({"channel":"h:a","data":{"n":4}})).await;
    assert_eq!(read_until(&mut late, 4).await, [2, 3, 4]);

    // The URL form: `since` follows its channel.
    let since = offsets[1].as_str().unwrap();
    let mut url = ws_connect(&relay.ws_url(&format!("/ws?channel=h:a&since={since}"))).await;
    assert_eq!(url.welcome["recovered"]["h:a"], true, "{}", url.welcome);
    assert_eq!(read_until(&mut url, 4).await, [3, 4]);

    // Another epoch, or an offset older than what is kept: reload.
    let r = late.request(json!({"op":"subscribe","channel":"h:b","since":"zzz:1"})).await;
    assert_eq!(r["result"]["recovered"], false, "{r}");
    for n in 1..=5 {
        relay.publish(json!({"channel":"small:x","data":{"n":n}})).await;
    }
    let r = late.request(json!({"op":"subscribe","channel":"small:x","since": format!("{}:1", offsets[0].as_str().unwrap().split(':').next().unwrap())})).await;
    assert_eq!(r["result"]["recovered"], false, "only the last 3 are kept: {r}");
    // Without history, `since` cannot be honoured.
    let r = late.request(json!({"op":"subscribe","channel":"plain","since":"x:1"})).await;
    assert_eq!(r["result"]["recovered"], false);

    // The API: the newest messages, or those after an offset.
    let (status, _, body) =
        crate::common::request(http::Method::GET, &relay.admin_url("/api/channels/h:a/history?limit=2"), None, &[])
            .await;
    assert_eq!(status, StatusCode::OK);
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        v["messages"].as_array().unwrap().iter().map(|m| m["data"]["n"].as_i64().unwrap()).collect::<Vec<_>>(),
        [3, 4]
    );
    assert_eq!(seq(&v["offset"]), 4);
    let url = format!("/api/channels/h:a/history?since={}", offsets[0].as_str().unwrap());
    let (_, _, body) = crate::common::request(http::Method::GET, &relay.admin_url(&url), None, &[]).await;
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["recovered"], true);
    assert_eq!(v["messages"].as_array().unwrap().len(), 3);
    let (status, _, _) =
        crate::common::request(http::Method::GET, &relay.admin_url("/api/channels/plain/history"), None, &[]).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // A client publish is told its offset too.
    let r = live.request(json!({"op":"publish","channel":"h:a","data":{"n":5}})).await;
    assert_eq!(seq(&r["result"]["offset"]), 5, "{r}");
}

/// Publishes {"n": i} through `nodes` in turn until `stop`; returns the
/// acknowledged n's and the refused ones.
pub(crate) async fn publish_throughout(
    nodes: Vec<String>,
    channel: &'static str,
    stop: Arc<AtomicBool>,
) -> (Vec<i64>, Vec<i64>) {
    let (mut acked, mut refused) = (Vec::new(), Vec::new());
    let mut n = 0i64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let admin = &nodes[n as usize % nodes.len()];
        let body = json!({"channel": channel, "data": {"n": n}}).to_string();
        let headers = [("content-type", "application/json".to_owned())];
        match crate::common::try_request(http::Method::POST, &format!("{admin}/api/publish"), Some(body), &headers)
            .await
        {
            Ok((StatusCode::OK, _, _)) => acked.push(n),
            _ => refused.push(n),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (acked, refused)
}

/// Reads until every acknowledged n arrived (or the time is up); returns all.
pub(crate) async fn collect(c: &mut WsClient, want: &[i64]) -> Vec<i64> {
    let last = *want.last().unwrap();
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + STEP * 2;
    while tokio::time::Instant::now() < deadline {
        let Some(m) = c.recv_wire(Duration::from_millis(500)).await else {
            if got.last() == Some(&last) {
                break;
            }
            continue;
        };
        match m["op"].as_str() {
            Some("message") => got.push(m["data"]["n"].as_i64().unwrap()),
            Some("gap") => got.push(-1),
            _ => {}
        }
    }
    got
}

pub(crate) async fn node(app: &Upstream, redis: &RedisServer, cfg: &tempfile::NamedTempFile) -> Relay {
    let args =
        ["--redis-url", &redis.url(), "--config", cfg.path().to_str().unwrap(), "--redis-probe-timeout", "1500ms"];
    let relay = Relay::start(&app.url(), &args).await;
    eventually(STEP, "broker up", || async { relay.readyz_broker().await == StatusCode::OK }).await;
    relay
}

#[tokio::test]
async fn a_redis_restart_with_aof_loses_and_duplicates_nothing_acknowledged() {
    let mut redis = RedisServer::start_aof();
    let app = Upstream::start().await;
    let cfg = config("");
    let a = node(&app, &redis, &cfg).await;
    let b = node(&app, &redis, &cfg).await;
    let mut on_a = ws_connect(&a.ws_url("/ws?channel=h:r")).await;
    let mut on_b = ws_connect(&b.ws_url("/ws?channel=h:r")).await;
    let stop = Arc::new(AtomicBool::new(false));
    let publisher = tokio::spawn(publish_throughout(vec![a.admin_url(""), b.admin_url("")], "h:r", stop.clone()));
    tokio::time::sleep(Duration::from_millis(500)).await;
    redis.kill();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    redis.restart();
    for n in [&a, &b] {
        eventually(STEP, "broker back", || async { n.readyz_broker().await == StatusCode::OK }).await;
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    stop.store(true, Ordering::Relaxed);
    let (acked, refused) = publisher.await.unwrap();
    assert!(!refused.is_empty(), "the outage was seen by the publisher");
    assert!(acked.len() > 50, "{}", acked.len());
    for c in [&mut on_a, &mut on_b] {
        let got = collect(c, &acked).await;
        assert_eq!(got, acked, "every acknowledged message once, in order; no refused one");
    }
}

#[tokio::test]
async fn a_killed_subscriber_connection_catches_up_from_the_stream() {
    let redis = RedisServer::start();
    let app = Upstream::start().await;
    let cfg = config("");
    let a = node(&app, &redis, &cfg).await;
    let b = node(&app, &redis, &cfg).await;
    let mut on_b = ws_connect(&b.ws_url("/ws?channel=h:k")).await;
    let stop = Arc::new(AtomicBool::new(false));
    let publisher = tokio::spawn(publish_throughout(vec![a.admin_url("")], "h:k", stop.clone()));
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        redis.cmd(&["CLIENT", "KILL", "TYPE", "pubsub"]).await;
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    stop.store(true, Ordering::Relaxed);
    let (acked, _) = publisher.await.unwrap();
    assert!(b.metric("wsrelay_broker_reconnects_total").await >= 1.0);
    assert_eq!(collect(&mut on_b, &acked).await, acked, "nothing lost while b reconnected, nothing twice");
}

#[tokio::test]
async fn a_redis_restart_without_persistence_is_signalled_never_silent() {
    let mut redis = RedisServer::start();
    let app = Upstream::start().await;
    let cfg = config("");
    let a = node(&app, &redis, &cfg).await;
    let b = node(&app, &redis, &cfg).await;
    let mut on_b = ws_connect(&b.ws_url("/ws?channel=h:v")).await;
    for n in 1..=3 {
        assert_eq!(a.publish(json!({"channel":"h:v","data":{"n":n}})).await.0, StatusCode::OK);
    }
    assert_eq!(read_until(&mut on_b, 3).await, [1, 2, 3]);
    redis.kill();
    redis.restart();
    for n in [&a, &b] {
        eventually(STEP, "broker back", || async { n.readyz_broker().await == StatusCode::OK }).await;
    }
    // The history died with Redis: the stream starts again in a new epoch.
    let (status, body) = a.publish(json!({"channel":"h:v","data":{"n":4}})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(seq(&body["offset"]), 1);
    let got = read_until(&mut on_b, 4).await;
    assert_eq!(got, [-1, 4], "a gap frame before the new epoch's first message");
    assert!(b.metric("wsrelay_history_gaps_total").await >= 1.0);
    // A client presenting an offset from before: reload.
    let mut c = ws_connect(&a.ws_url("/ws")).await;
    let r = c.request(json!({"op":"subscribe","channel":"h:v","since":"00000000:3"})).await;
    assert_eq!(r["result"]["recovered"], false);
}

#[tokio::test]
async fn flushall_means_recovered_false_never_stale_data() {
    let redis = RedisServer::start();
    let app = Upstream::start().await;
    let cfg = config("");
    let a = node(&app, &redis, &cfg).await;
    let (_, body) = a.publish(json!({"channel":"h:f","data":{"n":1}})).await;
    let old = body["offset"].as_str().unwrap().to_owned();
    redis.cmd(&["FLUSHALL"]).await;
    a.publish(json!({"channel":"h:f","data":{"n":2}})).await;
    let mut c = ws_connect(&a.ws_url("/ws")).await;
    let r = c.request(json!({"op":"subscribe","channel":"h:f","since": old})).await;
    assert_eq!(r["result"]["recovered"], false, "{r}");
    assert_ne!(r["result"]["offset"].as_str().unwrap().split(':').next(), old.split(':').next(), "a new epoch");
}

#[tokio::test]
async fn clients_of_a_killed_sidecar_recover_everything_on_another() {
    let redis = RedisServer::start();
    let app = Upstream::start().await;
    let cfg = config("");
    let cfg_path = cfg.path().to_str().unwrap().to_owned();
    let doomed = Binary::spawn(None, &["--upstream", &app.url(), "--redis-url", &redis.url(), "--config", &cfg_path]);
    eventually(STEP, "broker up", || async { doomed.metric("wsrelay_broker_up").await == Some(1.0) }).await;
    let survivor = node(&app, &redis, &cfg).await;
    let mut c = ws_connect(&format!("ws://{}/ws?channel=h:s", doomed.public)).await;
    let mut last = Value::Null;
    for n in 1..=3 {
        survivor.publish(json!({"channel":"h:s","data":{"n":n}})).await;
        let m = c.recv().await;
        last = m["offset"].clone();
    }
    drop(doomed); // SIGKILL
    let mut acked = BTreeMap::new();
    for n in 4..=8 {
        let (status, body) = survivor.publish(json!({"channel":"h:s","data":{"n":n}})).await;
        assert_eq!(status, StatusCode::OK);
        acked.insert(n, body["offset"].clone());
    }
    // The client reconnects elsewhere with the last offset it saw.
    let since = last.as_str().unwrap();
    let mut again = ws_connect(&survivor.ws_url(&format!("/ws?channel=h:s&since={since}"))).await;
    assert_eq!(again.welcome["recovered"]["h:s"], true);
    survivor.publish(json!({"channel":"h:s","data":{"n":9}})).await;
    assert_eq!(read_until(&mut again, 9).await, [4, 5, 6, 7, 8, 9]);
}

pub(crate) const PRESENCE_NS: &str =
    "[[namespace]]\nprefix = \"room:\"\npublish = \"anyone\"\npresence = true\njoin-leave = true\n";

#[tokio::test]
async fn presence_and_join_leave_in_memory_and_server_side_subscribe() {
    let app = Upstream::start().await;
    let cfg = config(PRESENCE_NS);
    let relay = Relay::start(&app.url(), &["--config", cfg.path().to_str().unwrap(), "--jwt-secret", "k"]).await;
    let ann = crate::cluster::user_token("ann");
    let bob = crate::cluster::user_token("bob");
    let mut a = ws_connect(&relay.ws_url(&format!("/ws?token={ann}"))).await;
    a.subscribe("room:1").await;
    let mut b = ws_connect(&relay.ws_url(&format!("/ws?token={bob}"))).await;
    b.subscribe("room:1").await;
    let join = a.recv().await;
    assert_eq!((join["op"].as_str(), join["user"].as_str()), (Some("join"), Some("bob")), "{join}");
    let r = a.request(json!({"op":"presence","channel":"room:1"})).await;
    let mut users: Vec<&str> =
        r["result"]["clients"].as_array().unwrap().iter().map(|c| c["user"].as_str().unwrap()).collect();
    users.sort_unstable();
    assert_eq!(users, ["ann", "bob"], "{r}");
    let (status, _, body) =
        crate::common::request(http::Method::GET, &relay.admin_url("/api/channels/room:1/presence"), None, &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(serde_json::from_slice::<Value>(&body).unwrap()["count"], 2);
    // Only subscribers may ask, and only where presence is kept.
    let carl = crate::cluster::user_token("carl");
    let mut outsider = ws_connect(&relay.ws_url(&format!("/ws?token={carl}"))).await;
    let r = outsider.request(json!({"op":"presence","channel":"room:1"})).await;
    assert_eq!(r["error"]["code"], "forbidden");
    drop(b);
    let leave = a.recv().await;
    assert_eq!((leave["op"].as_str(), leave["user"].as_str()), (Some("leave"), Some("bob")), "{leave}");

    // Server-side subscribe: the app puts ann in a room; she is told, then gets its messages.
    let (status, _) = relay.api("/api/subscribe", json!({"user":"ann","channel":"news"}), None).await;
    assert_eq!(status, StatusCode::OK);
    let m = a.recv().await;
    assert_eq!((m["op"].as_str(), m["channel"].as_str()), (Some("subscribed"), Some("news")), "{m}");
    relay.publish(json!({"channel":"news","data":{"n":1}})).await;
    assert_eq!(a.recv().await["data"]["n"], 1);
    let (status, _) =
        relay.api("/api/unsubscribe", json!({"connection": a.connection_id(),"channel":"news"}), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(a.recv().await["op"], "unsubscribed");
    let (status, _) = relay.api("/api/subscribe", json!({"channel":"news"}), None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "a target is required");
}

#[tokio::test]
async fn presence_spans_nodes_and_a_killed_node_leaves_within_the_expiry() {
    let redis = RedisServer::start();
    let app = Upstream::start().await;
    let cfg = config(PRESENCE_NS);
    let cfg_path = cfg.path().to_str().unwrap().to_owned();
    let a = node(&app, &redis, &cfg).await;
    let doomed = Binary::spawn(None, &["--upstream", &app.url(), "--redis-url", &redis.url(), "--config", &cfg_path]);
    eventually(STEP, "broker up", || async { doomed.metric("wsrelay_broker_up").await == Some(1.0) }).await;
    let mut on_a = ws_connect(&a.ws_url("/ws")).await;
    on_a.subscribe("room:x").await;
    let mut on_doomed = ws_connect(&format!("ws://{}/ws", doomed.public)).await;
    on_doomed.subscribe("room:x").await;
    assert_eq!(on_a.recv().await["op"], "join", "a join from the other node");
    let r = on_a.request(json!({"op":"presence","channel":"room:x"})).await;
    assert_eq!(r["result"]["count"], 2, "{r}");
    // Server-side subscribe reaches a session on another node.
    let (status, _) =
        a.api("/api/subscribe", json!({"connection": on_doomed.connection_id(), "channel":"room:y"}), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(on_doomed.recv().await["op"], "subscribed");
    drop(doomed); // SIGKILL, sessions and all: no leave is ever sent
    drop(on_doomed);
    let started = std::time::Instant::now();
    eventually(STEP * 3, "the dead node's member expires", || async {
        let (_, _, body) =
            crate::common::request(http::Method::GET, &a.admin_url("/api/channels/room:x/presence"), None, &[]).await;
        serde_json::from_slice::<Value>(&body).unwrap()["count"] == 1
    })
    .await;
    assert!(started.elapsed() < Duration::from_secs(20), "gone within the 15 s expiry (plus a read)");
}

/// A client that follows a channel across sidecars: on any close it
/// reconnects to the next URL with the last offset it saw.
async fn follow(urls: Vec<String>, channel: &'static str, until: Arc<AtomicBool>) -> Vec<i64> {
    let mut got = Vec::new();
    let mut last: Option<String> = None;
    let mut i = 0usize;
    loop {
        let base = &urls[i % urls.len()];
        i += 1;
        let url = match &last {
            Some(o) => format!("{base}/ws?channel={channel}&since={o}"),
            None => format!("{base}/ws?channel={channel}"),
        };
        let Ok(mut c) = crate::common::ws_connect_with(&url, &[]).await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        if last.is_some() {
            assert_eq!(c.welcome["recovered"][channel], true, "{}", c.welcome);
        }
        loop {
            use futures_util::StreamExt;
            let msg = tokio::time::timeout(Duration::from_millis(300), c.ws.next()).await;
            match msg {
                Err(_) if until.load(Ordering::Relaxed) => return got,
                Err(_) => continue,
                Ok(Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t)))) => {
                    let m: Value = serde_json::from_str(&t).unwrap();
                    if m["op"] == "message" {
                        got.push(m["data"]["n"].as_i64().unwrap());
                        last = m["offset"].as_str().map(str::to_owned);
                    }
                }
                Ok(Some(Ok(_))) => {}
                // Closed (1001 from a draining sidecar) or reset: reconnect elsewhere.
                Ok(None | Some(Err(_))) => break,
            }
        }
    }
}

#[tokio::test]
async fn a_rolling_restart_loses_and_duplicates_nothing() {
    let redis = RedisServer::start();
    let app = Upstream::start().await;
    let cfg = config("");
    let a = node(&app, &redis, &cfg).await;
    let b = node(&app, &redis, &cfg).await;
    let a_url = format!("ws://{}", a.public);
    let b_url = format!("ws://{}", b.public);
    let done = Arc::new(AtomicBool::new(false));
    let mut readers = Vec::new();
    for start in [vec![a_url.clone(), b_url.clone()], vec![b_url.clone(), a_url.clone()]] {
        readers.push(tokio::spawn(follow(start, "h:roll", done.clone())));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stop = Arc::new(AtomicBool::new(false));
    // The app publishes through node b, which stays up, all along.
    let publisher = tokio::spawn(publish_throughout(vec![b.admin_url("")], "h:roll", stop.clone()));
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Node a is deployed again: SIGTERM (drain, 1001), then a new one.
    a.stop().await;
    let a2 = node(&app, &redis, &cfg).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let (acked, refused) = publisher.await.unwrap();
    assert!(refused.is_empty(), "b never refused: {refused:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    done.store(true, Ordering::Relaxed);
    for r in readers {
        let got = tokio::time::timeout(STEP, r).await.unwrap().unwrap();
        assert_eq!(got, acked, "every acknowledged message once, in order, across the restart");
    }
    drop(a2);
}

#[tokio::test]
async fn a_node_behind_its_receive_buffer_repairs_history_channels() {
    let redis = RedisServer::start();
    let app = Upstream::start().await;
    let cfg = config("[[namespace]]\nprefix = \"big:\"\nhistory = { size = 5000, ttl = \"10m\" }\n");
    let cfg_path = cfg.path().to_str().unwrap().to_owned();
    let a = node(&app, &redis, &cfg).await;
    let args = ["--upstream", &app.url(), "--redis-url", &redis.url(), "--config", &cfg_path];
    let b = Binary::spawn(None, &[&args[..], &["--redis-receive-buffer", "65536", "--client-queue", "4096"]].concat());
    eventually(STEP, "broker up", || async { b.metric("wsrelay_broker_up").await == Some(1.0) }).await;
    let mut c = ws_connect(&format!("ws://{}/ws?channel=big:o", b.public)).await;
    // b falls behind: stopped while 1500 messages (~750 KB) are published.
    let pid = b.child.id().to_string();
    assert!(std::process::Command::new("kill").args(["-STOP", &pid]).status().unwrap().success());
    let pad = "p".repeat(500);
    for n in 1..=1500 {
        assert_eq!(a.publish(json!({"channel":"big:o","data":{"n":n,"pad":pad}})).await.0, StatusCode::OK);
    }
    assert!(std::process::Command::new("kill").args(["-CONT", &pid]).status().unwrap().success());
    let want: Vec<i64> = (1..=1500).collect();
    assert_eq!(read_until(&mut c, 1500).await, want, "every message once, in order");
    assert!(b.metric("wsrelay_broker_receive_overflow_total").await.unwrap() > 0.0, "the buffer overflowed");
    assert!(b.metric("wsrelay_history_recovered_total").await.unwrap() > 0.0, "and history repaired it");
    assert_eq!(b.metric("wsrelay_broker_reconnects_total").await, Some(0.0), "without calling Redis dead");
}

#[tokio::test]
async fn since_recovers_a_channel_the_session_already_has() {
    // A channel given by the URL (or the connect hook, the token, the app)
    // is subscribed from the start; `subscribe` with `since` still recovers.
    let app = Upstream::start().await;
    let cfg = config("");
    let relay = Relay::start(&app.url(), &["--config", cfg.path().to_str().unwrap()]).await;
    let mut offsets = Vec::new();
    for n in 1..=3 {
        offsets.push(relay.publish(json!({"channel":"h:s","data":{"n":n}})).await.1["offset"].clone());
    }
    let mut c = ws_connect(&relay.ws_url("/ws?channel=h:s")).await;
    let r = c.request(json!({"op":"subscribe","channel":"h:s","since": offsets[0]})).await;
    assert_eq!(r["result"]["recovered"], true, "{r}");
    assert_eq!(r["result"]["offset"], offsets[2]);
    relay.publish(json!({"channel":"h:s","data":{"n":4}})).await;
    assert_eq!(read_until(&mut c, 4).await, [2, 3, 4]);
    // An offset from another history: the client must reload.
    let r = c.request(json!({"op":"subscribe","channel":"h:s","since":"bogus:1"})).await;
    assert_eq!(r["result"]["recovered"], false, "{r}");
    relay.publish(json!({"channel":"h:s","data":{"n":5}})).await;
    assert_eq!(read_until(&mut c, 5).await, [5]);
}

/// Found by the soak: a node's first subscription to several history
/// channels at once (a token or connect hook granting them) read their
/// metas in one pipeline whose reply was parsed as a pair, so it failed,
/// and the node dropped its Redis subscriber and refused requests.
#[tokio::test]
async fn joining_several_history_channels_at_once_keeps_the_subscriber() {
    let (app, redis, cfg) = (Upstream::start().await, RedisServer::start(), config(""));
    let args = ["--redis-url", &redis.url(), "--config", cfg.path().to_str().unwrap(), "--jwt-secret", "k"];
    let relay = Relay::start(&app.url(), &args).await;
    eventually(STEP, "broker up", || async { relay.readyz_broker().await == StatusCode::OK }).await;
    relay.publish(json!({"channel":"h:m2","data":{"n":0}})).await;
    let exp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 600;
    let token = |i: usize| {
        let channels = if i == 0 {
            vec!["h:m1".to_owned(), "h:m2".into(), "h:m3".into()]
        } else {
            vec![format!("h:x{i}"), format!("h:y{i}")]
        };
        let claims = json!({"sub": format!("u{i}"), "exp": exp, "channels": channels});
        jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &jsonwebtoken::EncodingKey::from_secret(b"k"))
            .unwrap()
    };
    // Many at once, as after a deploy: the node's subscriber takes them in batches.
    let urls: Vec<String> = (0..40).map(|i| relay.ws_url(&format!("/ws?token={}", token(i)))).collect();
    let mut all = futures_util::future::join_all(urls.iter().map(|u| ws_connect(u))).await;
    let mut c = all.swap_remove(0);
    for (i, ch) in ["h:m1", "h:m2", "h:m3"].into_iter().enumerate() {
        relay.publish(json!({"channel": ch, "data": {"n": i + 1}})).await;
        let m = c.recv().await;
        assert_eq!((m["channel"].as_str(), m["data"]["n"].as_u64()), (Some(ch), Some(i as u64 + 1)), "{m}");
    }
    assert_eq!(relay.metric("wsrelay_broker_reconnects_total").await, 0.0, "the subscriber was never dropped");
    let r = c.request(json!({"op":"subscribe","channel":"h:m4"})).await;
    assert!(r.get("error").is_none(), "{r}");
}
