//! The publisher task: every queued publish of a moment in one pipeline on
//! a held connection, and the confirmation of history publishes whose answer
//! was lost.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::conn::Pool;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tracing::{Instrument, debug};

use super::MAX_BATCH;
use super::conn::Source;
use super::life::Life;
use super::shards::Routes;
use super::wire::Scripts;
use super::wire::*;
use crate::broker::BrokerError;
use crate::metrics::Metrics;
use crate::protocol::Offset;

/// What the publisher sends for one message.
impl Out {
    /// A key of its command (all its keys share the channel's hash tag).
    fn key(&self) -> &str {
        match self {
            Out::Publish { channel, .. } => channel,
            Out::History { stream, .. } => stream,
        }
    }
}

/// The publish script's ARGV[1..=7] for a history publish, the same on
/// every path (one pipeline, a shard master's pipeline, redis-rs's cluster
/// connection): header, data, size, stream TTL, meta TTL, the epoch a new
/// history would start with, the publish id.
type ScriptArgs<'a> = (&'a [u8], &'a [u8], usize, u64, u64, String, &'a str);

fn script_args<'a>(header: &'a [u8], data: &'a Utf8Bytes, size: usize, ttl_ms: u64, id: &'a str) -> ScriptArgs<'a> {
    (header, data.as_bytes(), size, ttl_ms, META_TTL_MS, crate::config::random_id(8), id)
}

pub(super) enum Out {
    /// No history: a plain PUBLISH.
    Publish { channel: String, payload: Vec<u8> },
    /// History kept: the publish script (offset, XADD, TTLs, PUBLISH).
    History {
        stream: String,
        meta: String,
        channel: String,
        header: Vec<u8>,
        data: Utf8Bytes,
        size: usize,
        ttl_ms: u64,
        /// Stored with the entry, so a publish whose answer was lost can be
        /// found again (see [`confirm`]).
        id: String,
    },
}

pub(super) struct Job {
    pub(super) messages: Vec<Out>,
    pub(super) done: Option<oneshot::Sender<Result<Vec<Option<Offset>>, BrokerError>>>,
}

/// The publisher task: drains the queue into pipelines on one held connection.
///
/// A failed pipeline is never retried: Redis may have run part of it before
/// the connection broke, and a retry would deliver those messages twice.
/// The callers get `unavailable` and decide. The held connection is replaced
/// after an error and whenever the subscriber lost its connection (a Redis
/// restart kills both; this avoids one spurious 503 afterwards).
pub(super) async fn publisher(
    (pool, source): (Pool, Arc<Source>),
    (life, scripts, sharded, wait_replicas): (Arc<Life>, Arc<Scripts>, bool, usize),
    mut rx: mpsc::Receiver<Job>,
    generation: Arc<AtomicU64>,
    timeout: Duration,
    metrics: Arc<Metrics>,
    (shutdown, tasks): (tokio_util::sync::CancellationToken, tokio_util::task::TaskTracker),
) {
    let mut held: Option<Held> = None;
    let mut routes: Option<Routes> = None;
    let mut retry_at = Instant::now();
    let mut batch: Vec<Job> = Vec::with_capacity(64);
    loop {
        let n = tokio::select! {
            n = rx.recv_many(&mut batch, MAX_BATCH) => n,
            // The node stopped: nothing publishes any more.
            () = shutdown.cancelled() => 0,
        };
        if n == 0 {
            break;
        }
        let now = generation.load(Ordering::Acquire);
        if held.as_ref().is_some_and(|(_, g, _)| *g != now) {
            discard(&mut held);
        }
        let timer = metrics.broker_publish_seconds.start_timer();
        let results = if sharded {
            run_sharded(&pool, (&mut routes, &mut retry_at), (&source, &scripts), &batch, timeout).await
        } else {
            // One pipeline: all applied, or the batch failed.
            match run_batch(&pool, (&life, &scripts, wait_replicas, &metrics), &mut held, now, &batch, timeout).await {
                Ok(offsets) => offsets.into_iter().map(Ok).collect(),
                Err(e) => vec![Err(e); batch.iter().map(|j| j.messages.len()).sum()],
            }
        };
        timer.observe_duration();
        let mut results = results.into_iter();
        for mut job in batch.drain(..) {
            let mine: Result<Vec<Option<Offset>>, BrokerError> = results.by_ref().take(job.messages.len()).collect();
            let Some(done) = job.done.take() else { continue };
            match mine {
                Ok(offsets) => {
                    let _ = done.send(Ok(offsets));
                }
                Err(e) => {
                    debug!(error = %e, "publish failed");
                    // Where every message keeps history, the connection may
                    // have broken after Redis applied them: look, rather than
                    // call them failed and have them delivered anyway.
                    if job.messages.iter().all(|m| matches!(m, Out::History { .. })) {
                        let (pool, err) = (pool.clone(), e.clone());
                        tasks.spawn(
                            async move {
                                let r = confirm(&pool, &job.messages, timeout).await.ok_or(err);
                                let _ = done.send(r);
                            }
                            .in_current_span(),
                        );
                    } else {
                        let _ = done.send(Err(e));
                    }
                }
            }
        }
    }
}

