//! The app's commands as the subscriber receives them: the control log
//! (disconnect, subscribe, unsubscribe, close_room), replayed after a gap,
//! and the live calls and membership queries with their answers.

use tracing::{debug, warn};

use super::subscriber::Subscriber;
use super::wire::*;
use crate::broker::BrokerError;
use crate::protocol::commands::{CallAnswer, NodeCommand, Query, Target};

impl Subscriber {
    /// Applies the logged commands after `applied` to the sessions older
    /// than each command, and moves `applied` past them.
    pub(super) async fn replay_commands(&self, applied: &mut StreamId) -> Result<(), BrokerError> {
        let read = async {
            let mut c = self.pool.get().await?;
            let start = format!("({applied}");
            let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
                .arg(&self.keys.control_log)
                .arg(start)
                .arg("+")
                .arg("COUNT")
                .arg(CONTROL_LOG_LEN)
                .query_async(&mut c)
                .await?;
            Ok::<_, BrokerError>(entries)
        };
        let entries = match tokio::time::timeout(self.timeout, read).await {
            Ok(r) => r?,
            Err(_) => return Err(BrokerError::Timeout(self.timeout)),
        };
        for (id, fields) in entries {
            let Some(id) = StreamId::parse(&id) else { continue };
            if let Some((_, payload)) = fields.iter().find(|(k, _)| k == "c") {
                self.apply(id, payload, applied, true);
            }
        }
        Ok(())
    }

    /// Applies one command once (by id). A replayed one spares the sessions
    /// that connected after it was issued.
    pub(super) fn apply(&self, id: StreamId, payload: &str, applied: &mut StreamId, replayed: bool) {
        if id <= *applied {
            return;
        }
        *applied = id;
        match decode_command(payload.as_bytes()) {
            Ok((t, op)) => {
                let n = self.events.command(&op, replayed.then_some(t));
                debug!(?op, sessions = n, replayed, "command applied");
            }
            Err(e) => warn!(error = %e, "ignoring a malformed command"),
        }
    }

    /// A call or its answer (`{prefix}calls`): live only, never logged nor
    /// replayed (a late one is useless: its caller timed out).
    pub(super) fn on_call(&self, payload: &[u8]) {
        let op = match decode_command(payload) {
            Ok((_, op @ (NodeCommand::Call { .. } | NodeCommand::Answer { .. }))) => op,
            Ok((_, NodeCommand::Query { id, query })) => {
                if let Some(answer) = self.events.query(&query) {
                    self.answer(Query::answer_id(&id, &self.node_id), answer);
                }
                return;
            }
            _ => return warn!("ignoring a malformed call"),
        };
        let n = self.events.command(&op, None);
        if let NodeCommand::Call { target: Target::Connection(id), call } = &op {
            let here = id.node() == self.node_id;
            if n == 0 && here {
                // Ours by its name, and gone: say so now rather than at the timeout.
                self.answer(call.id.clone(), CallAnswer::Gone);
            }
        }
    }

    /// Sends an answer to the node waiting for `call`, in the background.
    fn answer(&self, call: String, answer: CallAnswer) {
        let answer = NodeCommand::Answer { call, answer };
        let (pool, keys, timeout) = (self.pool.clone(), self.keys.clone(), self.timeout);
        self.tasks.spawn(async move {
            let _ = send_call(&pool, &keys, &answer, timeout).await;
        });
    }
}
