//! What travels through Redis: key and channel names, the Lua scripts, the
//! message envelope and the logged commands.

use std::sync::Arc;
use std::time::Duration;

use super::conn::Pool;
use bytes::Bytes;

use serde::{Deserialize, Serialize};
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::broker::{BrokerError, History};
use crate::channel::Channel;
use crate::protocol::commands::NodeCommand;
use crate::protocol::{Kind, Message, Offset};

/// Redis key and channel names, all under the prefix.
///
/// On a Cluster (`sharded`), a channel's pub/sub name carries the channel as
/// its hash tag (`{prefix}ch:{<channel>}`), like its history and presence
/// keys, so its scripts `SPUBLISH` on its own shard; node-wide keys carry
/// the prefix as theirs (`{<prefix>}node:…`), so the few commands that
/// touch several run on one shard.
#[derive(Clone)]
pub(super) struct Keys {
    pub(super) prefix: String,
    /// Node-wide keys start with this: the prefix, or `{prefix}` on a Cluster.
    global: String,
    pub(super) sharded: bool,
    pub(super) channel_prefix: String,
    pub(super) control: String,
    pub(super) control_log: String,
    /// Calls and their answers (published, not logged).
    pub(super) calls: String,
    pub(super) probe: String,
    /// The dataset's life (see `life.rs`).
    pub(super) life: String,
    /// This node's watermark (see `life.rs`).
    pub(super) watermark: String,
}

impl Keys {
    pub(super) fn new(prefix: &str, node_id: &str, sharded: bool) -> Self {
        let global = if sharded { format!("{{{prefix}}}") } else { prefix.to_owned() };
        Keys {
            prefix: prefix.to_owned(),
            channel_prefix: format!("{prefix}ch:"),
            control: format!("{prefix}ctl"),
            control_log: format!("{global}ctl:log"),
            calls: format!("{prefix}calls"),
            probe: format!("{prefix}probe:{node_id}"),
            life: format!("{global}life"),
            watermark: format!("{global}wm:{node_id}"),
            global,
            sharded,
        }
    }
    /// A node-wide key (`node:…`, `nodes`, `stash:…`).
    pub(super) fn global(&self, suffix: &str) -> String {
        format!("{}{suffix}", self.global)
    }
    pub(super) fn channel(&self, channel: &str) -> String {
        if self.sharded {
            format!("{}{{{channel}}}", self.channel_prefix)
        } else {
            format!("{}{channel}", self.channel_prefix)
        }
    }
    /// The channel a pub/sub name under the channel prefix is for.
    pub(super) fn channel_of<'a>(&self, name: &'a str) -> Option<&'a str> {
        let rest = name.strip_prefix(&self.channel_prefix)?;
        if self.sharded { rest.strip_prefix('{')?.strip_suffix('}') } else { Some(rest) }
    }
    /// A channel's history stream and meta hash. The `{channel}` hash tag
    /// keeps both in one slot, for a later Redis Cluster mode.
    pub(super) fn stream(&self, channel: &str) -> String {
        format!("{}hist:{{{channel}}}:s", self.prefix)
    }
    pub(super) fn meta(&self, channel: &str) -> String {
        format!("{}hist:{{{channel}}}:m", self.prefix)
    }
    /// A channel's presence: members (hash) and their expiry (sorted set).
    pub(super) fn presence(&self, channel: &str) -> (String, String) {
        (format!("{}pres:{{{channel}}}:h", self.prefix), format!("{}pres:{{{channel}}}:z", self.prefix))
    }
}

/// The scripts as a mode runs them: on a Cluster, a channel's messages go
/// out with `SPUBLISH` (on its shard) and the dataset's life is the
/// shard's: its master's run id (a script can only touch its own slot, so
/// there is no node-wide life key to read; see `life.rs`).
pub(super) struct Scripts {
    pub(super) publish: redis::Script,
    pub(super) history: redis::Script,
    pub(super) meta: redis::Script,
    pub(super) presence: redis::Script,
    pub(super) presence_read: redis::Script,
    pub(super) control: redis::Script,
}

