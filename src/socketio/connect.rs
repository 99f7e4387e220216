//! A socket's CONNECT: authentication, recovery, then the session loop.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use http::{Request, StatusCode};
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Message as WsMessage, Utf8Bytes};

use super::engineio::Opening;
use super::trail::{Applied, Trail, recovers, trail_key};
use super::transport::Eio;
use crate::auth::SioConnect;
use crate::channel::Channel;
use crate::error::ConnResult;
use crate::node::Node;
use crate::protocol::Offset;
use crate::protocol::socketio::{ROOT, SocketIo, parse_packet, valid_namespace};
use crate::protocol::socketio::{namespace_channel, room_channel};
use crate::session::Session;
use crate::session::transport::Transport;
/// Engine.IO packets other than the CONNECT a client may send before it.
const PRE_CONNECT_CONTROL: u32 = 16;

#[derive(Deserialize)]
struct RecoveryAuth {
    #[serde(default)]
    pid: Option<String>,
    #[serde(default)]
    offset: Option<String>,
}

/// What a new socket starts with.
pub(super) struct Start {
    /// The open request's head, for the connect hook.
    pub(super) head: Request<()>,
    pub(super) remote: SocketAddr,
    /// Its connection id.
    pub(super) sid: crate::channel::ConnectionId,
    pub(super) slot: crate::node::Slot,
    /// Its place among the sessions waiting for CONNECT.
    pub(super) opening: Opening,
    /// When the open packet was made: the heartbeat counts from there.
    pub(super) opened: tokio::time::Instant,
}

/// Waits for the client's first CONNECT, authenticates it and runs the
/// session; a refusal is a CONNECT_ERROR.
pub(super) async fn socket(node: Arc<Node>, mut eio: Eio, start: Start) {
    // On the heap while it runs, freed after: the connect hook's and the
    // broker's futures would otherwise size every socket's task for its life.
    // (A `let`, not an `if let`: the box must be gone before the session runs.)
    let connected = Box::pin(connect(&node, &mut eio, start)).await;
    if let Some((session, welcome)) = connected {
        session.run(eio, welcome).await;
    }
}

