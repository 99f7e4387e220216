//! One polling session's shared state: what GETs take and POSTs bring.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, mpsc, oneshot};
use tokio_tungstenite::tungstenite::Utf8Bytes;

use super::payload::Payload;
use super::{INBOUND, MAX_PACKETS, SEPARATOR, lock};
use crate::session::transport::Ws;

#[derive(Default)]
struct Out {
    queue: VecDeque<Utf8Bytes>,
    bytes: usize,
    closed: bool,
    /// A GET waiting now should return a noop (an upgrade is under way).
    noop: bool,
    /// A GET has carried the close packet to the client.
    close_sent: bool,
    /// The client closed the session (its `1`).
    by_client: bool,
    /// Closed without a word to the client (a ping timeout): every GET
    /// gets `400`.
    discarded: bool,
    /// A ping is unanswered, and past this the session is over: a GET that
    /// comes later gets `400`, whichever of it and the session's own timer
    /// runs first.
    pong_due: Option<tokio::time::Instant>,
}

/// What a GET gets.
#[derive(Debug, PartialEq, Eq)]
pub enum Taken {
    /// Packets, joined with [`SEPARATOR`].
    Payload(String),
    /// The session is over (`1`, the close packet, was sent once).
    Closed,
}

/// Why a packet cannot be queued.
#[derive(Debug, PartialEq, Eq)]
pub enum Closed {
    /// The session is closed.
    Closed,
    /// It is longer than a response may be (`maxPayload`): never sent.
    TooLarge,
}

/// Why a polling request is refused.
#[derive(Debug, PartialEq, Eq)]
pub enum PollError {
    /// Another GET (or POST) is already under way on this session: the
    /// session is closed, as Engine.IO does.
    Overlap,
    /// The session is gone.
    Gone,
    /// A packet over `--max-message-bytes` (the session is closed).
    TooLarge,
    /// More than [`MAX_PACKETS`] packets in one payload (the session is closed).
    TooMany,
    /// A packet of no type a client sends (the session is closed).
    Invalid,
}

/// One polling session's shared state.
pub struct Poll {
    pub sid: Arc<str>,
    out: Mutex<Out>,
    /// Something for a GET: packets, a close, a noop.
    ready: Notify,
    /// A GET took packets: room for the session to write.
    room: Notify,
    inbound: mpsc::Sender<Payload>,
    /// Longest packet a POST may carry (`--max-message-bytes`).
    max_packet: usize,
    upgrade: Mutex<Option<oneshot::Sender<Ws>>>,
    getting: AtomicBool,
    posting: AtomicBool,
    /// Set when a waiting GET's client went away.
    abandoned: AtomicBool,
    /// Cancelled when the session is over (closed by either side).
    ended: tokio_util::sync::CancellationToken,
    /// Bytes queued at most (and per GET response unless one packet is longer).
    cap: usize,
    /// Bytes a response may carry at most: `maxPayload`.
    max_response: usize,
}

/// The session's side of a polling session.
pub struct PollEnd {
    pub inbound: mpsc::Receiver<Payload>,
    pub upgrade: oneshot::Receiver<Ws>,
}

/// A GET under way on a session, until its response body is gone: over
/// HTTP/2 a response the client does not read (window 0) keeps it, so a
/// client cannot pile up unread responses on one session.
pub struct Getting(Arc<Poll>);

impl Drop for Getting {
    fn drop(&mut self) {
        self.0.getting.store(false, Ordering::Release);
    }
}

/// A POST under way on a session (one at a time).
pub struct Posting<'a>(&'a AtomicBool);

