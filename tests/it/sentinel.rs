//! Redis Sentinel: a master, a replica and three sentinels on loopback; the
//! sidecars follow a failover without a restart and never lose an
//! acknowledged message silently.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http::StatusCode;
use serde_json::json;

use crate::common::redis::SentinelSet;
use crate::common::{Relay, STEP, Upstream, eventually, ws_connect};
use crate::history::{collect, config, publish_throughout};

async fn node(app: &Upstream, set: &SentinelSet, cfg: &tempfile::NamedTempFile) -> Relay {
    let args = ["--redis-url", &set.url(), "--config", cfg.path().to_str().unwrap(), "--redis-probe-timeout", "1500ms"];
    let relay = Relay::start(&app.url(), &args).await;
    eventually(STEP, "broker up", || async { relay.readyz_broker().await == StatusCode::OK }).await;
    relay
}

/// Every delivered message was acknowledged, once, in order; every
/// acknowledged one that is missing was signalled by a gap (-1) before
/// the next delivered message.
pub(crate) fn never_silent(acked: &[i64], got: &[i64]) -> Result<usize, String> {
    let mut gap = false;
    let mut last = 0i64;
    let mut missing = 0;
    for &m in got {
        if m == -1 {
            gap = true;
            continue;
        }
        if m <= last {
            return Err(format!("{m} after {last}: a duplicate or out of order"));
        }
        if acked.binary_search(&m).is_err() {
            return Err(format!("{m} delivered but never acknowledged"));
        }
        let skipped = acked.iter().filter(|&&n| n > last && n < m).count();
        if skipped > 0 && !gap {
            return Err(format!("{skipped} acknowledged messages between {last} and {m} lost without a gap"));
        }
        missing += skipped;
        gap = false;
        last = m;
    }
    if acked.last().is_some_and(|&n| n > last) {
        return Err(format!("the acknowledged messages after {last} never arrived"));
    }
    Ok(missing)
}