/// A socket's CONNECT: the session and its CONNECT answer, or None once
/// the client was refused (or failed) and told.
async fn connect(node: &Arc<Node>, eio: &mut Eio, start: Start) -> Option<(Session<SocketIo>, Utf8Bytes)> {
    let Start { head, remote, sid, slot, opening, opened } = start;
    let s = &node.cfg.session;
    let (every, pong_within) = (s.ping_interval, s.ping_timeout());
    let first = tokio::time::timeout(s.handshake_timeout, async {
        // Noops before the CONNECT: a few at most. The Engine.IO heartbeat
        // runs from the open packet on, as in Engine.IO: a ping every
        // interval, and no pong within pingTimeout ends the session.
        let mut control = 0;
        let mut ping = tokio::time::interval_at(opened + every, every);
        let mut pong_due: Option<tokio::time::Instant> = None;
        loop {
            let frame = tokio::select! {
                f = eio.recv() => f,
                at = ping.tick(), if pong_due.is_none() => {
                    if eio.feed(WsMessage::Ping(Default::default())).await.is_err() || eio.flush().await.is_err() {
                        return None;
                    }
                    // Counted from when the ping was due, as the client counts.
                    pong_due = Some(at + pong_within);
                    if let Some(p) = &eio.poll {
                        p.pong_due(pong_due);
                    }
                    continue;
                }
                () = tokio::time::sleep_until(pong_due.unwrap_or_else(tokio::time::Instant::now)), if pong_due.is_some() => {
                    tracing::debug!("no pong before CONNECT within pingTimeout: closed");
                    eio.discard();
                    return None;
                }
            };
            match frame? {
                Ok(WsMessage::Pong(_)) if pong_due.is_some() => {
                    pong_due = None;
                    if let Some(p) = &eio.poll {
                        p.pong_due(None);
                    }
                }
                Ok(WsMessage::Text(t)) => {
                    let Ok(p) = parse_packet(&t) else { return None };
                    if p.kind != 0 {
                        // Nothing but CONNECT before CONNECT.
                        return None;
                    }
                    let auth = match p.json.trim() {
                        "" => None,
                        j => Some(RawValue::from_string(j.to_owned()).ok()?),
                    };
                    return Some((p.namespace.to_owned(), auth));
                }
                Ok(_) if control < PRE_CONNECT_CONTROL => control += 1,
                Ok(_) | Err(_) => return None,
            }
        }
    })
    .await;
    let Ok(Some((namespace, auth))) = first else {
        node.metrics.connection_result(ConnResult::HandshakeFailed);
        let reason = Utf8Bytes::from_static("a CONNECT packet was expected");
        eio.close(Some(CloseFrame { code: CloseCode::Protocol, reason })).await;
        return None;
    };
    if !valid_namespace(&namespace) {
        say_goodbye(eio, Some(SocketIo::connect_error(&namespace, "Invalid namespace"))).await;
        return None;
    }
    let sio = SioConnect { namespace: &namespace, auth: auth.as_deref() };
    let transport = eio.transport_name();
    let who = crate::auth::Connecting { connection: &sid, transport, sio: Some(sio) };
    let ident = match node.auth.authenticate_with(&head, remote, who).await {
        Ok(i) => i,
        Err(r) => {
            node.metrics.connection_result(r.result);
            node.metrics.error(r.error.fault);
            r.error.log("Socket.IO CONNECT refused");
            // A refusal is final for socket.io-client (CONNECT_ERROR); a
            // failure (the app or Redis unavailable) is not: the transport
            // closes and the client tries again.
            let final_refusal = matches!(r.status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN);
            say_goodbye(eio, final_refusal.then(|| SocketIo::connect_error(&namespace, &r.error.message))).await;
            return None;
        }
    };
    // Who it is is known: it no longer counts among the unauthenticated.
    drop(opening);
    let own_room = room_channel(&namespace, &sid).ok();
    // Channels: the namespace's, the sid's room, the app's (as rooms of this namespace).
    let mut channels: Vec<Channel> = Vec::new();
    let mut push = |c: Result<Channel, crate::channel::ChannelError>| {
        if let Ok(c) = c {
            if !channels.contains(&c) {
                channels.push(c);
            }
        }
    };
    push(namespace_channel(&namespace));
    push(room_channel(&namespace, &sid));
    for c in &ident.channels {
        push(if namespace == ROOT { Ok(c.clone()) } else { room_channel(&namespace, c) });
    }
    let user = ident.user.as_deref().map(str::to_owned);

    // Connection-state recovery: the previous socket's trail, if it is ours.
    let recovery = auth
        .as_deref()
        .and_then(|a| serde_json::from_str::<RecoveryAuth>(a.get()).ok())
        .filter(|r| r.pid.as_ref().is_some_and(|p| p.len() <= 64))
        .filter(|_| recovers(node));
    let mut since: HashMap<Channel, String> = HashMap::new();
    let mut known = false;
    let mut old_pid = None;
    // Put back if this connection fails, so the client's retry can use it.
    let mut taken: Option<(String, String)> = None;
    if let Some(RecoveryAuth { pid: Some(pid), offset }) = recovery {
        // Only the state of this user and namespace can be taken: someone
        // else's `pid` finds nothing, and leaves that state for its owner.
        let key = trail_key(&pid, user.as_deref(), &namespace);
        match node.broker.take_stash(&key).await {
            Ok(Some(saved)) => {
                let trail = match serde_json::from_str::<Trail>(&saved) {
                    Ok(trail) if trail.user == user && trail.namespace == namespace => {
                        match since_away(node, trail).await {
                            Ok(t) => Ok(t),
                            Err(e) => {
                                tracing::warn!(error = %e, "Socket.IO CONNECT failed: the app's commands unavailable");
                                restash(node, Some((key, saved)));
                                say_goodbye(eio, None).await;
                                return None;
                            }
                        }
                    }
                    other => other.map(Some),
                };
                match trail {
                    Ok(None) => tracing::debug!("the app disconnected this socket while it was away: not recovered"),
                    Ok(Some(trail)) if trail.user == user && trail.namespace == namespace => {
                        let (positions, k) = trail.positions(offset.as_deref());
                        known = k;
                        for ch in trail.rooms {
                            match positions.get(&ch) {
                                Some(o) => {
                                    since.insert(ch.clone(), o.to_string());
                                }
                                // Joined while away: nothing missed there.
                                None if trail.fresh.contains(&ch) => {}
                                // History kept, but where the socket was is not known.
                                None if node.cfg.namespaces.rule(&ch).history.is_some() => known = false,
                                None => {}
                            }
                            push(Ok(ch));
                        }
                        old_pid = Some(pid);
                    }
                    Ok(_) => tracing::debug!("recovery state of another user or namespace: not recovered"),
                    Err(e) => tracing::warn!(error = %e, "unreadable recovery state: not recovered"),
                }
                taken = Some((key, saved));
            }
            Ok(None) => tracing::debug!("no recovery state for this pid (expired, or its node died)"),
            Err(e) => tracing::debug!(error = %e, "recovery state unavailable"),
        }
    }
    let max = node.cfg.session.max_subscriptions;
    if channels.len() > max {
        tracing::warn!(channels = channels.len(), max, "more rooms than max-subscriptions: the rest are not joined");
        channels.truncate(max);
    }
    let (handle, rx) = node.hub.register(sid.clone(), ident.user.clone(), node.cfg.session.client_queue);
    let ident = Arc::new(ident);
    let mut session = Session::new(node.clone(), SocketIo, handle, ident, slot, rx);
    session.own.origin = Some(Arc::new((head, remote, transport)));

    // Where history is kept, a channel joined without `since` starts its
    // trail at the channel's top (read before anything is written).
    let mut bases = Vec::new();
    for ch in &channels {
        if since.contains_key(ch) || Some(ch) == own_room.as_ref() {
            continue;
        }
        if let Some(policy) = node.cfg.namespaces.rule(ch).history {
            match node.broker.history(ch, policy, u64::MAX / 2, 1).await {
                // An empty history has no epoch yet: the channel's first
                // message will say where the socket was.
                Ok(h) if h.epoch.is_empty() => {}
                Ok(h) => bases.push((ch.clone(), h.top_offset())),
                Err(e) => {
                    tracing::warn!(error = %e, "Socket.IO CONNECT failed: history unavailable");
                    restash(node, taken);
                    say_goodbye(eio, None).await;
                    return None;
                }
            }
        }
    }
    let recovered = match session.subscribe_initial(&channels, &since).await {
        Ok(r) => r,
        Err(e) => {
            // The broker (or a limit): not the client's fault; it retries.
            e.log("Socket.IO CONNECT failed");
            restash(node, taken);
            say_goodbye(eio, None).await;
            return None;
        }
    };
    let mut trail = Trail {
        user,
        namespace: namespace.clone(),
        connection: sid.to_string(),
        connected_us: session.handle.connected_us,
        ..Trail::default()
    };
    trail.rooms = channels.iter().filter(|c| Some(*c) != own_room.as_ref()).cloned().collect();
    trail.base.extend(bases);
    for (ch, o) in &since {
        if let Some(o) = Offset::parse(o) {
            trail.base.entry(ch.clone()).or_insert(o);
        }
    }
    // Recovered: the trail was ours, the client's position known, and every
    // channel with history caught up.
    let is_recovered = old_pid.is_some() && known && recovered.iter().all(|(_, ok)| *ok);
    if old_pid.is_some() && !is_recovered {
        tracing::debug!(known, ?recovered, ?since, "recovery state found, but not everything missed could be sent");
    }
    if taken.is_some() {
        node.metrics
            .socketio_recoveries
            .with_label_values(&[if is_recovered { "recovered" } else { "not_recovered" }])
            .inc();
    }
    // The same pid tells socket.io-client it was recovered; a new one, not.
    trail.pid = match old_pid {
        Some(p) if is_recovered => p,
        _ => crate::config::random_id(16),
    };
    // No `pid` when recovery is off (`--socketio-recovery-window 0`), as
    // Socket.IO answers without connection-state recovery.
    let welcome = SocketIo::connected(&namespace, &sid, recovers(node).then_some(trail.pid.as_str()));
    session.state = Some(Box::new(trail));
    node.metrics.connection_result(ConnResult::Accepted);
    tracing::debug!(namespace, recovered = is_recovered, "socket connected");
    Some((session, welcome))
}

