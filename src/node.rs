//! The node: everything one sidecar's sessions, API and proxy share — the
//! configuration, metrics, hub, broker, authorization and proxy — plus the
//! few operations that belong to no single one of them: the one publish
//! path (used by the admin API and by client publishes alike), connection
//! slots, the drain schedule and the hook-path guard.

use std::sync::Arc;
use std::time::Duration;

use serde_json::value::RawValue;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Auth;
use crate::broker::{Broker, PresenceList};
use crate::channel::{Channel, ConnectionId};
use crate::config::Config;
use crate::error::{ApiError, ErrorCode};
use crate::hub::{Call, CallAnswer, Hub, NodeCommand, Target, now_us};
use crate::metrics::Metrics;
use crate::protocol::commands::Query;
use crate::protocol::{Message, Offset};
use crate::proxy::Proxy;
use crate::upstream::normalized_path;

/// How long a membership query waits for the other nodes' answers.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(2);

/// This node's answer to a membership query from another node: the rooms
/// of a connection it holds (or "gone" when the id names this node), the
/// members of a channel it has.
pub fn answer_query(hub: &Hub, node_id: &str, q: &Query) -> Option<CallAnswer> {
    match q {
        Query::Rooms(id) => match hub.rooms_of(id) {
            Some(rooms) => Some(CallAnswer::Names(rooms)),
            None => (id.node() == node_id).then_some(CallAnswer::Gone),
        },
        Query::Members(channel) => Some(CallAnswer::Names(hub.members(channel))),
    }
}

/// Who published a message: the `source` label of
/// `wsrelay_messages_published_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The app, through `POST /api/publish`.
    Api,
    /// A client's `publish` frame.
    Client,
}

pub struct Node {
    pub cfg: Config,
    pub metrics: Arc<Metrics>,
    pub hub: Arc<Hub>,
    pub broker: Broker,
    pub auth: Auth,
    pub proxy: Proxy,
    /// Cancelled on SIGTERM: readyz turns 503, upgrades are refused,
    /// sessions close.
    pub drain: CancellationToken,
    /// Every session task, so the drain can wait for them.
    pub sessions: TaskTracker,
    /// `--max-connections` permits; a session holds one for its life.
    slots: Arc<Semaphore>,
    /// Hook paths, normalized once (see [`is_hook_path`](Self::is_hook_path)).
    hook_paths: Vec<String>,
}

/// A connection slot under `--max-connections`; given back when dropped,
/// whichever way the session ends.
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    metrics: Arc<Metrics>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.metrics.connections.dec();
    }
}

impl Node {
    pub fn new(cfg: Config, metrics: Arc<Metrics>, hub: Arc<Hub>, broker: Broker, auth: Auth, proxy: Proxy) -> Self {
        let hook_paths = cfg.auth.hook_paths().map(normalized_path).filter(|h| h != "/").collect();
        let slots = Arc::new(Semaphore::new(cfg.session.max_connections));
        Node {
            cfg,
            metrics,
            hub,
            broker,
            auth,
            proxy,
            drain: CancellationToken::new(),
            sessions: TaskTracker::new(),
            slots,
            hook_paths,
        }
    }

    /// Takes a connection slot, or None at `--max-connections`.
    pub fn take_slot(&self) -> Option<Slot> {
        let permit = self.slots.clone().try_acquire_owned().ok()?;
        self.metrics.connections.inc();
        Some(Slot { _permit: permit, metrics: self.metrics.clone() })
    }

    fn open_sessions(&self) -> usize {
        self.cfg.session.max_connections.saturating_sub(self.slots.available_permits())
    }

    /// When a session closes after the drain starts: after `--shutdown-delay`,
    /// spread over 2 ms per open session, within 80 % of what is left of
    /// `--drain-timeout`, so a full replica does not send every client
    /// reconnecting at the same instant.
    pub fn drain_delay(&self) -> Duration {
        use rand::RngExt;
        let n = u32::try_from(self.open_sessions()).unwrap_or(u32::MAX);
        let room = self.cfg.drain_timeout.saturating_sub(self.cfg.shutdown_delay).mul_f64(0.8);
        let window = Duration::from_millis(2).saturating_mul(n).min(room);
        if window.is_zero() {
            return self.cfg.shutdown_delay;
        }
        self.cfg.shutdown_delay + rand::rng().random_range(Duration::ZERO..window)
    }

