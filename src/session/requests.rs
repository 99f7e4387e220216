//! What a session does with a request: subscribe (with recovery from
//! history, presence), publish, send, presence, and what the app asks of it
//! (server-side subscribe). The loop in [`super`] reads, writes and closes.

use super::*;

/// What a pending request ends with: the reply's address, and what the
/// request's future did.
pub(crate) struct Outcome<Id> {
    id: Option<Id>,
    done: Done,
}

/// What a request's future ends with.
pub(crate) struct Done {
    result: Result<Option<Box<RawValue>>, ApiError>,
    /// A subscribe with `since`: what history holds after it.
    recovery: Option<Recovery>,
    /// A subscribe that failed after its channel was reserved.
    release: Option<Channel>,
    /// A subscribe that succeeded (in the hub, and presence if kept).
    subscribed: Option<Channel>,
    /// A recovery of a subscribed channel that failed: its held live
    /// messages go out as they are.
    unhold: Option<Channel>,
    /// What a front's own request left for [`ProtocolFront::resume`].
    front: Option<Box<dyn std::any::Any + Send>>,
}

impl Done {
    /// A front's own request ended, leaving `left` for [`ProtocolFront::resume`].
    pub(crate) fn front(left: Box<dyn std::any::Any + Send>) -> Self {
        Done { front: Some(left), ..Done::reply(Ok(None)) }
    }

    pub(crate) fn reply(result: Result<Option<Box<RawValue>>, ApiError>) -> Self {
        Done { result, recovery: None, release: None, subscribed: None, unhold: None, front: None }
    }
}

/// A subscribe with `since`, after reading the channel's history.
pub(super) struct Recovery {
    channel: Channel,
    since: Option<Offset>,
    history: History,
    /// Everything after `since` is in `history`: no gap.
    recovered: bool,
}

impl Recovery {
    fn new(channel: Channel, since: Option<Offset>, history: History) -> Self {
        // Covered, and read up to the top (a stream may keep more than
        // `size` entries, and the read stops at `size`).
        let read_to = |s: &Offset| history.messages.last().and_then(|m| m.offset.as_ref()).map_or(s.seq, |o| o.seq);
        let recovered = since.as_ref().is_some_and(|s| history.covers(s) && read_to(s) >= history.top);
        Recovery { channel, since, history, recovered }
    }

    /// The subscribe reply's result: `{"recovered":…,"offset":…}`.
    fn answer(&self) -> Box<RawValue> {
        let v = serde_json::json!({ "recovered": self.recovered, "offset": self.history.top_offset().to_string() });
        // A JSON value printed as JSON is valid raw JSON.
        RawValue::from_string(v.to_string()).unwrap_or_else(|_| Box::<RawValue>::default())
    }
}

impl<C: ProtocolFront> Session<C> {
    /// This session as its channels' presence lists it.
    pub(super) fn presence_entry(&self) -> String {
        let v = serde_json::json!({
            "connection": &*self.handle.id,
            "user": self.ident.user.as_deref(),
            "info": self.ident.info,
        });
        v.to_string()
    }

    /// Subscribes before the upgrade (URL, hook and token channels); a URL
    /// channel with `since` is recovered: its history after that offset is
    /// written right after the welcome. Returns each recovery's outcome.
    pub(crate) async fn subscribe_initial(
        &mut self,
        channels: &[Channel],
        since: &HashMap<Channel, String>,
    ) -> Result<Vec<(Channel, bool)>, ApiError> {
        let mut recovered = Vec::new();
        for ch in channels {
            if !self.subs.insert(ch.clone()) {
                continue;
            }
            self.node.hub.subscribe(ch, &self.handle)?;
            let presence = self.presence_of(ch);
            membership::confirm_join(&self.node, &self.handle, ch, presence, membership::OnFailure::Keep).await?;
            let Some(offset) = since.get(ch) else { continue };
            let Some(policy) = self.node.cfg.namespaces.rule(ch).history else {
                recovered.push((ch.clone(), false));
                continue;
            };
            let offset = Offset::parse(offset);
            let after = offset.as_ref().map_or(0, |o| o.seq);
            self.node.metrics.history_reads.inc();
            let h = self.node.broker.history(ch, policy, after, policy.read_limit()).await?;
            let r = Recovery::new(ch.clone(), offset, h);
            recovered.push((ch.clone(), r.recovered));
            // Live messages already queued are newer or duplicates: `seen`
            // drops the latter when they are written, after these.
            self.recover(r);
        }
        Ok(recovered)
    }