/// On a Cluster: the batch grouped by shard master, one pipeline per
/// master (`shards.rs`); what was not run there (no slot map yet, a slot
/// that moved, a script not loaded) one command per message through
/// redis-rs's cluster connection, which follows `MOVED`/`ASK`. One result
/// per message.
async fn run_sharded(
    pool: &Pool,
    (routes, retry_at): (&mut Option<Routes>, &mut Instant),
    (source, scripts): (&Source, &Scripts),
    batch: &[Job],
    timeout: Duration,
) -> Vec<Result<Option<Offset>, BrokerError>> {
    let outs: Vec<&Out> = batch.iter().flat_map(|j| &j.messages).collect();
    let total = outs.len();
    let mut results: Vec<Option<Result<Option<Offset>, BrokerError>>> = (0..total).map(|_| None).collect();
    if routes.is_none() && Instant::now() >= *retry_at {
        match tokio::time::timeout(timeout, Routes::discover(pool, source, scripts, timeout)).await {
            Ok(Ok(r)) => *routes = Some(r),
            failed => {
                // A master down (a failover under way): not again for a second.
                *retry_at = Instant::now() + Duration::from_secs(1);
                let error = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => "timed out".to_owned(),
                };
                debug!(%error, "no slot map; publishing through the cluster connection");
            }
        }
    }
    if let Some(r) = routes.as_ref() {
        let cmds = outs
            .iter()
            .enumerate()
            .map(|(i, out)| (i, out.key(), command(out, scripts), matches!(out, Out::History { .. })))
            .collect();
        match tokio::time::timeout(timeout, r.run(cmds, total)).await {
            Ok((replies, stale)) => {
                for (slot, reply) in results.iter_mut().zip(replies) {
                    *slot = reply.map(|r| r.map(|v| offset_of(&v)));
                }
                if stale {
                    *routes = None;
                }
            }
            Err(_) => {
                // They may have run: not retried.
                *routes = None;
                return vec![Err(BrokerError::Timeout(timeout)); total];
            }
        }
    }
    let rest: Vec<usize> = (0..total).filter(|i| results[*i].is_none()).collect();
    if !rest.is_empty() {
        let conn = match tokio::time::timeout(timeout, pool.get()).await {
            Ok(Ok(c)) => Some(c),
            Ok(Err(e)) => {
                let e = BrokerError::from(e);
                rest.iter().for_each(|i| results[*i] = Some(Err(e.clone())));
                None
            }
            Err(_) => {
                rest.iter().for_each(|i| results[*i] = Some(Err(BrokerError::Timeout(timeout))));
                None
            }
        };
        if let Some(conn) = conn {
            let sends = rest.iter().map(|i| {
                let (mut c, out) = (conn.shared(), outs[*i]);
                async move {
                    let run = async {
                        match out {
                            Out::Publish { channel, payload } => {
                                redis::cmd("SPUBLISH").arg(channel).arg(payload).query_async::<i64>(&mut c).await?;
                                Ok(None)
                            }
                            Out::History { stream, meta, channel, header, data, size, ttl_ms, id } => {
                                let mut inv = scripts.publish.key(stream);
                                inv.key(meta).key(channel).arg(script_args(header, data, *size, *ttl_ms, id));
                                let reply: redis::Value = inv.invoke_async(&mut c).await?;
                                Ok(offset_of(&reply))
                            }
                        }
                    };
                    tokio::time::timeout(timeout, run).await.unwrap_or(Err(BrokerError::Timeout(timeout)))
                }
            });
            for (i, r) in rest.iter().zip(futures_util::future::join_all(sends).await) {
                results[*i] = Some(r);
            }
        }
    }
    results.into_iter().map(|r| r.unwrap_or(Err(BrokerError::NotConnected))).collect()
}

