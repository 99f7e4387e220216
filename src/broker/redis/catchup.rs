//! Where the subscriber's channels with history stand, and how it catches
//! them up: the top offset read before subscribing, the catch-up after a
//! reconnect or a gap, the gap notice where history no longer covers it,
//! and the placing of each live message against what was delivered.

use std::sync::Arc;

use tokio_tungstenite::tungstenite::Utf8Bytes;
use tracing::{debug, warn};

use super::gaps::{Arrival, arrival};
use super::subscriber::{SubState, Subscriber};
use super::wire::*;
use crate::broker::BrokerError;
use crate::channel::Channel;
use crate::protocol::{Kind, Message, Offset};

impl Subscriber {
    /// Records the current top offset of the history channels in `chunk`
    /// that are not tracked yet.
    pub(super) async fn track(&self, chunk: &[Channel], st: &mut SubState) -> Result<(), BrokerError> {
        let todo: Vec<&Channel> = chunk
            .iter()
            .filter(|c| self.namespaces.rule(c).history.is_some() && !st.tracked.contains_key(*c))
            .collect();
        if todo.is_empty() {
            return Ok(());
        }
        if self.keys.sharded {
            return self.track_sharded(todo, st).await;
        }
        let read = async {
            let mut c = self.pool.get().await?;
            let mut pipe = redis::pipe();
            pipe.cmd("HGET").arg(&self.keys.life).arg("id");
            for ch in &todo {
                pipe.cmd("HMGET").arg(self.keys.meta(ch)).arg("e").arg("s").arg("l");
            }
            // One reply per command: the life, then each channel's meta
            // (epoch, top offset, the life it was stamped in). Read as a
            // list: a pair would only fit a chunk of exactly one channel.
            let replies: Vec<redis::Value> = pipe.query_async(&mut c).await?;
            let mut replies = replies.iter();
            let life: Option<String> =
                replies.next().map(redis::from_redis_value_ref).transpose().map_err(redis::RedisError::from)?.flatten();
            let metas = replies
                .map(redis::from_redis_value_ref::<(Option<String>, Option<u64>, Option<String>)>)
                .collect::<Result<Vec<_>, _>>()
                .map_err(redis::RedisError::from)?;
            Ok::<_, BrokerError>((life, metas))
        };
        let (life, metas) =
            tokio::time::timeout(self.timeout, read).await.unwrap_or(Err(BrokerError::Timeout(self.timeout)))?;
        for (ch, (epoch, top, stamped)) in todo.into_iter().zip(metas) {
            // Stamped in another life of the dataset: no history (as the history script says).
            let (epoch, top) = if stamped.is_some() && stamped != life { (None, None) } else { (epoch, top) };
            let offset = Offset { epoch: Arc::from(epoch.unwrap_or_default()), seq: top.unwrap_or(0) };
            st.tracked.insert(ch.clone(), offset);
        }
        Ok(())
    }

    /// [`track`] on a Cluster: each channel's meta on its shard (the meta
    /// script compares the life there), all at once.
    async fn track_sharded(&self, todo: Vec<&Channel>, st: &mut SubState) -> Result<(), BrokerError> {
        let c = tokio::time::timeout(self.timeout, self.pool.get())
            .await
            .map_err(|_| BrokerError::Timeout(self.timeout))??;
        let reads = todo.iter().map(|ch| {
            let (mut c, meta) = (c.shared(), self.keys.meta(ch));
            async move { self.scripts.meta.key(meta).invoke_async::<(String, u64)>(&mut c).await }
        });
        let metas = tokio::time::timeout(self.timeout, futures_util::future::join_all(reads))
            .await
            .map_err(|_| BrokerError::Timeout(self.timeout))?;
        for (ch, meta) in todo.into_iter().zip(metas) {
            let (epoch, seq) = meta?;
            st.tracked.insert(ch.clone(), Offset { epoch: Arc::from(epoch), seq });
        }
        Ok(())
    }

    /// After a gap in this node's subscription (a reconnect): every tracked
    /// channel gets what was published since its last delivered offset.
    pub(super) async fn catch_up(&self, st: &mut SubState) -> Result<(), BrokerError> {
        let channels: Vec<(Channel, Offset)> = st.tracked.iter().map(|(c, o)| (c.clone(), o.clone())).collect();
        for (channel, last) in channels {
            self.fill(&channel, &last, None, st).await?;
        }
        Ok(())
    }

