//! Channel names, validated once where they enter (a client frame, the URL,
//! the API, a hook's or token's answer, the config file) into [`Channel`],
//! and carried as that type everywhere past the edge.

use std::borrow::Borrow;
use std::fmt;
use std::sync::Arc;

/// Longest channel name, in bytes.
pub const MAX_CHANNEL_LEN: usize = 255;

/// Bytes allowed in a channel name besides ASCII letters and digits.
const PUNCTUATION: &str = "_-:.@/=+#,!~";

/// Why a string is not a channel name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChannelError {
    #[error("channel name is empty")]
    Empty,
    #[error("channel name is {0} bytes, the limit is {MAX_CHANNEL_LEN}")]
    TooLong(usize),
    #[error("channel name has {0:?}: allowed are A-Z a-z 0-9 and {PUNCTUATION}")]
    BadChar(char),
}

/// Checks a name (or a namespace prefix): 1–255 bytes of `A-Z a-z 0-9` and
/// `_ - : . @ / = + # , ! ~`. Nothing in it needs escaping in JSON, a URL
/// query or a Redis key.
pub fn check(name: &str) -> Result<(), ChannelError> {
    if name.is_empty() {
        return Err(ChannelError::Empty);
    }
    if name.len() > MAX_CHANNEL_LEN {
        return Err(ChannelError::TooLong(name.len()));
    }
    match name.chars().find(|c| !(c.is_ascii_alphanumeric() || PUNCTUATION.contains(*c))) {
        Some(c) => Err(ChannelError::BadChar(c)),
        None => Ok(()),
    }
}

/// A channel's Socket.IO namespace and room: `/chat#r` is room `r` of
/// namespace `/chat`, `/chat` that namespace's own channel (no room), and
/// any other name `n` room `n` of the main namespace `/`.
pub fn split_socketio(channel: &str) -> (&str, Option<&str>) {
    if channel == "/" {
        return ("/", None);
    }
    match channel.strip_prefix('/') {
        Some(rest) => match rest.find('#') {
            Some(i) => (&channel[..i + 1], Some(&rest[i + 1..])),
            None => (channel, None),
        },
        None => ("/", Some(channel)),
    }
}

/// Whether a name has the shape of a connection id (`<node-id>.<12 of
/// [0-9a-z]>`, as every node mints them): a channel by that name is the
/// room of one Socket.IO socket.
pub fn is_connection_id(name: &str) -> bool {
    name.rsplit_once('.').is_some_and(|(node, tail)| {
        !node.is_empty()
            && tail.len() == CONNECTION_ID_RANDOM
            && tail.bytes().all(|b| b.is_ascii_digit() || b.is_ascii_lowercase())
    })
}

// Ids that name their node, minted and read here only. A connection id
// (`socket.id`, what hooks, `exclude` and `/api/*` name) and an Engine.IO
// sid (the client's secret for polling) are `<node-id>.<random>`: the part
// before the last dot says which sidecar holds the connection, so any
// sidecar can route to it.

/// Random characters of a connection id.
const CONNECTION_ID_RANDOM: usize = 12;
/// Random characters of an Engine.IO sid (a secret: longer).
const ENGINEIO_SID_RANDOM: usize = 24;

/// `len` random characters of `[0-9a-z]`.
pub fn random_id(len: usize) -> String {
    use rand::RngExt;
    const ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut rng = rand::rng();
    (0..len).map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char).collect()
}

/// A connection id (`socket.id`: `<node-id>.<12 of [0-9a-z]>`): minted by
/// the node that holds the connection, parsed where one comes in (the API,
/// Redis, python-socketio's manager), and asked which node holds it. Cheap
/// to clone; compared, hashed and borrowed as its text, so maps keyed by it
/// are looked up with a `&str`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnectionId(Arc<str>);

impl ConnectionId {
    /// A new id on `node_id`.
    pub fn mint(node_id: &str) -> Self {
        ConnectionId(Arc::from(format!("{node_id}.{}", random_id(CONNECTION_ID_RANDOM))))
    }