/// A message's command for a shard master's pipeline.
fn command(out: &Out, scripts: &Scripts) -> redis::Cmd {
    match out {
        Out::Publish { channel, payload } => redis::cmd("SPUBLISH").arg(channel).arg(payload).to_owned(),
        Out::History { stream, meta, channel, header, data, size, ttl_ms, id } => redis::cmd("EVALSHA")
            .arg(scripts.publish.get_hash())
            .arg(3)
            .arg(stream)
            .arg(meta)
            .arg(channel)
            .arg(script_args(header, data, *size, *ttl_ms, id))
            .to_owned(),
    }
}

/// The publisher's connection: its generation, and the publish script's
/// SHA as loaded on it (a Redis restart forgets scripts; a new connection
/// loads it again).
pub(super) type Held = (super::conn::Connection, u64, String);

/// Takes a connection out of the pool for good: it may be half-broken.
pub(super) fn discard(held: &mut Option<Held>) {
    if let Some((c, _, _)) = held.take() {
        super::conn::Connection::discard(c);
    }
}

pub(super) async fn run_batch(
    pool: &Pool,
    (life, scripts, wait_replicas, metrics): (&Life, &Scripts, usize, &Metrics),
    held: &mut Option<Held>,
    generation: u64,
    batch: &[Job],
    timeout: Duration,
) -> Result<Vec<Option<Offset>>, BrokerError> {
    let r = tokio::time::timeout(timeout, async {
        if held.is_none() {
            let mut c = pool.get().await?;
            let sha: String = scripts.publish.prepare_invoke().load_async(&mut c).await?;
            *held = Some((c, generation, sha));
        }
        let Some((c, _, sha)) = held.as_mut() else {
            return Err(BrokerError::NotConnected);
        };
        let mut pipe = redis::pipe();
        let mut history = false;
        for job in batch {
            for out in &job.messages {
                match out {
                    Out::Publish { channel, payload } => {
                        pipe.publish(channel, payload);
                    }
                    Out::History { stream, meta, channel, header, data, size, ttl_ms, id } => {
                        history = true;
                        pipe.cmd("EVALSHA")
                            .arg(&*sha)
                            .arg(5)
                            .arg(stream)
                            .arg(meta)
                            .arg(channel)
                            .arg(&life.key)
                            .arg(&life.watermark)
                            .arg(script_args(header, data, *size, *ttl_ms, id))
                            .arg(life.acked_now());
                    }
                }
            }
        }
        // This node's watermark, after every history publish of the batch (see `life.rs`).
        if history {
            pipe.cmd("INCR").arg(&life.watermark);
            pipe.cmd("PEXPIRE").arg(&life.watermark).arg(META_TTL_MS).ignore();
        }
        let mut replies: Vec<redis::Value> = pipe.query_async(&mut *c).await?;
        if history {
            if let Some(redis::Value::Int(wm)) = replies.pop() {
                life.acked(u64::try_from(wm).unwrap_or(0));
            }
        }
        if replies.iter().any(ended_life) {
            metrics.history_lives_ended.inc();
            tracing::warn!("Redis lost writes this node saw acknowledged: history starts a new epoch");
        }
        if history && wait_replicas > 0 {
            // On its own: whatever it answers, the messages are published.
            let ms = u64::try_from(timeout.as_millis() / 2).unwrap_or(u64::MAX).max(1);
            let n: redis::RedisResult<i64> = redis::cmd("WAIT").arg(wait_replicas).arg(ms).query_async(&mut *c).await;
            if !n.as_ref().is_ok_and(|n| usize::try_from(*n).unwrap_or(0) >= wait_replicas) {
                metrics.broker_unreplicated.inc();
                tracing::warn!(answer = ?n, wanted = wait_replicas, "publish not on enough replicas in time");
            }
        }
        Ok(replies.iter().map(offset_of).collect())
    })
    .await
    .unwrap_or(Err(BrokerError::Timeout(timeout)));
    if r.is_err() {
        discard(held);
    }
    r
}

