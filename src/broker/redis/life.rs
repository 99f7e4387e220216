//! The life of the Redis dataset: which history offsets may be trusted.
//!
//! Redis replicates and persists asynchronously, so the Redis a node talks
//! to after a failover, a restart from an older snapshot or a managed
//! endpoint switching machines can lack the last writes, offset counters
//! included, and would hand out again offsets clients have seen for other
//! messages. A client resuming from such an offset would silently skip
//! the messages that now carry it.
//!
//! So the dataset has a life id (`{prefix}life`, field `id`) and every
//! channel's meta records the life its epoch was stamped in (`l`): the
//! publish script starts a new epoch where they differ, the history script
//! reports such a channel as having no history. A node ends a life when it
//! sees that acknowledged writes are gone:
//!
//! - the watermark: every publish pipeline that carries a history publish
//!   ends with `INCR {prefix}wm:<node>` (one per node: a node whose writes
//!   survived must not hide another's loss); the node keeps the highest
//!   value it got back. Redis applies, replicates and persists in order, so
//!   a dataset that lost one of those publishes lost the increment after
//!   it: a watermark below the node's means lost writes. Checked by every
//!   publish script (the node passes its value: a publisher that reaches a
//!   new master first still cannot reuse an offset) and on every
//!   subscriber reconnect;
//! - a channel this node delivers whose top offset is below the last one
//!   it delivered, in the same epoch.
//!
//! Both are checked before the node says it is up again. What no surviving
//! node saw acknowledged cannot be detected (documented).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::conn::Pool;

use crate::broker::BrokerError;

/// Ends the life (a new `id`, ARGV[2]) when ARGV[3] is "1" or this node's
/// watermark (KEYS[2]) is below ARGV[1], raising it to ARGV[1] (for ARGV[4]
/// ms). Answers 1 when it ended the life. KEYS: life, node's watermark.
pub(super) const LIFE_SCRIPT: &str = r"
local wm = tonumber(redis.call('GET', KEYS[2]) or '0')
local mine = tonumber(ARGV[1])
if ARGV[3] == '1' or wm < mine then
  redis.call('HSET', KEYS[1], 'id', ARGV[2])
  if wm < mine then redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[4]) end
  return 1
end
return 0
";

/// This node's view of the dataset's life.
pub(super) struct Life {
    /// `{prefix}life`.
    pub(super) key: String,
    /// `{prefix}wm:<node>`: this node's watermark. Per node: a node whose
    /// writes survived must not hide the loss of another's.
    pub(super) watermark: String,
    /// The highest watermark a publish pipeline of this node got back.
    acked: AtomicU64,
    script: redis::Script,
    /// On a Cluster (see [`Life::check`]).
    sharded: bool,
}

impl Life {
    pub(super) fn new(key: String, watermark: String, sharded: bool) -> Self {
        Life { key, watermark, sharded, acked: AtomicU64::new(0), script: redis::Script::new(LIFE_SCRIPT) }
    }

    /// The highest watermark got back so far.
    pub(super) fn acked_now(&self) -> u64 {
        self.acked.load(Ordering::Acquire)
    }

    /// A publish pipeline came back with watermark `wm`.
    pub(super) fn acked(&self, wm: u64) {
        self.acked.fetch_max(wm, Ordering::AcqRel);
    }

    /// Ends the life if `lost` (this node saw it) or if the watermark says
    /// acknowledged writes are gone. True when this call ended it.
    ///
    /// Not on a Cluster: there each shard's life is its master's run id,
    /// which the scripts read themselves (a failover or restart of a shard
    /// starts new epochs for its channels, lossless or not).
    pub(super) async fn check(&self, pool: &Pool, lost: bool, timeout: Duration) -> Result<bool, BrokerError> {
        let mine = self.acked.load(Ordering::Acquire);
        if self.sharded || (mine == 0 && !lost) {
            return Ok(false);
        }
        let run = async {
            let mut c = pool.get().await?;
            let mut inv = self.script.key(&self.key);
            inv.key(&self.watermark).arg(mine).arg(crate::config::random_id(8)).arg(if lost { "1" } else { "0" });
            inv.arg(super::wire::META_TTL_MS);
            inv.invoke_async::<i64>(&mut c).await.map_err(BrokerError::from)
        };
        let ended = tokio::time::timeout(timeout, run).await.unwrap_or(Err(BrokerError::Timeout(timeout)))? == 1;
        if ended {
            tracing::warn!(
                "Redis lost acknowledged writes (a failover to a replica behind, or a restart from an older \
                 copy): history starts a new epoch on every channel, and resuming clients are told"
            );
        }
        Ok(ended)
    }
}