/// A Cluster shard's life, for the channel whose meta is `meta`: its
/// master's run id and replication id (a restart changes the first, a
/// failover or a demoted master promoted again the second). A meta stamped
/// with another run id that came by `MIGRATE` (a slot moved) to a master
/// that has been up since before the channel's last write, and was never
/// a promoted replica, is the same history: it is adopted, not reset.
///
/// `known`: the run id, when the caller knows it (a publisher's own
/// connection to this master learned it when it connected, and a
/// connection does not outlive its server process); else `INFO` says.
const SHARD_LIFE: &str = r"
local function shard_life(meta, known)
  local info = nil
  local run = known
  if not run then
    info = redis.call('INFO', 'server')
    run = string.match(info, 'run_id:(%w+)') .. ':' ..
      string.match(redis.call('INFO', 'replication'), 'master_replid:(%w+)')
  end
  local m = redis.call('HMGET', meta, 'l', 't')
  if m[1] and m[1] ~= run and m[2] then
    info = info or redis.call('INFO', 'server')
    local up = tonumber(string.match(info, 'uptime_in_seconds:(%d+)'))
    local now = tonumber(redis.call('TIME')[1])
    local replid2 = string.match(redis.call('INFO', 'replication'), 'master_replid2:(%w+)')
    if replid2 == string.rep('0', 40) and now - up <= tonumber(m[2]) then
      redis.call('HSET', meta, 'l', run)
    end
  end
  return run
end
";

impl Scripts {
    pub(super) fn new(sharded: bool) -> Scripts {
        let publish = if sharded { "SPUBLISH" } else { "PUBLISH" };
        // Each script's first statement sets `life`.
        let life = |meta_key: &str, create: bool| {
            if sharded {
                // ARGV[8] of the publish script: the run id, where known.
                let known = if create { "ARGV[8]" } else { "nil" };
                format!("{SHARD_LIFE}local life = shard_life({meta_key}, {known})\nlocal ended = 0")
            } else if create {
                // KEYS[5]: this node's watermark, ARGV[8]: the highest it got
                // back. Below it, writes this node saw acknowledged are gone:
                // a new life, before any offset is handed out again.
                "local life = redis.call('HGET', KEYS[4], 'id')\n\
                 local wm = tonumber(redis.call('GET', KEYS[5]) or '0')\n\
                 local ended = 0\n\
                 if not life or wm < tonumber(ARGV[8]) then\n\
                 \x20 if life then ended = 1 end\n\
                 \x20 life = ARGV[6]\n\
                 \x20 redis.call('HSET', KEYS[4], 'id', life)\n\
                 \x20 if wm < tonumber(ARGV[8]) then redis.call('SET', KEYS[5], ARGV[8], 'PX', ARGV[5]) end\n\
                 end"
                .to_owned()
            } else {
                // The life key is always the last key.
                "local life = redis.call('HGET', KEYS[#KEYS], 'id')".to_owned()
            }
        };
        // On a Cluster a publish records when (the shard's clock), for `SHARD_LIFE`.
        let stamp = if sharded { "redis.call('HSET', KEYS[2], 't', redis.call('TIME')[1])" } else { "" };
        Scripts {
            publish: redis::Script::new(
                &PUBLISH_SCRIPT
                    .replace("__LIFE__", &life("KEYS[2]", true))
                    .replace("__STAMP__", stamp)
                    .replace("'PUBLISH'", &format!("'{publish}'")),
            ),
            history: redis::Script::new(&HISTORY_SCRIPT.replace("__LIFE__", &life("KEYS[2]", false))),
            meta: redis::Script::new(&META_SCRIPT.replace("__LIFE__", &life("KEYS[1]", false))),
            presence: redis::Script::new(&PRESENCE_SCRIPT.replace("'PUBLISH'", &format!("'{publish}'"))),
            presence_read: redis::Script::new(PRESENCE_READ_SCRIPT),
            // Commands go to every node: classic pub/sub, which a Cluster broadcasts.
            control: redis::Script::new(CONTROL_SCRIPT),
        }
    }
}

/// Adds or removes a presence member and, with ARGV[4] = "1", announces it
/// on the channel (a `j`oin or `l`eave envelope), atomically.
/// KEYS: hash, zset, pubsub channel. ARGV: connection, entry, expiry (ms since
/// the epoch; "" to remove), announce, envelope header, keys' TTL (ms).
const PRESENCE_SCRIPT: &str = r"
if ARGV[3] == '' then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('ZREM', KEYS[2], ARGV[1])
else
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
  redis.call('PEXPIRE', KEYS[1], ARGV[6])
  redis.call('PEXPIRE', KEYS[2], ARGV[6])
