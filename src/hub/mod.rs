//! The hub: this node's registry of sessions and channels, and local fan-out.
//!
//! A message reaches the hub once per node as an `Arc<`[`Message`]`>`; the
//! hub hands a clone of that pointer (a reference-count increment) to the
//! bounded queue of every local subscriber with `try_send`, so fan-out never
//! waits. Each session's codec frames it, once per protocol per message. A
//! subscriber whose queue is full is a slow consumer: it is told to close
//! (1013) and the others are not slowed.
//!
//! Channels live in sharded `std::sync::Mutex`es that are never held across
//! an `.await`: every operation under a lock is a map update or a `try_send`.
//! A channel is removed the moment its last local subscriber leaves, and the
//! broker's interest in it is updated under the same lock, so a concurrent
//! subscribe/unsubscribe pair cannot leave the broker subscription behind or
//! missing.

mod budget;

pub use self::budget::{Held, QueueBudget};

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use indexmap::IndexMap;
use tokio::sync::{Notify, mpsc};
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::channel::{Channel, ConnectionId};
use crate::error::{ApiError, CloseReason, ErrorCode, Fault};
pub use crate::interest::Interest;
use crate::metrics::Metrics;
use crate::protocol::Message;
pub use crate::protocol::commands::{Call, CallAnswer, NodeCommand, Target};
pub use crate::protocol::now_us;

const SHARDS: usize = 64;

/// One item queued for a session's socket.
#[derive(Debug, Clone)]
pub enum Outbound {
    /// A channel message, shared with every other subscriber.
    Message(Arc<Message>),
    /// A frame already encoded for this session (a reply, a control frame).
    /// Boxed, like commands: replies are one per request, and every queue
    /// slot of every session is as large as the largest variant.
    Frame(Box<Utf8Bytes>),
    /// Something the app asked of this session (server-side subscribe).
    Command(Box<SessionCommand>),
}

/// What the app can ask of a session through the hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionCommand {
    Subscribe(Channel, Applied),
    Unsubscribe(Channel, Applied),
    /// Send an event and return the client's acknowledgement (`/api/call`).
    Call(Call),
}

/// Tells whoever waits (`/api/subscribe` for a connection of this node) that
/// a server-side subscribe or unsubscribe took effect, the broker's
/// subscription included (when the last clone drops), or why it did not
/// ([`fail`](Self::fail)).
#[derive(Debug, Clone, Default)]
pub struct Applied {
    _tx: Option<Arc<AppliedTx>>,
}

type AppliedResult = Result<(), ApiError>;

#[derive(Debug)]
struct AppliedTx(Mutex<(Option<tokio::sync::oneshot::Sender<AppliedResult>>, AppliedResult)>);

impl Drop for AppliedTx {
    fn drop(&mut self) {
        let mut g = lock(&self.0);
        let result = std::mem::replace(&mut g.1, Ok(()));
        if let Some(tx) = g.0.take() {
            let _ = tx.send(result);
        }
    }
}

impl Applied {
    /// A notifier and what completes once it is dropped everywhere.
    pub fn pair() -> (Applied, tokio::sync::oneshot::Receiver<AppliedResult>) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        (Applied { _tx: Some(Arc::new(AppliedTx(Mutex::new((Some(tx), Ok(())))))) }, rx)
    }

    /// It did not take effect, for this reason (told when it drops).
    pub fn fail(&self, e: ApiError) {
        if let Some(tx) = &self._tx {
            lock(&tx.0).1 = Err(e);
        }
    }
}

impl PartialEq for Applied {
    /// Who waits is no part of what a command asks.
    fn eq(&self, _: &Applied) -> bool {
        true
    }
}

impl Eq for Applied {}

impl Outbound {
    /// What it counts against the node's [`QueueBudget`]: channel messages
    /// (replies are one per request, bounded by the session's read loop).
    pub fn weight(&self) -> usize {
        match self {
            Outbound::Message(m) => m.weight(),
            Outbound::Frame(_) | Outbound::Command(_) => 0,
        }
    }
}

