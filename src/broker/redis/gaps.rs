//! Where a channel's delivery stands on this node, as a plain value: what
//! a live message means given the last offset delivered (in order, a
//! duplicate, after a hole, or in a new epoch). The subscriber acts on it.

use crate::protocol::Offset;

/// What a live message at some offset means for its channel, given where
/// this node's delivery of the channel stands (`last`).
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Arrival {
    /// Already delivered (caught up from history, or a duplicate): dropped.
    Duplicate,
    /// The next one, or a channel not tracked: delivered.
    Next,
    /// The history was lost and started again: what the old epoch did not
    /// deliver is gone (a gap), and the new epoch is read from its start
    /// (`fill`, when something precedes this message) before it.
    NewEpoch { fill: Option<Offset> },
    /// Messages after `last` were missed: read from history before it.
    Missed { last: Offset },
}

pub(super) fn arrival(last: Option<&Offset>, off: &Offset) -> Arrival {
    let Some(last) = last else { return Arrival::Next };
    if !last.epoch.is_empty() && *last.epoch == *off.epoch && off.seq <= last.seq {
        return Arrival::Duplicate;
    }
    if !last.epoch.is_empty() && *last.epoch != *off.epoch {
        let fill = (off.seq > 1).then(|| Offset { epoch: off.epoch.clone(), seq: 0 });
        return Arrival::NewEpoch { fill };
    }
    // An empty epoch: the channel had no history when tracked.
    let expected = if last.epoch.is_empty() { 1 } else { last.seq.saturating_add(1) };
    if off.seq > expected { Arrival::Missed { last: last.clone() } } else { Arrival::Next }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn off(epoch: &str, seq: u64) -> Offset {
        Offset { epoch: Arc::from(epoch), seq }
    }

    #[test]
    fn live_messages_are_placed_against_what_was_delivered() {
        // Not tracked (no history): delivered as it comes.
        assert_eq!(arrival(None, &off("e", 5)), Arrival::Next);
        // In order, then duplicates (caught up from history, or twice).
        assert_eq!(arrival(Some(&off("e", 4)), &off("e", 5)), Arrival::Next);
        assert_eq!(arrival(Some(&off("e", 5)), &off("e", 5)), Arrival::Duplicate);
        assert_eq!(arrival(Some(&off("e", 9)), &off("e", 5)), Arrival::Duplicate);
        // A hole: what is between is read from history first.
        assert_eq!(arrival(Some(&off("e", 4)), &off("e", 7)), Arrival::Missed { last: off("e", 4) });
        // Tracked before anything was published (empty epoch): 1 is next.
        assert_eq!(arrival(Some(&off("", 0)), &off("e", 1)), Arrival::Next);
        assert_eq!(arrival(Some(&off("", 0)), &off("e", 3)), Arrival::Missed { last: off("", 0) });
        // A new epoch (history lost): a gap, and the new epoch read from 0.
        assert_eq!(arrival(Some(&off("a", 9)), &off("b", 1)), Arrival::NewEpoch { fill: None });
        assert_eq!(arrival(Some(&off("a", 9)), &off("b", 4)), Arrival::NewEpoch { fill: Some(off("b", 0)) });
    }
}
