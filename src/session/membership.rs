//! Joining and leaving a channel, written once for every way a session
//! gets in or out of one (a client's subscribe, the connect hook's or the
//! token's channels, `/api/subscribe`, Socket.IO namespaces and rooms, the
//! bridge's room commands, recovery): the hub first (messages from then on
//! reach the queue), then the broker's subscription and presence, with what
//! succeeded undone when a join that must be confirmed fails; leaving does
//! the same in reverse and drops the session's per-channel state.

use super::*;
use crate::hub::SessionHandle;

/// Whether a failed broker step undoes the join, or the join stands (the
/// broker subscribes when it is back: the hub's interest still names the
/// channel).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OnFailure {
    Undo,
    Keep,
}

/// The broker's half of a join: its subscription, then presence (`Some`:
/// the entry and whether joins are announced).
pub(crate) async fn confirm_join(
    node: &Node,
    handle: &SessionHandle,
    channel: &Channel,
    presence: Option<(String, bool)>,
    on_failure: OnFailure,
) -> Result<(), ApiError> {
    let undo = |e: crate::broker::BrokerError| {
        if on_failure == OnFailure::Undo {
            node.hub.unsubscribe(channel, handle.key);
        }
        ApiError::from(e)
    };
    node.broker.ensure_subscribed(channel).await.map_err(undo)?;
    if let Some((entry, announce)) = presence {
        node.broker.presence_change(channel, &handle.id, entry, true, announce).await.map_err(undo)?;
    }
    Ok(())
}

/// Undoes a confirmed join (a later step of the subscribe failed).
pub(crate) async fn undo_join(
    node: &Node,
    handle: &SessionHandle,
    channel: &Channel,
    presence: Option<(String, bool)>,
) {
    node.hub.unsubscribe(channel, handle.key);
    if let Some((entry, announce)) = presence {
        let _ = node.broker.presence_change(channel, &handle.id, entry, false, announce).await;
    }
}

impl<C: ProtocolFront> Session<C> {
    /// What a join of `channel` records in presence, where its namespace
    /// keeps presence: this session's entry, and whether joins are announced.
    pub(crate) fn presence_of(&self, channel: &Channel) -> Option<(String, bool)> {
        let rule = self.node.cfg.namespaces.rule(channel);
        rule.presence.then(|| (self.presence_entry(), rule.join_leave))
    }

    /// The local half of a join the app made (server-side, a namespace's
    /// rooms): the hub, the session's set, the front's state; the broker's
    /// half follows in the background and the join stands if it fails.
    /// False when already joined.
    pub(crate) fn join_now(&mut self, channel: &Channel) -> Result<bool, crate::hub::NodeLimit> {
        if self.subs.contains(channel) {
            return Ok(false);
        }
        self.node.hub.subscribe(channel, &self.handle)?;
        self.subs.insert(channel.clone());
        self.state_joined(channel);
        Ok(true)
    }

    /// Leaves `channel` if joined: the session's set, then [`drop_channel`](Self::drop_channel).
    pub(crate) fn leave_channel(&mut self, channel: &Channel) -> bool {
        match self.subs.take(channel) {
            Some(ch) => {
                self.drop_channel(&ch);
                true
            }
            None => false,
        }
    }

    /// Leaves `channel`'s presence, in the background (from Drop too).
    pub(crate) fn leave_presence(&self, channel: &Channel) {
        let rule = self.node.cfg.namespaces.rule(channel);
        if !rule.presence {
            return;
        }
        let (node, channel, id, entry, announce) =
            (self.node.clone(), channel.clone(), self.handle.id.clone(), self.presence_entry(), rule.join_leave);
        // From Drop too: only where a runtime still runs (else the entry expires).
        self.node.spawn(async move {
            if let Err(e) = node.broker.presence_change(&channel, &id, entry, false, announce).await {
                tracing::debug!(error = %e, "presence leave not recorded (the entry expires)");
            }
        });
    }

    /// Everything of `channel` but the session's set: the hub, presence (in
    /// the background), the per-channel recovery state, the front's state.
    pub(crate) fn drop_channel(&mut self, channel: &Channel) {
        self.node.hub.unsubscribe(channel, self.handle.key);
        self.leave_presence(channel);
        self.forget(channel);
        self.state_left(channel);
    }
}
