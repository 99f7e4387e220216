//! The node-wide budget of queued bytes, and what holds part of it.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::Hub;

/// Bytes of channel messages queued on this node, across every session,
/// under `--max-queued-bytes`: per-connection queue limits alone multiply
/// (10 000 connections × 1024 messages × 64 KiB).
#[derive(Debug)]
pub struct QueueBudget {
    pub(super) used: AtomicUsize,
    pub(super) max: usize,
}

impl QueueBudget {
    pub fn new(max: usize) -> Self {
        QueueBudget { used: AtomicUsize::new(0), max }
    }
    /// Bytes queued now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }
    /// Written or dropped: no longer queued.
    pub fn release(&self, bytes: usize) {
        if bytes > 0 {
            self.used.fetch_sub(bytes, Ordering::AcqRel);
        }
    }

    /// Counts `bytes` unless the budget is used up.
    pub fn try_take(&self, bytes: usize) -> bool {
        let before = self.used.fetch_add(bytes, Ordering::AcqRel);
        if before + bytes > self.max && bytes > 0 {
            self.used.fetch_sub(bytes, Ordering::AcqRel);
            return false;
        }
        true
    }
}

/// Bytes held outside a queue (a client's polling payload) and counted
/// against the node's [`QueueBudget`] until dropped.
pub struct Held {
    hub: Arc<Hub>,
    bytes: usize,
}

impl Held {
    /// Nothing held yet.
    pub fn new(hub: Arc<Hub>) -> Self {
        Held { hub, bytes: 0 }
    }

    /// Holds `bytes` more; false (nothing more held) once the budget is used up.
    pub fn grow(&mut self, bytes: usize) -> bool {
        if !self.hub.budget.try_take(bytes) {
            return false;
        }
        self.bytes += bytes;
        true
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.hub.budget.release(self.bytes);
    }
}

impl std::fmt::Debug for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Held").field("bytes", &self.bytes).finish()
    }
}