/// Puts back a recovery state taken for a CONNECT that failed, so that the
/// client's retry can use it.
fn restash(node: &Arc<Node>, taken: Option<(String, String)>) {
    let (Some((key, saved)), Some(window)) = (taken, node.cfg.session.socketio.as_ref().map(|s| s.recovery_window))
    else {
        return;
    };
    let n = node.clone();
    node.spawn(async move {
        let _ = n.broker.stash(&key, saved, window).await;
    });
}

/// A trail with the app's commands issued while its socket was away
/// applied; None when the app disconnected the socket meanwhile, or when
/// the commands of that time are no longer all known.
async fn since_away(node: &Node, mut trail: Trail) -> Result<Option<Trail>, crate::broker::BrokerError> {
    // Commands issued well before the socket ended reached it live.
    let after = trail.kept_us.saturating_sub(5_000_000).max(trail.connected_us);
    let Some(commands) = node.broker.commands_after(after).await? else {
        tracing::debug!("the app's commands since this socket left are no longer all kept: not recovered");
        return Ok(None);
    };
    for (_, cmd) in &commands {
        if trail.apply(cmd) == Applied::Dropped {
            return Ok(None);
        }
    }
    Ok(Some(trail))
}

/// Ends a socket that never started: a CONNECT_ERROR first when it is a
/// refusal (final for the client), else a close that says "try again".
async fn say_goodbye(eio: &mut Eio, packet: Option<Utf8Bytes>) {
    let frame = match packet {
        Some(p) => {
            let _ = eio.feed(WsMessage::Text(p)).await;
            let _ = eio.flush().await;
            CloseFrame { code: CloseCode::Normal, reason: Utf8Bytes::from_static("") }
        }
        None => CloseFrame { code: CloseCode::Again, reason: Utf8Bytes::from_static("try again later") },
    };
    eio.close(Some(frame)).await;
}