end
if ARGV[4] == '1' then
  redis.call('PUBLISH', KEYS[3], ARGV[5] .. ARGV[2])
end
return 1
";

/// Drops expired members, then answers the count and (within ARGV[2]) the
/// members. KEYS: hash, zset. ARGV: now (ms), most listed.
const PRESENCE_READ_SCRIPT: &str = r"
local gone = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1])
for _, c in ipairs(gone) do redis.call('HDEL', KEYS[1], c) end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[1])
local n = redis.call('HLEN', KEYS[1])
if n > tonumber(ARGV[2]) then return {n, {}} end
return {n, redis.call('HVALS', KEYS[1])}
";

/// How long a channel's meta (epoch and top offset) outlives its last
/// publish: much longer than any history, so an offset is never reused
/// with the same epoch while a client could still present it.
pub(super) const META_TTL_MS: u64 = 30 * 24 * 3600 * 1000;

/// Assigns the next offset, appends to the stream (trimmed), refreshes the
/// TTLs and publishes the message with its offset and epoch, atomically.
/// A missing meta (expired, flushed, new), or one stamped in another life
/// of the dataset (KEYS[4], see `life.rs`), starts a new epoch, ARGV[6].
/// KEYS: stream, meta, pubsub channel, life (not on a Cluster: `Scripts`).
const PUBLISH_SCRIPT: &str = r#"
__LIFE__
local m = redis.call('HMGET', KEYS[2], 'e', 'l')
local epoch = m[1]
if not epoch or (m[2] and m[2] ~= life) then
  epoch = ARGV[6]
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[2], 'e', epoch, 's', 0, 'l', life)
elseif not m[2] then
  redis.call('HSET', KEYS[2], 'l', life)
end
local seq = redis.call('HINCRBY', KEYS[2], 's', 1)
__STAMP__
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], seq .. '-0', 'h', ARGV[1], 'd', ARGV[2], 'i', ARGV[7])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[5])
local header = '{"o":' .. seq .. ',"e":"' .. epoch .. '",' .. string.sub(ARGV[1], 2)
redis.call('PUBLISH', KEYS[3], header .. '\n' .. ARGV[2])
return {seq, epoch, ended}
"#;

/// Reads a channel's epoch, top offset, oldest kept offset and the entries
/// after ARGV[1] (at most ARGV[2]), atomically. A meta stamped in another
/// life of the dataset is no history. KEYS: stream, meta, life.
const HISTORY_SCRIPT: &str = r"
__LIFE__
local m = redis.call('HMGET', KEYS[2], 'e', 's', 'l')
if not m[1] then return {'', 0, 1, {}} end
if m[3] and m[3] ~= life then return {'', 0, 1, {}} end
local top = tonumber(m[2])
local first = top + 1
local oldest = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
if oldest[1] then first = tonumber(string.match(oldest[1][1], '^(%d+)')) end
local entries = redis.call('XRANGE', KEYS[1], '(' .. ARGV[1] .. '-0', '+', 'COUNT', ARGV[2])
return {m[1], top, first, entries}
";

/// A channel's epoch and top offset (`{'', 0}` without history, or one
/// from another life). KEYS: meta, life (not on a Cluster).
const META_SCRIPT: &str = r"
__LIFE__
local m = redis.call('HMGET', KEYS[1], 'e', 's', 'l')
if not m[1] then return {'', 0} end
if m[3] and m[3] ~= life then return {'', 0} end
return {m[1], tonumber(m[2])}
";

/// The envelope's header. `o`/`e` (offset, epoch) are added by the publish
/// script where history is kept.
#[derive(Serialize, Deserialize)]
pub(super) struct Header<'a> {
    /// `j`oin or `l`eave (presence events); absent for a publication.
    #[serde(default, skip_serializing_if = "Option::is_none", borrow)]
    pub(super) k: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) o: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none", borrow)]
    pub(super) e: Option<std::borrow::Cow<'a, str>>,
    pub(super) t: u64,
    #[serde(default, skip_serializing_if = "Option::is_none", borrow)]
    pub(super) x: Option<std::borrow::Cow<'a, str>>,
    /// The event name of a named event (`data` is its arguments).
    #[serde(default, skip_serializing_if = "Option::is_none", borrow)]
    pub(super) v: Option<std::borrow::Cow<'a, str>>,
    /// A named event's binary attachments, base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) b: Option<Vec<String>>,
}

