//! The seam between the loop and a client protocol's own requests.

use super::{Pending, Session};
use crate::protocol::Codec;

/// A client protocol as the session loop sees it: its codec, and the
/// handling of the protocol's own requests ([`Request::Own`]), which the
/// core does not know. wsrelay.v1 has none; Socket.IO's front handles its
/// events, acks and namespaces (`crate::socketio::requests`).
pub(crate) trait ProtocolFront: Codec + Sized {
    /// What the front keeps of each socket beside the loop's state
    /// (Socket.IO: the open request's head, for further namespaces);
    /// `()` for a front that keeps nothing.
    type Socket: Default + Send + Sync;

    /// One of the protocol's own requests; a future when it waits on
    /// something (its `Done` may carry [`Done::front`] back to
    /// [`resume`](Self::resume)).
    fn handle(s: &mut Session<Self>, id: Option<Self::Id>, req: Self::Own) -> Option<Pending<Self::Id>>;
    /// Whether the client can answer `call` now (Socket.IO: it is
    /// connected to the call's namespace).
    fn can_answer(s: &Session<Self>, call: &crate::hub::Call) -> bool {
        let _ = (s, call);
        true
    }
    /// What the front's own pending request left for it.
    fn resume(s: &mut Session<Self>, id: Option<Self::Id>, left: Box<dyn std::any::Any + Send>) {
        let _ = (s, id, left);
    }
}