/// The hub's handle on one session: its queue and the way to stop it.
pub struct SessionHandle {
    /// Node-local key, unique for the life of the process.
    pub key: u64,
    /// The connection id clients and the API see.
    pub id: ConnectionId,
    pub user: Option<Arc<str>>,
    /// When it connected (µs since the Unix epoch): commands replayed after
    /// a broker gap apply only to sessions older than the command.
    pub connected_us: u64,
    tx: mpsc::Sender<Outbound>,
    kill: Notify,
    kill_reason: AtomicU8,
}

impl SessionHandle {
    /// Items waiting in its queue.
    fn backlog(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }

    /// Queues a frame without waiting. A full queue means the client is not
    /// reading fast enough: the session is told to close as a slow consumer.
    pub fn enqueue(&self, out: Outbound) -> bool {
        match self.tx.try_send(out) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.kill(CloseReason::SlowConsumer);
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// Asks the session to close; the first reason wins.
    pub fn kill(&self, reason: CloseReason) {
        if self.kill_reason.compare_exchange(0, reason as u8, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            // notify_one stores a permit, so a session busy elsewhere still sees it.
            self.kill.notify_one();
        }
    }

    /// Completes once [`kill`](Self::kill) was called. Cancel safe.
    pub async fn killed(&self) -> CloseReason {
        self.kill.notified().await;
        self.kill_reason().unwrap_or(CloseReason::Error)
    }

    pub fn kill_reason(&self) -> Option<CloseReason> {
        CloseReason::from_u8(self.kill_reason.load(Ordering::Acquire))
    }
}

#[derive(Default)]
struct Subscribers {
    sessions: IndexMap<u64, Arc<SessionHandle>>,
}

#[derive(Default)]
struct Sessions {
    by_id: HashMap<ConnectionId, Arc<SessionHandle>>,
    by_user: HashMap<Arc<str>, Vec<Arc<SessionHandle>>>,
}

type Shard = Mutex<HashMap<Channel, Subscribers>>;

/// A node-wide limit a subscribe would pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NodeLimit {
    #[error("this node holds its maximum of channels (max-channels)")]
    Channels,
    #[error("this node holds its maximum of subscriptions (max-node-subscriptions)")]
    Subscriptions,
}

impl From<NodeLimit> for ApiError {
    fn from(e: NodeLimit) -> Self {
        ApiError::new(ErrorCode::LimitExceeded, e.to_string()).blame(Fault::Internal)
    }
}

/// Node-wide caps, so per-connection limits cannot multiply past memory.
#[derive(Debug, Clone, Copy)]
pub struct HubLimits {
    pub channels: usize,
    pub subscriptions: usize,
    /// Bytes of channel messages queued for sessions, node-wide.
    pub queued_bytes: usize,
}

/// Takes one unit of `counter` under `max`.
fn take(counter: &AtomicUsize, max: usize) -> Result<(), ()> {
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1))
        .map(|_| ())
        .map_err(|_| ())
}

pub struct Hub {
    shards: Box<[Shard]>,
    hasher: std::collections::hash_map::RandomState,
    sessions: Mutex<Sessions>,
    next_key: AtomicU64,
    interest: Option<Arc<Interest>>,
    metrics: Arc<Metrics>,
    limits: HubLimits,
    channels: AtomicUsize,
    subscriptions: AtomicUsize,
    budget: QueueBudget,
    /// API requests waiting for a call's answer, by call id.
    calls: Mutex<HashMap<String, tokio::sync::oneshot::Sender<CallAnswer>>>,
}

/// Calls waiting at once on one node, at most.
pub const MAX_CALLS: usize = 10_000;

