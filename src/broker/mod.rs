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
//!   ([`Interest`]), and `ensure_subscribed` returns once that is in effect.
//!
//! History, recovery and presence (SPEC §6) plug in here: `Publication`
//! will carry the namespace's history settings and `publish` return the
//! offset.

pub mod memory;
pub mod redis;

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tokio_util::sync::CancellationToken;

use crate::config::BrokerConfig;
use crate::error::ApiError;
use crate::hub::{DisconnectTarget, Hub};
use crate::metrics::Metrics;

/// One message to publish: the channel, the frame encoded once for every
/// subscriber, and the connection that must not receive it.
#[derive(Debug, Clone)]
pub struct Publication {
    pub channel: String,
    pub frame: Utf8Bytes,
    pub exclude: Option<String>,
    /// µs since the Unix epoch, for `wsrelay_delivery_seconds`.
    pub published_us: u64,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum BrokerError {
    #[error("broker unavailable: {0}")]
    Unavailable(String),
}

impl From<BrokerError> for ApiError {
    fn from(e: BrokerError) -> Self {
        ApiError::unavailable(e.to_string())
    }
}

pub enum Broker {
    Memory(memory::MemoryBroker),
    Redis(redis::RedisBroker),
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
            (Some(url), Some(interest)) => {
                Ok(Broker::Redis(redis::RedisBroker::start(url, cfg, node_id, hub, interest, metrics, shutdown)?))
            }
            (None, _) => {
                metrics.broker_up.set(1);
                Ok(Broker::Memory(memory::MemoryBroker::new(hub, metrics)))
            }
            (Some(_), None) => Err(BrokerError::Unavailable("internal: redis broker built without interest".into())),
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
    pub async fn publish(&self, pubs: Vec<Publication>) -> Result<(), BrokerError> {
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

/// Which channels this node needs from the broker (`desired`, kept by the
/// hub) and which the broker connection has confirmed (`active`, kept by the
/// subscriber task). The subscriber task is woken on every change and
/// applies the difference in batches, so churn costs one round trip per
/// batch, not per channel, and a reconnect resubscribes everything.
#[derive(Default)]
pub struct Interest {
    state: Mutex<InterestState>,
    changed: Notify,
    epoch: watch::Sender<u64>,
}

#[derive(Default)]
struct InterestState {
    desired: HashSet<Arc<str>>,
    active: HashSet<Arc<str>>,
    up: bool,
}

impl Interest {
    fn lock(&self) -> MutexGuard<'_, InterestState> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The hub has a first local subscriber for `channel`.
    pub fn want(&self, channel: &Arc<str>) {
        self.lock().desired.insert(channel.clone());
        self.changed.notify_one();
    }

    /// The hub's last local subscriber of `channel` left.
    pub fn unwant(&self, channel: &str) {
        self.lock().desired.remove(channel);
        self.changed.notify_one();
    }

    pub fn is_up(&self) -> bool {
        self.lock().up
    }

    /// Waits until `channel` is confirmed by the broker, failing at once
    /// while the broker is down and after `timeout`.
    pub async fn wait_active(&self, channel: &str, timeout: Duration) -> Result<(), BrokerError> {
        let mut epoch = self.epoch.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            {
                let s = self.lock();
                if !s.up {
                    return Err(BrokerError::Unavailable("not connected to Redis".into()));
                }
                if s.active.contains(channel) || !s.desired.contains(channel) {
                    return Ok(());
                }
            }
            match tokio::time::timeout_at(deadline, epoch.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => {
                    return Err(BrokerError::Unavailable("subscription not confirmed by Redis in time".into()));
                }
            }
        }
    }

    /// Channels to subscribe and to unsubscribe to match `desired`. Those to
    /// unsubscribe leave `active` now, before the UNSUBSCRIBE goes out: a
    /// subscriber arriving while it is in flight must wait for the
    /// re-SUBSCRIBE, not be told "ok" while Redis is dropping the channel.
    fn take_changes(&self) -> (Vec<Arc<str>>, Vec<Arc<str>>) {
        let (add, remove): (Vec<Arc<str>>, Vec<Arc<str>>) = {
            let mut s = self.lock();
            let add = s.desired.difference(&s.active).cloned().collect();
            let remove: Vec<Arc<str>> = s.active.difference(&s.desired).cloned().collect();
            for c in &remove {
                s.active.remove(c);
            }
            (add, remove)
        };
        if !remove.is_empty() {
            self.epoch.send_modify(|e| *e += 1);
        }
        (add, remove)
    }

    /// Redis confirmed these subscriptions; returns how many are active.
    fn confirm(&self, added: &[Arc<str>]) -> usize {
        let n = {
            let mut s = self.lock();
            for c in added {
                s.active.insert(c.clone());
            }
            s.active.len()
        };
        self.epoch.send_modify(|e| *e += 1);
        n
    }

    fn active_count(&self) -> usize {
        self.lock().active.len()
    }

    fn set_up(&self, up: bool) {
        {
            let mut s = self.lock();
            s.up = up;
            if !up {
                s.active.clear();
            }
        }
        self.epoch.send_modify(|e| *e += 1);
    }
}
