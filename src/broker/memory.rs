//! In-memory broker: one process, publish goes straight to the local hub
//! (through [`super::BrokerEvents`]).
//! Ordering per channel comes from the hub's shard lock, taken once per
//! message; where a namespace keeps history, from the channel's ring lock,
//! held while the offset is assigned and the message delivered.
//!
//! History is a ring per channel: the last `size` messages younger than
//! `ttl`, with an epoch per ring (a ring dropped after its `ttl` and made
//! again gets a new one, so an old offset can never match).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use super::BrokerEvents;
use super::History;
use super::presence::{LocalPresence, PresenceList};
use crate::channel::Channel;
use crate::config::{HistoryPolicy, Namespaces};
use crate::metrics::Metrics;
use crate::protocol::commands::NodeCommand;
use crate::protocol::{Kind, Message, Offset};
use tokio_tungstenite::tungstenite::Utf8Bytes;

/// Publishes between two sweeps of expired rings.
const SWEEP_EVERY: u64 = 1024;

pub struct MemoryBroker {
    events: Arc<dyn BrokerEvents>,
    metrics: Arc<Metrics>,
    namespaces: Arc<Namespaces>,
    rings: Mutex<HashMap<Channel, Arc<Mutex<Ring>>>>,
    /// Random per process; rings add a generation.
    process_epoch: String,
    generation: AtomicU64,
    publishes: AtomicU64,
    presence: LocalPresence,
    /// Stashed values and when they expire (bounded: expired ones are swept
    /// when full, and a new one is refused if it still is).
    stash: Mutex<HashMap<String, (Instant, String)>>,
    /// The last commands (disconnect, subscribe, unsubscribe) with the time
    /// they were issued, as Redis's control log keeps them.
    log: Mutex<CommandLog>,
}

/// Stashed values kept at most.
const MAX_STASH: usize = 100_000;
/// Commands kept in the log at most.
const COMMAND_LOG: usize = 10_000;

#[derive(Default)]
struct CommandLog {
    entries: VecDeque<(u64, NodeCommand)>,
    /// When the newest command dropped from the log was issued.
    dropped: u64,
}

struct Ring {
    epoch: Arc<str>,
    top: u64,
    entries: VecDeque<(Instant, Arc<Message>)>,
}

impl Ring {
    fn trim(&mut self, policy: HistoryPolicy, now: Instant) {
        while self.entries.len() > policy.size {
            self.entries.pop_front();
        }
        while self.entries.front().is_some_and(|(at, _)| now.duration_since(*at) > policy.ttl) {
            self.entries.pop_front();
        }
    }

