//! Publishing on a Cluster in pipelines: a batch grouped by shard master,
//! one pipeline per master on a connection of our own.
//!
//! redis-rs's cluster connection takes one command per message here (it
//! refuses a pipeline whose commands hash to different slots), which cost
//! the publishing sidecar 14 µs per message against 6 µs on one Redis
//! (docs/BENCHMARKS.md). A master accepts commands for several of its
//! slots in one pipeline, so: a slot map from `CLUSTER SLOTS`, the slot of
//! each message's keys (their `{channel}` hash tag), and per master one
//! pipeline. What a master redirects (`MOVED`/`ASK`: the slot moved) or
//! has not loaded (`NOSCRIPT`) was not run: it goes through redis-rs's
//! connection, which follows redirections, and the map is read again.

use std::collections::HashMap;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, ServerErrorKind};

use super::conn::{Pool, Source};
use super::wire::Scripts;
use crate::broker::BrokerError;

/// The slot of a key: CRC16 (XMODEM) of its hash tag, or of the key.
pub(super) fn slot(key: &[u8]) -> u16 {
    let tag = key
        .iter()
        .position(|b| *b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            rest.iter().position(|b| *b == b'}').filter(|len| *len > 0).map(|len| &rest[..len])
        })
        .unwrap_or(key);
    crc16::State::<crc16::XMODEM>::calculate(tag) % 16384
}

/// Which master serves which slots, with a connection to each.
pub(super) struct Routes {
    /// (first slot, last slot, index into `masters`), sorted.
    ranges: Vec<(u16, u16, usize)>,
    masters: Vec<MultiplexedConnection>,
    /// Each master's life (run id and replication id), read on its
    /// connection when it was made.
    run_ids: Vec<String>,
}

impl Routes {
    /// Reads the slot map and connects to every master.
    pub(super) async fn discover(
        pool: &Pool,
        source: &Source,
        scripts: &Scripts,
        timeout: Duration,
    ) -> Result<Routes, BrokerError> {
        let mut c = pool.get().await?;
        let slots: Vec<redis::Value> = redis::cmd("CLUSTER").arg("SLOTS").query_async(&mut c).await?;
        let mut ranges = Vec::new();
        let mut addresses: Vec<(String, u16)> = Vec::new();
        for range in slots {
            let redis::Value::Array(parts) = range else { continue };
            let (Some(first), Some(last), Some(redis::Value::Array(master))) =
                (parts.first(), parts.get(1), parts.get(2))
            else {
                continue;
            };
            let parsed = (
                redis::from_redis_value_ref::<u16>(first),
                redis::from_redis_value_ref::<u16>(last),
                master.first().map(redis::from_redis_value_ref::<String>),
                master.get(1).map(redis::from_redis_value_ref::<u16>),
            );
            let (Ok(first), Ok(last), Some(Ok(host)), Some(Ok(port))) = parsed else { continue };
            let i = match addresses.iter().position(|a| a.0 == host && a.1 == port) {
                Some(i) => i,
                None => {
                    addresses.push((host, port));
                    addresses.len() - 1
                }
            };
            ranges.push((first, last, i));
        }
        ranges.sort_unstable();
        let config =
            AsyncConnectionConfig::new().set_connection_timeout(Some(timeout)).set_response_timeout(Some(timeout));
        let mut masters = Vec::with_capacity(addresses.len());
        let mut run_ids = Vec::with_capacity(addresses.len());
        for (host, port) in addresses {
            let info = source.node(&host, port)?;
            let mut conn = redis::Client::open(info)?.get_multiplexed_async_connection_with_config(&config).await?;
            // Loaded on each master: the callers send EVALSHA with its hash.
            let _: String = scripts.publish.prepare_invoke().load_async(&mut conn).await?;
            // The shard's life as the scripts compute it: run id and
            // replication id. A promotion changes the replication id and
            // redirects this node's writes first (MOVED), so the map and
            // this value are read again before they could be stale.
            let (server, repl): (String, String) =
                redis::pipe().cmd("INFO").arg("server").cmd("INFO").arg("replication").query_async(&mut conn).await?;
            let field =
                |text: &str, name: &str| text.lines().find_map(|l| l.strip_prefix(name)).map(|v| v.trim().to_owned());
            match (field(&server, "run_id:"), field(&repl, "master_replid:")) {
                (Some(run), Some(replid)) => run_ids.push(format!("{run}:{replid}")),
                _ => return Err(BrokerError::NotConnected),
            }
            masters.push(conn);
        }
        Ok(Routes { ranges, masters, run_ids })
    }

