//! A Socket.IO socket's recovery trail: its rooms and where it was in each
//! channel with history, kept for `--socketio-recovery-window` after it ends.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::channel::Channel;
use crate::error::CloseReason;
use crate::hub::{NodeCommand, SessionCommand, Target, now_us};
use crate::node::Node;
use crate::protocol::socketio::{in_namespace, room_channel};
use crate::protocol::{Message, Offset};
use crate::session::SocketState;
/// Entries of a trail's write log (older ones are summed up per channel).
const TRAIL_LOG: usize = 64;

/// What a Socket.IO socket's next connection needs to recover: its rooms,
/// and where it was in each channel with history. The log keeps the last
/// offsets written in order, so the client's own last offset tells which of
/// them it really received (those after it may have been lost in flight).
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct Trail {
    pub(super) pid: String,
    pub(super) user: Option<String>,
    /// The namespace it was connected to first (the one recovered).
    #[serde(default)]
    pub(super) namespace: String,
    pub(super) rooms: Vec<Channel>,
    /// Per channel: the last offset written before the log.
    pub(super) base: HashMap<Channel, Offset>,
    pub(super) log: VecDeque<(Channel, Offset)>,
    /// The socket's connection id, and when it connected and ended (µs since
    /// the Unix epoch): app commands for it issued meanwhile still apply.
    #[serde(default)]
    pub(super) connection: String,
    #[serde(default)]
    pub(super) connected_us: u64,
    #[serde(default)]
    pub(super) kept_us: u64,
    /// Rooms the app put the socket in while it was away: joined without a
    /// position (it was not in them, so it missed nothing there).
    #[serde(skip)]
    pub(super) fresh: Vec<Channel>,
}

/// What an app command issued while the socket was away does to its trail.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Applied {
    /// Not about this socket.
    Skipped,
    /// A room joined or left.
    Changed,
    /// The app disconnected it: nothing is recovered.
    Dropped,
}

impl Trail {
    /// Called for every message with an offset written to the socket:
    /// reference-count clones, no allocation once the log is full.
    fn wrote(&mut self, channel: &Channel, offset: &Offset) {
        // A channel's first message: it was at the one before (a channel
        // joined server-side has no position until then). Every channel in
        // the log has a base from its first message on.
        if !self.base.contains_key(channel) {
            let before = Offset { epoch: offset.epoch.clone(), seq: offset.seq.saturating_sub(1) };
            self.base.insert(channel.clone(), before);
        }
        if self.log.len() == TRAIL_LOG {
            if let Some((c, o)) = self.log.pop_front() {
                self.base.insert(c, o);
            }
        }
        self.log.push_back((channel.clone(), offset.clone()));
    }

    /// Applies an app command issued while the socket was away, as it would
    /// have applied to the socket (`/api/subscribe`, `/api/unsubscribe`,
    /// `/api/disconnect` of its user or connection).
    pub(super) fn apply(&mut self, cmd: &NodeCommand) -> Applied {
        let (target, change) = match cmd {
            NodeCommand::Disconnect(t) => (t, None),
            NodeCommand::Subscribe { target, channel } => (target, Some((channel, true))),
            NodeCommand::Unsubscribe { target, channel } => (target, Some((channel, false))),
            NodeCommand::Call { .. } | NodeCommand::Answer { .. } | NodeCommand::Query { .. } => {
                return Applied::Skipped;
            }
        };
        let ours = match target {
            Target::User(u) => self.user.as_deref() == Some(u.as_str()),
            Target::Connection(c) => c.as_str() == self.connection,
            Target::Room(c) => self.rooms.contains(c),
        };
        match (ours, change) {
            (false, _) => Applied::Skipped,
            (true, None) => Applied::Dropped,
            (true, Some((channel, true))) => {
                if in_namespace(channel, &self.namespace) && !self.rooms.contains(channel) {
                    self.rooms.push(channel.clone());
                    self.fresh.push(channel.clone());
                }
                Applied::Changed
            }
            (true, Some((channel, false))) => {
                self.rooms.retain(|r| r != channel);
                self.fresh.retain(|r| r != channel);
                self.base.remove(channel);
                self.log.retain(|(c, _)| c != channel);
                Applied::Changed
            }
        }
    }

    /// Each room's `since` given the client's last offset, and whether that
    /// offset could be placed (the client's position is known).
    pub(super) fn positions(&self, client_offset: Option<&str>) -> (HashMap<Channel, Offset>, bool) {
        let mut since = self.base.clone();
        let (upto, known) = match client_offset.map(Offset::parse) {
            None => (0, true),
            Some(o) => match o.and_then(|o| self.log.iter().rposition(|(_, x)| *x == o)) {
                Some(i) => (i + 1, true),
                // Older than the log, or not an offset: where it is cannot
                // be told (a base may be past what it received).
                None => (0, self.log.is_empty()),
            },
        };
        for (c, o) in self.log.iter().take(upto) {
            since.insert(c.clone(), o.clone());
        }
        (since, known)
    }
}

