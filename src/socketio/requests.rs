//! Socket.IO's own requests, handled by its front: events for the app (the
//! message hook), acknowledgements of app calls, and further namespaces on
//! one connection (CONNECT, DISCONNECT). The session loop knows none of
//! them: it hands them over through [`ProtocolFront`].

use std::any::Any;
use std::future::Future;
use std::sync::Arc;

use serde_json::value::RawValue;

use crate::channel::Channel;
use crate::error::ApiError;
use crate::hub::Outbound;
use crate::protocol::socketio::{self, SioRequest, SocketIo};
use crate::session::{Done, OnFailure, Pending, ProtocolFront, Session, confirm_join};

/// A further Socket.IO namespace, as its CONNECT ended.
struct Joined {
    namespace: Arc<str>,
    /// The app's rooms in it, or why it is refused.
    result: Result<Vec<Channel>, ApiError>,
    /// When its token expires (JWT), if it does.
    expires: Option<u64>,
}

/// What the Socket.IO front keeps of a socket beside the loop: the open
/// request's head, the client's address and the transport, for the connect
/// hook of further namespaces.
#[derive(Default)]
pub(crate) struct SioSocket {
    pub(crate) origin: Option<Arc<(http::Request<()>, std::net::SocketAddr, &'static str)>>,
}

impl ProtocolFront for SocketIo {
    type Socket = SioSocket;

    fn handle(s: &mut Session<Self>, id: Option<Self::Id>, req: SioRequest) -> Option<Pending<Self::Id>> {
        match req {
            SioRequest::Emit { namespace, event, args, ack, attachments } => {
                if s.subs.iter().any(|c| socketio::in_namespace(c, &namespace)) {
                    return Some(Session::<SocketIo>::pending(id, s.emit(namespace, event, args, ack, attachments)));
                }
                let e = ApiError::bad_request(format!("not connected to namespace {namespace:?}"));
                s.reply(id.as_ref(), Err(&e));
                None
            }
            SioRequest::Ack { ack, args, attachments } => {
                s.acked(ack, &args, attachments.as_deref());
                None
            }
            SioRequest::Connect { namespace, auth } => {
                s.connect_namespace(namespace, auth).map(|fut| Session::<SocketIo>::pending(None, fut))
            }
            SioRequest::Leave { namespace } => {
                s.leave_namespace(&namespace);
                None
            }
        }
    }

    fn can_answer(s: &Session<Self>, call: &crate::hub::Call) -> bool {
        s.subs.iter().any(|c| socketio::in_namespace(c, &call.namespace))
    }

    fn resume(s: &mut Session<Self>, _id: Option<Self::Id>, left: Box<dyn Any + Send>) {
        if let Ok(joined) = left.downcast::<Joined>() {
            s.join_namespace(*joined);
        }
    }
}

impl Session<SocketIo> {
    /// A Socket.IO event for the app: the message hook answers it (and its
    /// answer is the acknowledgement when the client asked for one).
    fn emit(
        &self,
        namespace: Arc<str>,
        event: Arc<str>,
        args: Box<RawValue>,
        ack: bool,
        attachments: Option<crate::protocol::Attachments>,
    ) -> impl Future<Output = Done> + Send + 'static {
        let node = self.node.clone();
        let handle = self.handle.clone();
        let ident = self.ident.clone();
        async move {
            let event = crate::auth::Event {
                namespace: &namespace,
                event: &event,
                args: &args,
                ack,
                attachments: attachments.as_deref(),
            };
            Done::reply(node.auth.emit(&ident, &handle.id, event).await)
        }
    }

    /// The client answered a call.
    fn acked(&mut self, ack: u64, args: &RawValue, attachments: Option<&[Box<str>]>) {
        use crate::hub::CallAnswer;
        let answer = match attachments {
            Some(a) => CallAnswer::Binary {
                args: args.get().to_owned(),
                attachments: a.iter().map(|x| x.to_string()).collect(),
            },
            None => CallAnswer::Args(args.get().to_owned()),
        };
        match self.calls.remove(&ack) {
            Some(call) => self.node.answer_call(call, answer),
            None => tracing::debug!(ack, "acknowledgement for no pending call: ignored"),
        }
    }