    /// Whether a client request would reach a hook: the hook paths and
    /// everything starting with them, however spelled (case, `%`-escapes,
    /// `//`, `..`, trailing `/` or `.json`).
    pub fn is_hook_path(&self, path: &str) -> bool {
        if self.hook_paths.is_empty() {
            return false;
        }
        let path = normalized_path(path);
        self.hook_paths.iter().any(|h| path.starts_with(h.as_str()))
    }

    /// Hands a call's answer to the API request waiting for it: on this
    /// node directly, else through the broker to the node that has it.
    /// Runs `fut` in the background, tracked with the sessions (the drain
    /// waits for it); outside a runtime (a `Drop` at exit) it does not run.
    pub fn spawn<F: std::future::Future<Output = ()> + Send + 'static>(&self, fut: F) {
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(self.sessions.track_future(fut));
        }
    }

    /// Sends `call` to `connection` on whichever node holds it and waits up
    /// to `timeout` for the client's answer: `/api/call` and python-socketio's
    /// `sio.call`. The answer is `Args` or `Binary`; a socket that is gone
    /// (or its node) is `NotFound`, a protocol that cannot answer
    /// `NotSupported`, no answer in time `Timeout`. Counted by result.
    pub async fn call(&self, connection: &ConnectionId, call: Call, timeout: Duration) -> Result<CallAnswer, ApiError> {
        let gone = || ApiError::new(ErrorCode::NotFound, "no such connection");
        let metric = |r: &str| self.metrics.calls.with_label_values(&[r]).inc();
        let id = call.id.clone();
        let rx = self
            .hub
            .await_call(&id)
            .ok_or_else(|| ApiError::new(ErrorCode::LimitExceeded, "too many calls waiting on this node"))?;
        let forget = |e: ApiError| {
            self.hub.forget_call(&id);
            if e.code == ErrorCode::NotFound {
                metric("gone");
            }
            e
        };
        let cmd = NodeCommand::Call { target: Target::Connection(connection.clone()), call };
        let owner = connection.node();
        // Here, or (one node only) nowhere else.
        if owner == self.cfg.node_id || !self.broker.is_shared() {
            if !self.hub.has_session(connection) {
                return Err(forget(gone()));
            }
            self.hub.apply(&cmd, None);
        } else {
            match self.broker.peer_url(owner).await {
                Ok(Some(_)) => {}
                Ok(None) => return Err(forget(gone())),
                Err(e) => return Err(forget(e.into())),
            }
            if let Err(e) = self.broker.command(cmd).await {
                return Err(forget(e.into()));
            }
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(a @ (CallAnswer::Args(_) | CallAnswer::Binary { .. }))) => {
                metric("answered");
                Ok(a)
            }
            // (`Names` answers queries, never a call.)
            Ok(Ok(CallAnswer::Gone | CallAnswer::Names(_)) | Err(_)) => {
                metric("gone");
                Err(gone())
            }
            Ok(Ok(CallAnswer::Unsupported)) => {
                metric("unsupported");
                Err(ApiError::new(
                    ErrorCode::NotSupported,
                    "the connection's protocol (wsrelay.v1) cannot answer calls",
                ))
            }
            Err(_) => {
                self.hub.forget_call(&id);
                metric("timeout");
                Err(ApiError::new(
                    ErrorCode::Timeout,
                    format!("the client did not answer within {} s", timeout.as_secs_f64()),
                ))
            }
        }
    }

    pub fn answer_call(self: &Arc<Self>, call: String, answer: CallAnswer) {
        if self.hub.answer_call(&call, answer.clone()) {
            return;
        }
        let node = self.clone();
        self.spawn(async move {
            if let Err(e) = node.broker.command(NodeCommand::Answer { call, answer }).await {
                tracing::warn!(error = %e, "a call's answer could not be sent back (the caller times out)");
            }
        });
    }

    /// The channels a connection is subscribed to, asked of its node.
    pub async fn rooms_of(&self, connection: &ConnectionId) -> Result<Vec<String>, ApiError> {
        let gone = || ApiError::new(ErrorCode::NotFound, "no such connection");
        let owner = connection.node();
        if owner == self.cfg.node_id || !self.broker.is_shared() {
            return self.hub.rooms_of(connection).ok_or_else(gone);
        }
        if self.broker.peer_url(owner).await?.is_none() {
            return Err(gone());
        }
        let mut answers = self.query(Query::Rooms(connection.clone()), &[owner.to_owned()]).await?;
        match answers.pop().flatten() {
            Some(CallAnswer::Names(rooms)) => Ok(rooms),
            Some(_) => Err(gone()),
            None => Err(ApiError::new(ErrorCode::Unavailable, format!("node {owner} did not answer in time"))),
        }
    }

    /// The connections subscribed to `channel` on every live node, and
    /// whether every node answered in time.
    pub async fn members(&self, channel: &Channel) -> Result<(Vec<String>, bool), ApiError> {
        let mut ids = self.hub.members(channel);
        if !self.broker.is_shared() {
            return Ok((ids, true));
        }
        let others: Vec<String> =
            self.broker.live_nodes().await?.into_iter().filter(|n| *n != self.cfg.node_id).collect();
        let answers = self.query(Query::Members(channel.clone()), &others).await?;
        let mut complete = true;
        for a in answers {
            match a {
                Some(CallAnswer::Names(more)) => ids.extend(more),
                _ => complete = false,
            }
        }
        ids.sort_unstable();
        Ok((ids, complete))
    }

    /// Asks `nodes` a question through the broker and waits (at most
    /// [`QUERY_TIMEOUT`] in all) for each one's answer: None where a node
    /// did not answer.
    async fn query(&self, query: Query, nodes: &[String]) -> Result<Vec<Option<CallAnswer>>, ApiError> {
        if nodes.is_empty() {
            return Ok(Vec::new());
        }
        let id = format!("q.{}", crate::channel::random_id(16));
        let keys: Vec<String> = nodes.iter().map(|n| Query::answer_id(&id, n)).collect();
        let forget = |keys: &[String]| keys.iter().for_each(|k| self.hub.forget_call(k));
        let mut waits = Vec::with_capacity(keys.len());
        for k in &keys {
            match self.hub.await_call(k) {
                Some(rx) => waits.push(rx),
                None => {
                    forget(&keys);
                    return Err(ApiError::new(ErrorCode::LimitExceeded, "too many calls waiting on this node"));
                }
            }
        }
        if let Err(e) = self.broker.command(NodeCommand::Query { id, query }).await {
            forget(&keys);
            return Err(e.into());
        }
        let deadline = tokio::time::Instant::now() + QUERY_TIMEOUT;
        let mut answers = Vec::with_capacity(waits.len());
        for rx in waits {
            answers.push(tokio::time::timeout_at(deadline, rx).await.ok().and_then(Result::ok));
        }
        forget(&keys);
        Ok(answers)
    }

    /// Who is subscribed to `channel` across nodes (for the `presence` op and
    /// the API), measured.
    pub async fn presence(&self, channel: &Channel) -> Result<PresenceList, ApiError> {
        let list = self.broker.presence(channel).await?;
        self.metrics.presence_size.observe(list.count as f64);
        Ok(list)
    }

    /// Publishes `data` to `channels`: the one publish path. The message is
    /// built once (the data copied once, shared by every channel of a
    /// broadcast), stamped, handed to the broker, and counted once the
    /// broker has it, with each channel's offset where history is kept.
    /// Fails with `unavailable` when the broker does not take it: never
    /// reported as done when it was not.
    pub async fn publish(
        &self,
        channels: Vec<Channel>,
        data: &RawValue,
        exclude: Option<&str>,
        event: Option<Arc<str>>,
        attachments: Option<crate::protocol::Attachments>,
        source: Source,
    ) -> Result<Vec<Option<Offset>>, ApiError> {
        let data = Utf8Bytes::from(data.get().to_owned());
        let published_us = now_us();
        let n = channels.len() as u64;
        let messages = channels
            .into_iter()
            .map(|c| {
                Arc::new(
                    Message::new(c, data.clone(), exclude.map(Into::into), published_us)
                        .with_event(event.clone())
                        .with_attachments(attachments.clone()),
                )
            })
            .collect();
        let offsets = self.broker.publish(messages).await?;
        match source {
            Source::Api => self.metrics.published_api.inc_by(n),
            Source::Client => self.metrics.published_client.inc_by(n),
        }
        Ok(offsets)
    }
}