/// Locks a mutex, recovering the data if a panic poisoned it: every critical
/// section here leaves the maps consistent before anything can panic.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Hub {
    /// `interest` is the broker's view of which channels this node needs
    /// (None for the in-memory broker, where the hub is the whole routing).
    pub fn new(interest: Option<Arc<Interest>>, metrics: Arc<Metrics>, limits: HubLimits) -> Self {
        Hub {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: Default::default(),
            sessions: Mutex::new(Sessions::default()),
            next_key: AtomicU64::new(1),
            interest,
            metrics,
            budget: QueueBudget::new(limits.queued_bytes),
            limits,
            channels: AtomicUsize::new(0),
            subscriptions: AtomicUsize::new(0),
            calls: Mutex::new(HashMap::new()),
        }
    }

    /// Registers a call this node waits for; None past [`MAX_CALLS`].
    pub fn await_call(&self, id: &str) -> Option<tokio::sync::oneshot::Receiver<CallAnswer>> {
        let mut calls = lock(&self.calls);
        calls.retain(|_, tx| !tx.is_closed());
        if calls.len() >= MAX_CALLS {
            return None;
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        calls.insert(id.to_owned(), tx);
        Some(rx)
    }

    /// Hands a call's answer to the request waiting for it, if it is here.
    pub fn answer_call(&self, id: &str, answer: CallAnswer) -> bool {
        let tx = lock(&self.calls).remove(id);
        tx.is_some_and(|tx| tx.send(answer).is_ok())
    }

    /// Forgets a call (timed out).
    pub fn forget_call(&self, id: &str) {
        lock(&self.calls).remove(id);
    }

    /// Whether a connection is on this node.
    pub fn has_session(&self, id: &str) -> bool {
        lock(&self.sessions).by_id.contains_key(id)
    }

    /// Hands a command to a local connection (false: not here).
    pub fn command_local(&self, id: &str, cmd: SessionCommand) -> bool {
        let Some(handle) = lock(&self.sessions).by_id.get(id).cloned() else { return false };
        handle.enqueue(Outbound::Command(Box::new(cmd)));
        true
    }

    /// The channels a local connection is subscribed to (None: not here).
    /// Walks every channel of the node: for the API, not the hot path.
    pub fn rooms_of(&self, id: &str) -> Option<Vec<String>> {
        let key = lock(&self.sessions).by_id.get(id)?.key;
        let mut rooms = Vec::new();
        for shard in &self.shards {
            let shard = lock(shard);
            rooms.extend(shard.iter().filter(|(_, s)| s.sessions.contains_key(&key)).map(|(c, _)| c.to_string()));
        }
        rooms.sort_unstable();
        Some(rooms)
    }

    /// The ids of the local connections subscribed to `channel`.
    pub fn members(&self, channel: &str) -> Vec<String> {
        lock(self.shard(channel))
            .get(channel)
            .map(|c| c.sessions.values().map(|h| h.id.to_string()).collect())
            .unwrap_or_default()
    }

    /// The local sessions subscribed to `channel`.
    pub fn subscribers(&self, channel: &str) -> Vec<Arc<SessionHandle>> {
        lock(self.shard(channel)).get(channel).map(|c| c.sessions.values().cloned().collect()).unwrap_or_default()
    }

    fn shard(&self, channel: &str) -> &Shard {
        &self.shards[(self.hasher.hash_one(channel) as usize) % SHARDS]
    }

    /// Creates a session handle with an outbound queue of `queue` frames and
    /// registers it (for `/api/disconnect`).
    pub fn register(
        &self,
        id: ConnectionId,
        user: Option<Arc<str>>,
        queue: usize,
    ) -> (Arc<SessionHandle>, mpsc::Receiver<Outbound>) {
        let (tx, rx) = mpsc::channel(queue);
        let handle = Arc::new(SessionHandle {
            key: self.next_key.fetch_add(1, Ordering::Relaxed),
            id,
            user,
            connected_us: now_us(),
            tx,
            kill: Notify::new(),
            kill_reason: AtomicU8::new(0),
        });
        let mut s = lock(&self.sessions);
        s.by_id.insert(handle.id.clone(), handle.clone());
        if let Some(u) = &handle.user {
            s.by_user.entry(u.clone()).or_default().push(handle.clone());
        }
        (handle, rx)
    }

    /// Removes a session from the registry (its subscriptions are removed by
    /// the session with [`unsubscribe`](Self::unsubscribe)).
    pub fn unregister(&self, handle: &SessionHandle) {
        let mut s = lock(&self.sessions);
        s.by_id.remove(&handle.id);
        if let Some(u) = &handle.user {
            if let Some(list) = s.by_user.get_mut(u) {
                list.retain(|h| h.key != handle.key);
                if list.is_empty() {
                    s.by_user.remove(u);
                }
            }
        }
    }

    /// Adds a subscriber. Returns false if it was already subscribed, and
    /// [`NodeLimit`] when the node holds `--max-node-subscriptions`
    /// subscriptions, or `--max-channels` channels and this is a new one.
    pub fn subscribe(&self, channel: &Channel, session: &Arc<SessionHandle>) -> Result<bool, NodeLimit> {
        let mut shard = lock(self.shard(channel));
        let existing = shard.get_mut(channel.as_str());
        if existing.as_ref().is_some_and(|ch| ch.sessions.contains_key(&session.key)) {
            return Ok(false);
        }
        take(&self.subscriptions, self.limits.subscriptions).map_err(|()| NodeLimit::Subscriptions)?;
        match existing {
            Some(ch) => {
                ch.sessions.insert(session.key, session.clone());
            }
            None => {
                if take(&self.channels, self.limits.channels).is_err() {
                    self.subscriptions.fetch_sub(1, Ordering::AcqRel);
                    return Err(NodeLimit::Channels);
                }
                if let Some(i) = &self.interest {
                    i.want(channel);
                }
                let mut ch = Subscribers::default();
                ch.sessions.insert(session.key, session.clone());
                shard.insert(channel.clone(), ch);
                self.metrics.channels.inc();
            }
        }
        self.metrics.subscriptions.inc();
        Ok(true)
    }

    /// Removes a subscriber; the channel goes with its last subscriber.
    pub fn unsubscribe(&self, channel: &str, session_key: u64) -> bool {
        let mut shard = lock(self.shard(channel));
        let Some(ch) = shard.get_mut(channel) else {
            return false;
        };
        let removed = ch.sessions.swap_remove(&session_key).is_some();
        if ch.sessions.is_empty() {
            shard.remove(channel);
            if let Some(i) = &self.interest {
                i.unwant(channel);
            }
            self.channels.fetch_sub(1, Ordering::AcqRel);
            self.metrics.channels.dec();
        }
        if removed {
            self.subscriptions.fetch_sub(1, Ordering::AcqRel);
            self.metrics.subscriptions.dec();
        }
        removed
    }

    /// Hands one message to every local subscriber of its channel except
    /// the `exclude` connection. Never waits. Returns how many sessions got it.
    ///
    /// While the node's queued bytes are over `--max-queued-bytes`, the
    /// subscribers that are already behind (a non-empty queue) are closed as
    /// slow consumers instead of being handed more; those keeping up still
    /// get it.
    pub fn deliver(&self, msg: &Arc<Message>) -> usize {
        let shard = lock(self.shard(&msg.channel));
        let Some(ch) = shard.get(msg.channel.as_str()) else {
            return 0;
        };
        let exclude = msg.exclude.as_deref();
        let over = self.budget.used() >= self.budget.max;
        let subs = ch.sessions.values().filter(|sub| exclude.is_none_or(|x| *x != *sub.id));
        self.hand_out(subs, ch.sessions.len(), msg, over)
    }

    /// Queues `msg` for each of `subs` (at most `count` of them), counted
    /// against the queue budget first; `over`: the budget was exceeded, so
    /// those already behind are closed instead.
    fn hand_out<'a>(
        &self,
        subs: impl Iterator<Item = &'a Arc<SessionHandle>>,
        count: usize,
        msg: &Arc<Message>,
        over: bool,
    ) -> usize {
        // Counted before any session can write and release it (a release
        // racing ahead of the add would wrap the counter); what is not
        // queued is given back after.
        let weight = msg.weight();
        self.budget.used.fetch_add(count * weight, Ordering::AcqRel);
        let mut n = 0;
        for sub in subs {
            if over && sub.backlog() > 0 {
                sub.kill(CloseReason::SlowConsumer);
                self.metrics.dropped_slow_consumer.inc();
                continue;
            }
            if sub.enqueue(Outbound::Message(msg.clone())) {
                n += 1;
            } else {
                self.metrics.dropped_slow_consumer.inc();
            }
        }
        self.budget.release((count - n) * weight);
        n
    }

    /// Hands one message to every local subscriber of any of `channels`,
    /// once each, except the `skip` connections (python-socketio's emits to
    /// several rooms). Never waits; returns how many sessions got it.
    pub fn deliver_many(&self, channels: &[Channel], msg: &Arc<Message>, skip: &[String]) -> usize {
        let mut targets: IndexMap<u64, Arc<SessionHandle>> = IndexMap::new();
        for ch in channels {
            for s in self.subscribers(ch) {
                if !skip.iter().any(|x| **x == *s.id) {
                    targets.insert(s.key, s);
                }
            }
        }
        let over = self.budget.used() >= self.budget.max;
        self.hand_out(targets.values(), targets.len(), msg, over)
    }

    /// The node's queued-bytes budget (sessions release what they write).
    pub fn budget(&self) -> &QueueBudget {
        &self.budget
    }

    /// Applies a command to the targeted local sessions that connected
    /// before `before_us` (all of them with None); returns how many.
    pub fn apply(&self, cmd: &NodeCommand, before_us: Option<u64>) -> usize {
        let target = match cmd {
            NodeCommand::Disconnect(t)
            | NodeCommand::Subscribe { target: t, .. }
            | NodeCommand::Unsubscribe { target: t, .. }
            | NodeCommand::Call { target: t, .. } => t,
            NodeCommand::Answer { call, answer } => {
                return usize::from(self.answer_call(call, answer.clone()));
            }
            // Answered by the node (`BrokerEvents::query`), not applied.
            NodeCommand::Query { .. } => return 0,
        };
        let all: Vec<Arc<SessionHandle>> = match target {
            Target::Connection(id) => lock(&self.sessions).by_id.get(id.as_str()).cloned().into_iter().collect(),
            Target::User(user) => lock(&self.sessions).by_user.get(user.as_str()).cloned().unwrap_or_default(),
            Target::Room(channel) => self.subscribers(channel),
        };
        let victims: Vec<Arc<SessionHandle>> =
            all.into_iter().filter(|h| before_us.is_none_or(|t| h.connected_us < t)).collect();
        for v in &victims {
            match cmd {
                NodeCommand::Disconnect(_) => v.kill(CloseReason::Disconnected),
                NodeCommand::Subscribe { channel, .. } => {
                    let cmd = SessionCommand::Subscribe(channel.clone(), Applied::default());
                    v.enqueue(Outbound::Command(Box::new(cmd)));
                }
                NodeCommand::Unsubscribe { channel, .. } => {
                    let cmd = SessionCommand::Unsubscribe(channel.clone(), Applied::default());
                    v.enqueue(Outbound::Command(Box::new(cmd)));
                }
                NodeCommand::Call { call, .. } => {
                    v.enqueue(Outbound::Command(Box::new(SessionCommand::Call(call.clone()))));
                }
                NodeCommand::Answer { .. } | NodeCommand::Query { .. } => {}
            }
        }
        victims.len()
    }

    /// Closes the targeted local sessions; returns how many.
    pub fn disconnect(&self, target: &Target) -> usize {
        self.apply(&NodeCommand::Disconnect(target.clone()), None)
    }

    /// Sessions currently registered on this node.
    pub fn session_count(&self) -> usize {
        lock(&self.sessions).by_id.len()
    }

    /// Every session, e.g. to stop them all.
    pub fn all_sessions(&self) -> Vec<Arc<SessionHandle>> {
        lock(&self.sessions).by_id.values().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub(queued_bytes: usize) -> Hub {
        let metrics = Arc::new(Metrics::new("t").unwrap());
        Hub::new(None, metrics, HubLimits { channels: 100, subscriptions: 100, queued_bytes })
    }

    fn msg(channel: &str, exclude: Option<&str>) -> Arc<Message> {
        let c = Channel::parse(channel).unwrap();
        Arc::new(Message::new(c, Utf8Bytes::from_static("1"), exclude.map(Into::into), 0))
    }

    /// A connection id on node `n` whose random part starts with `tag`.
    fn id(tag: &str) -> ConnectionId {
        ConnectionId::parse(&format!("n.{tag}{}", "0".repeat(11))).unwrap()
    }

    fn queued(rx: &mut mpsc::Receiver<Outbound>) -> usize {
        std::iter::from_fn(|| rx.try_recv().ok()).count()
    }

    #[test]
    fn a_message_reaches_each_subscriber_once_but_the_excluded_one() {
        let hub = hub(1 << 20);
        let (a, mut ra) = hub.register(id("a"), Some(Arc::from("alice")), 8);
        let (b, mut rb) = hub.register(id("b"), None, 8);
        let (_c, mut rc) = hub.register(id("c"), None, 8);
        let room = Channel::parse("room").unwrap();
        assert_eq!(hub.subscribe(&room, &a), Ok(true));
        assert_eq!(hub.subscribe(&room, &b), Ok(true));
        assert_eq!(hub.subscribe(&room, &b), Ok(false));
        assert_eq!(hub.deliver(&msg("room", None)), 2);
        assert_eq!((queued(&mut ra), queued(&mut rb), queued(&mut rc)), (1, 1, 0));
        assert_eq!(hub.deliver(&msg("room", Some(a.id.as_str()))), 1);
        assert_eq!((queued(&mut ra), queued(&mut rb)), (0, 1));
        // Several rooms: each session once, `skip` left out.
        let other = Channel::parse("other").unwrap();
        hub.subscribe(&other, &a).unwrap();
        assert_eq!(hub.deliver_many(&[room.clone(), other.clone()], &msg("room", None), &[]), 2);
        assert_eq!((queued(&mut ra), queued(&mut rb)), (1, 1));
        assert_eq!(hub.deliver_many(&[room.clone(), other], &msg("room", None), &[b.id.to_string()]), 1);
        assert_eq!((queued(&mut ra), queued(&mut rb)), (1, 0));
        // Unsubscribed: nothing more; the budget is given back as frames go.
        assert!(hub.unsubscribe("room", b.key));
        assert_eq!(hub.deliver(&msg("room", None)), 1);
    }

    #[test]
    fn a_full_queue_drops_for_that_session_only_and_the_budget_closes_laggards() {
        let hub = hub(1 << 20);
        let (slow, _rs) = hub.register(id("s"), None, 1);
        let (fast, mut rf) = hub.register(id("f"), None, 8);
        let room = Channel::parse("room").unwrap();
        hub.subscribe(&room, &slow).unwrap();
        hub.subscribe(&room, &fast).unwrap();
        assert_eq!(hub.deliver(&msg("room", None)), 2);
        // The slow one's queue (1 frame) is full: only the fast one gets it.
        assert_eq!(hub.deliver(&msg("room", None)), 1);
        assert_eq!(queued(&mut rf), 2);
        // Over the node-wide budget, a session already behind is closed.
        let tight = self::hub(1);
        let (behind, _rb) = tight.register(id("x"), None, 8);
        tight.subscribe(&room, &behind).unwrap();
        assert_eq!(tight.deliver(&msg("room", None)), 1);
        assert_eq!(tight.deliver(&msg("room", None)), 0);
        assert_eq!(behind.kill_reason(), Some(CloseReason::SlowConsumer));
    }

    #[test]
    fn a_queue_slot_is_two_words() {
        // Every session's queue holds blocks of these: keep them small.
        assert_eq!(std::mem::size_of::<Outbound>(), 16);
    }
}
