//! Engine.IO v4 sessions that use HTTP long-polling: what a session's
//! transport and the polling requests share. The server sends packets by
//! queueing them here; a client `GET` takes what is queued (or waits for
//! it), a `POST` hands the client's packets to the session. When the client
//! upgrades to a WebSocket the socket is handed over here too.
//!
//! Every sid names the node that holds it (`<node-id>.<random>`): a polling
//! request that a round-robin proxy sends to another sidecar is forwarded
//! to the right one (see [`crate::session::socketio`]).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Utf8Bytes;

/// An upgraded client socket.
pub type Ws = WebSocketStream<TokioIo<Upgraded>>;

/// Separates packets in a polling payload.
pub const SEPARATOR: char = '\u{1e}';

/// Client payloads (POST bodies, each up to maxPayload) waiting for the
/// session: engine.io-client has one POST in flight at a time.
const INBOUND: usize = 4;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The polling sessions of this node, by sid, and the sessions (of both
/// transports) that are open but not yet authenticated.
pub struct Registry {
    polls: Mutex<HashMap<Arc<str>, Arc<Poll>>>,
    opening: Arc<tokio::sync::Semaphore>,
}

impl Registry {
    /// At most `opening` sessions may wait for their CONNECT at once: each
    /// holds a connection slot before anyone knows who it is.
    pub fn new(opening: usize) -> Self {
        Registry { polls: Mutex::new(HashMap::new()), opening: Arc::new(tokio::sync::Semaphore::new(opening)) }
    }

    /// A place among the sessions waiting for their CONNECT (None: full).
    pub fn try_open(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.opening.clone().try_acquire_owned().ok()
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

#[derive(Default)]
struct Out {
    queue: VecDeque<Utf8Bytes>,
    bytes: usize,
    closed: bool,
    /// A GET waiting now should return a noop (an upgrade is under way).
    noop: bool,
    /// A GET has carried the close packet to the client.
    close_sent: bool,
}

/// What a GET gets.
#[derive(Debug, PartialEq, Eq)]
pub enum Taken {
    /// Packets, joined with [`SEPARATOR`].
    Payload(String),
    /// The session is over (`1`, the close packet, was sent once).
    Closed,
}

/// The session is closed.
#[derive(Debug, PartialEq, Eq)]
pub struct Closed;

/// Why a polling request is refused.
#[derive(Debug, PartialEq, Eq)]
pub enum PollError {
    /// Another GET is already waiting on this session.
    Overlap,
    /// The session is gone.
    Gone,
    /// A packet over `--max-message-bytes` (the session is closed).
    TooLarge,
}

/// One polling session's shared state.
pub struct Poll {
    pub sid: Arc<str>,
    out: Mutex<Out>,
    /// Something for a GET: packets, a close, a noop.
    ready: Notify,
    /// A GET took packets: room for the session to write.
    room: Notify,
    inbound: mpsc::Sender<String>,
    /// Longest packet a POST may carry (`--max-message-bytes`).
    max_packet: usize,
    upgrade: Mutex<Option<oneshot::Sender<Ws>>>,
    getting: AtomicBool,
    /// Cancelled when the session is over (closed by either side).
    ended: tokio_util::sync::CancellationToken,
    /// Bytes queued at most (and per GET response): `maxPayload`.
    cap: usize,
}

/// The session's side of a polling session.
pub struct PollEnd {
    pub inbound: mpsc::Receiver<String>,
    pub upgrade: oneshot::Receiver<Ws>,
}

struct Getting<'a>(&'a AtomicBool);

impl Drop for Getting<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl Poll {
    pub fn new(sid: Arc<str>, cap: usize, max_packet: usize) -> (Arc<Poll>, PollEnd) {
        let (tx, inbound) = mpsc::channel(INBOUND);
        let (up_tx, upgrade) = oneshot::channel();
        let poll = Arc::new(Poll {
            sid,
            out: Mutex::new(Out::default()),
            ready: Notify::new(),
            room: Notify::new(),
            inbound: tx,
            max_packet,
            upgrade: Mutex::new(Some(up_tx)),
            getting: AtomicBool::new(false),
            ended: tokio_util::sync::CancellationToken::new(),
            cap,
        });
        (poll, PollEnd { inbound, upgrade })
    }

    /// Queues a packet for the next GET. Ok(false) when the queue is full
    /// (wait for [`room`](Self::room)); Err once closed.
    pub fn push(&self, packet: &Utf8Bytes) -> Result<bool, Closed> {
        let mut out = lock(&self.out);
        if out.closed {
            return Err(Closed);
        }
        if !out.queue.is_empty() && out.bytes + packet.len() > self.cap {
            return Ok(false);
        }
        out.bytes += packet.len();
        out.queue.push_back(packet.clone());
        Ok(true)
    }

    /// Wakes a waiting GET (after pushes).
    pub fn flush(&self) {
        self.ready.notify_one();
    }

    /// A future that completes when a GET made room (create it before
    /// [`push`](Self::push) fails, so a wake-up in between is not lost).
    pub fn room(&self) -> tokio::sync::futures::Notified<'_> {
        self.room.notified()
    }

    /// Ends the session: the next (or waiting) GET gets the close packet.
    pub fn close(&self) {
        lock(&self.out).closed = true;
        self.ready.notify_one();
        self.ended.cancel();
    }

    /// Completes once the session is closed.
    pub fn ended(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.ended.cancelled()
    }

    /// An upgrade probe succeeded: a waiting GET returns a noop, so the
    /// client can pause polling.
    pub fn noop(&self) {
        lock(&self.out).noop = true;
        self.ready.notify_one();
    }

    /// Hands the upgraded socket to the session (false if it is gone or
    /// already upgraded).
    pub fn hand_over(&self, ws: Ws) -> bool {
        match lock(&self.upgrade).take() {
            Some(tx) => tx.send(ws).is_ok(),
            None => false,
        }
    }

    /// Whether an upgrade can still happen.
    pub fn can_upgrade(&self) -> bool {
        lock(&self.upgrade).is_some()
    }

    /// The session switched to a WebSocket: what is still queued goes there.
    pub fn take_all(&self) -> VecDeque<Utf8Bytes> {
        let mut out = lock(&self.out);
        out.bytes = 0;
        out.noop = true;
        let q = std::mem::take(&mut out.queue);
        drop(out);
        self.ready.notify_one();
        self.room.notify_waiters();
        q
    }

    /// A GET: what is queued, waiting up to `wait` for something (then a
    /// noop, `6`).
    pub async fn get(&self, wait: Duration) -> Result<Taken, PollError> {
        if self.getting.swap(true, Ordering::AcqRel) {
            return Err(PollError::Overlap);
        }
        let _guard = Getting(&self.getting);
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let ready = self.ready.notified();
            tokio::pin!(ready);
            ready.as_mut().enable();
            {
                let mut out = lock(&self.out);
                if !out.queue.is_empty() {
                    let mut payload = String::new();
                    while let Some(p) = out.queue.front() {
                        if !payload.is_empty() && payload.len() + p.len() + 1 > self.cap {
                            break;
                        }
                        if !payload.is_empty() {
                            payload.push(SEPARATOR);
                        }
                        payload.push_str(p.as_str());
                        out.bytes -= p.len();
                        out.queue.pop_front();
                    }
                    // The close packet, if closed, goes in the next GET: not
                    // in this payload. socket.io-client hands decoded events
                    // to the socket on the next tick but acts on a close at
                    // once, so events before it in one payload would reach a
                    // disconnected socket, be buffered past the offset it
                    // reconnects with, and come twice after a recovery.
                    drop(out);
                    self.room.notify_waiters();
                    return Ok(Taken::Payload(payload));
                }
                if out.closed {
                    out.close_sent = true;
                    drop(out);
                    self.room.notify_waiters();
                    return Ok(Taken::Closed);
                }
                if out.noop {
                    out.noop = false;
                    return Ok(Taken::Payload("6".to_owned()));
                }
            }
            tokio::select! {
                () = ready => {}
                () = tokio::time::sleep_until(deadline) => return Ok(Taken::Payload("6".to_owned())),
            }
        }
    }

    /// A POST: the client's payload (packets joined by [`SEPARATOR`]), in
    /// one piece, to the session. Waits while the session has [`INBOUND`]
    /// payloads unread (back-pressure); a packet over the size limit closes
    /// the session.
    pub async fn post(&self, payload: String) -> Result<(), PollError> {
        if payload.split(SEPARATOR).any(|p| p.len() > self.max_packet) {
            self.close();
            return Err(PollError::TooLarge);
        }
        self.inbound.send(payload).await.map_err(|_| PollError::Gone)
    }

    /// A GET has taken everything, the close packet included.
    pub fn close_sent(&self) -> bool {
        lock(&self.out).close_sent
    }

    pub fn is_closed(&self) -> bool {
        lock(&self.out).closed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_oversized_packet_closes_the_session() {
        let (poll, mut end) = Poll::new(Arc::from("n.1"), 1000, 4);
        assert_eq!(poll.post("42[]\u{1e}42[1]".to_owned()).await, Err(PollError::TooLarge));
        assert!(poll.is_closed());
        assert!(end.inbound.try_recv().is_err());
    }

    #[tokio::test]
    async fn get_takes_queued_packets_up_to_the_cap() {
        let (poll, _end) = Poll::new(Arc::from("n.1"), 8, 100);
        assert_eq!(poll.push(&Utf8Bytes::from("42[1]")), Ok(true));
        assert_eq!(poll.push(&Utf8Bytes::from("42[2]")), Ok(false));
        assert_eq!(poll.get(Duration::from_millis(10)).await, Ok(Taken::Payload("42[1]".into())));
        assert_eq!(poll.get(Duration::from_millis(10)).await, Ok(Taken::Payload("6".into())));
        assert_eq!(poll.push(&Utf8Bytes::from("41")), Ok(true));
        poll.close();
        // What is left, then (in a response of its own) the close packet.
        assert_eq!(poll.get(Duration::from_millis(10)).await, Ok(Taken::Payload("41".into())));
        assert!(!poll.close_sent());
        assert_eq!(poll.get(Duration::from_millis(10)).await, Ok(Taken::Closed));
        assert!(poll.close_sent());
        assert_eq!(poll.push(&Utf8Bytes::from("2")), Err(Closed));
    }
}
