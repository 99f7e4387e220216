//! A Socket.IO client's packet (an Engine.IO message, as the WebSocket or a
//! polling POST carries it): never a panic; errors have a message; event
//! arguments are a JSON array; our acknowledgements parse back.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wsrelay::protocol::socketio::{SioRequest, SocketIo, parse_packet};
use wsrelay::protocol::{Codec, Frame, Request};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let d = SocketIo.decode(Frame::Text(text));
    match &d.request {
        Ok(Request::Own(SioRequest::Emit { args, .. })) => {
            // Relayed as they are (raw JSON, never re-parsed on the way).
            serde_json::from_str::<Vec<&serde_json::value::RawValue>>(args.get()).expect("event arguments are an array");
        }
        Ok(Request::Own(SioRequest::Ack { args, .. })) => {
            serde_json::from_str::<serde_json::Value>(args.get()).expect("ack arguments are JSON");
        }
        Err(e) => assert!(!e.message.is_empty()),
        _ => {}
    }
    if let Some(id) = &d.id {
        let ack = SocketIo.reply_ok(Some(id), None).expect("an ack id gets an ack");
        let p = parse_packet(ack.as_str()).expect("our ACK parses");
        assert_eq!((p.kind, p.ack), (3, Some(id.ack)));
        if let Err(e) = &d.request {
            let err = SocketIo.reply_err(Some(id), e).expect("an error ack");
            parse_packet(err.as_str()).expect("our error ACK parses");
        }
    }
});