    /// Socket.IO: the client connects one more namespace on this connection.
    /// The connect hook (or the JWT) is asked again, with that namespace and
    /// its `auth`; it must be the same user. None when it is connected already.
    fn connect_namespace(
        &mut self,
        namespace: Arc<str>,
        auth: Option<Box<RawValue>>,
    ) -> Option<impl Future<Output = Done> + Send + 'static> {
        if self.subs.iter().any(|c| socketio::in_namespace(c, &namespace)) {
            return None;
        }
        let node = self.node.clone();
        let origin = self.own.origin.clone();
        let user = self.ident.user.clone();
        let connection = self.handle.id.clone();
        Some(async move {
            let mut expires = None;
            let result = match origin.as_deref() {
                None => Err(ApiError::bad_request("this connection cannot open namespaces")),
                Some((head, remote, transport)) => {
                    let sio = crate::auth::SioConnect { namespace: &namespace, auth: auth.as_deref() };
                    let who = crate::auth::Connecting { connection: &connection, transport, sio: Some(sio) };
                    match node.auth.authenticate_with(head, *remote, who).await {
                        Ok(ident) if ident.user == user => {
                            expires = ident.expires;
                            Ok(ident.channels)
                        }
                        Ok(_) => Err(ApiError::forbidden("a connection's namespaces belong to one user")),
                        Err(r) => {
                            r.error.log("Socket.IO namespace CONNECT refused");
                            Err(r.error)
                        }
                    }
                }
            };
            Done::front(Box::new(Joined { namespace, result, expires }))
        })
    }

    /// A further namespace's CONNECT ended: its sockets are in the
    /// namespace's channel, the room named by the connection id and the
    /// app's rooms; or it is refused (CONNECT_ERROR).
    fn join_namespace(&mut self, joined: Joined) {
        let Joined { namespace, result, expires } = joined;
        let rooms = match result {
            Ok(rooms) => rooms,
            Err(why) => {
                self.send_frame(SocketIo::connect_error(&namespace, &why.message));
                return;
            }
        };
        let mut channels = Vec::new();
        let own = [socketio::namespace_channel(&namespace), socketio::room_channel(&namespace, &self.handle.id)];
        for c in own.into_iter().chain(rooms.iter().map(|r| socketio::room_channel(&namespace, r))) {
            match c {
                Ok(c) if !channels.contains(&c) => channels.push(c),
                Ok(_) => {}
                Err(_) => {
                    self.send_frame(SocketIo::connect_error(&namespace, "invalid namespace or room"));
                    return;
                }
            }
        }
        let max = self.node.cfg.session.max_subscriptions;
        if self.subs.len() + channels.len() > max {
            self.send_frame(SocketIo::connect_error(&namespace, "too many rooms (max-subscriptions)"));
            return;
        }
        let mut joined = Vec::new();
        for ch in &channels {
            match self.join_now(ch) {
                Ok(true) => joined.push((ch.clone(), self.presence_of(ch))),
                Ok(false) => {}
                Err(e) => {
                    self.send_frame(SocketIo::connect_error(&namespace, &e.to_string()));
                    return;
                }
            }
        }
        // The connection lasts no longer than its shortest-lived token.
        if let Some(exp) = expires {
            if self.expires.is_none_or(|e| exp < e) {
                self.expires = Some(exp);
                self.expiry_moved = true;
            }
        }
        let (node, handle) = (self.node.clone(), self.handle.clone());
        self.node.spawn(async move {
            for (ch, presence) in joined {
                let keep = OnFailure::Keep;
                if let Err(e) = confirm_join(&node, &handle, &ch, presence, keep).await {
                    tracing::warn!(channel = %ch, error = %e, "namespace channel not confirmed by the broker");
                }
            }
            handle.enqueue(Outbound::Frame(Box::new(SocketIo::connected(&namespace, &handle.id, None))));
        });
    }

    /// Socket.IO: the client leaves a namespace (its rooms go with it).
    fn leave_namespace(&mut self, namespace: &str) {
        let gone: Vec<Channel> = self.subs.iter().filter(|c| socketio::in_namespace(c, namespace)).cloned().collect();
        for ch in gone {
            self.leave_channel(&ch);
        }
        if !self.subs.iter().any(|c| socketio::split_channel(c).1.is_none()) {
            // The client left every namespace on purpose: nothing to recover
            // later. The Engine.IO connection stays open (pings go on), as
            // with the reference server: the client closes it, or CONNECTs
            // again.
            self.state = None;
        }
    }
}
