//! In-memory broker: one process, publish goes straight to the local hub.
//! Ordering per channel comes from the hub's shard lock, taken once per
//! message.

use std::sync::Arc;

use crate::hub::{DisconnectTarget, Hub};
use crate::metrics::Metrics;
use crate::protocol::Message;

pub struct MemoryBroker {
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
}

impl MemoryBroker {
    pub fn new(hub: Arc<Hub>, metrics: Arc<Metrics>) -> Self {
        MemoryBroker { hub, metrics }
    }

    pub fn publish(&self, pubs: &[Arc<Message>]) {
        let timer = self.metrics.broker_publish_seconds.start_timer();
        for m in pubs {
            self.hub.deliver(m);
        }
        timer.observe_duration();
    }

    pub fn disconnect(&self, target: &DisconnectTarget) {
        self.hub.disconnect(target, None);
    }
}
