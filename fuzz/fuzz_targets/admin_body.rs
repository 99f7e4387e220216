//! Bodies of POST /api/publish and /api/disconnect: never a panic, and an
//! accepted publish holds valid channels and bounded data.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wsrelay::admin::{parse_disconnect, parse_publish};

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = parse_publish(data, 4096) {
        assert!(!p.channels.is_empty());
        assert!(p.data.get().len() <= 4096);
        assert!(wsrelay::protocol::check_depth(p.data.get()).is_ok());
    }
    let _ = parse_disconnect(data);
});
