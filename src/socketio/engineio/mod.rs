//! Engine.IO v4 sessions that use HTTP long-polling: what a session's
//! transport and the polling requests share. The server sends packets by
//! queueing them here; a client `GET` takes what is queued (or waits for
//! it), a `POST` hands the client's packets to the session. When the client
//! upgrades to a WebSocket the socket is handed over here too.
//!
//! Every sid names the node that holds it (`<node-id>.<random>`): a polling
//! request that a round-robin proxy sends to another sidecar is forwarded
//! to the right one (see [`super::http`]).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex, MutexGuard};

mod payload;
mod poll;

pub use payload::Payload;
pub use poll::{Closed, Getting, Poll, PollEnd, PollError, Posting, Taken};

/// Separates packets in a polling payload.
pub const SEPARATOR: char = '\u{1e}';

/// Client payloads waiting for the session besides the one it is reading:
/// one POST is in flight at a time (a second one ends the session).
const INBOUND: usize = 1;

/// Packets one polling payload may carry (Engine.IO sets no limit; a
/// client's batch of buffered emits is far below it, and the client rate
/// limit counts each packet anyway).
pub const MAX_PACKETS: usize = 1024;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The polling sessions of this node, by sid, and the sessions (of both
/// transports) that are open but not yet authenticated.
pub struct Registry {
    polls: Mutex<HashMap<Arc<str>, Arc<Poll>>>,
    opening: Arc<tokio::sync::Semaphore>,
    /// Sessions waiting for their CONNECT, per client address.
    by_address: Arc<Mutex<HashMap<IpAddr, usize>>>,
    per_address: usize,
}

/// Why a session cannot open now.
#[derive(Debug, PartialEq, Eq)]
pub enum Busy {
    /// Too many sessions wait for their CONNECT on this node.
    Node,
    /// Too many of them come from this client address.
    Address,
}

/// A place among the sessions waiting for their CONNECT, given back on drop.
pub struct Opening {
    _permit: tokio::sync::OwnedSemaphorePermit,
    address: IpAddr,
    by_address: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl Drop for Opening {
    fn drop(&mut self) {
        let mut map = lock(&self.by_address);
        if let Some(n) = map.get_mut(&self.address) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.address);
            }
        }
    }
}

/// The address a client is counted under: IPv4 as it is, IPv6 by its /64
/// (one host usually has a whole /64).
fn address_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & (u128::MAX << 64))),
        v4 => v4,
    }
}

impl Registry {
    /// At most `opening` sessions may wait for their CONNECT at once (each
    /// holds a connection slot before anyone knows who it is), and at most
    /// `per_address` of them from one client address, so one client's burst
    /// cannot lock the others out.
    pub fn new(opening: usize, per_address: usize) -> Self {
        Registry {
            polls: Mutex::new(HashMap::new()),
            opening: Arc::new(tokio::sync::Semaphore::new(opening)),
            by_address: Arc::new(Mutex::new(HashMap::new())),
            per_address,
        }
    }

    /// A place among the sessions waiting for their CONNECT.
    pub fn try_open(&self, client: IpAddr) -> Result<Opening, Busy> {
        let address = address_key(client);
        let mut map = lock(&self.by_address);
        if map.get(&address).is_some_and(|n| *n >= self.per_address) {
            return Err(Busy::Address);
        }
        // Counted only once it holds a place: a refused address leaves no entry.
        let permit = self.opening.clone().try_acquire_owned().map_err(|_| Busy::Node)?;
        *map.entry(address).or_insert(0) += 1;
        drop(map);
        Ok(Opening { _permit: permit, address, by_address: self.by_address.clone() })
    }

    pub fn insert(&self, poll: Arc<Poll>) {
        lock(&self.polls).insert(poll.sid.clone(), poll);
    }
    pub fn get(&self, sid: &str) -> Option<Arc<Poll>> {
        lock(&self.polls).get(sid).cloned()
    }
    pub fn remove(&self, sid: &str) {
        lock(&self.polls).remove(sid);
    }
    pub fn len(&self) -> usize {
        lock(&self.polls).len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