    pub(super) fn apply(&mut self, outcome: Outcome<C::Id>) {
        let Outcome { id, done: mut outcome } = outcome;
        if let Some(left) = outcome.front.take() {
            C::resume(self, id, left);
            return;
        }
        if let Some(channel) = &outcome.unhold {
            for m in self.recovering.remove(channel).unwrap_or_default() {
                self.front.push_back(Front { out: Outbound::Message(m), counted: true, checked: true });
            }
        }
        if let Some(channel) = &outcome.release {
            self.subs.remove(channel);
            self.forget(channel);
        }
        if let Some(channel) = &outcome.subscribed {
            // The app unsubscribed it (server-side) while this was pending.
            if !self.subs.contains(channel) {
                self.drop_channel(channel);
                outcome.recovery = None;
            }
        }
        match outcome.recovery {
            // Unsubscribed meanwhile: nothing to recover.
            Some(r) if !self.subs.contains(&r.channel) => {
                self.reply(id.as_ref(), Ok(None));
            }
            Some(r) if outcome.result.is_ok() => {
                // The reply first, then history, then what arrived meanwhile.
                if let Some(reply) = self.codec.reply_ok(id.as_ref(), Some(&r.answer())) {
                    let out = Outbound::Frame(Box::new(reply));
                    self.front.push_back(Front { out, counted: false, checked: true });
                }
                self.recover(r);
            }
            _ => self.reply(id.as_ref(), outcome.result.as_ref().map(Option::as_deref)),
        }
    }

    /// Queues (in front) what history holds after the client's offset, then
    /// the live messages that waited, each once and in order.
    pub(super) fn recover(&mut self, r: Recovery) {
        let waiting = self.recovering.remove(&r.channel).unwrap_or_default();
        let mut last = r.since.as_ref().filter(|_| r.recovered).map_or(0, |o| o.seq);
        let mut dropped = 0;
        let mut n = 0u64;
        if r.recovered {
            for m in &r.history.messages {
                if let Some(off) = m.offset.as_ref().filter(|o| o.seq > last) {
                    last = off.seq;
                    self.front.push_back(Front { out: Outbound::Message(m.clone()), counted: false, checked: true });
                    n += 1;
                }
            }
        }
        for m in waiting {
            match &m.offset {
                Some(off) if *off.epoch == *r.history.epoch && off.seq <= last => dropped += m.weight(),
                off => {
                    last = last.max(off.as_ref().map_or(0, |o| o.seq));
                    self.front.push_back(Front { out: Outbound::Message(m), counted: true, checked: true });
                }
            }
        }
        self.release(dropped);
        self.node.metrics.history_recovered.inc_by(n);
        self.seen.insert(r.channel, Offset { epoch: r.history.epoch.clone(), seq: last });
    }

    /// Answers a request at once, or returns the future that will.
    pub(super) fn dispatch(&mut self, decoded: Decoded<C::Id, C::Own>) -> Option<Pending<C::Id>> {
        let Decoded { id, request } = decoded;
        let request = match request {
            Ok(r) => r,
            Err(e) => {
                self.reply(id.as_ref(), Err(&e));
                return None;
            }
        };
        let result = match request {
            Request::Ping => {
                // Always answered, id or not: it is how a client checks the link.
                if let Some(f) = self.codec.reply_ok(id.as_ref(), None) {
                    self.send_frame(f);
                }
                return None;
            }
            Request::Subscribe { channel, since } if self.subs.contains(&channel) => {
                // Already subscribed (by the connect hook, the token, the
                // app): `since` still recovers what the client missed.
                match self.recover_subscribed(channel, since) {
                    Some(fut) => return Some(Self::pending(id, fut)),
                    None => Ok(()),
                }
            }
            Request::Subscribe { channel, since } => match self.subscribe(channel, since) {
                Ok(Some(fut)) => return Some(Self::pending(id, fut)),
                Ok(None) => Ok(()),
                Err(e) => Err(e),
            },
            Request::Unsubscribe { channel } => {
                self.leave_channel(&channel);
                Ok(())
            }
            Request::Publish { channel, data } => return Some(Self::pending(id, self.publish(channel, data))),
            Request::Send { data } => return Some(Self::pending(id, self.send(data))),
            Request::Presence { channel } => match self.presence(channel) {
                Ok(fut) => return Some(Self::pending(id, fut)),
                Err(e) => Err(e),
            },
            Request::Own(req) => return C::handle(self, id, req),
            // Handled before dispatch (the session closes).
            Request::Refuse(why) => Err(ApiError::bad_request(why)),
        };
        self.reply(id.as_ref(), result.as_ref().map(|()| None));
        None
    }

