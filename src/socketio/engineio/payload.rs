//! A client's polling payload, walked in place.

use bytes::Bytes;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::hub::Held;

use super::SEPARATOR;

/// A client's polling payload (a POST body, valid UTF-8), kept as the one
/// buffer it arrived in and walked packet by packet; counted against the
/// node's queue budget until dropped.
#[derive(Debug)]
pub struct Payload {
    text: Bytes,
    pos: usize,
    done: bool,
    _held: Option<Held>,
}

impl Payload {
    pub fn new(text: Utf8Bytes, held: Option<Held>) -> Self {
        Payload { text: Bytes::from(text), pos: 0, done: false, _held: held }
    }

    /// How many packets it carries, the longest one's length, and whether
    /// each starts as a client's packet may (`1`–`6`, or `b`: base64 binary).
    pub(super) fn shape(&self) -> (usize, usize, bool) {
        self.text.split(|b| *b == SEPARATOR as u8).fold((0, 0, true), |(n, max, ok), p| {
            (n + 1, max.max(p.len()), ok && matches!(p.first(), Some(b'1'..=b'6' | b'b')))
        })
    }

    /// The next packet, a slice of the payload (no copy).
    pub fn next_packet(&mut self) -> Option<Utf8Bytes> {
        if self.done {
            return None;
        }
        let rest = &self.text[self.pos..];
        let end = match rest.iter().position(|b| *b == SEPARATOR as u8) {
            Some(i) => self.pos + i,
            None => {
                self.done = true;
                self.text.len()
            }
        };
        let packet = self.text.slice(self.pos..end);
        self.pos = end + 1;
        // Cut at an ASCII separator inside valid UTF-8: valid UTF-8.
        Some(Utf8Bytes::try_from(packet).unwrap_or_default())
    }
}
