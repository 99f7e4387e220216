//! The broker carries published messages to every node's hub.
//!
//! Two implementations, picked by one `match` on the configuration:
//! [`memory`] (one process: publish goes straight to the local hub) and
//! [`redis`] (every sidecar sharing a Redis and a prefix forms one cluster:
//! publish goes to Redis, and each node's single subscriber connection hands
//! what it receives to its hub). Both keep the same contract:
//!
//! - `publish` returns only once the message is accepted by the broker, and
//!   fails with `unavailable` otherwise; nothing is dropped silently.
//! - Per channel, every subscriber on every node sees messages in one order.
//! - A node receives only the channels its hub has subscribers for
//!   ([`Interest`], kept by the hub), and `ensure_subscribed` returns once
//!   that is in effect.
//!
//! History, recovery and presence (SPEC §6) plug in here: `publish` will
//! return the offsets it assigned.

pub mod memory;
pub mod presence;
pub mod redis;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

pub use self::presence::PresenceList;
use crate::channel::Channel;
use crate::config::{BrokerConfig, HistoryPolicy, Namespaces};
pub use crate::error::BrokerError;
use crate::interest::Interest;
use crate::metrics::Metrics;
use crate::protocol::commands::{CallAnswer, NodeCommand, Query};
use crate::protocol::{Message, Offset};

/// What a broker reports upward, to what holds the node's sockets (the
/// hub, and a front for foreign traffic), as centrifuge's
/// `BrokerEventHandler`: the broker names none of them.
pub trait BrokerEvents: Send + Sync + 'static {
    /// A message for the local subscribers of its channel.
    fn deliver(&self, m: &Arc<Message>);
    /// An app command for the local sessions (`replayed_at`: when it was
    /// issued, for one read back from the log); how many it reached.
    fn command(&self, cmd: &NodeCommand, replayed_at: Option<u64>) -> usize;
    /// A message on the python-socketio channel (`--socketio-redis-channel`).
    fn foreign(&self, payload: &[u8]);
    /// This node's answer to a membership query (None: not for this node).
    fn query(&self, q: &Query) -> Option<CallAnswer>;
}

/// What a broker is wired to.
pub struct Wiring {
    pub node_id: String,
    pub events: Arc<dyn BrokerEvents>,
    pub metrics: Arc<Metrics>,
    pub namespaces: Arc<Namespaces>,
    /// Its background tasks stop when this is cancelled.
    pub shutdown: CancellationToken,
    /// Every task it spawns, so the node can wait for them to end.
    pub tasks: tokio_util::task::TaskTracker,
}

/// A channel's history as read at one moment.
#[derive(Debug)]
pub struct History {
    /// The history's epoch (a new one whenever it was lost).
    pub epoch: Arc<str>,
    /// The last sequence number assigned (0: none yet).
    pub top: u64,
    /// The oldest sequence number still kept (`top + 1` when none is).
    pub first: u64,
    /// The messages asked for, oldest first, each with its offset.
    pub messages: Vec<Arc<Message>>,
}

impl History {
    /// Whether everything after `since` is here (or can be read): same
    /// epoch, and nothing between it and the oldest kept message dropped.
    pub fn covers(&self, since: &Offset) -> bool {
        *since.epoch == *self.epoch && since.seq <= self.top && since.seq + 1 >= self.first
    }

    /// The offset of the newest message.
    pub fn top_offset(&self) -> Offset {
        Offset { epoch: self.epoch.clone(), seq: self.top }
    }
}

pub enum Broker {
    Memory(Box<memory::MemoryBroker>),
    Redis(Box<redis::RedisBroker>),
}

impl Broker {
    /// Builds the broker the configuration names and starts its tasks; they
    /// stop when `shutdown` is cancelled.
    pub fn start(cfg: &BrokerConfig, w: Wiring, interest: Option<Arc<Interest>>) -> Result<Broker, BrokerError> {
        match (&cfg.redis_url, interest) {
            (Some(url), Some(interest)) => {
                Ok(Broker::Redis(Box::new(redis::RedisBroker::start(url, cfg, w, interest)?)))
            }
            (None, _) => {
                w.metrics.broker_up.set(1);
                Ok(Broker::Memory(Box::new(memory::MemoryBroker::new(w.events, w.metrics, w.namespaces))))
            }
            (Some(_), None) => Err(BrokerError::Config("the Redis broker needs the hub's interest".into())),
        }
    }

    /// Whether a Redis broker is configured (the hub then needs an [`Interest`]).
    pub fn needs_interest(cfg: &BrokerConfig) -> bool {
        cfg.redis_url.is_some()
    }

    /// The start-up line naming the broker.
    /// Whether other nodes share it (Redis); in memory this node is alone.
    pub fn is_shared(&self) -> bool {
        !matches!(self, Broker::Memory(_))
    }

    pub fn describe(&self) -> String {
        match self {
            Broker::Memory(_) => {
                "using in-memory broker (single instance: messages do not reach other replicas)".to_owned()
            }
            Broker::Redis(r) => r.describe(),
        }
    }

    /// Publishes messages (one or a broadcast); Ok once the broker has
    /// them, with each one's offset where its namespace keeps history.
    pub async fn publish(&self, pubs: Vec<Arc<Message>>) -> Result<Vec<Option<Offset>>, BrokerError> {
        match self {
            Broker::Memory(m) => Ok(m.publish(&pubs)),
            Broker::Redis(r) => r.publish(pubs).await,
        }
    }