    /// An id of the shape every node mints (None: no connection's).
    pub fn parse(s: &str) -> Option<Self> {
        is_connection_id(s).then(|| ConnectionId(Arc::from(s)))
    }

    /// The node that holds the connection.
    pub fn node(&self) -> &str {
        // Every ConnectionId has the shape `is_connection_id` checks: a
        // non-empty node before the last dot.
        self.0.rsplit_once('.').map_or("", |(n, _)| n)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::ops::Deref for ConnectionId {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for ConnectionId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ConnectionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ConnectionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl serde::Serialize for ConnectionId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for ConnectionId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        ConnectionId::parse(&s).ok_or_else(|| serde::de::Error::custom(format!("{s:?} is not a connection id")))
    }
}

/// A new Engine.IO session id on `node_id`.
pub fn engineio_sid(node_id: &str) -> String {
    format!("{node_id}.{}", random_id(ENGINEIO_SID_RANDOM))
}

/// The node an id names (None: not one of ours).
pub fn node_of(id: &str) -> Option<&str> {
    id.rsplit_once('.').map(|(n, _)| n).filter(|n| !n.is_empty())
}

/// Whether a channel stands for a Socket.IO namespace (`/`, `/chat`) or
/// one connection (the room named by its id, in any namespace): what is
/// published there is meant for those sockets alone, so clients may not
/// subscribe or publish there unless a namespace rule names it.
pub fn is_private(channel: &str) -> bool {
    match split_socketio(channel) {
        (_, None) => true,
        (_, Some(room)) => is_connection_id(room),
    }
}

/// A valid channel name. Cheap to clone (shared), compared and hashed as
/// its text, so maps keyed by it can be looked up with a `&str`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Channel(Arc<str>);

impl Channel {
    pub fn parse(name: &str) -> Result<Self, ChannelError> {
        check(name)?;
        Ok(Channel(Arc::from(name)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Channel {
    type Error = ChannelError;
    fn try_from(s: String) -> Result<Self, ChannelError> {
        check(&s)?;
        Ok(Channel(Arc::from(s)))
    }
}

impl std::str::FromStr for Channel {
    type Err = ChannelError;
    fn from_str(s: &str) -> Result<Self, ChannelError> {
        Channel::parse(s)
    }
}

impl<'de> serde::Deserialize<'de> for Channel {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Channel::try_from(s).map_err(serde::de::Error::custom)
    }
}

impl serde::Serialize for Channel {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl Borrow<str> for Channel {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for Channel {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::ops::Deref for Channel {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_ids_name_their_node_and_are_checked_where_they_come_in() {
        let id = ConnectionId::mint("web.1");
        assert_eq!(id.node(), "web.1", "the node is what is before the last dot");
        assert_eq!(ConnectionId::parse(id.as_str()), Some(id.clone()));
        for bad in ["", "abc", ".0123456789ab", "n.0123456789a", "n.0123456789AB", "n.0123456789abc"] {
            assert_eq!(ConnectionId::parse(bad), None, "{bad:?}");
        }
        // As it travels between nodes: a string, checked on the way in.
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(serde_json::from_str::<ConnectionId>(&json).unwrap(), id);
        assert!(serde_json::from_str::<ConnectionId>("\"not-an-id\"").is_err());
        // Maps keyed by it are looked up with its text.
        let map: std::collections::HashMap<ConnectionId, u8> = [(id.clone(), 1)].into();
        assert_eq!(map.get(id.as_str()), Some(&1));
    }

    #[test]
    fn names() {
        assert!(Channel::parse("user:42").is_ok());
        assert!(Channel::parse("a/b.c-d_e@f=g+h#i,j!k~l").is_ok());
        assert_eq!(Channel::parse(""), Err(ChannelError::Empty));
        assert_eq!(Channel::parse("has space"), Err(ChannelError::BadChar(' ')));
        assert!(Channel::parse("quote\"").is_err());
        assert_eq!(Channel::parse(&"x".repeat(256)), Err(ChannelError::TooLong(256)));
        let c: Channel = serde_json::from_str("\"room:1\"").unwrap();
        assert_eq!(c.as_str(), "room:1");
        assert!(serde_json::from_str::<Channel>("\"a b\"").is_err());
    }
}