#[tokio::test]
async fn a_sentinel_failover_is_followed_and_never_loses_silently() {
    let mut set = SentinelSet::start().await;
    let app = Upstream::start().await;
    let cfg = config("");
    let a = node(&app, &set, &cfg).await;
    let b = node(&app, &set, &cfg).await;
    let old = format!("wsrelay_broker_server{{address=\"127.0.0.1:{}\"}}", set.master.port);
    assert_eq!(a.metric(&old).await, 1.0, "the metric names the master");
    let mut on_a = ws_connect(&a.ws_url("/ws?channel=h:fo")).await;
    let mut on_b = ws_connect(&b.ws_url("/ws?channel=h:fo")).await;
    let stop = Arc::new(AtomicBool::new(false));
    let publisher = tokio::spawn(publish_throughout(vec![a.admin_url(""), b.admin_url("")], "h:fo", stop.clone()));
    tokio::time::sleep(Duration::from_millis(500)).await;
    set.master.kill(); // SIGKILL
    // Health tells the truth during the switch.
    eventually(STEP, "broker down on a", || async { a.readyz_broker().await == StatusCode::SERVICE_UNAVAILABLE }).await;
    let promoted = set.replica.port;
    eventually(Duration::from_secs(30), "the replica promoted", || async { set.master_port().await == Some(promoted) })
        .await;
    for n in [&a, &b] {
        eventually(STEP * 2, "following the new master", || async { n.readyz_broker().await == StatusCode::OK }).await;
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    stop.store(true, Ordering::Relaxed);
    let (acked, refused) = publisher.await.unwrap();
    assert!(!refused.is_empty(), "publishes during the switch were refused (503), not reported done");
    let new = format!("wsrelay_broker_server{{address=\"127.0.0.1:{promoted}\"}}");
    assert_eq!(b.metric(&new).await, 1.0);
    assert!(!a.metrics().await.contains(&old), "the old master is gone from the metric");
    for c in [&mut on_a, &mut on_b] {
        let got = collect(c, &acked).await;
        if let Err(e) = never_silent(&acked, &got) {
            panic!("{e}\nacked {acked:?}\nrefused {refused:?}\ngot {got:?}");
        }
    }
    // A publish through the new master is acknowledged and delivered.
    let (status, _) = a.publish(json!({"channel":"h:fo","data":{"n": 100_000}})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(crate::history::read_until(&mut on_b, 100_000).await.last(), Some(&100_000));
}

#[test]
fn the_checker_catches_silence_duplicates_and_strangers() {
    let acked = [1, 2, 3, 4, 5];
    assert_eq!(never_silent(&acked, &[1, 2, 3, 4, 5]), Ok(0));
    assert_eq!(never_silent(&acked, &[1, 2, -1, 5]), Ok(2));
    assert!(never_silent(&acked, &[1, 2, 5]).is_err(), "3 and 4 lost silently");
    assert!(never_silent(&acked, &[1, 2, 2, 3, 4, 5]).is_err(), "a duplicate");
    assert!(never_silent(&acked, &[1, 2, 3, 4, 5, 6]).is_err(), "never acknowledged");
    assert!(never_silent(&acked, &[1, 2, 3]).is_err(), "the tail never came");
}

#[tokio::test]
async fn a_manual_failover_with_the_old_master_alive_is_followed() {
    let set = SentinelSet::start().await;
    let app = Upstream::start().await;
    let cfg = config("");
    let a = node(&app, &set, &cfg).await;
    let mut c = ws_connect(&a.ws_url("/ws?channel=h:mf")).await;
    assert_eq!(a.publish(json!({"channel":"h:mf","data":{"n":1}})).await.0, StatusCode::OK);
    // The old master stays up and becomes a replica (read-only).
    let sentinel = redis::Client::open(format!("redis://127.0.0.1:{}", set.sentinel_ports[0])).unwrap();
    let mut s = sentinel.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("SENTINEL").arg("FAILOVER").arg("mymaster").query_async(&mut s).await.unwrap();
    let promoted = set.replica.port;
    eventually(Duration::from_secs(30), "the replica promoted", || async { set.master_port().await == Some(promoted) })
        .await;
    // Publishes reach the new master (never a 200 for a write the demoted one refused).
    let mut n = 1;
    eventually(STEP * 2, "a publish through the new master", || {
        n += 1;
        let body = json!({"channel":"h:mf","data":{"n": n}});
        let a = &a;
        async move { a.publish(body).await.0 == StatusCode::OK }
    })
    .await;
    let got = crate::history::read_until(&mut c, n).await;
    assert_eq!(got.first(), Some(&1));
    assert_eq!(got.last(), Some(&n));
    let new = format!("wsrelay_broker_server{{address=\"127.0.0.1:{promoted}\"}}");
    a.wait_metric(&new, |v| v == 1.0).await;
}

#[tokio::test]
async fn open_webuis_sentinel_value_works_unchanged() {
    // One password for the master, the replica and the sentinels, and the
    // path as Open WebUI and python-socketio write it (/<db>/<master>).
    let mut set = SentinelSet::start_with(Some("s3cret")).await;
    assert!(set.url().ends_with("/0/mymaster"), "{}", set.url());
    let app = Upstream::start().await;
    let cfg = config("");
    let a = node(&app, &set, &cfg).await;
    let mut c = ws_connect(&a.ws_url("/ws?channel=h:pw")).await;
    assert_eq!(a.publish(json!({"channel":"h:pw","data":{"n":1}})).await.0, StatusCode::OK);
    set.master.kill();
    let promoted = set.replica.port;
    eventually(Duration::from_secs(30), "the replica promoted", || async { set.master_port().await == Some(promoted) })
        .await;
    let mut n = 1;
    eventually(STEP * 2, "a publish through the new master", || {
        n += 1;
        let body = json!({"channel":"h:pw","data":{"n": n}});
        let a = &a;
        async move { a.publish(body).await.0 == StatusCode::OK }
    })
    .await;
    assert_eq!(crate::history::read_until(&mut c, n).await.last(), Some(&n));
}

#[tokio::test]
async fn a_replica_promoted_behind_its_master_starts_a_new_epoch() {
    let mut set = SentinelSet::start().await;
    let app = Upstream::start().await;
    let cfg = config("");
    let a = node(&app, &set, &cfg).await;
    let b = node(&app, &set, &cfg).await;
    let mut live = ws_connect(&b.ws_url("/ws?channel=h:behind")).await;
    let publish = |n: i64| {
        let a = &a;
        async move {
            let (status, body) = a.publish(json!({"channel":"h:behind","data":{"n": n}})).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            body["offset"].clone()
        }
    };
    for n in 1..=10 {
        publish(n).await;
    }
    // The replica stops hearing the master; 20 more are acknowledged by the
    // master alone, then it dies: the replica promoted lacks them.
    set.replica.signal("STOP");
    set.master.cmd(&["CLIENT", "KILL", "TYPE", "replica"]).await;
    let mut seen = serde_json::Value::Null;
    for n in 11..=30 {
        seen = publish(n).await;
    }
    set.master.kill();
    set.replica.signal("CONT");
    let promoted = set.replica.port;
    eventually(Duration::from_secs(30), "the replica promoted", || async { set.master_port().await == Some(promoted) })
        .await;
    for n in [&a, &b] {
        eventually(STEP * 2, "following the new master", || async { n.readyz_broker().await == StatusCode::OK }).await;
    }
    let mut n = 30;
    eventually(STEP * 2, "publishing through the new master", || {
        n += 1;
        let a = &a;
        async move { a.publish(json!({"channel":"h:behind","data":{"n": n}})).await.0 == StatusCode::OK }
    })
    .await;
    let last = n;
    for n in last + 1..=last + 20 {
        publish(n).await;
    }
    // The live subscriber saw 1..30, then is told (a gap), then the rest.
    let got = crate::history::read_until(&mut live, last + 20).await;
    let acked: Vec<i64> = (1..=30).chain(last..=last + 20).collect();
    if let Err(e) = never_silent(&acked, &got) {
        panic!("{e}\ngot {got:?}");
    }
    assert!(got.contains(&-1), "the loss was signalled: {got:?}");
    // A client that saw 30 is told to reload, even once the new master's
    // offsets have passed 30.
    let mut c = ws_connect(&b.ws_url("/ws")).await;
    let r = c.request(json!({"op":"subscribe","channel":"h:behind","since": seen})).await;
    assert_eq!(r["result"]["recovered"], false, "{r}");
    assert!(a.metric("wsrelay_history_lives_ended_total").await >= 1.0);
}