/// Attachments as the header carries them.
pub(super) fn attachments_of(m: &Message) -> Option<Vec<String>> {
    m.attachments.as_ref().map(|a| a.iter().map(|x| x.to_string()).collect())
}

fn attachments_from(b: Option<Vec<String>>) -> Option<crate::protocol::Attachments> {
    b.map(|b| b.into_iter().map(String::into_boxed_str).collect())
}

/// A command to every node, as logged and published.
#[derive(Serialize, Deserialize)]
pub(super) struct Command {
    /// When it was issued (µs since the Unix epoch, the issuing node's clock).
    pub(super) t: u64,
    #[serde(flatten)]
    pub(super) op: NodeCommand,
}

/// Commands kept in the control log (approximately).
pub(super) const CONTROL_LOG_LEN: usize = 10_000;
/// How long the control log outlives its last command.
pub(super) const CONTROL_LOG_TTL_MS: u64 = 24 * 3600 * 1000;

/// Appends a command to the log and publishes it with its id, atomically.
const CONTROL_SCRIPT: &str = r"
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'c', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PUBLISH', ARGV[4], id .. ' ' .. ARGV[1])
return id
";

/// Logs and publishes a command for every node.
pub(super) async fn send_command(
    pool: &Pool,
    script: &redis::Script,
    keys: &Keys,
    op: &NodeCommand,
    timeout: Duration,
) -> Result<(), BrokerError> {
    let cmd = Command { t: crate::protocol::now_us(), op: op.clone() };
    // A struct of strings always serializes.
    let payload = serde_json::to_string(&cmd).unwrap_or_default();
    within(timeout, async {
        let mut c = pool.get().await?;
        let mut inv = script.key(&keys.control_log);
        // The channel is an argument: on a Cluster it is not in the log's slot.
        inv.arg(&payload).arg(CONTROL_LOG_LEN).arg(CONTROL_LOG_TTL_MS).arg(&keys.control);
        inv.invoke_async::<String>(&mut c).await.map_err(BrokerError::from)
    })
    .await
    .map(|_| ())
}

/// `run`, or a timeout error after `timeout`.
async fn within<T>(
    timeout: Duration,
    run: impl std::future::Future<Output = Result<T, BrokerError>>,
) -> Result<T, BrokerError> {
    tokio::time::timeout(timeout, run).await.unwrap_or(Err(BrokerError::Timeout(timeout)))
}

/// Publishes a call or its answer to every node, without logging it.
pub(super) async fn send_call(
    pool: &Pool,
    keys: &Keys,
    op: &NodeCommand,
    timeout: Duration,
) -> Result<(), BrokerError> {
    let cmd = Command { t: crate::protocol::now_us(), op: op.clone() };
    let payload = serde_json::to_string(&cmd).unwrap_or_default();
    within(timeout, async {
        let mut c = pool.get().await?;
        redis::cmd("PUBLISH").arg(&keys.calls).arg(payload).query_async::<i64>(&mut c).await.map_err(BrokerError::from)
    })
    .await
    .map(|_| ())
}

/// A Redis stream id, `<ms>-<seq>`, ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct StreamId(pub(super) u64, pub(super) u64);

impl StreamId {
    pub fn parse(s: &str) -> Option<StreamId> {
        let (ms, seq) = s.split_once('-')?;
        Some(StreamId(ms.parse().ok()?, seq.parse().ok()?))
    }
}

impl std::fmt::Display for StreamId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.0, self.1)
    }
}

pub(super) fn envelope(header: &Header<'_>, frame: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(frame.len() + 48);
    // A struct of an integer and a string always serializes.
    let _ = serde_json::to_writer(&mut out, header);
    out.push(b'\n');
    out.extend_from_slice(frame);
    out
}