    fn master_of(&self, key: &str) -> Option<usize> {
        let s = slot(key.as_bytes());
        let i = self.ranges.partition_point(|(_, last, _)| *last < s);
        self.ranges.get(i).filter(|(first, _, _)| *first <= s).map(|(_, _, m)| *m)
    }

    /// Runs `cmds` (index, a key of the command, the command, whether it
    /// is the publish script, which gets the master's run id as its last
    /// argument) grouped by master, one pipeline each, all at once. Per index: the reply,
    /// `None` where it was not run and may go elsewhere (redirected, script
    /// not loaded, slot not mapped), or the error of a pipeline that failed
    /// (it may have run: not retried). Also says whether the map is stale.
    pub(super) async fn run(
        &self,
        cmds: Vec<(usize, &str, redis::Cmd, bool)>,
        total: usize,
    ) -> (Vec<Option<Result<redis::Value, BrokerError>>>, bool) {
        let mut out: Vec<Option<Result<redis::Value, BrokerError>>> = (0..total).map(|_| None).collect();
        let mut stale = false;
        let mut groups: HashMap<usize, (Vec<usize>, redis::Pipeline)> = HashMap::new();
        for (i, key, mut cmd, script) in cmds {
            let Some(m) = self.master_of(key) else {
                stale = true;
                continue;
            };
            let (idx, pipe) = groups.entry(m).or_insert_with(|| {
                let mut p = redis::pipe();
                p.ignore_errors();
                (Vec::new(), p)
            });
            idx.push(i);
            if script {
                cmd.arg(&self.run_ids[m]);
            }
            pipe.add_command(cmd);
        }
        let runs = groups.into_iter().map(|(m, (idx, pipe))| {
            let mut conn = self.masters[m].clone();
            async move { (idx, pipe.query_async::<Vec<redis::Value>>(&mut conn).await) }
        });
        for (idx, result) in futures_util::future::join_all(runs).await {
            match result {
                Ok(values) => {
                    for (i, v) in idx.into_iter().zip(values) {
                        out[i] = match v {
                            // The slot moved, or the master restarted: read the map again.
                            redis::Value::ServerError(e)
                                if matches!(e.kind(), Some(ServerErrorKind::Moved | ServerErrorKind::NoScript)) =>
                            {
                                stale = true;
                                None
                            }
                            // A slot being migrated: this once elsewhere, the map stays.
                            redis::Value::ServerError(e)
                                if matches!(e.kind(), Some(ServerErrorKind::Ask | ServerErrorKind::TryAgain)) =>
                            {
                                None
                            }
                            redis::Value::ServerError(e) => Some(Err(redis::RedisError::from(e).into())),
                            v => Some(Ok(v)),
                        };
                    }
                }
                Err(e) => {
                    stale = true;
                    let e = BrokerError::from(e);
                    for i in idx {
                        out[i] = Some(Err(e.clone()));
                    }
                }
            }
        }
        (out, stale)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_follow_hash_tags() {
        // Redis Cluster's reference values (CLUSTER KEYSLOT).
        assert_eq!(slot(b"foo"), 12182);
        assert_eq!(slot(b"{user1000}.following"), slot(b"{user1000}.followers"));
        assert_eq!(slot(b"wsrelay:ch:{room:1}"), slot(b"wsrelay:hist:{room:1}:s"));
        assert_eq!(slot(b"foo{}{bar}"), slot(b"foo{}{bar}"));
        assert_ne!(slot(b"foo{}{bar}"), slot(b"bar"), "an empty tag hashes the whole key");
    }
}
