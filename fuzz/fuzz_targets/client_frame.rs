//! A client's wsrelay.v1 text frame: never a panic; every error has a
//! message, and whatever parses as a request round-trips its reply as JSON.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wsrelay::protocol::wsrelay::{parse_frame, reply_err, reply_ok};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let f = parse_frame(text);
    let reply = match &f.request {
        Ok(_) => reply_ok(f.id.as_deref(), None),
        Err(e) => {
            assert!(!e.message.is_empty());
            reply_err(f.id.as_deref(), e)
        }
    };
    // Every reply we would send is valid JSON.
    serde_json::from_str::<serde_json::Value>(reply.as_str()).expect("replies are JSON");
});
