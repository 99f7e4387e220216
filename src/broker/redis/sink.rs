//! The subscriber's connection: one RESP3 connection to the master, or a
//! RESP3 cluster connection whose channel subscriptions are sharded
//! (`SSUBSCRIBE` on each channel's shard; redis-rs routes them, follows
//! `MOVED`, and resubscribes after a shard's reconnect or a slot's move).
//!
//! Its pushes go into a receive buffer bounded by `--redis-receive-buffer`
//! bytes: a node that falls behind (CPU-starved, or a burst) drops what does
//! not fit, counts it in `wsrelay_broker_receive_overflow_total`, and
//! repairs the channels that keep history from their streams when it sees
//! the gap in offsets. redis-rs's own pub/sub buffers without bound.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::cluster_async::ClusterConnection;
use redis::{AsyncConnectionConfig, PushKind, RedisResult};
use tokio::sync::mpsc;

use super::conn::Source;
use crate::metrics::Metrics;

/// What the subscriber connection hands over.
pub(super) enum Received {
    /// A message, the bytes it holds in the receive buffer, and the buffer's count.
    Msg(redis::Msg, u64, Arc<AtomicU64>),
    /// redis-rs saw the connection close (one server: the subscriber reconnects).
    Closed,
    /// On a Cluster: a (re)subscription confirmed by a shard, a shard that
    /// dropped one (its slot moved), with the name; or a shard's connection
    /// lost (`Disconnection`, no name).
    Shard(PushKind, String),
}

/// The receive buffer's bound and what it reports to.
pub(super) struct Buffer {
    pub(super) budget: u64,
    pub(super) metrics: Arc<Metrics>,
    pub(super) overflowed: Arc<AtomicBool>,
}

pub(super) enum Sink {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl Sink {
    /// Connects (to the master now, or to the cluster), and returns the
    /// buffer's receiving end and the server address(es), comma-separated.
    pub(super) async fn open(
        source: &Source,
        timeout: Duration,
        buffer: Buffer,
    ) -> RedisResult<(Sink, mpsc::UnboundedReceiver<Received>, String)> {
        let (tx, rx) = mpsc::unbounded_channel::<Received>();
        let queued = Arc::new(AtomicU64::new(0));
        let cluster = source.is_cluster();
        let sender = move |push: redis::PushInfo| -> Result<(), ()> {
            match push.kind {
                // One shard's connection: redis-rs reconnects and resubscribes.
                PushKind::Disconnection if cluster => {
                    return tx.send(Received::Shard(PushKind::Disconnection, String::new())).map_err(|_| ());
                }
                PushKind::Disconnection => return tx.send(Received::Closed).map_err(|_| ()),
                PushKind::SSubscribe | PushKind::SUnsubscribe | PushKind::Subscribe if cluster => {
                    let name = push.data.first().and_then(|v| redis::from_redis_value_ref::<String>(v).ok());
                    return match name {
                        Some(name) => tx.send(Received::Shard(push.kind, name)).map_err(|_| ()),
                        None => Ok(()),
                    };
                }
                _ => {}
            }
            let Some(msg) = redis::Msg::from_push_info(push) else { return Ok(()) };
            let size = msg.get_payload_bytes().len() as u64 + 64;
            if queued.fetch_add(size, Ordering::AcqRel) + size > buffer.budget {
                queued.fetch_sub(size, Ordering::AcqRel);
                buffer.metrics.broker_receive_overflow.inc();
                buffer.overflowed.store(true, Ordering::Release);
                return Ok(());
            }
            tx.send(Received::Msg(msg, size, queued.clone())).map_err(|_| ())
        };
        if cluster {
            let client = source.cluster_client(timeout, Some(sender))?;
            let mut conn = client.get_async_connection().await?;
            let masters = masters(&mut conn).await?;
            return Ok((Sink::Cluster(conn), rx, masters.join(",")));
        }
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_push_sender(sender);
        let info = source.master().await?;
        let resp3 = info.redis_settings().clone().set_protocol(redis::ProtocolVersion::RESP3);
        let address = super::conn::address(&info);
        let client = redis::Client::open(info.set_redis_settings(resp3))?;
        let conn = client.get_multiplexed_async_connection_with_config(&config).await?;
        Ok((Sink::Single(conn), rx, address))
    }

    /// Classic subscriptions (node-wide channels; a Cluster broadcasts them).
    pub(super) async fn subscribe(&mut self, names: &[&str]) -> RedisResult<()> {
        match self {
            Sink::Single(c) => c.subscribe(names).await,
            Sink::Cluster(c) => c.subscribe(names).await,
        }
    }

    pub(super) async fn unsubscribe(&mut self, names: &[&str]) -> RedisResult<()> {
        match self {
            Sink::Single(c) => c.unsubscribe(names).await,
            Sink::Cluster(c) => c.unsubscribe(names).await,
        }
    }

    /// Channel subscriptions: classic on one server, sharded on a Cluster
    /// (one `SSUBSCRIBE` per channel: a command runs on one slot).
    pub(super) async fn subscribe_channels(&mut self, names: &[String]) -> RedisResult<()> {
        match self {
            Sink::Single(c) => c.subscribe(names).await,
            Sink::Cluster(c) => {
                let each = names.iter().map(|n| {
                    let mut c = c.clone();
                    async move { c.ssubscribe(n).await }
                });
                futures_util::future::join_all(each).await.into_iter().collect()
            }
        }
    }

    pub(super) async fn unsubscribe_channels(&mut self, names: &[String]) -> RedisResult<()> {
        match self {
            Sink::Single(c) => c.unsubscribe(names).await,
            Sink::Cluster(c) => {
                let each = names.iter().map(|n| {
                    let mut c = c.clone();
                    async move { c.sunsubscribe(n).await }
                });
                futures_util::future::join_all(each).await.into_iter().collect()
            }
        }
    }

    /// The server(s) it talks to now, comma-separated (a Cluster's masters).
    pub(super) async fn servers(&mut self) -> RedisResult<Option<String>> {
        match self {
            Sink::Single(_) => Ok(None),
            Sink::Cluster(c) => Ok(Some(masters(c).await?.join(","))),
        }
    }
}

/// The masters of a cluster's slot ranges (`CLUSTER SLOTS`), `host:port`.
async fn masters(c: &mut ClusterConnection) -> RedisResult<Vec<String>> {
    let slots: Vec<redis::Value> = redis::cmd("CLUSTER").arg("SLOTS").query_async(c).await?;
    let mut out = Vec::new();
    for range in slots {
        let redis::Value::Array(parts) = range else { continue };
        let Some(redis::Value::Array(master)) = parts.get(2) else { continue };
        let host: Option<String> = master.first().and_then(|v| redis::from_redis_value_ref(v).ok());
        let port: Option<i64> = master.get(1).and_then(|v| redis::from_redis_value_ref(v).ok());
        if let (Some(h), Some(p)) = (host, port) {
            out.push(format!("{h}:{p}"));
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}