    /// Wraps a request's future with its reply address.
    pub(crate) fn pending(id: Option<C::Id>, fut: impl Future<Output = Done> + Send + 'static) -> Pending<C::Id> {
        Box::pin(async move { Outcome { id, done: fut.await } })
    }

    /// Reserves the channel and returns the future that authorizes and
    /// subscribes (and, with `since`, reads the history to recover), or None
    /// when already subscribed.
    pub(super) fn subscribe(
        &mut self,
        channel: Channel,
        since: Option<String>,
    ) -> Result<Option<impl Future<Output = Done> + Send + 'static>, ApiError> {
        if self.subs.contains(&channel) {
            return Ok(None);
        }
        let max = self.node.cfg.session.max_subscriptions;
        if self.subs.len() >= max {
            return Err(ApiError::new(
                ErrorCode::LimitExceeded,
                format!("subscription limit reached ({max} channels per connection)"),
            ));
        }
        // Reserved now, so a session dropped mid-way cleans it up.
        self.subs.insert(channel.clone());
        let rule = self.node.cfg.namespaces.rule(&channel);
        let history = rule.history;
        let presence = self.presence_of(&channel);
        if since.is_some() && history.is_some() {
            // Live messages wait from the moment the hub has us.
            self.recovering.insert(channel.clone(), Vec::new());
        }
        let node = self.node.clone();
        let handle = self.handle.clone();
        let ident = self.ident.clone();
        Ok(Some(async move {
            let asked = since.is_some();
            let result = async {
                node.auth.authorize(Action::Subscribe, &ident, &handle.id, &channel, None).await?;
                node.hub.subscribe(&channel, &handle)?;
                membership::confirm_join(&node, &handle, &channel, presence.clone(), membership::OnFailure::Undo)
                    .await?;
                match (since, history) {
                    (Some(since), Some(policy)) => {
                        let since = Offset::parse(&since);
                        let after = since.as_ref().map_or(0, |o| o.seq);
                        node.metrics.history_reads.inc();
                        match node.broker.history(&channel, policy, after, policy.read_limit()).await {
                            Ok(h) => Ok(Some(Recovery::new(channel.clone(), since, h))),
                            Err(e) => {
                                // Undo what succeeded: the subscribe failed as a whole.
                                membership::undo_join(&node, &handle, &channel, presence).await;
                                Err(ApiError::from(e))
                            }
                        }
                    }
                    // Without history there is nothing to recover from: say
                    // so, so the client reloads instead of trusting a
                    // gap-free stream.
                    (Some(_), None) => Ok(None),
                    (None, _) => Ok(None),
                }
            }
            .await;
            let subscribed = Some(channel.clone());
            match result {
                Ok(Some(recovery)) => Done { recovery: Some(recovery), subscribed, ..Done::reply(Ok(None)) },
                Ok(None) if asked => {
                    let not_recovered = RawValue::from_string(r#"{"recovered":false}"#.to_owned()).ok();
                    Done { subscribed, ..Done::reply(Ok(not_recovered)) }
                }
                Ok(None) => Done { subscribed, ..Done::reply(Ok(None)) },
                Err(e) => Done { release: Some(channel), ..Done::reply(Err(e)) },
            }
        }))
    }

