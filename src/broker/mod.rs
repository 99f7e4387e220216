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
pub mod redis;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::config::BrokerConfig;
pub use crate::error::BrokerError;
use crate::hub::{DisconnectTarget, Hub, Interest};
use crate::metrics::Metrics;
use crate::protocol::Message;

pub enum Broker {
    Memory(memory::MemoryBroker),
    Redis(Box<redis::RedisBroker>),
}

impl Broker {
    /// Builds the broker the configuration names and starts its tasks; they
    /// stop when `shutdown` is cancelled.
    pub fn start(
        cfg: &BrokerConfig,
        node_id: &str,
        hub: Arc<Hub>,
        interest: Option<Arc<Interest>>,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> Result<Broker, BrokerError> {
        match (&cfg.redis_url, interest) {
            (Some(url), Some(interest)) => Ok(Broker::Redis(Box::new(redis::RedisBroker::start(
                url, cfg, node_id, hub, interest, metrics, shutdown,
            )?))),
            (None, _) => {
                metrics.broker_up.set(1);
                Ok(Broker::Memory(memory::MemoryBroker::new(hub, metrics)))
            }
            (Some(_), None) => Err(BrokerError::Config("the Redis broker needs the hub's interest".into())),
        }
    }

    /// Whether a Redis broker is configured (the hub then needs an [`Interest`]).
    pub fn needs_interest(cfg: &BrokerConfig) -> bool {
        cfg.redis_url.is_some()
    }

    /// The start-up line naming the broker.
    pub fn describe(&self) -> String {
        match self {
            Broker::Memory(_) => {
                "using in-memory broker (single instance: messages do not reach other replicas)".to_owned()
            }
            Broker::Redis(r) => r.describe(),
        }
    }

    /// Publishes messages (one or a broadcast); Ok once the broker has them.
    pub async fn publish(&self, pubs: Vec<Arc<Message>>) -> Result<(), BrokerError> {
        match self {
            Broker::Memory(m) => {
                m.publish(&pubs);
                Ok(())
            }
            Broker::Redis(r) => r.publish(pubs).await,
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

    /// Closes the targeted sessions on every node.
    pub async fn disconnect(&self, target: DisconnectTarget) -> Result<(), BrokerError> {
        match self {
            Broker::Memory(m) => {
                m.disconnect(&target);
                Ok(())
            }
            Broker::Redis(r) => r.disconnect(&target).await,
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
