//! A Redis that comes back without acknowledged writes (restored from an
//! older copy, or a replica behind promoted) must never make a client skip
//! a message silently: the dataset's life ends, every channel's history
//! starts a new epoch, live subscribers get a gap and resuming clients
//! `recovered:false`, even once the reused offsets have caught up.

use http::{Method, StatusCode};
use serde_json::{Value, json};

use crate::common::redis::RedisServer;
use crate::common::{Binary, Relay, STEP, Upstream, eventually, request, ws_connect};
use crate::history::{config, node, read_until, seq};

async fn publish_n(r: &Relay, channel: &str, range: std::ops::RangeInclusive<i64>) -> Value {
    let mut last = Value::Null;
    for n in range {
        let (status, body) = r.publish(json!({"channel": channel, "data": {"n": n}})).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        last = body["offset"].clone();
    }
    last
}

async fn resumed(r: &Relay, channel: &str, since: &Value) -> Value {
    let mut c = ws_connect(&r.ws_url("/ws")).await;
    let reply = c.request(json!({"op":"subscribe","channel":channel,"since":since})).await;
    reply["result"].clone()
}

/// Restarts Redis from the snapshot taken by `SAVE` (the writes after it are gone).
async fn back_from_snapshot(redis: &mut RedisServer, nodes: &[&Relay]) {
    redis.kill();
    redis.restart();
    for n in nodes {
        eventually(STEP, "broker back", || async { n.readyz_broker().await == StatusCode::OK }).await;
    }
}

#[tokio::test]
async fn a_redis_back_from_an_older_copy_starts_a_new_epoch_for_resuming_clients() {
    let mut redis = RedisServer::start();
    let app = Upstream::start().await;
    let cfg = config("");
    let a = node(&app, &redis, &cfg).await;
    // Nobody subscribes: only the publishing node knows what was acknowledged.
    publish_n(&a, "h:old", 1..=10).await;
    redis.cmd(&["SAVE"]).await;
    let seen = publish_n(&a, "h:old", 11..=40).await;
    assert_eq!(seq(&seen), 40);
    back_from_snapshot(&mut redis, &[&a]).await;
    assert_eq!(a.metric("wsrelay_history_lives_ended_total").await, 1.0);
    let r = resumed(&a, "h:old", &seen).await;
    assert_eq!(r["recovered"], false, "{r}");
    // The offsets the old copy would hand out again are in a new epoch.
    let again = publish_n(&a, "h:old", 41..=80).await;
    assert_eq!(seq(&again), 40, "counting from 1 again");
    assert_ne!(again.as_str().unwrap().split(':').next(), seen.as_str().unwrap().split(':').next());
    let r = resumed(&a, "h:old", &seen).await;
    assert_eq!(r["recovered"], false, "offset 40 of the old epoch is not offset 40 of the new: {r}");
    // Resuming inside the new epoch recovers as always.
    let mut c = ws_connect(&a.ws_url("/ws")).await;
    let mid = format!("{}:20", again.as_str().unwrap().split(':').next().unwrap());
    let reply = c.request(json!({"op":"subscribe","channel":"h:old","since":mid})).await;
    assert_eq!(reply["result"]["recovered"], true, "{reply}");
}

#[tokio::test]
async fn a_subscriber_node_that_saw_lost_offsets_ends_the_life_on_its_own() {
    let mut redis = RedisServer::start();
    let app = Upstream::start().await;
    let cfg = config("");
    let cfg_path = cfg.path().to_str().unwrap().to_owned();
    // The publishing node dies with Redis: only the subscriber node saw 11..=40.
    let publisher =
        Binary::spawn(None, &["--upstream", &app.url(), "--redis-url", &redis.url(), "--config", &cfg_path]);
    eventually(STEP, "broker up", || async { publisher.metric("wsrelay_broker_up").await == Some(1.0) }).await;
    let b = node(&app, &redis, &cfg).await;
    let mut live = ws_connect(&b.ws_url("/ws?channel=h:sub")).await;
    let admin = format!("http://{}/api/publish", publisher.admin);
    let json_type = [("content-type", "application/json".to_owned())];
    for n in 1..=40 {
        if n == 11 {
            redis.cmd(&["SAVE"]).await;
        }
        let body = json!({"channel":"h:sub","data":{"n":n}}).to_string();
        let (status, _, _) = request(Method::POST, &admin, Some(body), &json_type).await;
        assert_eq!(status, StatusCode::OK);
    }
    assert_eq!(read_until(&mut live, 40).await, (1..=40).collect::<Vec<_>>());
    drop(publisher); // SIGKILL
    back_from_snapshot(&mut redis, &[&b]).await;
    assert_eq!(b.metric("wsrelay_history_lives_ended_total").await, 1.0);
    let again = publish_n(&b, "h:sub", 41..=75).await;
    assert_eq!(seq(&again), 35, "a new epoch, from 1");
    assert_eq!(read_until(&mut live, 75).await, [vec![-1], (41..=75).collect()].concat(), "one gap, then all");
}

#[tokio::test]
async fn wait_replicas_holds_the_answer_until_a_replica_has_it() {
    let master = RedisServer::start();
    let mut replica = RedisServer::start_replica_of(master.port);
    let app = Upstream::start().await;
    let cfg = config("");
    let args = [
        "--redis-url",
        &master.url(),
        "--config",
        cfg.path().to_str().unwrap(),
        "--redis-wait-replicas",
        "1",
        "--redis-timeout",
        "2s",
    ];
    let a = Relay::start(&app.url(), &args).await;
    eventually(STEP, "broker up", || async { a.readyz_broker().await == StatusCode::OK }).await;
    eventually(STEP, "replica in sync", || async {
        let info: String = redis::from_redis_value(replica.cmd(&["INFO", "replication"]).await).unwrap_or_default();
        info.contains("master_link_status:up")
    })
    .await;
    let (status, body) = a.publish(json!({"channel":"h:w","data":{"n":1}})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // On the replica when the 200 came.
    let on_replica = replica.cmd(&["XLEN", "wsrelay:hist:{h:w}:s"]).await;
    assert_eq!(on_replica, redis::Value::Int(1));
    assert_eq!(a.metric("wsrelay_broker_unreplicated_total").await, 0.0);
    // No replica: still a 200 (delivered), counted.
    replica.kill();
    let (status, body) = a.publish(json!({"channel":"h:w","data":{"n":2}})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(a.metric("wsrelay_broker_unreplicated_total").await, 1.0);
}

#[tokio::test]
async fn another_nodes_surviving_writes_do_not_hide_a_loss() {
    let mut redis = RedisServer::start();
    let app = Upstream::start().await;
    let cfg = config("");
    let a = node(&app, &redis, &cfg).await;
    let b = node(&app, &redis, &cfg).await;
    publish_n(&a, "h:two", 1..=10).await;
    publish_n(&b, "h:other", 1..=50).await;
    redis.cmd(&["SAVE"]).await;
    // Only a's last 30 are lost; b's writes all survive.
    let seen = publish_n(&a, "h:two", 11..=40).await;
    back_from_snapshot(&mut redis, &[&a, &b]).await;
    // b publishes on, on the same channel, past the lost offsets.
    let again = publish_n(&b, "h:two", 41..=80).await;
    assert_ne!(again.as_str().unwrap().split(':').next(), seen.as_str().unwrap().split(':').next(), "a new epoch");
    let r = resumed(&b, "h:two", &seen).await;
    assert_eq!(r["recovered"], false, "{r}");
}