    /// A subscribe with `since` on a channel this session already has: its
    /// live messages wait while history after `since` is read, then both
    /// are written, each once. None when there is nothing to recover from
    /// (no `since`, no history, or a recovery of it under way).
    fn recover_subscribed(
        &mut self,
        channel: Channel,
        since: Option<String>,
    ) -> Option<impl Future<Output = Done> + Send + 'static> {
        let since = since?;
        let policy = self.node.cfg.namespaces.rule(&channel).history?;
        if self.recovering.contains_key(&channel) {
            return None;
        }
        self.recovering.insert(channel.clone(), Vec::new());
        // What was written before stays written; the recovery decides again.
        self.seen.remove(&channel);
        let node = self.node.clone();
        Some(async move {
            let since = Offset::parse(&since);
            let after = since.as_ref().map_or(0, |o| o.seq);
            node.metrics.history_reads.inc();
            match node.broker.history(&channel, policy, after, policy.read_limit()).await {
                Ok(h) => Done { recovery: Some(Recovery::new(channel, since, h)), ..Done::reply(Ok(None)) },
                Err(e) => Done { unhold: Some(channel), ..Done::reply(Err(ApiError::from(e))) },
            }
        })
    }

    /// Applies what the app asked (`/api/subscribe`, `/api/unsubscribe`): no
    /// policy check, the app decides; the per-connection and node limits
    /// still hold. The client is told with a `subscribed`/`unsubscribed`
    /// frame (once the broker delivers the channel, for a subscribe).
    pub(super) fn server_command(&mut self, cmd: SessionCommand) {
        match cmd {
            SessionCommand::Subscribe(channel, applied) => {
                if self.subs.contains(&channel) {
                    return;
                }
                if self.subs.len() >= self.node.cfg.session.max_subscriptions {
                    tracing::warn!(%channel, "server-side subscribe over max-subscriptions: ignored");
                    let msg = "the connection holds its maximum of channels (max-subscriptions)";
                    applied.fail(ApiError::new(ErrorCode::LimitExceeded, msg));
                    return;
                }
                if let Err(e) = self.join_now(&channel) {
                    tracing::warn!(%channel, error = %e, "server-side subscribe refused");
                    applied.fail(e.into());
                    return;
                }
                let frame = self.codec.server_subscription(&channel, true);
                let presence = self.presence_of(&channel);
                let (node, handle) = (self.node.clone(), self.handle.clone());
                self.node.spawn(async move {
                    let keep = membership::OnFailure::Keep;
                    if let Err(e) = membership::confirm_join(&node, &handle, &channel, presence, keep).await {
                        tracing::warn!(%channel, error = %e, "server-side subscribe not confirmed by the broker");
                        applied.fail(e);
                    }
                    if let Some(frame) = frame {
                        handle.enqueue(Outbound::Frame(Box::new(frame)));
                    }
                    drop(applied);
                });
            }
            SessionCommand::Call(call) => self.call(call),
            SessionCommand::Unsubscribe(channel, _applied) => {
                if self.leave_channel(&channel) {
                    if let Some(f) = self.codec.server_subscription(&channel, false) {
                        self.send_frame(f);
                    }
                }
            }
        }
    }

    /// Who is subscribed to `channel` (a channel this session is subscribed
    /// to, in a namespace with presence).
    pub(super) fn presence(&self, channel: Channel) -> Result<impl Future<Output = Done> + Send + 'static, ApiError> {
        if !self.node.cfg.namespaces.rule(&channel).presence {
            return Err(ApiError::new(ErrorCode::NotFound, format!("no presence is kept for {channel:?}")));
        }
        if !self.subs.contains(&channel) {
            return Err(ApiError::forbidden(format!("subscribe to {channel:?} to see who else is")));
        }
        let node = self.node.clone();
        Ok(async move {
            let result = match node.presence(&channel).await {
                Ok(list) => Ok(RawValue::from_string(list.to_json().to_string()).ok()),
                Err(e) => Err(e),
            };
            Done::reply(result)
        })
    }

    pub(super) fn publish(&self, channel: Channel, data: Box<RawValue>) -> impl Future<Output = Done> + Send + 'static {
        let node = self.node.clone();
        let handle = self.handle.clone();
        let ident = self.ident.clone();
        async move {
            let result = async {
                node.auth.authorize(Action::Publish, &ident, &handle.id, &channel, Some(&data)).await?;
                let offsets = node.publish(vec![channel], &data, None, None, None, Source::Client).await?;
                // Where history is kept, the reply says where the message went.
                Ok(offsets.into_iter().flatten().next().and_then(|o| {
                    RawValue::from_string(serde_json::json!({ "offset": o.to_string() }).to_string()).ok()
                }))
            }
            .await;
            Done::reply(result)
        }
    }

    /// Sends an event the app waits an answer for (`/api/call`).
    pub(super) fn call(&mut self, call: crate::hub::Call) {
        use crate::hub::CallAnswer;
        self.next_ack += 1;
        let ack = self.next_ack;
        let attachments: Vec<Box<str>> = call.attachments.iter().flatten().map(|a| Box::from(a.as_str())).collect();
        let Some(frame) = self.codec.call(&call.namespace, &call.event, &call.args, &attachments, ack) else {
            self.node.answer_call(call.id, CallAnswer::Unsupported);
            return;
        };
        // Not connected to that namespace: no socket there to answer. And
        // bounded like the queue: a client that never answers does not pile
        // calls up.
        let joined = C::can_answer(self, &call);
        if !joined || self.calls.len() >= self.node.cfg.session.client_queue {
            self.node.answer_call(call.id, CallAnswer::Gone);
            return;
        }
        self.calls.insert(ack, call.id);
        self.send_frame(frame);
    }

    pub(super) fn send(&self, data: Box<RawValue>) -> impl Future<Output = Done> + Send + 'static {
        let node = self.node.clone();
        let handle = self.handle.clone();
        let ident = self.ident.clone();
        async move { Done::reply(node.auth.send(&ident, &handle.id, &data).await) }
    }
}