impl Drop for Posting<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl Poll {
    pub fn new(sid: Arc<str>, cap: usize, max_packet: usize, max_response: usize) -> (Arc<Poll>, PollEnd) {
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
            posting: AtomicBool::new(false),
            abandoned: AtomicBool::new(false),
            ended: tokio_util::sync::CancellationToken::new(),
            cap,
            max_response: max_response.max(cap),
        });
        (poll, PollEnd { inbound, upgrade })
    }

    /// Queues a packet for the next GET. Ok(false) when the queue is full
    /// (wait for [`room`](Self::room)); Err once closed, or for a packet
    /// that no response may carry (longer than `maxPayload`).
    pub fn push(&self, packet: &Utf8Bytes) -> Result<bool, Closed> {
        let mut out = lock(&self.out);
        if out.closed {
            return Err(Closed::Closed);
        }
        if packet.len() > self.max_response {
            return Err(Closed::TooLarge);
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

    /// Ends the session without telling the client (it stopped answering
    /// pings): what is queued is dropped, and every GET, a waiting one too,
    /// gets `400`.
    pub fn discard(&self) {
        {
            let mut out = lock(&self.out);
            out.discarded = true;
            out.queue.clear();
            out.bytes = 0;
        }
        self.room.notify_waiters();
        self.close();
    }

    /// A ping went out and its pong is due by `due` (None: it came).
    pub fn pong_due(&self, due: Option<tokio::time::Instant>) {
        lock(&self.out).pong_due = due;
    }

    /// The client sent `1`: a GET waiting gets a noop, and the session ends.
    pub fn close_by_client(&self) {
        lock(&self.out).by_client = true;
        self.close();
    }

    /// Ends the session: a GET waiting gets the close packet (what is queued
    /// first); a GET that comes after gets `400`, the sid unknown, as from
    /// Engine.IO.
    pub fn close(&self) {
        lock(&self.out).closed = true;
        self.ready.notify_one();
        self.ended.cancel();
    }

    /// A GET was waiting and its client went away (the connection closed,
    /// the tab navigated): the session ends now, as Engine.IO's "poll
    /// connection closed prematurely", not a ping timeout later.
    pub fn abandon(&self) {
        self.abandoned.store(true, Ordering::Release);
        self.close();
    }

    /// Whether the session ended because a waiting GET was abandoned.
    pub fn abandoned(&self) -> bool {
        self.abandoned.load(Ordering::Acquire)
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
    /// noop, `6`), and the mark of a GET under way, to keep as long as the
    /// response. A second GET meanwhile closes the session.
    pub async fn get(self: &Arc<Self>, wait: Duration) -> Result<(Taken, Getting), PollError> {
        if self.getting.swap(true, Ordering::AcqRel) {
            self.close();
            return Err(PollError::Overlap);
        }
        let guard = Getting(self.clone());
        self.take(wait).await.map(|t| (t, guard))
    }

    async fn take(&self, wait: Duration) -> Result<Taken, PollError> {
        let deadline = tokio::time::Instant::now() + wait;
        // Whether this GET was waiting when the session closed.
        let mut waited = false;
        let late = lock(&self.out).pong_due.is_some_and(|due| due <= tokio::time::Instant::now());
        if late {
            self.discard();
        }
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
                    // Never a close packet in this payload, if closed: the
                    // next GET gets 400. socket.io-client hands decoded
                    // events to the socket on the next tick but acts on a
                    // close at once, so events before it in one payload would
                    // reach a disconnected socket, be buffered past the
                    // offset it reconnects with, and come twice after a
                    // recovery.
                    drop(out);
                    self.room.notify_waiters();
                    return Ok(Taken::Payload(payload));
                }
                if out.closed {
                    let first = !out.close_sent;
                    out.close_sent = true;
                    let (by_client, discarded) = (out.by_client, out.discarded);
                    drop(out);
                    self.room.notify_waiters();
                    return if discarded {
                        Err(PollError::Gone)
                    } else if by_client && first {
                        // The client's own `1`: the GET beside its POST (waiting
                        // or just behind it) gets a noop.
                        Ok(Taken::Payload("6".to_owned()))
                    } else if waited && !by_client {
                        Ok(Taken::Closed)
                    } else {
                        Err(PollError::Gone)
                    };
                }
                if out.noop {
                    out.noop = false;
                    return Ok(Taken::Payload("6".to_owned()));
                }
            }
            tokio::select! {
                () = ready => waited = true,
                () = tokio::time::sleep_until(deadline) => return Ok(Taken::Payload("6".to_owned())),
            }
        }
    }

    /// Marks a POST under way; a second one at the same time closes the
    /// session (engine.io-client never overlaps them).
    pub fn begin_post(&self) -> Result<Posting<'_>, PollError> {
        if self.posting.swap(true, Ordering::AcqRel) {
            self.close();
            return Err(PollError::Overlap);
        }
        Ok(Posting(&self.posting))
    }

    /// A POST: the client's payload (packets joined by [`SEPARATOR`]), in
    /// one piece, to the session. Waits while the session has a payload
    /// unread (back-pressure), or until the session ends; a packet over the
    /// size limit, or too many packets, close the session.
    pub async fn post(&self, payload: Payload) -> Result<(), PollError> {
        let (packets, longest, valid) = payload.shape();
        if packets > MAX_PACKETS {
            self.close();
            return Err(PollError::TooMany);
        }
        if !valid {
            self.close();
            return Err(PollError::Invalid);
        }
        if longest > self.max_packet {
            self.close();
            return Err(PollError::TooLarge);
        }
        tokio::select! {
            r = self.inbound.send(payload) => r.map_err(|_| PollError::Gone),
            () = self.ended.cancelled() => Err(PollError::Gone),
        }
    }

    /// Nothing is left for a GET to take (or one has taken the close): what
    /// was queued, or the noop owed to the GET beside a client's `1`.
    pub fn drained(&self) -> bool {
        let out = lock(&self.out);
        out.close_sent || (out.queue.is_empty() && !out.by_client)
    }

    pub fn is_closed(&self) -> bool {
        lock(&self.out).closed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::socketio::engineio::{Busy, Registry};
    use std::net::IpAddr;
    use std::time::Duration;

    #[tokio::test]
    async fn an_oversized_packet_closes_the_session() {
        let (poll, mut end) = Poll::new(Arc::from("n.1"), 1000, 4, 1000);
        assert_eq!(poll.post(Payload::new("42[]\u{1e}42[1]".into(), None)).await, Err(PollError::TooLarge));
        assert!(poll.is_closed());
        assert!(end.inbound.try_recv().is_err());
    }

    #[tokio::test]
    async fn get_takes_queued_packets_up_to_the_cap() {
        let (poll, _end) = Poll::new(Arc::from("n.1"), 8, 100, 8);
        assert_eq!(poll.push(&Utf8Bytes::from("42[1]")), Ok(true));
        assert_eq!(poll.push(&Utf8Bytes::from("42[2]")), Ok(false));
        assert_eq!(poll.take(Duration::from_millis(10)).await, Ok(Taken::Payload("42[1]".into())));
        assert_eq!(poll.take(Duration::from_millis(10)).await, Ok(Taken::Payload("6".into())));
        assert_eq!(poll.push(&Utf8Bytes::from("41")), Ok(true));
        poll.close();
        // What is left; then the session is gone (Engine.IO's 400).
        assert!(!poll.drained());
        assert_eq!(poll.take(Duration::from_millis(10)).await, Ok(Taken::Payload("41".into())));
        assert!(poll.drained());
        assert_eq!(poll.take(Duration::from_millis(10)).await, Err(PollError::Gone));
        assert_eq!(poll.push(&Utf8Bytes::from("2")), Err(Closed::Closed));

        // A GET waiting when the server closes gets the close packet; when
        // the client closes (its `1`), a noop.
        for (by_client, want) in [(false, Taken::Closed), (true, Taken::Payload("6".into()))] {
            let (poll, _end) = Poll::new(Arc::from("n.2"), 8, 100, 8);
            let waiting = tokio::spawn({
                let poll = poll.clone();
                async move { poll.take(Duration::from_secs(5)).await }
            });
            tokio::time::sleep(Duration::from_millis(20)).await;
            if by_client {
                poll.close_by_client();
            } else {
                poll.close();
            }
            assert_eq!(waiting.await.unwrap(), Ok(want));
        }

        // One packet may fill a response alone, up to maxPayload, never more.
        let (poll, _end) = Poll::new(Arc::from("n.3"), 8, 100, 16);
        assert_eq!(poll.push(&Utf8Bytes::from("42[\"0123456789\"]")), Ok(true));
        assert_eq!(poll.push(&Utf8Bytes::from("42[\"0123456789ab\"]")), Err(Closed::TooLarge));
    }

    #[test]
    fn a_payload_is_walked_in_place() {
        let mut p = Payload::new("40\u{1e}42[\"é\"]\u{1e}6".into(), None);
        assert_eq!(p.shape(), (3, "42[\"é\"]".len(), true));
        let packets: Vec<String> = std::iter::from_fn(|| p.next_packet()).map(|u| u.as_str().to_owned()).collect();
        assert_eq!(packets, ["40", "42[\"é\"]", "6"]);
        let mut empty = Payload::new("".into(), None);
        assert_eq!(empty.next_packet().as_deref(), Some(""));
        assert_eq!(empty.next_packet(), None);
    }

    #[tokio::test]
    async fn too_many_packets_close_the_session() {
        let (poll, _end) = Poll::new(Arc::from("n.1"), 1000, 100, 1000);
        let body = vec!["6"; MAX_PACKETS + 1].join("\u{1e}");
        assert_eq!(poll.post(Payload::new(body.into(), None)).await, Err(PollError::TooMany));
        assert!(poll.is_closed());
    }

    #[tokio::test]
    async fn overlapping_requests_close_the_session() {
        let (poll, _end) = Poll::new(Arc::from("n.1"), 1000, 100, 1000);
        let first = poll.begin_post().unwrap();
        assert!(matches!(poll.begin_post(), Err(PollError::Overlap)));
        assert!(poll.is_closed());
        drop(first);

        let (poll, _end) = Poll::new(Arc::from("n.2"), 1000, 100, 1000);
        assert_eq!(poll.push(&Utf8Bytes::from("42[1]")), Ok(true));
        // The first GET's response is not gone yet (an HTTP/2 client that
        // does not read it): a second GET is an overlap.
        let (taken, getting) = poll.get(Duration::from_millis(10)).await.unwrap();
        assert_eq!(taken, Taken::Payload("42[1]".into()));
        assert!(matches!(poll.get(Duration::from_millis(10)).await, Err(PollError::Overlap)));
        assert!(poll.is_closed());
        drop(getting);
    }

    #[test]
    fn opening_is_limited_per_address_and_in_total() {
        let reg = Registry::new(4, 2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let a1 = reg.try_open(a).unwrap();
        let _a2 = reg.try_open(a).unwrap();
        assert_eq!(reg.try_open(a).err(), Some(Busy::Address));
        // Another address still gets in; the same /64 is the same client.
        let _b1 = reg.try_open("2001:db8::1".parse().unwrap()).unwrap();
        let _b2 = reg.try_open("2001:db8::2".parse().unwrap()).unwrap();
        assert_eq!(reg.try_open("2001:db8::3".parse().unwrap()).err(), Some(Busy::Address));
        // The node is full.
        assert_eq!(reg.try_open("10.0.0.9".parse().unwrap()).err(), Some(Busy::Node));
        drop(a1);
        let _a3 = reg.try_open(a).unwrap();
        assert_eq!(lock(&reg.by_address).len(), 2);
    }
}
