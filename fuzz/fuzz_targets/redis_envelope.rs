//! What a node reads from Redis (anything may publish there), through the
//! decoders the subscriber uses: message envelopes, control messages and
//! commands never panic, and a decoded message frames into valid JSON (for
//! both protocols) when its data is JSON.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wsrelay::broker::redis::{decode_command, decode_control, decode_message};
use wsrelay::protocol::socketio::SocketIo;
use wsrelay::protocol::wsrelay::WsrelayV1;

fuzz_target!(|data: &[u8]| {
    if let Some((_, cmd)) = decode_control(data) {
        let _ = decode_command(cmd.as_bytes());
    }
    let _ = decode_command(data);
    if let Ok(msg) = decode_message("room:1", data) {
        let frame = msg.encoded(&WsrelayV1);
        let _ = msg.encoded(&SocketIo);
        if serde_json::from_str::<serde_json::Value>(msg.data.as_str()).is_ok() {
            serde_json::from_str::<serde_json::Value>(frame.as_str()).expect("a frame around JSON is JSON");
        }
    }
});
