//! What the app asks of sessions anywhere in the cluster (subscribe,
//! unsubscribe, disconnect, call), as it travels between nodes.

use crate::channel::{Channel, ConnectionId};

/// An event sent to one client whose answer the app waits for.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Call {
    /// Unique; names the waiting API request on the node that made it.
    pub id: String,
    pub namespace: String,
    pub event: String,
    /// The event's arguments, a JSON array.
    pub args: String,
    /// Binary attachments, base64 (`args` holds their placeholders).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attachments: Option<Vec<String>>,
}

/// How a call ended.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CallAnswer {
    /// The client's acknowledgement arguments (a JSON array).
    Args(String),
    /// A binary acknowledgement: the arguments with placeholders, and the
    /// attachments, base64.
    Binary { args: String, attachments: Vec<String> },
    /// No such connection (any more).
    Gone,
    /// The connection's protocol cannot answer (wsrelay.v1).
    Unsupported,
    /// The answer to a [`Query`]: connection ids or channel names.
    Names(Vec<String>),
}

/// A question about the sessions of the cluster, answered by the nodes
/// that hold them (membership without presence: python-socketio's
/// `rooms(sid)` and `manager.rooms`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Query {
    /// The channels a connection is subscribed to (its node answers).
    Rooms(ConnectionId),
    /// The connections subscribed to a channel (every node answers).
    Members(Channel),
}

impl Query {
    /// The id under which `node` answers the query `id`: every node that
    /// answers has its own, so the asker can wait for each.
    pub fn answer_id(id: &str, node: &str) -> String {
        format!("{id}@{node}")
    }
}

/// A command for the sessions of a connection or user, on every node
/// (`/api/disconnect`, `/api/subscribe`, `/api/unsubscribe`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeCommand {
    Disconnect(Target),
    Subscribe {
        target: Target,
        channel: Channel,
    },
    Unsubscribe {
        target: Target,
        channel: Channel,
    },
    /// `/api/call`: the event for one connection.
    Call {
        target: Target,
        call: Call,
    },
    /// A membership question, for the nodes that hold the answer.
    Query {
        id: String,
        query: Query,
    },
    /// The answer to a call or query, for the node whose API request waits.
    Answer {
        call: String,
        answer: CallAnswer,
    },
}

/// Whose sessions a [`NodeCommand`] is for.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    Connection(ConnectionId),
    User(String),
    /// Every session subscribed to this channel (`/api/close_room`).
    Room(Channel),
}
