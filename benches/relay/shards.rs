//! `shards`: one Redis against a 3-master Redis Cluster, same run, same
//! machine. Many channels with history, publishes on one sidecar, every
//! subscriber on another (so every message crosses Redis): what each
//! setup delivers, and what Redis spends per message and at its busiest
//! process — the part a cluster spreads over its shards.

use std::fmt::Write as _;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;

use super::{Node, Proc, cpu_secs, free_port, http_client, now_us, percentile, tempfile_with, wait_ready, wsrelay};

const CHANNELS: usize = 1000;
/// Subscribers per channel (all on the second sidecar).
const PER_CHANNEL: usize = 2;
/// Channels per `/api/publish` broadcast.
const FANOUT: usize = 100;

/// Three cluster-enabled redis-servers joined with `redis-cli --cluster create`.
fn cluster() -> (Vec<Proc>, String) {
    let mut procs = Vec::new();
    let mut ports = Vec::new();
    let dir = std::env::temp_dir().join(format!("wsrelay-bench-cluster-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for _ in 0..3 {
        let port = free_port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--cluster-enabled", "yes", "--cluster-port", &free_port().to_string()])
            .args(["--cluster-config-file", &format!("nodes-{port}.conf")])
            .arg("--dir")
            .arg(&dir)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server");
        procs.push(Proc(child));
        ports.push(port);
    }
    std::thread::sleep(Duration::from_millis(300));
    let status = Command::new("redis-cli")
        .args(["--cluster", "create"])
        .args(ports.iter().map(|p| format!("127.0.0.1:{p}")))
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .stdout(Stdio::null())
        .status()
        .expect("redis-cli");
    assert!(status.success(), "redis-cli --cluster create");
    for _ in 0..100 {
        let ok = ports.iter().all(|p| {
            let out = Command::new("redis-cli").args(["-p", &p.to_string(), "CLUSTER", "INFO"]).output();
            out.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("cluster_state:ok"))
        });
        if ok {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    (procs, format!("redis+cluster://127.0.0.1:{},127.0.0.1:{}", ports[0], ports[1]))
}

struct Row {
    offered: u64,
    delivered_per_s: f64,
    lost: i64,
    p99_ms: f64,
    redis_us: f64,
    busiest_pct: f64,
    /// Publishing sidecar CPU per message, subscribing sidecar CPU per delivery.
    a_us: f64,
    b_us: f64,
}

async fn point(publisher: &Node, subscriber: &Node, redis: &[u32], rate: u64) -> Row {
    // The subscribers: PER_CHANNEL per channel, on the second sidecar.
    let mut readers = Vec::new();
    for i in 0..CHANNELS * PER_CHANNEL {
        let url = format!("ws://{}/ws?channel=bench:s{}", subscriber.public, i % CHANNELS);
        let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        ws.next().await.unwrap().unwrap(); // welcome
        readers.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_secs(3), ws.next()).await {
                let s = m.to_text().unwrap_or_default();
                if let Some(i) = s.find("\"ts\":") {
                    let digits = &s[i + 5..];
                    let end = digits.find(|c: char| !c.is_ascii_digit()).unwrap_or(digits.len());
                    let ts: u64 = digits[..end].parse().unwrap_or(0);
                    lat.push(now_us().saturating_sub(ts));
                }
            }
            lat
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let redis0: Vec<f64> = redis.iter().map(|p| cpu_secs(*p)).collect();
    let (a0, b0) = (cpu_secs(publisher.pid()), cpu_secs(subscriber.pid()));
    let client = http_client();
    let published = Arc::new(AtomicU64::new(0));
    let requests_per_s = (rate / FANOUT as u64).max(1);
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / requests_per_s as f64));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = Instant::now();
    let mut inflight = Vec::new();
    let mut k = 0usize;
    while started.elapsed() < super::POINT {
        tick.tick().await;
        let channels: Vec<String> =
            (0..FANOUT).map(|j| format!("\"bench:s{}\"", (k * FANOUT + j) % CHANNELS)).collect();
        k += 1;
        let body = format!(r#"{{"channels":[{}],"data":{{"ts":{}}}}}"#, channels.join(","), now_us());
        let req = http::Request::post(format!("http://{}/api/publish", publisher.admin))
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from(body)))
            .unwrap();
        let (client, published) = (client.clone(), published.clone());
        inflight.push(tokio::spawn(async move {
            if let Ok(r) = client.request(req).await {
                if r.status() == 200 {
                    published.fetch_add(FANOUT as u64, Ordering::Relaxed);
                }
            }
        }));
    }
    let elapsed = started.elapsed().as_secs_f64();
    for f in inflight {
        let _ = f.await;
    }
    let used: Vec<f64> = redis.iter().zip(&redis0).map(|(p, c0)| cpu_secs(*p) - c0).collect();
    let (a_cpu, b_cpu) = (cpu_secs(publisher.pid()) - a0, cpu_secs(subscriber.pid()) - b0);
    let mut lat = Vec::new();
    for r in readers {
        lat.extend(r.await.unwrap());
    }
    lat.sort_unstable();
    let messages = published.load(Ordering::Relaxed);
    let expected = messages * PER_CHANNEL as u64;
    Row {
        offered: rate,
        delivered_per_s: lat.len() as f64 / elapsed,
        lost: expected as i64 - lat.len() as i64,
        p99_ms: percentile(&lat, 0.99) as f64 / 1000.0,
        redis_us: used.iter().sum::<f64>() * 1e6 / messages.max(1) as f64,
        busiest_pct: used.iter().copied().fold(0.0, f64::max) * 100.0 / elapsed,
        a_us: a_cpu * 1e6 / messages.max(1) as f64,
        b_us: b_cpu * 1e6 / (lat.len() as f64).max(1.0),
    }
}