/// After a failed pipeline: whether Redis applied these history publishes
/// after all (each entry carries its publish id), retried until `timeout`
/// (a restarted Redis is back within it). Their offsets when every one is
/// found; None while Redis is unreachable or one is missing (then it was not
/// applied, or Redis is still away: the publish stays unconfirmed, 503).
pub(super) async fn confirm(pool: &Pool, outs: &[Out], timeout: Duration) -> Option<Vec<Option<Offset>>> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        let found = async {
            let mut c = pool.get().await.ok()?;
            let mut offsets = Vec::with_capacity(outs.len());
            for out in outs {
                let Out::History { stream, meta, id, .. } = out else { return None };
                type Entry = (String, Vec<(String, String)>);
                let tail: Vec<Entry> = redis::cmd("XREVRANGE")
                    .arg(stream)
                    .arg("+")
                    .arg("-")
                    .arg("COUNT")
                    .arg(MAX_BATCH * 4)
                    .query_async(&mut c)
                    .await
                    .ok()?;
                let entry = tail.iter().find(|(_, f)| f.iter().any(|(k, v)| k == "i" && v == id));
                let Some((entry_id, _)) = entry else { return Some(None) };
                let seq: u64 = entry_id.split_once('-')?.0.parse().ok()?;
                let epoch: String = redis::cmd("HGET").arg(meta).arg("e").query_async(&mut c).await.ok()?;
                offsets.push(Some(Offset { epoch: Arc::from(epoch), seq }));
            }
            Some(Some(offsets))
        };
        match tokio::time::timeout(timeout, found).await {
            Ok(Some(Some(offsets))) => {
                debug!("publish confirmed after a failed answer");
                return Some(offsets);
            }
            // Reachable, and not there: it was not applied.
            Ok(Some(None)) => return None,
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    None
}

/// Whether a publish script's answer (`[seq, epoch, ended]`) says it
/// ended the dataset's life.
fn ended_life(v: &redis::Value) -> bool {
    matches!(v, redis::Value::Array(parts) if matches!(parts.get(2), Some(redis::Value::Int(1))))
}

/// The offset a publish script answered (`[seq, epoch]`); None for a PUBLISH.
pub(super) fn offset_of(v: &redis::Value) -> Option<Offset> {
    let redis::Value::Array(parts) = v else { return None };
    let seq = match parts.first()? {
        redis::Value::Int(n) => u64::try_from(*n).ok()?,
        _ => return None,
    };
    let epoch: String = redis::from_redis_value_ref(parts.get(1)?).ok()?;
    Some(Offset { epoch: Arc::from(epoch), seq })
}