/// Reads a channel's history with the history script.
pub(super) async fn read_history(
    pool: &Pool,
    script: &redis::Script,
    keys: &Keys,
    channel: &Channel,
    after: u64,
    limit: usize,
    timeout: Duration,
) -> Result<History, BrokerError> {
    type Entry = (String, Vec<(String, Vec<u8>)>);
    let read = async {
        let mut c = pool.get().await?;
        let mut inv = script.key(keys.stream(channel));
        inv.key(keys.meta(channel));
        if !keys.sharded {
            inv.key(&keys.life);
        }
        inv.arg(after).arg(limit);
        let (epoch, top, first, entries): (String, u64, u64, Vec<Entry>) = inv.invoke_async(&mut c).await?;
        Ok::<_, BrokerError>((epoch, top, first, entries))
    };
    let (epoch, top, first, entries) =
        tokio::time::timeout(timeout, read).await.unwrap_or(Err(BrokerError::Timeout(timeout)))?;
    let epoch: Arc<str> = Arc::from(epoch);
    let mut messages = Vec::with_capacity(entries.len());
    for (id, fields) in entries {
        let Some(seq) = id.split_once('-').and_then(|(s, _)| s.parse::<u64>().ok()) else { continue };
        let field = |name: &str| fields.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_slice());
        let (Some(h), Some(d)) = (field("h"), field("d")) else { continue };
        let Ok(header) = serde_json::from_slice::<Header<'_>>(h) else { continue };
        let Ok(data) = Utf8Bytes::try_from(Bytes::copy_from_slice(d)) else { continue };
        let msg = Message::new(channel.clone(), data, header.x.map(|x| x.into_owned().into_boxed_str()), header.t)
            .with_event(header.v.map(|v| Arc::from(&*v)))
            .with_attachments(attachments_from(header.b));
        messages.push(Arc::new(msg.with_offset(Offset { epoch: epoch.clone(), seq })));
    }
    Ok(History { epoch, top, first, messages })
}

/// Why a message read from a Redis channel is not one of ours.
#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    #[error("no wsrelay header (published by something else?)")]
    NoHeader,
    #[error("malformed header: {0}")]
    Header(#[from] serde_json::Error),
    #[error("invalid channel name: {0}")]
    Channel(#[from] crate::channel::ChannelError),
    #[error("data is not UTF-8")]
    NotUtf8,
}

/// Decodes a message published on `{prefix}ch:{channel}` (`channel` without
/// the prefix): only the small header is parsed; the data is taken as it
/// came (it was validated by the node that published it).
pub fn decode_message(channel: &str, payload: &[u8]) -> Result<Message, EnvelopeError> {
    let nl = payload.iter().position(|b| *b == b'\n').ok_or(EnvelopeError::NoHeader)?;
    let header: Header<'_> = serde_json::from_slice(&payload[..nl])?;
    let channel = Channel::parse(channel)?;
    let data = Utf8Bytes::try_from(Bytes::copy_from_slice(&payload[nl + 1..])).map_err(|_| EnvelopeError::NotUtf8)?;
    let kind = match header.k.as_deref() {
        Some("j") => Some(Kind::Join),
        Some("l") => Some(Kind::Leave),
        _ => None,
    };
    if let Some(kind) = kind {
        return Ok(Message::event(kind, channel, data, header.x.map(|x| x.into_owned().into_boxed_str())));
    }
    let msg = Message::new(channel, data, header.x.map(|x| x.into_owned().into_boxed_str()), header.t)
        .with_event(header.v.map(|v| Arc::from(&*v)))
        .with_attachments(attachments_from(header.b));
    Ok(match (header.o, header.e) {
        (Some(seq), Some(epoch)) => msg.with_offset(Offset { epoch: Arc::from(&*epoch), seq }),
        _ => msg,
    })
}

/// Splits a control message as published (`<stream id> <command JSON>`);
/// None if malformed. The command is read by [`decode_command`].
pub fn decode_control(payload: &[u8]) -> Option<(StreamId, &str)> {
    let (id, cmd) = std::str::from_utf8(payload).ok()?.split_once(' ')?;
    Some((StreamId::parse(id)?, cmd))
}

/// Reads a command (from the control channel or log, or a call): when it
/// was issued and what it does.
pub fn decode_command(cmd: &[u8]) -> Result<(u64, NodeCommand), serde_json::Error> {
    serde_json::from_slice::<Command>(cmd).map(|c| (c.t, c.op))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_roundtrip() {
        let h = Header { k: None, o: None, e: None, t: 42, x: Some("c1".into()), v: None, b: None };
        let e = envelope(&h, br#"{"op":"message"}"#);
        let nl = e.iter().position(|b| *b == b'\n').unwrap();
        let back: Header<'_> = serde_json::from_slice(&e[..nl]).unwrap();
        assert_eq!(back.t, 42);
        assert_eq!(back.x.as_deref(), Some("c1"));
        assert_eq!(&e[nl + 1..], br#"{"op":"message"}"#);
    }
}