pub(super) async fn shards(report: &mut String) {
    writeln!(report, "### One Redis vs a 3-shard Redis Cluster\n").unwrap();
    writeln!(
        report,
        "{CHANNELS} channels with history, {PER_CHANNEL} subscribers each on a second sidecar, messages published on the first through `/api/publish` broadcasts of {FANOUT} channels, for {} s per point: every message crosses Redis (one `PUBLISH` script per message on one Redis; `SPUBLISH` on the channel's shard on the cluster). Redis CPU: all its processes per message; busiest: the most loaded Redis process, % of one core.\n",
        super::POINT.as_secs()
    )
    .unwrap();
    writeln!(
        report,
        "| Redis | messages/s offered | deliveries/s | lost | p99 | Redis CPU/message | busiest Redis process | publishing sidecar CPU/message | subscribing sidecar CPU/delivery |"
    )
    .unwrap();
    writeln!(report, "|---|---|---|---|---|---|---|---|---|").unwrap();
    let cfg = tempfile_with("[[namespace]]\nprefix = \"bench:\"\nhistory = { size = 100, ttl = \"1m\" }\n");
    for setup in ["one Redis", "cluster, 3 masters"] {
        let (procs, url) = if setup == "one Redis" {
            let (p, url) = super::redis();
            (vec![p], url)
        } else {
            cluster()
        };
        let pids: Vec<u32> = procs.iter().map(|p| p.0.id()).collect();
        for rate in [10_000u64, 20_000, 40_000] {
            let a = wsrelay(&["--redis-url", &url, "--config", &cfg]);
            let b = wsrelay(&["--redis-url", &url, "--config", &cfg]);
            wait_ready(&a.admin).await;
            wait_ready(&b.admin).await;
            let r = point(&a, &b, &pids, rate).await;
            let line = format!(
                "| {setup} | {} | {:.0} | {} | {:.1} ms | {:.1} µs | {:.0} % | {:.1} µs | {:.1} µs |",
                r.offered, r.delivered_per_s, r.lost, r.p99_ms, r.redis_us, r.busiest_pct, r.a_us, r.b_us
            );
            println!("{line}");
            writeln!(report, "{line}").unwrap();
        }
        drop(procs);
    }
    writeln!(report).unwrap();
}