/// Where a trail is kept: its pid and its owner (user and namespace), so
/// that a `pid` presented by anyone else names nothing.
/// Whether connection-state recovery is on (`--socketio-recovery-window` > 0).
pub(super) fn recovers(node: &Node) -> bool {
    node.cfg.session.socketio.as_ref().is_some_and(|s| !s.recovery_window.is_zero())
}

pub(super) fn trail_key(pid: &str, user: Option<&str>, namespace: &str) -> String {
    // JSON keeps the parts apart whatever they contain.
    let owner = serde_json::to_string(&(namespace, user)).unwrap_or_default();
    format!("sio:{pid}:{owner}")
}

impl SocketState for Trail {
    fn wrote(&mut self, m: &Message) {
        if let Some(off) = &m.offset {
            Trail::wrote(self, &m.channel, off);
        }
    }

    fn joined(&mut self, channel: &Channel) {
        // Only the first namespace is recovered; not the socket's own room.
        let own = room_channel(&self.namespace, &self.connection).ok();
        if in_namespace(channel, &self.namespace) && own.as_ref() != Some(channel) && !self.rooms.contains(channel) {
            self.rooms.push(channel.clone());
        }
    }

    fn left(&mut self, channel: &Channel) {
        self.rooms.retain(|r| r != channel);
        self.base.remove(channel);
    }

    /// Keeps the trail for the client's next connection (in the background).
    fn ended(self: Box<Self>, node: &Arc<Node>, reason: CloseReason, queued: Vec<SessionCommand>) {
        if matches!(reason, CloseReason::Disconnected | CloseReason::TokenExpired | CloseReason::Protocol) {
            return;
        }
        let Some(window) = node.cfg.session.socketio.as_ref().map(|s| s.recovery_window) else { return };
        if window.is_zero() {
            return;
        }
        let mut trail = *self;
        // Commands that reached the queue but not the socket apply too.
        for cmd in queued {
            match cmd {
                SessionCommand::Subscribe(c, _) if in_namespace(&c, &trail.namespace) && !trail.rooms.contains(&c) => {
                    trail.rooms.push(c);
                }
                SessionCommand::Unsubscribe(c, _) => {
                    trail.rooms.retain(|r| *r != c);
                    trail.base.remove(&c);
                }
                _ => {}
            }
        }
        trail.kept_us = now_us();
        let Ok(value) = serde_json::to_string(&trail) else { return };
        let n = node.clone();
        node.spawn(async move {
            let node = n;
            let key = trail_key(&trail.pid, trail.user.as_deref(), &trail.namespace);
            if let Err(e) = node.broker.stash(&key, value, window).await {
                tracing::debug!(error = %e, "recovery state not kept: this socket will not be recovered");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn off(s: &str) -> Offset {
        Offset::parse(s).unwrap()
    }

    fn ch(s: &str) -> Channel {
        Channel::parse(s).unwrap()
    }

    fn at(since: &HashMap<Channel, Offset>, c: &str) -> String {
        since[&ch(c)].to_string()
    }

    #[test]
    fn the_clients_last_offset_places_it_in_the_trail() {
        let mut t = Trail::default();
        t.base.insert(ch("a"), off("e:4"));
        for (c, o) in [("a", "e:5"), ("b", "f:1"), ("a", "e:6"), ("b", "f:2")] {
            t.wrote(&ch(c), &off(o));
        }
        // b had no position: its first message says where it was.
        assert_eq!(t.base[&ch("b")], off("f:0"));
        // It saw up to a's e:6: b's f:2 may have been lost in flight.
        let (since, known) = t.positions(Some("e:6"));
        assert!(known);
        assert_eq!((at(&since, "a"), at(&since, "b")), ("e:6".into(), "f:1".into()));
        // It saw nothing of the log.
        let (since, known) = t.positions(None);
        assert!(known);
        assert_eq!((at(&since, "a"), at(&since, "b")), ("e:4".into(), "f:0".into()));
        // An offset the trail does not know, or not an offset: not placed.
        assert!(!t.positions(Some("zz:1")).1);
        assert!(!t.positions(Some("hello")).1);
        // What is kept in the broker reads back the same.
        let back: Trail = serde_json::from_str(&serde_json::to_string(&t).unwrap()).unwrap();
        assert_eq!(back.positions(Some("e:6")).0, t.positions(Some("e:6")).0);
    }

    #[test]
    fn the_log_is_bounded_and_folds_into_the_base() {
        let mut t = Trail::default();
        for i in 1..=(TRAIL_LOG as u64 + 10) {
            t.wrote(&ch("a"), &Offset { epoch: Arc::from("e"), seq: i });
        }
        assert_eq!(t.log.len(), TRAIL_LOG);
        assert_eq!(t.base[&ch("a")], off("e:10"));
        // An offset older than the log cannot place the client.
        assert!(!t.positions(Some("e:10")).1);
        assert!(t.positions(Some("e:11")).1);
    }
}