    fn first(&self) -> u64 {
        self.entries.front().and_then(|(_, m)| m.offset.as_ref()).map_or(self.top + 1, |o| o.seq)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl MemoryBroker {
    pub fn new(events: Arc<dyn BrokerEvents>, metrics: Arc<Metrics>, namespaces: Arc<Namespaces>) -> Self {
        MemoryBroker {
            events,
            metrics,
            namespaces,
            rings: Mutex::new(HashMap::new()),
            process_epoch: crate::config::random_id(6),
            generation: AtomicU64::new(0),
            publishes: AtomicU64::new(0),
            presence: LocalPresence::default(),
            stash: Mutex::new(HashMap::new()),
            log: Mutex::new(CommandLog::default()),
        }
    }

    pub fn stash(&self, key: &str, value: String, ttl: std::time::Duration) {
        let now = Instant::now();
        let mut stash = lock(&self.stash);
        if stash.len() >= MAX_STASH {
            stash.retain(|_, (until, _)| *until > now);
            if stash.len() >= MAX_STASH {
                return;
            }
        }
        stash.insert(key.to_owned(), (now + ttl, value));
    }

    pub fn take_stash(&self, key: &str) -> Option<String> {
        let (until, value) = lock(&self.stash).remove(key)?;
        (until > Instant::now()).then_some(value)
    }

    pub fn read_stash(&self, key: &str) -> Option<String> {
        let stash = lock(&self.stash);
        let (until, value) = stash.get(key)?;
        (*until > Instant::now()).then(|| value.clone())
    }

    fn ring(&self, channel: &Channel) -> Arc<Mutex<Ring>> {
        let mut rings = lock(&self.rings);
        rings
            .entry(channel.clone())
            .or_insert_with(|| {
                let g = self.generation.fetch_add(1, Ordering::Relaxed);
                let epoch = Arc::from(format!("{}{g}", self.process_epoch));
                Arc::new(Mutex::new(Ring { epoch, top: 0, entries: VecDeque::new() }))
            })
            .clone()
    }

    /// Drops the rings whose every message expired (their channels went quiet).
    fn sweep(&self, now: Instant) {
        let mut rings = lock(&self.rings);
        rings.retain(|channel, ring| {
            let Some(policy) = self.namespaces.rule(channel).history else { return false };
            let mut r = lock(ring);
            r.trim(policy, now);
            !r.entries.is_empty()
        });
    }

    pub fn publish(&self, pubs: &[Arc<Message>]) -> Vec<Option<Offset>> {
        let timer = self.metrics.broker_publish_seconds.start_timer();
        let now = Instant::now();
        let mut offsets = Vec::with_capacity(pubs.len());
        for m in pubs {
            let Some(policy) = self.namespaces.rule(&m.channel).history else {
                self.events.deliver(m);
                offsets.push(None);
                continue;
            };
            let ring = self.ring(&m.channel);
            let mut r = lock(&ring);
            r.top += 1;
            let offset = Offset { epoch: r.epoch.clone(), seq: r.top };
            let stored = Arc::new(m.with_offset(offset.clone()));
            r.entries.push_back((now, stored.clone()));
            r.trim(policy, now);
            // Delivered under the ring's lock: offsets reach subscribers in order.
            self.events.deliver(&stored);
            offsets.push(Some(offset));
        }
        if self.publishes.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
            self.sweep(now);
        }
        timer.observe_duration();
        offsets
    }

    /// The channel's history after sequence `after`, at most `limit` messages.
    pub fn history(&self, channel: &Channel, policy: HistoryPolicy, after: u64, limit: usize) -> History {
        // A read makes no ring: asking about many channels costs nothing.
        let Some(ring) = lock(&self.rings).get(channel).cloned() else {
            return History { epoch: Arc::from(""), top: 0, first: 1, messages: Vec::new() };
        };
        let mut r = lock(&ring);
        r.trim(policy, Instant::now());
        let messages = r
            .entries
            .iter()
            .map(|(_, m)| m)
            .filter(|m| m.offset.as_ref().is_some_and(|o| o.seq > after))
            .take(limit)
            .cloned()
            .collect();
        History { epoch: r.epoch.clone(), top: r.top, first: r.first(), messages }
    }

    pub fn presence_change(&self, channel: &Channel, connection: &Arc<str>, entry: String, join: bool, announce: bool) {
        if join {
            self.presence.add(channel, connection, entry.clone());
        } else {
            self.presence.remove(channel, connection);
        }
        if announce {
            let kind = if join { Kind::Join } else { Kind::Leave };
            let event = Message::event(kind, channel.clone(), Utf8Bytes::from(entry), Some(connection.as_ref().into()));
            self.events.deliver(&Arc::new(event));
        }
    }

    pub fn presence(&self, channel: &Channel) -> PresenceList {
        self.presence.list(channel)
    }

    pub fn command(&self, cmd: &NodeCommand) {
        if matches!(cmd, NodeCommand::Disconnect(_) | NodeCommand::Subscribe { .. } | NodeCommand::Unsubscribe { .. }) {
            let mut log = lock(&self.log);
            if log.entries.len() == COMMAND_LOG {
                if let Some((t, _)) = log.entries.pop_front() {
                    log.dropped = t;
                }
            }
            log.entries.push_back((crate::protocol::now_us(), cmd.clone()));
        }
        self.events.command(cmd, None);
    }

    /// The logged commands issued after `t_us`, oldest first (None: some of
    /// them are no longer kept).
    pub fn commands_after(&self, t_us: u64) -> Option<Vec<(u64, NodeCommand)>> {
        let log = lock(&self.log);
        if log.dropped > t_us {
            return None;
        }
        Some(log.entries.iter().filter(|(t, _)| *t > t_us).cloned().collect())
    }
}