    /// Delivers what history holds after `last` (up to, not including,
    /// sequence `before` when given) and moves the channel's tracked offset.
    /// Where history no longer covers it, the channel's subscribers are told
    /// (a gap notice) and tracking restarts at the top.
    pub(super) async fn fill(
        &self,
        channel: &Channel,
        last: &Offset,
        before: Option<u64>,
        st: &mut SubState,
    ) -> Result<(), BrokerError> {
        let Some(policy) = self.namespaces.rule(channel).history else { return Ok(()) };
        // Nothing was ever published when it was tracked: everything in the
        // (new) epoch is missed, from the start.
        let after = if last.epoch.is_empty() { 0 } else { last.seq };
        let limit = before.map_or(policy.read_limit(), |b| {
            usize::try_from(b.saturating_sub(after + 1)).unwrap_or(policy.read_limit())
        });
        if before.is_some() && limit == 0 {
            return Ok(());
        }
        self.metrics.history_reads.inc();
        let h = read_history(&self.pool, &self.scripts.history, &self.keys, channel, after, limit.max(1), self.timeout)
            .await?;
        if h.epoch.is_empty() {
            // No history at all (never published, or lost with nothing since).
            if !last.epoch.is_empty() && last.seq > 0 {
                self.gap(channel, st, Offset { epoch: h.epoch.clone(), seq: 0 });
            }
            return Ok(());
        }
        let start = Offset { epoch: h.epoch.clone(), seq: after };
        let same_life = last.epoch.is_empty() || *last.epoch == *h.epoch;
        if !last.epoch.is_empty() && same_life && last.seq > h.top && !st.life_ended {
            // This node delivered offsets the channel no longer reaches: the
            // dataset lost acknowledged writes, and would reuse them.
            st.life_ended = self.life.check(&self.pool, true, self.timeout).await?;
            if st.life_ended {
                self.metrics.history_lives_ended.inc();
            }
        }
        if st.life_ended && same_life && last.seq > h.top {
            self.gap(channel, st, Offset { epoch: Arc::from(""), seq: 0 });
            return Ok(());
        }
        if !same_life || !h.covers(&start) {
            self.gap(channel, st, h.top_offset());
            return Ok(());
        }
        let mut n = 0u64;
        for m in h.messages.iter().filter(|m| before.is_none_or(|b| m.offset.as_ref().is_some_and(|o| o.seq < b))) {
            self.events.deliver(m);
            n += 1;
            if let Some(o) = &m.offset {
                st.tracked.insert(channel.clone(), o.clone());
            }
        }
        if n > 0 {
            self.metrics.history_recovered.inc_by(n);
            debug!(%channel, messages = n, "caught up from history");
        }
        Ok(())
    }

    /// Tells the channel's local subscribers that messages were lost beyond
    /// history, and tracks it from `at` on.
    fn gap(&self, channel: &Channel, st: &mut SubState, at: Offset) {
        self.metrics.history_gaps.inc();
        warn!(%channel, "messages lost beyond history: subscribers told to reload");
        let notice = Message::event(Kind::Gap, channel.clone(), Utf8Bytes::from_static("null"), None);
        self.events.deliver(&Arc::new(notice));
        st.tracked.insert(channel.clone(), at);
    }

    /// A message with an offset: delivered once, in order, gaps filled first.
    pub(super) async fn on_offset_message(&self, msg: Message, off: Offset, st: &mut SubState) {
        let channel = msg.channel.clone();
        match arrival(st.tracked.get(&channel), &off) {
            Arrival::Duplicate => return,
            Arrival::Next => {}
            Arrival::NewEpoch { fill } => {
                self.gap(&channel, st, Offset { epoch: off.epoch.clone(), seq: 0 });
                if let Some(from) = fill {
                    if let Err(e) = self.fill(&channel, &from, Some(off.seq), st).await {
                        warn!(%channel, error = %e, "cannot read history to fill a gap");
                    }
                }
            }
            Arrival::Missed { last } => {
                if let Err(e) = self.fill(&channel, &last, Some(off.seq), st).await {
                    warn!(%channel, error = %e, "cannot read history to fill a gap");
                    self.gap(&channel, st, off.clone());
                }
            }
        }
        if self.namespaces.rule(&channel).history.is_some() {
            st.tracked.insert(channel, off);
        }
        self.events.deliver(&Arc::new(msg));
    }
}
