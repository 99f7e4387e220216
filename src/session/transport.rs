//! What a session reads client frames from and writes frames to. A plain
//! WebSocket for wsrelay.v1; for Socket.IO, an Engine.IO transport that is
//! HTTP long-polling until the client upgrades it to a WebSocket
//! (`crate::socketio`'s `Eio`). The session loop is written once against this.

use std::future::Future;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message as WsMessage};

use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio_tungstenite::WebSocketStream;

/// An upgraded client socket.
pub type Ws = WebSocketStream<TokioIo<Upgraded>>;

/// How long a close may take before the socket is dropped.
pub(crate) const CLOSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

pub(crate) trait Transport: Send + 'static {
    /// The client's next frame; None once it is gone. Cancel safe.
    fn recv(&mut self) -> impl Future<Output = Option<Result<WsMessage, WsError>>> + Send;
    /// Queues a frame (waits only when the write buffer is full).
    fn feed(&mut self, msg: WsMessage) -> impl Future<Output = Result<(), WsError>> + Send;
    /// Pushes what was fed to the client.
    fn flush(&mut self) -> impl Future<Output = Result<(), WsError>> + Send;
    /// Ends the session with `frame`'s code (if any), then lets the client
    /// answer before the socket goes, within [`CLOSE_TIMEOUT`].
    fn close(&mut self, frame: Option<CloseFrame>) -> impl Future<Output = ()> + Send;
}

impl Transport for Ws {
    async fn recv(&mut self) -> Option<Result<WsMessage, WsError>> {
        self.next().await
    }

    async fn feed(&mut self, msg: WsMessage) -> Result<(), WsError> {
        SinkExt::feed(self, msg).await
    }

    async fn flush(&mut self) -> Result<(), WsError> {
        SinkExt::flush(self).await
    }

    async fn close(&mut self, frame: Option<CloseFrame>) {
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, close_ws(self, frame)).await;
    }
}

/// Sends the close frame (if any), then lets the client answer: dropping a
/// socket with unread input resets it, and the client would never see the
/// close code.
pub(crate) async fn close_ws(ws: &mut Ws, frame: Option<CloseFrame>) {
    match frame {
        Some(frame) => {
            if Ws::close(ws, Some(frame)).await.is_err() {
                return;
            }
        }
        // The client's close was answered by tungstenite; push it out.
        None => {
            let _ = SinkExt::flush(ws).await;
        }
    }
    // Read the client's close reply, or (after a read error) drain raw
    // input, until the client hangs up.
    while let Some(Ok(_)) = ws.next().await {}
    let _ = ws.get_mut().shutdown().await;
    // On the heap: a 4 KiB array here would sit in every session's future.
    let mut sink = vec![0u8; 4096];
    while matches!(ws.get_mut().read(&mut sink).await, Ok(n) if n > 0) {}
}
