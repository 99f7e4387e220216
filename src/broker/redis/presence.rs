//! Presence in Redis: this node's heartbeat over its own entries.

use std::sync::Arc;
use std::time::Duration;

use super::conn::Pool;

use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::wire::*;
use crate::broker::BrokerError;

pub(super) fn expiry_ms() -> u64 {
    u64::try_from(crate::broker::presence::EXPIRY.as_millis()).unwrap_or(u64::MAX)
}

/// Refreshes the expiry of this node's presence entries every heartbeat, so
/// that a node that dies without removing them loses them within the expiry.
pub(super) async fn heartbeat(
    pool: Pool,
    keys: Keys,
    local: Arc<crate::broker::presence::LocalPresence>,
    timeout: Duration,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(crate::broker::presence::HEARTBEAT);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let entries = local.all();
        if entries.is_empty() {
            continue;
        }
        let until = crate::protocol::now_us() / 1000 + expiry_ms();
        let refresh = async {
            let c = pool.get().await?;
            // One pipeline; on a Cluster one per channel (a pipeline runs on one slot).
            let mut pipes = vec![redis::pipe()];
            for (channel, connection, entry) in &entries {
                if keys.sharded && !pipes.last().is_some_and(|p| p.is_empty()) {
                    pipes.push(redis::pipe());
                }
                let Some(pipe) = pipes.last_mut() else { continue };
                let (hash, zset) = keys.presence(channel);
                pipe.cmd("HSET").arg(&hash).arg(&**connection).arg(entry).ignore();
                pipe.cmd("ZADD").arg(&zset).arg(until).arg(&**connection).ignore();
                pipe.cmd("PEXPIRE").arg(&hash).arg(expiry_ms() * 4).ignore();
                pipe.cmd("PEXPIRE").arg(&zset).arg(expiry_ms() * 4).ignore();
            }
            c.run_each(pipes).await
        };
        if let Err(e) = tokio::time::timeout(timeout, refresh).await.unwrap_or(Err(BrokerError::Timeout(timeout))) {
            debug!(error = %e, "presence heartbeat failed; retrying at the next");
        }
    }
}
