//! Who is subscribed to a channel, across nodes.
//!
//! In memory: a map per channel. With Redis: per channel a hash
//! (`connection → {"connection","user","info"}`) and a sorted set of expiry
//! times, under the prefix and hash-tagged by channel. Each node refreshes
//! the expiry of its own entries every [`HEARTBEAT`]; a node that dies
//! (SIGKILL) stops refreshing and its entries are dropped by the next read
//! after [`EXPIRY`]. Reads are bounded: past [`MAX_LISTED`] members, only
//! the count is answered.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use serde_json::value::RawValue;

use crate::channel::Channel;

/// How often a node refreshes its entries in Redis.
pub const HEARTBEAT: Duration = Duration::from_secs(5);
/// An entry not refreshed for this long is gone (its node died).
pub const EXPIRY: Duration = Duration::from_secs(15);
/// Members listed at most; beyond, a presence answer carries the count only.
pub const MAX_LISTED: usize = 1000;

/// A channel's presence as answered to clients and the API.
#[derive(Debug)]
pub struct PresenceList {
    pub count: usize,
    /// Each member's `{"connection","user","info"}`; None past [`MAX_LISTED`].
    pub clients: Option<Vec<Box<RawValue>>>,
}

impl PresenceList {
    pub fn from_entries(entries: Vec<String>, count: usize) -> Self {
        if count > MAX_LISTED {
            return PresenceList { count, clients: None };
        }
        let clients = entries.into_iter().filter_map(|e| RawValue::from_string(e).ok()).collect();
        PresenceList { count, clients: Some(clients) }
    }

    /// `{"count":n,"clients":[…]}` (no `clients` past the bound).
    pub fn to_json(&self) -> serde_json::Value {
        match &self.clients {
            Some(c) => serde_json::json!({ "count": self.count, "clients": c }),
            None => serde_json::json!({ "count": self.count }),
        }
    }
}

/// This node's own entries: what it refreshes, and (in memory) all there is.
#[derive(Default)]
pub struct LocalPresence {
    by_channel: Mutex<HashMap<Channel, HashMap<Arc<str>, String>>>,
}

impl LocalPresence {
    fn lock(&self) -> MutexGuard<'_, HashMap<Channel, HashMap<Arc<str>, String>>> {
        self.by_channel.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn add(&self, channel: &Channel, connection: &Arc<str>, entry: String) {
        self.lock().entry(channel.clone()).or_default().insert(connection.clone(), entry);
    }

    pub fn remove(&self, channel: &Channel, connection: &str) {
        let mut m = self.lock();
        if let Some(c) = m.get_mut(channel) {
            c.remove(connection);
            if c.is_empty() {
                m.remove(channel);
            }
        }
    }

    pub fn list(&self, channel: &Channel) -> PresenceList {
        let m = self.lock();
        let entries: Vec<String> =
            m.get(channel).map(|c| c.values().take(MAX_LISTED + 1).cloned().collect()).unwrap_or_default();
        let count = m.get(channel).map_or(0, HashMap::len);
        PresenceList::from_entries(entries, count)
    }

    /// Every (channel, connection, entry) this node holds, for the heartbeat.
    pub fn all(&self) -> Vec<(Channel, Arc<str>, String)> {
        self.lock().iter().flat_map(|(ch, m)| m.iter().map(move |(c, e)| (ch.clone(), c.clone(), e.clone()))).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_big_channel_answers_its_count_only() {
        let entries: Vec<String> = (0..3).map(|i| format!("{{\"connection\":\"c{i}\"}}")).collect();
        let small = PresenceList::from_entries(entries.clone(), 3);
        assert_eq!(small.to_json()["clients"].as_array().unwrap().len(), 3);
        let big = PresenceList::from_entries(entries, MAX_LISTED + 1);
        assert_eq!(big.to_json(), serde_json::json!({ "count": MAX_LISTED + 1 }));
    }
}
