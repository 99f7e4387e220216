//! A front's per-socket state beside the loop (Socket.IO: the recovery
//! trail), behind a trait the loop calls without knowing the protocol.

use super::*;

/// What a front keeps per socket beside the session loop (Socket.IO: the
/// recovery trail): the loop, which knows no protocol, tells it what it
/// wrote, joined and left, and hands it over when the session ends.
pub(crate) trait SocketState: Send + Sync {
    /// A channel message with an offset was written to the client.
    fn wrote(&mut self, m: &Message);
    /// The socket joined a channel.
    fn joined(&mut self, channel: &Channel);
    /// The socket left a channel.
    fn left(&mut self, channel: &Channel);
    /// The session ended for `reason`; `queued` are the membership changes
    /// that reached its queue but not the socket.
    fn ended(self: Box<Self>, node: &Arc<Node>, reason: CloseReason, queued: Vec<SessionCommand>);
}

impl<C: ProtocolFront> Session<C> {
    /// Hands the front's state over as the session ends, with the
    /// membership changes still queued (their bytes given back).
    pub(super) fn end_state(&mut self, reason: CloseReason) {
        let Some(state) = self.state.take() else { return };
        let mut queued = Vec::new();
        if let Some(rx) = self.rx.as_mut() {
            while let Ok(out) = rx.try_recv() {
                self.node.hub.budget().release(out.weight());
                if let Outbound::Command(cmd) = out {
                    if matches!(*cmd, SessionCommand::Subscribe(..) | SessionCommand::Unsubscribe(..)) {
                        queued.push(*cmd);
                    }
                }
            }
        }
        state.ended(&self.node, reason, queued);
    }

    pub(super) fn state_joined(&mut self, channel: &Channel) {
        if let Some(s) = &mut self.state {
            s.joined(channel);
        }
    }

    pub(crate) fn state_left(&mut self, channel: &Channel) {
        if let Some(s) = &mut self.state {
            s.left(channel);
        }
    }
}