    /// A channel's history after sequence `after` (0: from the start), at
    /// most `limit` messages.
    pub async fn history(
        &self,
        channel: &Channel,
        policy: HistoryPolicy,
        after: u64,
        limit: usize,
    ) -> Result<History, BrokerError> {
        match self {
            Broker::Memory(m) => Ok(m.history(channel, policy, after, limit)),
            Broker::Redis(r) => r.history(channel, after, limit).await,
        }
    }

    /// Returns once messages published to `channel` from now on reach this
    /// node (the hub must already hold a subscriber for it).
    pub async fn ensure_subscribed(&self, channel: &str) -> Result<(), BrokerError> {
        match self {
            Broker::Memory(_) => Ok(()),
            Broker::Redis(r) => r.ensure_subscribed(channel).await,
        }
    }

    /// `connection` (described by `entry`, `{"connection","user","info"}`)
    /// joins (or leaves) `channel`'s presence; with `announce` the channel's
    /// subscribers get a `join` (or `leave`) frame.
    pub async fn presence_change(
        &self,
        channel: &Channel,
        connection: &str,
        entry: String,
        join: bool,
        announce: bool,
    ) -> Result<(), BrokerError> {
        match self {
            Broker::Memory(m) => {
                m.presence_change(channel, &Arc::from(connection), entry, join, announce);
                Ok(())
            }
            Broker::Redis(r) => r.presence_change(channel, &Arc::from(connection), entry, join, announce).await,
        }
    }

    /// Who is subscribed to `channel`, on every node.
    pub async fn presence(&self, channel: &Channel) -> Result<PresenceList, BrokerError> {
        match self {
            Broker::Memory(m) => Ok(m.presence(channel)),
            Broker::Redis(r) => r.presence(channel).await,
        }
    }

    /// Applies a command (disconnect, server-side subscribe) on every node,
    /// including nodes whose subscriber is reconnecting (they replay it).
    pub async fn command(&self, cmd: NodeCommand) -> Result<(), BrokerError> {
        match self {
            Broker::Memory(m) => {
                m.command(&cmd);
                Ok(())
            }
            Broker::Redis(r) => r.command(&cmd).await,
        }
    }

    /// The commands (disconnect, subscribe, unsubscribe) issued after
    /// `t_us`, oldest first, with the time each was issued; None when they
    /// are no longer all kept.
    pub async fn commands_after(&self, t_us: u64) -> Result<Option<Vec<(u64, NodeCommand)>>, BrokerError> {
        match self {
            Broker::Memory(m) => Ok(m.commands_after(t_us)),
            Broker::Redis(r) => r.commands_after(t_us).await,
        }
    }

    /// Makes this node reachable by the others at `url` (Redis only).
    pub fn advertise(&self, node_id: &str, url: String, shutdown: CancellationToken) {
        if let Broker::Redis(r) = self {
            r.advertise(node_id, url, shutdown);
        }
    }

    /// Where another node is reached, if it is alive (never, in memory).
    pub async fn peer_url(&self, node_id: &str) -> Result<Option<String>, BrokerError> {
        match self {
            Broker::Memory(_) => Ok(None),
            Broker::Redis(r) => r.peer_url(node_id).await,
        }
    }

    /// Keeps a small value for `ttl`, for any node to [`take_stash`](Self::take_stash).
    pub async fn stash(&self, key: &str, value: String, ttl: std::time::Duration) -> Result<(), BrokerError> {
        match self {
            Broker::Memory(m) => {
                m.stash(key, value, ttl);
                Ok(())
            }
            Broker::Redis(r) => r.stash(key, value, ttl).await,
        }
    }

    /// Takes (reads and deletes) a stashed value.
    pub async fn take_stash(&self, key: &str) -> Result<Option<String>, BrokerError> {
        match self {
            Broker::Memory(m) => Ok(m.take_stash(key)),
            Broker::Redis(r) => r.take_stash(key).await,
        }
    }

    /// Reads a stashed value without taking it.
    pub async fn read_stash(&self, key: &str) -> Result<Option<String>, BrokerError> {
        match self {
            Broker::Memory(m) => Ok(m.read_stash(key)),
            Broker::Redis(r) => r.read_stash(key).await,
        }
    }

    /// Removes a stashed value.
    pub async fn drop_stash(&self, key: &str) -> Result<(), BrokerError> {
        match self {
            Broker::Memory(m) => {
                m.take_stash(key);
                Ok(())
            }
            Broker::Redis(r) => r.take_stash(key).await.map(|_| ()),
        }
    }

    /// The ids of the nodes alive in the cluster (heard from within 15 s;
    /// none in memory, where this node is the cluster).
    pub async fn live_nodes(&self) -> Result<Vec<String>, BrokerError> {
        match self {
            Broker::Memory(_) => Ok(Vec::new()),
            Broker::Redis(r) => r.live_nodes().await,
        }
    }

    /// True while publishing and delivery work.
    pub fn is_up(&self) -> bool {
        match self {
            Broker::Memory(_) => true,
            Broker::Redis(r) => r.is_up(),
        }
    }
}
