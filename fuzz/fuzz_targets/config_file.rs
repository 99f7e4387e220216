//! A config file's text: refused with a message naming a key, or accepted;
//! never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wsrelay::config::{LoadError, from_toml_text};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match from_toml_text(text) {
        Ok(_) | Err(LoadError::Cli(_)) => {}
        Err(LoadError::Config(e)) => assert!(!e.key.is_empty()),
    }
});
