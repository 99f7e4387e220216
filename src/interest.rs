//! Which channels this node needs from the broker (`desired`, kept by the
//! hub) and which the broker connection has confirmed (`active`, kept by the
//! broker's subscriber task): the hub's bookkeeping of what the node wants,
//! read by the broker.

use std::collections::HashSet;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{Notify, watch};

use crate::channel::Channel;
use crate::error::BrokerError;

/// Which channels this node needs from the broker (`desired`, kept by the
/// hub) and which the broker connection has confirmed (`active`, kept by the
/// subscriber task). The subscriber task is woken on every change and
/// applies the difference in batches, so churn costs one round trip per
/// batch, not per channel, and a reconnect resubscribes everything.
#[derive(Default)]
pub struct Interest {
    state: Mutex<InterestState>,
    /// Woken on every change of `desired`.
    pub changed: Notify,
    epoch: watch::Sender<u64>,
}

#[derive(Default)]
struct InterestState {
    desired: HashSet<Channel>,
    active: HashSet<Channel>,
    up: bool,
    /// The broker has been up at least once: a node that is still starting
    /// waits for it, one in an outage fails fast.
    ever_up: bool,
}

impl Interest {
    fn lock(&self) -> MutexGuard<'_, InterestState> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The hub has a first local subscriber for `channel`.
    pub fn want(&self, channel: &Channel) {
        self.lock().desired.insert(channel.clone());
        self.changed.notify_one();
    }

    /// The hub's last local subscriber of `channel` left.
    pub fn unwant(&self, channel: &str) {
        self.lock().desired.remove(channel);
        self.changed.notify_one();
    }

    /// Whether the hub still wants `channel`.
    pub fn wants(&self, channel: &str) -> bool {
        self.lock().desired.contains(channel)
    }

    pub fn is_up(&self) -> bool {
        self.lock().up
    }

    /// Waits until `channel` is confirmed by the broker, failing at once
    /// while the broker is down (after it was up once: a starting node waits
    /// for its first connection) and after `timeout`.
    pub async fn wait_active(&self, channel: &str, timeout: Duration) -> Result<(), BrokerError> {
        let mut epoch = self.epoch.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let up = {
                let s = self.lock();
                if !s.up && s.ever_up {
                    return Err(BrokerError::NotConnected);
                }
                if s.up && (s.active.contains(channel) || !s.desired.contains(channel)) {
                    return Ok(());
                }
                s.up
            };
            match tokio::time::timeout_at(deadline, epoch.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) if up => return Err(BrokerError::NotConfirmed),
                Ok(Err(_)) | Err(_) => return Err(BrokerError::NotConnected),
            }
        }
    }

    /// Ok while the broker is up. A node still starting waits for its first
    /// connection, up to `timeout`; during an outage it fails at once.
    pub async fn wait_up(&self, timeout: Duration) -> Result<(), BrokerError> {
        let mut epoch = self.epoch.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            {
                let s = self.lock();
                if s.up {
                    return Ok(());
                }
                if s.ever_up {
                    return Err(BrokerError::NotConnected);
                }
            }
            if !matches!(tokio::time::timeout_at(deadline, epoch.changed()).await, Ok(Ok(()))) {
                return Err(BrokerError::NotConnected);
            }
        }
    }

    /// Channels to subscribe and to unsubscribe to match `desired`. Those to
    /// unsubscribe leave `active` now, before the UNSUBSCRIBE goes out: a
    /// subscriber arriving while it is in flight must wait for the
    /// re-SUBSCRIBE, not be told "ok" while Redis is dropping the channel.
    pub fn take_changes(&self) -> (Vec<Channel>, Vec<Channel>) {
        let (add, remove): (Vec<Channel>, Vec<Channel>) = {
            let mut s = self.lock();
            let add = s.desired.difference(&s.active).cloned().collect();
            let remove: Vec<Channel> = s.active.difference(&s.desired).cloned().collect();
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
    pub fn confirm(&self, added: &[Channel]) -> usize {
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

    /// The channels subscribed in the broker now.
    pub fn active(&self) -> Vec<Channel> {
        self.lock().active.iter().cloned().collect()
    }

    pub fn active_count(&self) -> usize {
        self.lock().active.len()
    }

    pub fn set_up(&self, up: bool) {
        {
            let mut s = self.lock();
            s.up = up;
            s.ever_up |= up;
            if !up {
                s.active.clear();
            }
        }
        self.epoch.send_modify(|e| *e += 1);
    }
}
